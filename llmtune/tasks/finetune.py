"""What the fine-tuning tasks share: truncation length, tokenised-row caching, lengths, padding, losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmtune.batching import pad_collator
from llmtune.errors import UserError
from llmtune.modeling import context_length
from llmtune.tasks.base import Prepared
from llmtune.tasks.packing import cached_splits

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import DataSpec, Recipe

DEFAULT_MAX_LENGTH = 512
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")


def max_length(data: DataSpec, config: Any) -> int:
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


class FinetuneTask:
    """Base of the fine-tuning tasks: the parts every one of them does the same way."""

    name: str
    auto_class: str
    cache_version: str

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.data = recipe.data
        self.seed = recipe.train.seed
        self.labelled = True  # False for `llmtune predict` on data without labels
        self.max_length = DEFAULT_MAX_LENGTH
        self.validation_raw: Dataset | None = None  # the raw rows of the last prepared validation split

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """No config changes unless the task has labels to count."""
        return {}

    def setup(self, data: DataSpec, model: Any, tokenizer: Any) -> None:
        """Learn the truncation length from the model; subclasses also read their label maps here."""
        self.max_length = max_length(data, model.config)
        if tokenizer.pad_token_id is None:
            raise UserError("tokenizer: fine-tuning pads batches and needs a pad token (or an EOS to use as one)")

    def cache_key(self) -> list[Any]:
        """What, besides data and tokenizer, changes the tokenised rows."""
        return [self.cache_version, self.max_length, self.labelled, self.data.model_dump(mode="json")]

    def prepare_rows(
        self, raw: RawData, tokenizer: Any, encode: Callable[[str, Dataset], tuple[Dataset, dict[str, Any]]]
    ) -> Prepared:
        """Tokenised rows per split (cached), with their lengths for length-grouped batching."""
        splits, stats = cached_splits(self.cache_key(), raw, tokenizer, self.data, encode)
        self.validation_raw = raw.splits.get("validation")
        lengths = {role: row_lengths(ds) for role, ds in splits.items()}
        for role, values in lengths.items():
            stats[f"{role}_examples"] = len(values)
            stats[f"{role}_tokens"] = int(sum(values))
        return Prepared(splits, stats, lengths)

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Pad each batch to its longest row."""
        return pad_collator(tokenizer.pad_token_id)

    def draw(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """Fine-tuning has no per-draw randomness (dropout aside)."""
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Labelled targets in the batch: tokens whose label is not -100."""
        return (batch["labels"] != -100).sum()


def encode_split(
    ds: Dataset, fn: Callable[[dict[str, list[Any]], list[int]], dict[str, list[Any]]], num_proc: int | None
) -> Dataset:
    """`ds.map(fn, batched=True, with_indices=True)` keeping only the new columns, in memory.

    `fn(rows, indices)` gets each batch's row numbers in the raw split, to store as `index` (the key
    that maps outputs back to raw examples, whatever order evaluation runs in).
    """
    return ds.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=num_proc,
        keep_in_memory=True,
        desc="tokenising",
    )
