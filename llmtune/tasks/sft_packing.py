"""Packing for causal SFT (`instruction.pack`): several tokenised examples in one row, each on its own.

Each packed row concatenates whole examples up to the block length (`data.max_length`). `position_ids` restart
at 0 for each example, and the batch carries no `attention_mask`: transformers (masking_utils,
`find_packed_sequence_indices`) then reads the example boundaries from the positions and builds a
block-diagonal causal mask for sdpa and eager attention alike, so no token attends to another example. The
first token of every example is labelled -100, so nothing is trained to predict an example from the one
before it; unpacked, that position is never predicted either (the label shift drops a row's first token),
so packed and unpacked training count exactly the same targets.

Rows are placed by best-fit decreasing (longest first, each into the fullest row that still has room), once
per prepared split; the loader shuffles the packed rows each epoch.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtune.tasks.token_loss import IGNORE

if TYPE_CHECKING:
    from datasets import Dataset


def pack_examples(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `capacity` tokens (best-fit decreasing; each length
    must be at most `capacity`). Rows come out in the order they were opened; examples in a row longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # (room left, row number) of the rows that still have room, sorted: the best fit is the first with enough room.
    open_rows: list[tuple[int, int]] = []
    for index in order:
        size = lengths[index]
        at = bisect.bisect_left(open_rows, (size, -1))
        if at == len(open_rows):
            rows.append([index])
            room, row = capacity - size, len(rows) - 1
        else:
            room, row = open_rows.pop(at)
            rows[row].append(index)
            room -= size
        if room > 0:
            bisect.insort(open_rows, (room, row))
    return rows


def packed_split(ds: Dataset, capacity: int) -> Dataset:
    """A split of tokenised examples (`input_ids`, `labels`) as packed rows: `input_ids`, `labels` (the first
    token of each example -100) and `position_ids` (from 0 in each example)."""
    from datasets import Dataset

    table = ds.with_format(None).data
    ids_column = table.column("input_ids").combine_chunks()
    offsets = ids_column.offsets.to_numpy()
    ids = ids_column.flatten().to_numpy(zero_copy_only=False)
    labels = table.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False).copy()
    lengths = np.diff(offsets)
    labels[offsets[:-1][lengths > 0]] = IGNORE
    positions = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
    rows: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in pack_examples(lengths.tolist(), capacity):
        take = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in members])
        rows["input_ids"].append(ids[take])
        rows["labels"].append(labels[take])
        rows["position_ids"].append(positions[take])
    return Dataset.from_dict(rows).with_format("torch")
