"""The evaluation loop every task shares: per-example sums, reduced per batch, gathered across ranks."""

from __future__ import annotations

from typing import Any

from llmtune.tasks.base import Task


def evaluate(
    accelerator: Any, model: Any, dataloader: Any, task: Task, max_batches: int | None = None
) -> dict[str, float]:
    """Run `task.eval_batch` over a prepared dataloader and return `task.metrics` of the summed values.

    Each batch is reduced to per-example values before gathering (no logits are kept), and
    `gather_for_metrics` drops the duplicates accelerate pads the last batch with, so every example
    counts once whatever the world size.
    """
    import torch

    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            with accelerator.autocast():
                values = task.eval_batch(model, batch)
            for key, value in accelerator.gather_for_metrics(values).items():
                total = value.double().sum()
                totals[key] = totals[key] + total if key in totals else total
    if was_training:
        model.train()
    return task.metrics({key: float(value) for key, value in totals.items()})
