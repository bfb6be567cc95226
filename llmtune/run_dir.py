"""The run directory's layout, in one place: every module asks a `RunDir` for its paths.

    recipe.resolved.yaml   the recipe as run (defaults filled in, paths absolute)
    environment.json       versions, device, world size, parameter counts
    metrics.jsonl          one record per log step and per evaluation
    tokenizer/             the tokenizer the run trained or loaded (resume reuses it)
    checkpoints/step-N/    resumable checkpoints; checkpoints/best/ the best evaluated model
    final/                 the model to use (a Hugging Face directory) + llmtune_metrics.json
    final_metrics.json     the final metrics (written last: a run with it is complete)
    run_status.json        running / finished / interrupted / failed, steps, wall time over all sessions
    eval/                  what `llmtune eval RUN` wrote
    tracking/              trackers' files: tensorboard/, wandb/ (offline runs), mlflow.db + mlflow-artifacts/
    .lock                  held by the process writing the run (released by the OS when it dies)

A run with `final/` but no `final_metrics.json` was stopped after saving its model; `--resume` completes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmtune.errors import UserError

FINAL_METRICS = "llmtune_metrics.json"  # inside final/ and checkpoints/best/: {"step": N, "metrics": {...}}


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory."""

    root: Path

    @property
    def recipe(self) -> Path:
        """The resolved recipe; its presence marks a run directory."""
        return self.root / "recipe.resolved.yaml"

    @property
    def environment(self) -> Path:
        """Versions, device and parameter counts."""
        return self.root / "environment.json"

    @property
    def metrics(self) -> Path:
        """The training log, one JSON record per line."""
        return self.root / "metrics.jsonl"

    @property
    def final_metrics(self) -> Path:
        """The final metrics; written last."""
        return self.root / "final_metrics.json"

    @property
    def tokenizer(self) -> Path:
        """The run's tokenizer."""
        return self.root / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        """Resumable step checkpoints (and `best/`)."""
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        """The best evaluated model so far."""
        return self.checkpoints / "best"

    @property
    def final(self) -> Path:
        """The model to use."""
        return self.root / "final"

    @property
    def eval(self) -> Path:
        """Metrics `llmtune eval` wrote for this run."""
        return self.root / "eval"

    @property
    def export(self) -> Path:
        """`llmtune export`'s default output."""
        return self.root / "export"

    @property
    def tracking(self) -> str:
        """The trackers' folder name under the root (accelerate's `init_trackers` project name)."""
        return "tracking"

    @property
    def status(self) -> Path:
        """How the run's training sessions ended (`llmtune.run_status`)."""
        return self.root / "run_status.json"

    @property
    def lock_file(self) -> Path:
        """The lock a writing process holds."""
        return self.root / ".lock"

    def written(self) -> list[Path]:
        """Everything a run writes here (what `--overwrite` removes; nothing else in the folder is touched)."""
        return [
            self.recipe,
            self.environment,
            self.metrics,
            self.final_metrics,
            self.status,
            self.tokenizer,
            self.checkpoints,
            self.final,
            self.eval,
            self.root / self.tracking,
        ]

    def holds_run(self) -> bool:
        """Whether a run has written here."""
        return any(p.exists() for p in (self.recipe, self.checkpoints, self.final))

    def is_complete(self) -> bool:
        """A finished run: its model and its final metrics are both written."""
        return self.final.is_dir() and self.final_metrics.is_file()

    def clear(self) -> None:
        """Remove what an earlier run wrote (for --overwrite)."""
        for path in self.written():
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def holder(self) -> int | None:
        """The PID of the live process holding this run's lock, or None (no lock file, or nobody holds it)."""
        return lock_holder(self.lock_file)

    def refuse_if_in_use(self) -> None:
        """Refuse (one line) when another live process is writing this run."""
        pid = self.holder()
        if pid is None:
            return
        who = f"process {pid} (if it is a leftover: kill {pid})" if pid > 0 else "another process"
        raise UserError(
            f"output_dir {self.root} is in use by {who}, which is writing a run there; wait for it to end, "
            "or use another output_dir"
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock (an OS `flock`, released when this process exits, however it exits)."""
        with exclusive_lock(self.lock_file, self._refuse_held):
            yield

    def _refuse_held(self) -> None:
        self.refuse_if_in_use()
        raise UserError(f"output_dir {self.root} is in use by another process; use another output_dir")


def lock_holder(lock_file: Path) -> int | None:
    """The PID written in `lock_file` while a live process holds its `flock` (-1 when it wrote none), or None
    (no such file, or nobody holds it)."""
    if not lock_file.is_file():
        return None
    with lock_file.open("r") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            text = fh.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, refuse: Callable[[], None]) -> Iterator[None]:
    """Hold an OS `flock` on `lock_file` with this process's PID written in it (the OS releases it when the
    process exits, however it exits, so a lock is never stale). When another process holds it, `refuse()`
    raises the caller's one-line error."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        refuse()
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (harmless: only a held lock counts)


def run_dir_of(path: str | Path) -> RunDir | None:
    """The run directory at `path`, or None when `path` is not one (no resolved recipe)."""
    run = RunDir(Path(path))
    return run if run.recipe.is_file() else None
