"""Trained tokenizers: WordPiece (BERT), Unigram (T5) and byte-level BPE (GPT-2) have the special
tokens and framing their tasks rely on, and survive save_pretrained -> AutoTokenizer.from_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmtune.tokenizer_training import (
    GPT2_EOS,
    sentinel_name,
    train_byte_level_bpe,
    train_unigram,
    train_wordpiece,
)
from tests.helpers import synthetic_documents

TEXTS = ["The lazy parser returns a sorted token.", "The nested socket joins a frozen thread.", "module"]


def reload(tok: Any, where: Path) -> Any:
    from transformers import AutoTokenizer

    tok.save_pretrained(str(where))
    return AutoTokenizer.from_pretrained(str(where))


# --- WordPiece ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordpiece() -> Any:
    return train_wordpiece(synthetic_documents(200), vocab_size=300)


def test_wordpiece_frames_with_cls_sep(wordpiece: Any) -> None:
    for text in TEXTS:
        ids = wordpiece(text)["input_ids"]
        assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
        assert wordpiece.cls_token_id not in ids[1:-1] and wordpiece.sep_token_id not in ids[1:-1]
        assert ids[1:-1] == wordpiece(text, add_special_tokens=False)["input_ids"]
    pair = wordpiece("the parser", "a token")["input_ids"]
    assert pair[0] == wordpiece.cls_token_id and pair[-1] == wordpiece.sep_token_id
    assert pair.count(wordpiece.sep_token_id) == 2


def test_wordpiece_special_tokens(wordpiece: Any) -> None:
    ids = {name: getattr(wordpiece, f"{name}_token_id") for name in ("mask", "pad", "unk", "cls", "sep")}
    assert None not in ids.values()
    assert len(set(ids.values())) == 5
    assert wordpiece.mask_token == "[MASK]" and wordpiece.pad_token == "[PAD]" and wordpiece.unk_token == "[UNK]"
    assert wordpiece.cls_token == "[CLS]" and wordpiece.sep_token == "[SEP]"
    assert set(ids.values()) <= set(wordpiece.all_special_ids)
    # The special tokens are single tokens in text, and unseen characters fall back to [UNK].
    assert wordpiece("[MASK]", add_special_tokens=False)["input_ids"] == [ids["mask"]]
    assert ids["unk"] in wordpiece("\u4e2d", add_special_tokens=False)["input_ids"]


def test_wordpiece_lowercases_when_asked(wordpiece: Any) -> None:
    assert wordpiece.tokenize("THE LAZY Parser") == wordpiece.tokenize("the lazy parser")
    assert wordpiece.decode(wordpiece("The PARSER")["input_ids"], skip_special_tokens=True) == "the parser"
    cased = train_wordpiece(synthetic_documents(200), vocab_size=300, lowercase=False)
    assert cased.tokenize("The") != cased.tokenize("the")
    assert cased.tokenize("The")[0] == "The"


def test_wordpiece_survives_save_and_reload(wordpiece: Any, tmp_path: Path) -> None:
    back = reload(wordpiece, tmp_path)
    assert len(back) == len(wordpiece)
    for text in [*TEXTS, "unparsed modulesocket", "[MASK] parser"]:
        assert back(text)["input_ids"] == wordpiece(text)["input_ids"]
    assert back("the parser", "a token")["input_ids"] == wordpiece("the parser", "a token")["input_ids"]
    for name in ("mask", "pad", "unk", "cls", "sep"):
        assert getattr(back, f"{name}_token_id") == getattr(wordpiece, f"{name}_token_id")
    assert sorted(back.all_special_ids) == sorted(wordpiece.all_special_ids)
    assert back.get_vocab() == wordpiece.get_vocab()


# --- Unigram -----------------------------------------------------------------------------------------

SENTINELS = 20


@pytest.fixture(scope="module")
def unigram() -> Any:
    return train_unigram(synthetic_documents(300), vocab_size=400, num_sentinels=SENTINELS)


def test_unigram_special_ids_and_eos(unigram: Any) -> None:
    assert (unigram.pad_token_id, unigram.eos_token_id, unigram.unk_token_id) == (0, 1, 2)
    assert (unigram.pad_token, unigram.eos_token, unigram.unk_token) == ("<pad>", "</s>", "<unk>")
    for text in TEXTS:
        ids = unigram(text)["input_ids"]
        assert ids[-1] == unigram.eos_token_id and unigram.eos_token_id not in ids[:-1]
        assert ids[:-1] == unigram(text, add_special_tokens=False)["input_ids"]
        assert unigram.unk_token_id not in ids


def test_unigram_sentinels_are_single_tokens(unigram: Any) -> None:
    ids = [unigram.convert_tokens_to_ids(sentinel_name(i)) for i in range(SENTINELS)]
    assert len(set(ids)) == SENTINELS
    assert not set(ids) & {unigram.pad_token_id, unigram.eos_token_id, unigram.unk_token_id}
    assert set(ids) <= set(unigram.all_special_ids)
    for i, sid in enumerate(ids):
        assert unigram(sentinel_name(i), add_special_tokens=False)["input_ids"] == [sid]
        encoded = unigram(f"a {sentinel_name(i)} b")["input_ids"]
        assert encoded.count(sid) == 1
        assert not (set(encoded) - {sid}) & set(ids)
    assert unigram.convert_tokens_to_ids(sentinel_name(SENTINELS)) == unigram.unk_token_id


def test_unigram_survives_save_and_reload(unigram: Any, tmp_path: Path) -> None:
    back = reload(unigram, tmp_path)
    assert len(back) == len(unigram)
    for text in [*TEXTS, f"a {sentinel_name(3)} b {sentinel_name(19)}"]:
        assert back(text)["input_ids"] == unigram(text)["input_ids"]
    assert (back.pad_token_id, back.eos_token_id, back.unk_token_id) == (0, 1, 2)
    for i in range(SENTINELS):
        assert back.convert_tokens_to_ids(sentinel_name(i)) == unigram.convert_tokens_to_ids(sentinel_name(i))
    assert sorted(back.all_special_ids) == sorted(unigram.all_special_ids)


# --- byte-level BPE ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe() -> Any:
    return train_byte_level_bpe(synthetic_documents(200), vocab_size=300)


def test_bpe_eos_is_pad_is_endoftext(bpe: Any) -> None:
    assert bpe.eos_token == bpe.pad_token == GPT2_EOS
    assert bpe.eos_token_id == bpe.pad_token_id == bpe.convert_tokens_to_ids(GPT2_EOS)
    assert bpe(GPT2_EOS, add_special_tokens=False)["input_ids"] == [bpe.eos_token_id]
    assert bpe.mask_token_id is None


@pytest.mark.parametrize(
    "text",
    [
        "The lazy parser returns a sorted token.",
        "def f(a , b) :\n\treturn a ; it 's  two  spaces ",
        "naïve café — Ünïcödé, 日本語 and emoji 🙂",
        "Привет, мир! ελληνικά",
    ],
)
def test_bpe_round_trips(bpe: Any, text: str) -> None:
    ids = bpe(text)["input_ids"]
    assert bpe.unk_token_id not in ids  # byte-level: nothing is unknown
    assert bpe.decode(ids) == text


def test_bpe_survives_save_and_reload(bpe: Any, tmp_path: Path) -> None:
    back = reload(bpe, tmp_path)
    text = "naïve parser — 日本語"
    assert back(text)["input_ids"] == bpe(text)["input_ids"]
    assert back.decode(back(text)["input_ids"]) == text
    assert back.eos_token_id == back.pad_token_id == bpe.eos_token_id
