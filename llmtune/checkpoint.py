"""Checkpoints: written under a temporary name and renamed when complete; rotation keeps last N + best.

Model, optimizer and gradient-scaler state go through `accelerator.save_state` / `load_state`, which
know DDP, FSDP and DeepSpeed sharding. Next to them we keep what accelerate does not restore exactly
(see ENVIRONMENT.md): the scheduler, the position in the data, and every RNG state, which the trainer
re-applies *after* the data loader has skipped to the resume point.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary `.tmp-*` directories never match)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in a form `torch.load(weights_only=True)` reads back."""
    import torch

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator: Any,
    root: Path,
    step: int,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically on every rank, then drop all but the newest `keep_last`.

    The best model is kept apart (checkpoints/best), so rotation never removes it.
    """
    import torch

    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, path in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path, scheduler: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model/optimizer/scaler and scheduler; return (trainer state, this rank's RNG state to apply)."""
    import torch

    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True)
    return json.loads((path / "trainer_state.json").read_text()), rng


def promote_best(accelerator: Any, best: Path, final: Path) -> None:
    """Copy the best evaluated model (checkpoints/best, with its metrics) to final/, atomically."""
    from llmtune.atomic import atomic_dir

    if accelerator.is_main_process:
        with atomic_dir(final) as tmp:
            shutil.copytree(best, tmp, dirs_exist_ok=True)
    accelerator.wait_for_everyone()
