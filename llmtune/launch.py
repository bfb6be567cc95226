"""How llmtune was launched (`accelerate launch`, torchrun or plain), and what it does about it.

- A worker rank whose launcher dies must not train on alone: torchrun gives workers sessions of their
  own, so a kill -9 of the launcher leaves them running (and writing the run directory). Each worker asks
  the kernel for SIGTERM when its parent dies (`PR_SET_PDEATHSIG`); the trainer turns SIGTERM into a
  checkpoint and a clean stop on every rank at the same step.
- FSDP or DeepSpeed asked for (through `accelerate launch`'s flags or config) where accelerate cannot
  provide it (no GPU): one warning line saying what runs instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

_PR_SET_PDEATHSIG = 1
_LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")  # set by torchrun and accelerate launch


def launched_as_worker() -> bool:
    """Whether this process is a rank started by a launcher (torchrun / accelerate launch)."""
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


def stop_with_launcher() -> bool:
    """On Linux, have the kernel send this worker SIGTERM when its launcher dies. Returns whether it was set."""
    return launched_as_worker() and die_with_parent()


def die_with_parent() -> bool:
    """On Linux, ask the kernel for SIGTERM when this process's parent dies (kill -9 included); the trainer turns
    it into a checkpoint and a clean stop. Also the `preexec_fn` of `llmtune sweep`'s trial processes.
    Returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


@contextlib.contextmanager
def signals_caught(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` inside the block (a flag to stop cleanly at the next safe point instead of
    dying mid-write); the previous handlers come back after it."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


_RUNS_INSTEAD = {
    "NO": "in one process without sharding",
    "MULTI_CPU": "plain data parallelism (DDP over gloo), without sharding",
    "MULTI_GPU": "plain DDP, without sharding",
}


def _asked(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def sharding_warning(distributed_type: Any) -> str | None:
    """A warning when FSDP / DeepSpeed were asked for but the accelerator runs something else."""
    got = str(distributed_type).rsplit(".", 1)[-1]
    for variable, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if _asked(variable) and got != wanted:
            instead = _RUNS_INSTEAD.get(got, f"{got} (no sharding)")
            return (
                f"warning: {wanted} was asked for, but accelerate cannot provide it here (it needs GPUs): "
                f"training runs {instead} instead"
            )
    return None
