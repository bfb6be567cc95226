"""The Task protocol: the only thing that differs between objectives. The trainer sees tasks only through it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import DataSpec


@dataclass
class Prepared:
    """Model-ready splits plus the facts the run log states about them.

    `lengths` (split -> tokens per row) marks variable-length splits: the trainer then batches rows of
    similar length together (`train.group_by_length`) and the collator pads to the longest in a batch.
    """

    splits: dict[str, Dataset]
    stats: dict[str, Any] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=dict)


class EvalOutputs:
    """What `eval_batch` returned for every example of a split, gathered across ranks, on the CPU.

    Each key holds a list of per-batch tensors whose first dimension is the examples of the batch;
    rows of 2-d values are padded with -100 to the longest in the batch.
    """

    def __init__(self) -> None:
        self.batches: dict[str, list[torch.Tensor]] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Append one batch of gathered values."""
        for key, value in values.items():
            self.batches.setdefault(key, []).append(value.detach().cpu())

    def sum(self, key: str) -> float:
        """The total of a per-example value over the split (0 when no batch was seen)."""
        return float(sum(float(b.double().sum()) for b in self.batches.get(key, [])))

    def flat(self, key: str) -> list[Any]:
        """One Python value per example (a scalar, or a list for 2-d values, padding kept)."""
        return [row for batch in self.batches.get(key, []) for row in batch.tolist()]

    def __len__(self) -> int:
        first = next(iter(self.batches.values()), [])
        return sum(len(b) for b in first)


class Task(Protocol):
    """One objective or downstream problem: model class, preprocessing, loss and metrics."""

    name: str
    auto_class: str  # the transformers auto class that builds and loads the model
    metric_names: tuple[str, ...]  # what `metrics` returns: the names expect:/best_metric may use
    seed: int  # seeds evaluation randomness (masks, spans) per example

    def required_columns(self, data: DataSpec) -> dict[str, str]:
        """Recipe key -> column that every loaded split must have (checked with one clear error)."""

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """Config keys the model is built with (e.g. num_labels, id2label from the training labels)."""

    def setup(self, data: DataSpec, model: Any, tokenizer: Any) -> None:
        """Refuse (`UserError`) settings this model or tokenizer cannot serve; keep what the task needs of them."""

    def prepare(self, raw: RawData, tokenizer: Any, data: DataSpec) -> Prepared:
        """Raw rows -> model inputs for each split (cached across runs)."""

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None:
        """The batch collate function, or None for the default tensor stacking."""

    def draw(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """A training batch as the model sees it this time it is drawn (e.g. fresh dynamic masks).

        `seed` is a pure function of (recipe seed, rank, step, micro-batch), so a resumed run draws
        exactly what an uninterrupted one would.
        """

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many targets the loss of this batch counts (a 0-d tensor; no host sync)."""

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """The batch's summed loss divided by `num_items` (the count over the whole accumulated step)."""

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example values (first dimension = examples) reduced on the device (sums, argmax ids, span
        scores, generated ids; never whole logits), to be gathered across ranks."""

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Final metrics (named `eval/...`) from the values `eval_batch` gave for the whole split."""


class PredictingTask(Task, Protocol):
    """A downstream task, which also turns evaluation outputs into per-example predictions."""

    labelled: bool  # False when predicting on data without labels

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """One record per raw example of the last prepared validation split (label, entities, answer, text)."""
