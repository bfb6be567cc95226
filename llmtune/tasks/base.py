"""The Task protocol: the only thing that differs between objectives. The trainer sees tasks only through it.

Lifecycle: training (`llmtune pretrain` / `finetune`, in `run.py`) and inference (`llmtune eval` /
`predict`, in `inference.py`) call a task's methods in this order, and nothing else sets its state:

1. `__init__(recipe, labelled)`: read the recipe (options, columns, seed); no model, no data yet.
2. `required_columns()`: the columns `data.load_raw` checks every split for.
3. `tokenizer_texts(train_split)`: only when the recipe trains a tokenizer: the texts it learns from.
4. `model_overrides(raw)`: training only, before the model is built (label maps from the training labels;
   inference reads them back from the saved config instead).
5. `setup(model, tokenizer)`: refuse what this model or tokenizer cannot serve; keep what the task needs.
6. `prepare(raw, tokenizer)`: raw rows -> model inputs per split (cached on disk).
7. `collator(tokenizer)`: how rows become a batch.
8. Training steps: `draw(batch, seed)` -> `count_items(batch)` -> `loss(model, batch, num_items)`.
9. Evaluation: `eval_batch(model, batch)` per batch, gathered across ranks into `EvalOutputs`, then
   `metrics(outputs)`; `predictions(outputs)` for per-example records and `scored_pairs(outputs)` for
   `evaluate` modules, where the registry entry says the task has them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llmtune.data import Required

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import Recipe


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

    name: str  # the registry entry's name
    auto_class: str  # the transformers auto class that builds and loads the model
    seed: int  # seeds evaluation randomness (masks, spans) per example
    labelled: bool  # False when predicting on data without labels

    def required_columns(self) -> list[Required]:
        """The columns every loaded split must have and what their cells hold (checked with one clear error)."""

    def tokenizer_texts(self, split: Dataset) -> Iterator[str]:
        """The texts a tokenizer trained for this task learns from (the text columns the task reads)."""

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """Config keys the model is built with (e.g. num_labels, id2label from the training labels)."""

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Refuse (`UserError`) settings this model or tokenizer cannot serve; keep what the task needs of them."""

    def prepare(self, raw: RawData, tokenizer: Any) -> Prepared:
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

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """One record per raw example of the prepared validation split (label, entities, answer, text)."""

    def scored_pairs(self, outputs: EvalOutputs) -> tuple[list[Any], list[Any]]:
        """(predictions, references) in the form `evaluate`'s metric modules take."""


class BaseTask:
    """What every task does the same way: reading the recipe, its columns, and the no-op defaults."""

    auto_class: str

    def __init__(self, recipe: Recipe, labelled: bool = True) -> None:
        self.recipe = recipe
        self.entry = recipe.entry
        self.name = self.entry.name
        self.data = recipe.data
        self.options: Any = recipe.options
        self.seed = recipe.train.seed
        self.labelled = labelled

    def required_columns(self) -> list[Required]:
        """The declared columns the data must have: label columns only with labels, optional ones if set."""
        columns = []
        for column in self.entry.columns:
            name = getattr(self.data, column.key)
            if name is None or (column.role == "labels" and not self.labelled):
                continue
            if column.role == "optional" and name == column.default:
                continue  # e.g. QA's id column: used when present
            columns.append(Required(f"data.{column.key}", name, column.cells))
        return columns

    def tokenizer_texts(self, split: Dataset) -> Iterator[str]:
        """Every text of the declared text columns (word lists joined, messages' contents, dotted fields)."""
        keys = [getattr(self.data, c.key) for c in self.entry.columns if c.text]
        names = [k for k in keys if k is not None and k.split(".")[0] in split.column_names]
        for rows in split.iter(batch_size=1000):
            for name in names:
                for value in column_values(rows, name):
                    yield from texts_in(value)

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """No config changes: the model is built as configured."""
        return {}

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None:
        """Default stacking (rows of one length)."""
        return None

    def draw(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """No per-draw randomness (dropout aside)."""
        return batch


def column_values(rows: dict[str, list[Any]], column: str) -> list[Any]:
    """A batch's values of `column`; a dotted name `a.b` reads field `b` of column `a` (None where absent)."""
    if column in rows or "." not in column:
        return rows[column]
    head, *fields = column.split(".")
    values = rows[head]
    for name in fields:
        values = [v.get(name) if isinstance(v, dict) else None for v in values]
    return values


def texts_in(value: Any) -> Iterator[str]:
    """The strings inside one cell: itself, a list of words (joined), or messages' contents."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            yield " ".join(value)
        else:
            for item in value:
                if isinstance(item, dict) and isinstance(item.get("content"), str):
                    yield item["content"]
