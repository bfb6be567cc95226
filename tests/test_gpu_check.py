"""The GPU check's parts that can be checked without a GPU: the accelerate configs load with accelerate's own
config classes, the script refuses in one line without a GPU, and its resume check works on a CPU run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli, tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {
    "ddp.yaml": "MULTI_GPU",
    "multi-node-ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed-zero2.yaml": "DEEPSPEED",
    "deepspeed-zero3.yaml": "DEEPSPEED",
}


def load_gpu_check() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_load(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert str(config.distributed_type).rsplit(".", 1)[-1] == EXPECTED[name]
    assert config.mixed_precision == "no"  # the recipe's train.precision decides
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-6])
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def test_gpu_check_refuses_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run this on a machine with an "
        "NVIDIA GPU and a CUDA build of torch"
    ]


@pytest.mark.slow
def test_resume_check_finds_an_exact_resume(corpus: dict[str, Path], tmp_path: Path, one_thread_cli: Any) -> None:
    gpu_check = load_gpu_check()
    run_dir = tmp_path / "run"
    train = {"max_steps": 8, "save_every": 4, "log_every": 2, "eval_max_batches": 2}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, run_dir, train=train))
    done = run_cli("pretrain", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    command = [sys.executable, "-m", "llmtune", "pretrain", str(recipe)]
    check = gpu_check.resume_check(run_dir, command, 8, tmp_path, timeout=300)
    assert check["ok"] and check["max_relative_difference"] == 0.0, check
    # ... and it notices a resumed run that is not the same: a run whose later losses were tampered with.
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for r in records:
        if r["step"] == 8 and "train/loss" in r:
            r["train/loss"] *= 1.01
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    check = gpu_check.resume_check(run_dir, command, 8, tmp_path, timeout=300)
    assert not check["ok"] and check["max_relative_difference"] == pytest.approx(0.01 / 1.01, rel=1e-3)
