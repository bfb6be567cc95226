"""causal-lm data: packing into blocks, sliding evaluation windows, and the tokenised-data cache."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmtune.data import RawData
from llmtune.tasks.causal_lm import IGNORE, CausalLM, pack_blocks, sliding_windows
from tests.helpers import make_task

DOCS = [
    "The small parser returns a sorted list.",
    "",
    "A frozen token holds the nested thread; the lazy socket splits it.",
    "Short.",
    "",
    "The encoded string joins a shared frame, and the local module builds a mutable class.",
    "Every function reads a small token.",
]
VALID = ["The nested module raises an empty frame.", "", "A shared socket writes the sorted string."]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmtune.tokenizer_training import train_byte_level_bpe

    return train_byte_level_bpe(DOCS * 4 + VALID * 4, vocab_size=300, min_frequency=1)


def raw_data(train: list[str] = DOCS, valid: list[str] = VALID, fingerprint: str = "x") -> RawData:
    from datasets import Dataset

    return RawData(
        splits={"train": Dataset.from_dict({"text": train}), "validation": Dataset.from_dict({"text": valid})},
        fingerprint=fingerprint,
    )


def lm(cache: Path, block_size: int, eval_stride: int | None = None) -> CausalLM:
    """A causal-lm task with these data settings."""
    return make_task("causal-lm", data={"block_size": block_size, "eval_stride": eval_stride, "cache_dir": str(cache)})


def expected_stream(tokenizer: Any, docs: list[str]) -> list[int]:
    """doc1 ids + EOS + doc2 ids + EOS + ..., empty documents contributing nothing."""
    out: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if ids:
            out += [*ids, tokenizer.eos_token_id]
    return out


def column(ds: Any, name: str) -> Any:
    """A whole column of a torch-formatted dataset as one tensor."""
    return ds[:][name]


def scored_positions(labels: np.ndarray, stride: int) -> list[int]:
    """Stream index of every label the loss scores (the label shift drops each window's position 0)."""
    found = []
    for row in range(labels.shape[0]):
        for pos in range(1, labels.shape[1]):
            if labels[row, pos] != IGNORE:
                found.append(row * stride + pos)
    return found


# --- pack_blocks --------------------------------------------------------------------------------


def test_pack_blocks_keeps_order_and_drops_short_tail() -> None:
    stream = np.arange(23, dtype=np.int64)
    blocks = pack_blocks(stream, 5)
    assert blocks.shape == (4, 5)
    np.testing.assert_array_equal(blocks.reshape(-1), stream[:20])


def test_pack_blocks_exact_multiple_keeps_everything() -> None:
    stream = np.arange(12, dtype=np.int64)
    np.testing.assert_array_equal(pack_blocks(stream, 4).reshape(-1), stream)


def test_pack_blocks_shorter_than_a_block_is_empty() -> None:
    assert pack_blocks(np.arange(3, dtype=np.int64), 4).shape == (0, 4)


# --- sliding_windows ----------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "block", "stride"), [(37, 8, 3), (40, 8, 4), (9, 8, 1), (5, 8, 2), (30, 6, 5)])
def test_overlapping_windows_score_every_token_after_the_first_exactly_once(
    length: int, block: int, stride: int
) -> None:
    stream = np.arange(100, 100 + length, dtype=np.int64)
    ids, labels, mask = sliding_windows(stream, block, stride, pad_id=0)
    assert ids.shape == labels.shape == mask.shape
    positions = scored_positions(labels, stride)
    assert sorted(positions) == list(range(1, length))  # each once: no duplicates, none missing
    for row in range(ids.shape[0]):
        begin = row * stride
        n = int(mask[row].sum())
        np.testing.assert_array_equal(ids[row, :n], stream[begin : begin + n])  # inputs are the stream
        assert (mask[row, :n] == 1).all()
        assert (mask[row, n:] == 0).all()
        scored = labels[row] != IGNORE
        np.testing.assert_array_equal(labels[row][scored], ids[row][scored])  # labels are the inputs
    assert ids.shape[0] == 1 + max(0, -(-(length - block) // stride))  # no window past the end


def test_windows_with_stride_equal_block_tile_the_stream() -> None:
    stream = np.arange(1, 27, dtype=np.int64)  # 26 tokens, block 8: 3 full windows + 2 tokens
    ids, labels, mask = sliding_windows(stream, 8, 8, pad_id=999)
    assert ids.shape == (4, 8)
    np.testing.assert_array_equal(ids[mask == 1], stream)  # tiles: each token once, in order
    np.testing.assert_array_equal(labels[labels != IGNORE], stream)
    # the last, partial window is padded, unmasked and unlabelled
    np.testing.assert_array_equal(ids[3], [25, 26, 999, 999, 999, 999, 999, 999])
    np.testing.assert_array_equal(mask[3], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(labels[3], [25, 26, *[IGNORE] * 6])
    assert (mask[:3] == 1).all()


def test_partial_last_overlapping_window_is_padded() -> None:
    stream = np.arange(1, 12, dtype=np.int64)  # 11 tokens, block 8, stride 6: windows at 0 and 6
    ids, labels, mask = sliding_windows(stream, 8, 6, pad_id=0)
    assert ids.shape == (2, 8)
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [7, 8, 9, 10, 11, 0, 0, 0])
    # tokens 7 and 8 were scored by window 0; only 9..11 are new
    np.testing.assert_array_equal(labels[1], [IGNORE, IGNORE, 9, 10, 11, IGNORE, IGNORE, IGNORE])


# --- CausalLM.prepare ---------------------------------------------------------------------------


def test_prepare_train_blocks_are_the_exact_stream_prefix(tokenizer: Any, tmp_path: Path) -> None:
    prepared = lm(tmp_path, block_size=8).prepare(raw_data(), tokenizer)
    stream = expected_stream(tokenizer, DOCS)
    blocks = column(prepared.splits["train"], "input_ids")
    assert blocks.ndim == 2
    assert blocks.shape[1] == 8
    flat = blocks.reshape(-1).tolist()
    assert len(flat) == len(stream) // 8 * 8
    assert len(stream) - len(flat) < 8  # only a tail shorter than a block is dropped
    assert flat == stream[: len(flat)]
    assert prepared.stats["train_stream_tokens"] == len(stream)
    assert prepared.stats["train_tokens"] == len(flat)


def test_prepare_puts_eos_after_every_document_and_skips_empty_ones(tokenizer: Any, tmp_path: Path) -> None:
    eos = tokenizer.eos_token_id
    prepared = lm(tmp_path, block_size=4).prepare(raw_data(), tokenizer)
    flat = column(prepared.splits["train"], "input_ids").reshape(-1).tolist()
    stream = expected_stream(tokenizer, DOCS)
    non_empty = [d for d in DOCS if d]
    assert stream.count(eos) == len(non_empty)  # the reference itself: one EOS per non-empty document
    assert eos not in expected_stream(tokenizer, ["", ""])
    assert flat == stream[: len(flat)]
    # no doubled EOS (which an empty document given an EOS would produce)
    assert all(not (a == b == eos) for a, b in itertools.pairwise(flat))
    # the documents' own tokens never contain EOS, so EOS marks exactly the document ends
    ends = [i for i, t in enumerate(stream) if t == eos]
    lengths = np.diff([-1, *ends]) - 1
    assert lengths.tolist() == [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in non_empty]


def test_prepare_validation_windows_cover_the_validation_stream(tokenizer: Any, tmp_path: Path) -> None:
    prepared = lm(tmp_path, block_size=8, eval_stride=3).prepare(raw_data(), tokenizer)
    stream = expected_stream(tokenizer, VALID)
    valid = prepared.splits["validation"]
    ids, labels, mask = (column(valid, c).numpy() for c in ("input_ids", "labels", "attention_mask"))
    assert sorted(scored_positions(labels, 3)) == list(range(1, len(stream)))
    for row, pos in zip(*np.nonzero(labels[:, 1:] != IGNORE), strict=True):
        assert labels[row, pos + 1] == stream[row * 3 + pos + 1]
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert prepared.stats["validation_tokens"] == len(stream)
    assert prepared.stats["validation_scored_tokens"] == len(stream) - 1


def test_prepare_outputs_torch_tensors(tokenizer: Any, tmp_path: Path) -> None:
    import torch

    prepared = lm(tmp_path, block_size=8).prepare(raw_data(), tokenizer)
    assert isinstance(prepared.splits["train"][0]["input_ids"], torch.Tensor)
    assert prepared.splits["train"][0]["input_ids"].dtype == torch.int64
    assert isinstance(prepared.splits["validation"][0]["labels"], torch.Tensor)


def test_prepare_refuses_a_train_split_shorter_than_a_block(tokenizer: Any, tmp_path: Path) -> None:
    from llmtune.errors import UserError

    with pytest.raises(UserError, match=r"one block.*data\.block_size"):
        lm(tmp_path, block_size=64).prepare(raw_data(train=["Short."]), tokenizer)


# --- the cache ----------------------------------------------------------------------------------


def _columns(prepared: Any) -> dict[str, dict[str, list[Any]]]:
    return {
        split: {col: column(ds, col).tolist() for col in ds.column_names}
        for split, ds in sorted(prepared.splits.items())
    }


def test_second_prepare_hits_the_cache_with_identical_data(tokenizer: Any, tmp_path: Path) -> None:
    first = lm(tmp_path, block_size=8, eval_stride=4).prepare(raw_data(), tokenizer)
    assert first.stats["cache"].startswith("miss")
    second = lm(tmp_path, block_size=8, eval_stride=4).prepare(raw_data(), tokenizer)
    assert second.stats["cache"].startswith("hit")
    assert _columns(second) == _columns(first)
    stats = {k: v for k, v in first.stats.items() if k not in ("cache", "prepare_seconds")}
    assert {k: v for k, v in second.stats.items() if k not in ("cache", "prepare_seconds")} == stats


@pytest.mark.parametrize(
    "change",
    [
        {"block_size": 4},
        {"eval_stride": 2},
        {"fingerprint": "y"},
    ],
)
def test_changed_inputs_miss_the_cache(tokenizer: Any, tmp_path: Path, change: dict[str, Any]) -> None:
    assert lm(tmp_path, 8).prepare(raw_data(), tokenizer).stats["cache"].startswith("miss")
    block = change.get("block_size", 8)
    again = lm(tmp_path, block, change.get("eval_stride")).prepare(
        raw_data(fingerprint=change.get("fingerprint", "x")), tokenizer
    )
    assert again.stats["cache"].startswith("miss")
    assert column(again.splits["train"], "input_ids").shape[1] == block


def test_a_different_tokenizer_misses_the_cache(tokenizer: Any, tmp_path: Path) -> None:
    from llmtune.tokenizer_training import train_byte_level_bpe

    other = train_byte_level_bpe(VALID * 3, vocab_size=300, min_frequency=1)
    assert lm(tmp_path, 8).prepare(raw_data(), tokenizer).stats["cache"].startswith("miss")
    again = lm(tmp_path, 8).prepare(raw_data(), other)
    assert again.stats["cache"].startswith("miss")
    assert (
        column(again.splits["train"], "input_ids").reshape(-1).tolist()
        == expected_stream(other, DOCS)[: again.stats["train_tokens"]]
    )
