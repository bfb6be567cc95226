"""What the fine-tuning tasks share: truncation length, tokenised-row caching, lengths, padding, label maps
and the checks every one of them makes the same way."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtune.batching import pad_collator
from llmtune.errors import UserError
from llmtune.modeling import context_length
from llmtune.tasks.base import BaseTask, Prepared
from llmtune.tasks.cache import cached_splits

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import Recipe

DEFAULT_MAX_LENGTH = 512
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")


def max_length(data: Any, config: Any) -> int:
    """data.max_length, or 512 capped by the model's context; refuse a length over the context."""
    limit = context_length(config)
    if data.max_length is not None:
        if limit is not None and data.max_length > limit:
            raise UserError(
                f"data.max_length: {data.max_length} is longer than the model's context ({limit}); "
                f"set data.max_length <= {limit}"
            )
        return data.max_length
    return min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)


def row_lengths(ds: Dataset, column: str = "input_ids") -> list[int]:
    """Tokens per row of a list column, read from arrow without materialising the rows."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.data.column(column).combine_chunks()).to_numpy(zero_copy_only=False).tolist()


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's tensors that the model's forward takes (no labels, indices or bookkeeping)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def unwrap(model: Any) -> Any:
    """The model inside a DDP / compile wrapper (for `generate` and config access)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def require_fast_tokenizer(tokenizer: Any, task: str, why: str) -> None:
    """Refuse a slow (Python) tokenizer where the task needs what only the Rust ones give."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"tokenizer: {task} {why}, which needs a fast tokenizer; {type(tokenizer).__name__} is a slow one: "
            "use a model directory with a tokenizer.json (or set tokenizer.pretrained to one)"
        )


@dataclass
class LabelMap:
    """The label <-> id map a classifier was built with, read back from its config (`label2id`/`id2label`)."""

    label2id: dict[str, int]
    id2label: dict[int, str]
    num_labels: int

    @classmethod
    def from_config(cls, config: Any) -> LabelMap:
        """The map the model's config holds."""
        return cls(
            {str(k): int(v) for k, v in (config.label2id or {}).items()},
            {int(k): str(v) for k, v in (config.id2label or {}).items()},
            int(config.num_labels),
        )

    def id_of(
        self, value: Any, key: str, role: str, row: int, names: list[str] | None = None, noun: str = "label"
    ) -> int:
        """The id of one label of the data; an unknown label is a `UserError` naming it, its row and the map.

        `names` are a hub dataset's ClassLabel names (its labels are stored as their indices).
        """
        if names is not None and isinstance(value, int) and 0 <= value < len(names):
            value = names[value]
        if str(value) in self.label2id:
            return self.label2id[str(value)]
        if isinstance(value, int) and not isinstance(value, bool) and names is None and 0 <= value < self.num_labels:
            return value  # ids given as the model's own (e.g. a hub checkpoint whose map says LABEL_0, LABEL_1)
        raise UserError(
            f"{key}: {noun} {value!r} ({role} split, row {row}) is not in the model's label map "
            f"({', '.join(self.label2id)}); evaluate on data with the {noun}s the model was trained on"
        )


class FinetuneTask(BaseTask):
    """Base of the fine-tuning tasks: tokenised rows per example, cached, padded per batch.

    A subclass encodes one batch of raw rows (`encode`) and may add what it counted (`split_stats`) and
    what else changes its rows (`cache_key`).
    """

    cache_version: str

    def __init__(self, recipe: Recipe, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.max_length = DEFAULT_MAX_LENGTH
        self.tokenizer: Any = None
        self.validation_raw: Dataset | None = None  # the raw rows of the last prepared validation split

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Learn the truncation length from the model; keep the tokenizer, which must pad."""
        self.max_length = max_length(self.data, model.config)
        if tokenizer.pad_token_id is None:
            raise UserError("tokenizer: fine-tuning pads batches and needs a pad token (or an EOS to use as one)")
        self.tokenizer = tokenizer

    def cache_key(self) -> list[Any]:
        """What, besides data and tokenizer, changes the tokenised rows."""
        return [self.cache_version, self.max_length, self.labelled, self.data.model_dump(mode="json")]

    def encode(self, rows: dict[str, list[Any]], indices: list[int], role: str) -> dict[str, list[Any]]:
        """One batch of raw rows -> model rows; `indices` are their row numbers in the raw split (kept as
        `index`, the key that maps outputs back to raw examples whatever order evaluation runs in)."""
        raise NotImplementedError

    def split_stats(self, role: str, raw: Dataset, encoded: Dataset) -> dict[str, Any]:
        """What the run log says about one encoded split besides its examples and tokens."""
        return {}

    def build_split(self, role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
        """One raw split, encoded batch by batch, with its stats."""
        encoded = ds.map(
            functools.partial(self.encode, role=role),
            batched=True,
            with_indices=True,
            remove_columns=ds.column_names,
            num_proc=self.data.num_proc,
            keep_in_memory=True,
            desc="tokenising",
        )
        return encoded, self.split_stats(role, ds, encoded)

    def prepare(self, raw: RawData, tokenizer: Any) -> Prepared:
        """Tokenised rows per split (cached), with their lengths for length-grouped batching."""
        self.tokenizer = tokenizer
        splits, stats = cached_splits(self.cache_key(), raw, tokenizer, self.data.cache_dir, self.build_split)
        self.validation_raw = raw.splits.get("validation")
        lengths = {role: row_lengths(ds) for role, ds in splits.items()}
        for role, values in lengths.items():
            stats[f"{role}_examples"] = len(values)
            stats[f"{role}_tokens"] = int(sum(values))
        return Prepared(splits, stats, lengths)

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Pad each batch to its longest row."""
        return pad_collator(tokenizer.pad_token_id)

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Labelled targets in the batch: tokens whose label is not -100."""
        return (batch["labels"] != -100).sum()

    def predictions(self, outputs: Any) -> list[dict[str, Any]]:
        """Per-example records; every fine-tuning task defines them."""
        raise NotImplementedError

    def predict_rows(self, model: Any, rows: Dataset) -> list[dict[str, Any]]:
        """`predictions` for raw rows held in memory, in one batch (what `llmtune serve` runs per batch): the same
        encoding, model call and post-processing as `llmtune predict`, without the cache and the loader."""
        import torch

        from llmtune.tasks.base import EvalOutputs

        self.validation_raw = rows
        encoded = self.encode(rows[:], list(range(len(rows))), "validation")
        examples = [dict(zip(encoded, values, strict=True)) for values in zip(*encoded.values(), strict=True)]
        outputs = EvalOutputs()
        if examples:
            with torch.no_grad():
                outputs.add(self.eval_batch(model, self.collator(self.tokenizer)(examples)))
        return self.predictions(outputs)

    def scored_pairs(self, outputs: Any) -> tuple[list[Any], list[Any]]:
        """(predictions, references) for `evaluate` modules, where the registry entry says the task has them."""
        raise NotImplementedError
