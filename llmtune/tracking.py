"""What a run reports: `metrics.jsonl` always, trackers (TensorBoard) through accelerate, a progress display."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from llmtune.atomic import write_text_atomic


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` and forwards it to accelerate's trackers."""

    def __init__(self, path: Path, accelerator: Any, enabled: bool) -> None:
        self.path, self.accelerator, self.enabled = path, accelerator, enabled

    def write(self, step: int, values: dict[str, Any]) -> None:
        """Record `values` at optimizer step `step`."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, int | float)}
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Progress:
    """A tqdm bar on a terminal; plain periodic lines (step, loss, lr, tokens/s, ETA) otherwise."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.started = time.perf_counter()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def step(self) -> None:
        """One optimizer step done (no host sync: only the bar's counter moves)."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None = None) -> None:
        """Show the values of a log step."""
        if not self.enabled:
            return
        if self.bar is not None:
            shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tokens_per_s:.0f}"}
            if mfu is not None:
                shown["mfu"] = f"{100 * mfu:.1f}%"
            self.bar.set_postfix(shown, refresh=False)
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done else 0.0
        print(
            f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:.0f} tok/s | "
            + (f"MFU {100 * mfu:.1f}% | " if mfu is not None else "")
            + f"eta {_duration(eta)}",
            flush=True,
        )

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()
