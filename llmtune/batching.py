"""Batches for variable-length tasks: pad to the longest row of a batch, group rows of similar length."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Padding value per column; any other list column pads with 0. Labels pad with -100 (ignored by losses),
# question-answering character offsets with -100 (not context).
PAD_VALUES = {
    "attention_mask": 0,
    "token_type_ids": 0,
    "labels": -100,
    "decoder_attention_mask": 0,
    "offset_start": -100,
    "offset_end": -100,
    "word_starts": -100,  # token-classification: first sub-token of each word (negative: none)
    "word_labels": -100,  # token-classification: gold tag id of each word
}


def pad_collator(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A collate function padding every list column to the longest row in the batch (scalars stacked).

    Written here rather than `DataCollatorWithPadding`: `tokenizer.pad` goes through Python per row
    and also needs `labels` lists handled separately; this pads every column in one numpy pass.
    """
    import torch

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            first = values[0]
            if (isinstance(first, torch.Tensor) and first.ndim == 0) or not hasattr(first, "__len__"):
                batch[key] = torch.as_tensor(np.array([np.asarray(v) for v in values]))
                continue
            width = max(len(v) for v in values)
            fill = pad_token_id if key in ("input_ids", "decoder_input_ids") else PAD_VALUES.get(key, 0)
            dtype = np.float32 if np.asarray(first).dtype.kind == "f" else np.int64
            out = np.full((len(values), width), fill, dtype=dtype)
            for i, v in enumerate(values):
                out[i, : len(v)] = np.asarray(v)
            batch[key] = torch.from_numpy(out)
        return batch

    return collate


def length_grouped_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A shuffled order in which each run of `batch_size` rows has similar lengths.

    Rows are shuffled, cut into mega-batches of 50 batches, each sorted by length and cut into batches;
    then the batches themselves are shuffled, so the length of consecutive batches is random. This is
    transformers' `get_length_grouped_indices` plus the batch-level shuffle it lacks (its batches come
    longest-first within each mega-batch).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    sizes = np.asarray(lengths)
    mega = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-sizes[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    # A short batch (the tail of a mega-batch) anywhere but last would shift every later boundary.
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]
    full = [full[i] for i in rng.permutation(len(full))]
    return [int(i) for b in [*full, *short] for i in b]


class LengthGroupedSampler:
    """A sampler yielding `length_grouped_order`, reshuffled each epoch from (seed, epoch).

    accelerate calls `set_epoch` on it (through the prepared DataLoader), so the order is a pure
    function of the epoch and a resumed run sees the same batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch `epoch`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed * 1_000_003 + self.epoch))

    def __len__(self) -> int:
        return len(self.lengths)


def longest_first(lengths: list[int]) -> list[int]:
    """Evaluation order: rows sorted by length, longest first (metrics do not depend on the order)."""
    return [int(i) for i in np.argsort(-np.asarray(lengths), kind="stable")]


def token_budget_batches(lengths: list[int], max_tokens: int, seed: int, world_size: int = 1) -> list[list[int]]:
    """Batches of row indices whose padded size (rows x longest row) stays within `max_tokens`, in shuffled order.

    Rows are sorted by length (rows of equal length in an order drawn from `seed`) and cut greedily: a batch
    takes rows while (rows + 1) x the next length fits the budget. The number and shapes of the batches depend
    on the lengths alone, so every epoch has as many, which the schedule and exact resume rely on. While their
    number is not a multiple of `world_size`, the batch with the most rows is halved, so sharding them over
    the ranks (accelerate gives rank r the batches r, r + world, ...) covers every row exactly once. Then the
    batches are shuffled. Every row needs `lengths[i] <= max_tokens` (`token_budget_problem` says otherwise).
    """
    rng = np.random.default_rng(seed)
    sizes = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(sizes[order], kind="stable")]
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order.tolist():
        # Ascending lengths: the row being added is the batch's longest.
        if current and (len(current) + 1) * int(sizes[index]) > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    while len(batches) % world_size and any(len(b) > 1 for b in batches):
        widest = max(range(len(batches)), key=lambda i: len(batches[i]))
        rows = batches.pop(widest)
        batches[widest:widest] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return [batches[i] for i in rng.permutation(len(batches))]


def token_budget_problem(lengths: list[int], max_tokens: int) -> str | None:
    """Why `train.max_tokens` cannot batch these rows (a row longer than the budget), or None."""
    longest = max(lengths, default=0)
    if longest > max_tokens:
        return (
            f"train.max_tokens: {max_tokens} is smaller than the longest training example ({longest} tokens); "
            f"set train.max_tokens >= {longest} or lower data.max_length"
        )
    return None


class TokenBudgetBatchSampler:
    """A batch sampler yielding `token_budget_batches`, reshuffled each epoch from (seed, epoch).

    The same number of batches every epoch (a multiple of `world_size`). accelerate shards it over the ranks
    (`BatchSamplerShard`, one whole batch per rank in turn) and calls `set_epoch` on it, directly in one
    process, and through `.sampler` of the batch sampler it wraps in several: hence `sampler` is itself.
    """

    def __init__(self, lengths: list[int], max_tokens: int, seed: int, world_size: int = 1) -> None:
        self.lengths, self.max_tokens, self.seed, self.world_size, self.epoch = lengths, max_tokens, seed, world_size, 0
        self.count = len(token_budget_batches(lengths, max_tokens, seed, world_size))

    @property
    def sampler(self) -> TokenBudgetBatchSampler:
        """Itself: where accelerate looks for `set_epoch` on the batch sampler it wraps when sharding."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the batches of epoch `epoch`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        seed = self.seed * 1_000_003 + self.epoch
        return iter(token_budget_batches(self.lengths, self.max_tokens, seed, self.world_size))

    def __len__(self) -> int:
        return self.count
