"""What the pretraining tasks share: documents -> one token stream -> fixed-length pieces, cached on disk."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtune.atomic import atomic_dir, cache_root
from llmtune.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import DataSpec


def token_stream(ds: Dataset, tokenizer: Any, text_column: str, separator: int, num_proc: int | None) -> np.ndarray:
    """Every non-empty document's tokens (no special tokens), each followed by `separator`, as one array."""

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
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


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps([tokenizer.all_special_tokens, tokenizer.all_special_ids])
    return hashlib.sha256((body + specials).encode()).hexdigest()[:16]


def cached_splits(
    key: list[Any],
    raw: RawData,
    tokenizer: Any,
    data: DataSpec,
    build: Callable[[str, Dataset], tuple[Dataset, dict[str, Any]]],
) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """Model-ready splits from the cache, or built by `build(role, raw_split)` and saved atomically.

    The cache key covers the raw data's fingerprint, the tokenizer and everything in `key` (the task's
    version and settings), so any change that alters the result misses the cache.
    """
    from datasets import DatasetDict, load_from_disk

    digest = hashlib.sha256(
        json.dumps([*key, raw.fingerprint, tokenizer_fingerprint(tokenizer), sorted(raw.splits)], default=str).encode()
    ).hexdigest()[:16]
    where = cache_root(data.cache_dir) / "tokenized" / digest
    started = time.perf_counter()
    if (where / "stats.json").is_file():
        stats = json.loads((where / "stats.json").read_text())
        stats["cache"] = f"hit {where}"
    else:
        splits, stats = {}, {}
        for role, ds in raw.splits.items():
            splits[role], role_stats = build(role, ds)
            stats.update({f"{role}_{k}": v for k, v in role_stats.items()})
        with atomic_dir(where) as tmp:
            DatasetDict(splits).save_to_disk(str(tmp))
            (tmp / "stats.json").write_text(json.dumps(stats))
        stats["cache"] = f"miss, saved {where}"
    stats["prepare_seconds"] = round(time.perf_counter() - started, 3)
    return {k: v.with_format("torch") for k, v in load_from_disk(str(where)).items()}, stats


def require_tokens(role: str, have: int, need: int, what: str) -> None:
    """Refuse a split too small to give even one example."""
    if have < need:
        raise UserError(
            f"data: the {role} split has {have} tokens, fewer than one {what} ({need}); "
            "lower data.block_size or add data"
        )
