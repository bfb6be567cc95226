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
