"""`run_status.json`: how a run's training sessions ended, so `llmtune runs` can tell a finished run from an
interrupted or a failed one, and its wall time summed over every session (a resumed run has several).

    {"status": "running" | "finished" | "interrupted" | "failed", "step": 120, "total_steps": 250,
     "wall_seconds": 812.4, "sessions": 2, "started": "2026-12-06T02:40:00+00:00", "updated": "...",
     "error": "RuntimeError: ..."}      # only when failed

Written atomically by the main process: "running" when training starts, the outcome when it ends
(an exception is "failed", Ctrl-C / SIGTERM "interrupted"). A process killed outright (kill -9, a lost node)
leaves "running" with nobody holding the run's lock: readers take that as interrupted. A leaf module: only
the standard library.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmtune.atomic import write_text_atomic

STATUS_FILE = "run_status.json"
STATUSES = ("running", "finished", "interrupted", "failed")


def read_status(root: Path) -> dict[str, Any] | None:
    """The run's status record, or None when it has none (a run from before it existed) or it is unreadable."""
    path = Path(root) / STATUS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") in STATUSES else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusRecord:
    """The status of one training session, added to what earlier sessions of the same run recorded."""

    def __init__(self, root: Path, enabled: bool, resumed: bool, began: float | None = None) -> None:
        """`began`: this session's start on the `time.perf_counter` clock (default now)."""
        self.path, self.enabled = Path(root) / STATUS_FILE, enabled
        earlier = read_status(Path(root)) if resumed else None
        self.earlier_seconds = float(earlier.get("wall_seconds", 0.0)) if earlier else 0.0
        self.record: dict[str, Any] = {
            "status": "running",
            "step": earlier.get("step", 0) if earlier else 0,
            "total_steps": None,
            "wall_seconds": self.earlier_seconds,
            "sessions": (int(earlier.get("sessions", 0)) if earlier else 0) + 1,
            "started": earlier.get("started", _now()) if earlier else _now(),
        }
        self.began = time.perf_counter() if began is None else began

    def wall_seconds(self) -> float:
        """Seconds spent on this run so far, over all its sessions."""
        return self.earlier_seconds + time.perf_counter() - self.began

    def write(self, status: str, step: int | None = None, total_steps: int | None = None, error: str = "") -> None:
        """Record `status` (and where training stands) atomically."""
        if not self.enabled:
            return
        self.record.update(status=status, wall_seconds=round(self.wall_seconds(), 2), updated=_now())
        if step is not None:
            self.record["step"] = step
        if total_steps is not None:
            self.record["total_steps"] = total_steps
        if error:
            self.record["error"] = error
        else:
            self.record.pop("error", None)
        write_text_atomic(self.path, json.dumps(self.record, indent=1))

    @contextlib.contextmanager
    def recorded(self, total_steps: int | None = None) -> Iterator[StatusRecord]:
        """Record "running" now, then "failed" (with the error) if the block raises, "interrupted" if it is
        stopped (Ctrl-C, a signal turned into SystemExit); the block records its own normal end."""
        self.write("running", total_steps=total_steps)
        try:
            yield self
        except (KeyboardInterrupt, SystemExit):
            self.write("interrupted")
            raise
        except Exception as exc:
            self.write("failed", error=" ".join(f"{type(exc).__name__}: {exc}".split())[:500])
            raise
