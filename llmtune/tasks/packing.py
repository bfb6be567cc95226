"""What the pretraining objectives share: documents -> one token stream -> fixed-length pieces, cached on disk."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from llmtune.data import Required
from llmtune.errors import UserError
from llmtune.modeling import context_length
from llmtune.tasks.base import BaseTask, Prepared
from llmtune.tasks.cache import cached_splits

if TYPE_CHECKING:
    from datasets import Dataset

    from llmtune.data import RawData


def token_stream(ds: Dataset, tokenizer: Any, text_column: str, separator: int, num_proc: int | None) -> np.ndarray:
    """Every non-blank document's tokens (no special tokens), each followed by `separator`, as one array.

    Blank and null documents are left out (`data.load_raw` counts them for the run log).
    """

    def encode(batch: dict[str, list[str | None]]) -> dict[str, list[list[int]]]:
        texts = [t for t in batch[text_column] if t is not None and t.strip()]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        return {"input_ids": [[*row, separator] for row in ids if row]}

    tokenized = ds.map(
        encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc, keep_in_memory=True, desc="tokenising"
    )
    if len(tokenized) == 0:
        return np.zeros(0, dtype=np.int64)
    column = tokenized.data.column("input_ids").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)


def pack_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a token stream into consecutive full blocks, shape (n, block_size); the short tail is dropped."""
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size)


def blocks_dataset(blocks: np.ndarray, **columns: np.ndarray) -> Dataset:
    """A dataset of fixed-length rows, built straight from arrays (no Python lists)."""
    import pyarrow as pa
    from datasets import Dataset

    def fixed(array: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])

    table = {"input_ids": fixed(blocks)}
    for name, array in columns.items():
        table[name] = fixed(array) if array.ndim == 2 else pa.array(array)
    return Dataset(pa.table(table))


def require_tokens(role: str, have: int, need: int, what: str) -> None:
    """Refuse a split too small to give even one example."""
    if have < need:
        raise UserError(
            f"data: the {role} split has {have} tokens, fewer than one {what} ({need}); "
            "lower data.block_size or add data"
        )


class PackedTextTask(BaseTask):
    """Base of the pretraining objectives: one text column, packed into pieces of `data.block_size`.

    A subclass says how a split's token stream becomes rows (`build_split`) and what else changes them
    (`cache_key`); the caching, the separator stream and the context check are here.
    """

    cache_version: str

    def __init__(self, recipe: Any, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.tokenizer: Any = None

    def required_columns(self) -> list[Required]:
        """The text column; blank and null documents are skipped (and counted), not errors."""
        return [Required("data.text_column", self.data.text_column, "text", "skip")]

    def check_block_size(self, model: Any) -> None:
        """Refuse a block size longer than the model's context."""
        limit = context_length(model.config)
        if limit is not None and self.data.block_size > limit:
            raise UserError(
                f"data.block_size: {self.data.block_size} is longer than the model's context ({limit}); "
                f"set data.block_size <= {limit}"
            )

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Keep the tokenizer; refuse a block longer than the context."""
        self.check_block_size(model)
        self.tokenizer = tokenizer

    def cache_key(self) -> list[Any]:
        """What, besides data and tokenizer, changes the prepared rows."""
        return [self.cache_version, self.data.text_column, self.data.block_size]

    def stream(self, ds: Dataset, separator: int) -> np.ndarray:
        """The split's documents as one token stream, `separator` after each."""
        return token_stream(ds, self.tokenizer, self.data.text_column, separator, self.data.num_proc)

    def build_split(self, role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
        """One raw split -> model rows and the facts the run log states about them."""
        raise NotImplementedError

    def prepare(self, raw: RawData, tokenizer: Any) -> Prepared:
        """The model rows of every split, from the cache when it has them."""
        self.tokenizer = tokenizer
        splits, stats = cached_splits(self.cache_key(), raw, tokenizer, self.data.cache_dir, self.build_split)
        return Prepared(splits, stats)
