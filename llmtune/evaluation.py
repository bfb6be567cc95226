"""The evaluation loop every task shares: per-example values, reduced per batch, gathered across ranks,
then scored by the task's metrics and the recipe's `evaluate` modules."""

from __future__ import annotations

from typing import Any

from llmtune.metrics import module_metrics
from llmtune.tasks.base import EvalOutputs, Task


def collect(accelerator: Any, model: Any, dataloader: Any, task: Task, max_batches: int | None = None) -> EvalOutputs:
    """Run `task.eval_batch` over a prepared dataloader and gather its values from every rank.

    Each batch is reduced to per-example values on the device before gathering (no logits are kept);
    2-d values are padded across ranks to one width, and `gather_for_metrics` drops the duplicates
    accelerate pads the last batch with, so every example counts once whatever the world size.
    """
    import torch

    was_training = model.training
    model.eval()
    outputs = EvalOutputs()
    with torch.no_grad():
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            with accelerator.autocast():
                values = task.eval_batch(model, batch)
            if accelerator.num_processes > 1:
                values = {
                    k: accelerator.pad_across_processes(v, dim=1, pad_index=-100) if v.ndim > 1 else v
                    for k, v in values.items()
                }
            outputs.add(accelerator.gather_for_metrics(values))
    if was_training:
        model.train()
    return outputs


def score(task: Task, outputs: EvalOutputs, modules: list[tuple[str, Any, dict[str, Any]]]) -> dict[str, float]:
    """The task's metrics over the gathered outputs, then each `evaluate` module's on its scored pairs."""
    metrics = task.metrics(outputs)
    if modules:
        metrics.update(module_metrics(modules, *task.scored_pairs(outputs)))
    return metrics


def evaluate(
    accelerator: Any,
    model: Any,
    dataloader: Any,
    task: Task,
    max_batches: int | None = None,
    modules: list[tuple[str, Any, dict[str, Any]]] | None = None,
) -> dict[str, float]:
    """The metrics over a prepared dataloader (see `collect` and `score`)."""
    return score(task, collect(accelerator, model, dataloader, task, max_batches), modules or [])
