"""The tokenised-data cache every task prepares through: built once per (data, tokenizer, settings), atomically."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmtune.atomic import atomic_dir, cache_root

if TYPE_CHECKING:
    from datasets import Dataset

    from llmtune.data import RawData


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
    cache_dir: str | None,
    build: Callable[[str, Dataset], tuple[Dataset, dict[str, Any]]],
) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """Model-ready splits from the cache, or built by `build(role, raw_split)` and saved atomically.

    The cache key covers the raw data's fingerprint, the tokenizer and everything in `key` (the task's
    version and settings), so any change that alters the result misses the cache. The stats `build`
    returns (and those of loading, `raw.stats`) are kept with the splits.
    """
    from datasets import DatasetDict, load_from_disk

    digest = hashlib.sha256(
        json.dumps([*key, raw.fingerprint, tokenizer_fingerprint(tokenizer), sorted(raw.splits)], default=str).encode()
    ).hexdigest()[:16]
    where = cache_root(cache_dir) / "tokenized" / digest
    started = time.perf_counter()
    if (where / "stats.json").is_file():
        stats = json.loads((where / "stats.json").read_text())
        stats["cache"] = f"hit {where}"
    else:
        splits, stats = {}, dict(raw.stats)
        for role, ds in raw.splits.items():
            splits[role], role_stats = build(role, ds)
            stats.update({f"{role}_{k}": v for k, v in role_stats.items()})
        with atomic_dir(where) as tmp:
            DatasetDict(splits).save_to_disk(str(tmp))
            (tmp / "stats.json").write_text(json.dumps(stats))
        stats["cache"] = f"miss, saved {where}"
    stats["prepare_seconds"] = round(time.perf_counter() - started, 3)
    return {k: v.with_format("torch") for k, v in load_from_disk(str(where)).items()}, stats
