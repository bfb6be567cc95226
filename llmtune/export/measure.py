"""What an export report measures, the same way for the source model and its export, in one process:
the task's metrics, CPU latency at batch 1 (median) and throughput at batch 32, size on disk, parameters."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".bin")


@dataclass
class Measured:
    """One model's row of the report."""

    name: str
    runtime: str  # pytorch | onnxruntime
    size_mib: float
    parameters: int
    latency_ms_p50: float  # batch 1
    throughput: float  # examples per second at the throughput batch size
    metrics: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def weights_size_mib(directory: Path) -> float:
    """Size on disk of a model directory's weight files, in MiB."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.suffix in WEIGHT_SUFFIXES) / 2**20


def speed(
    model: Any, task: Any, rows: Any, collate: Any, batch_size: int, max_batches: int = 20
) -> tuple[float, float]:
    """(median ms per single example, examples/s at `batch_size`) of `task.eval_batch` on the first rows.

    Both start with an untimed warm-up call; the inputs are already tokenised, so only the model (and the
    task's per-batch reduction, the same for every runtime) is timed.
    """
    import torch

    n = len(rows)
    single = [collate([rows[i]]) for i in range(min(n, 50))]
    batches = [collate([rows[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]
    batches = batches[:max_batches]
    with torch.no_grad():
        task.eval_batch(model, single[0])
        times = []
        for batch in single:
            started = time.perf_counter()
            task.eval_batch(model, batch)
            times.append(time.perf_counter() - started)
        task.eval_batch(model, batches[0])
        started = time.perf_counter()
        for batch in batches:
            task.eval_batch(model, batch)
        elapsed = time.perf_counter() - started
    examples = sum(len(b["input_ids"]) for b in batches)
    return 1000 * statistics.median(times), examples / max(elapsed, 1e-9)


def format_report(rows: list[Measured], batch_size: int) -> str:
    """The comparison as a plain-text table: one row per model, then each metric before and after."""
    metrics = list(dict.fromkeys(k for row in rows for k in row.metrics))
    header = ["model", "runtime", "size MiB", "parameters", "p50 ms (batch 1)", f"ex/s (batch {batch_size})"]
    table = [header + metrics]
    for row in rows:
        cells = [row.name, row.runtime, f"{row.size_mib:.1f}", f"{row.parameters:,}"]
        cells += [f"{row.latency_ms_p50:.2f}", f"{row.throughput:.1f}"]
        cells += [f"{row.metrics[m]:.4f}" if m in row.metrics else "-" for m in metrics]
        table.append(cells)
    if len(rows) == 2:
        source, export = rows
        ratio = ["export / source", "", f"{export.size_mib / max(source.size_mib, 1e-9):.2f}x", ""]
        ratio += [f"{export.latency_ms_p50 / max(source.latency_ms_p50, 1e-9):.2f}x"]
        ratio += [f"{export.throughput / max(source.throughput, 1e-9):.2f}x"]
        ratio += [f"{export.metrics.get(m, float('nan')) - source.metrics.get(m, float('nan')):+.4f}" for m in metrics]
        table.append(ratio)
    widths = [max(len(r[i]) for r in table) for i in range(len(header) + len(metrics))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)
