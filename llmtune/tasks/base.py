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
    """Model-ready splits plus the facts the run log states about them."""

    splits: dict[str, Dataset]
    stats: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """One objective or downstream problem: model class, preprocessing, loss and metrics."""

    name: str
    auto_class: str  # the transformers auto class that builds and loads the model
    metric_names: tuple[str, ...]  # what `metrics` returns: the names expect:/best_metric may use
    seed: int  # seeds evaluation randomness (masks, spans) per example

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
        """Per-example sums (1-d tensors, one value per example) that can be gathered across ranks."""

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Final metrics (named `eval/...`) from the per-example sums added over the split."""
