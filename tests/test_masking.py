"""Masked-LM masking: BERT's 15% / 80-10-10 statistics, special tokens, whole words, seeding, setup
refusals, per-example evaluation masks and the recipe's masking bounds."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llmtune.data import RawData
from llmtune.errors import UserError
from llmtune.recipe import MaskingSpec, build_recipe
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.masked_lm import IGNORE, MaskedLM, continuation_table
from llmtune.tokenizer_training import train_byte_level_bpe, train_wordpiece
from tests.helpers import ADJECTIVES, NOUNS, VERBS, make_task, synthetic_documents

BLOCK = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_wordpiece(synthetic_documents(200), vocab_size=300)


@pytest.fixture(scope="module")
def bert(tok: Any) -> Any:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=BLOCK,
        pad_token_id=tok.pad_token_id,
    )
    return BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # An explicit cache dir: module fixtures run before the autouse LLMTUNE_CACHE fixture.
    cache = tmp_path_factory.mktemp("mlm-cache")
    return {"block_size": BLOCK, "cache_dir": str(cache)}


@pytest.fixture(scope="module")
def prepared(tok: Any, data_spec: dict[str, Any]) -> Any:
    from datasets import Dataset

    raw = RawData(
        splits={
            "train": Dataset.from_dict({"text": synthetic_documents(400, seed=1)}),
            "validation": Dataset.from_dict({"text": synthetic_documents(12, seed=2)}),
        },
        fingerprint="test-masking",
    )
    return masked_lm(data_spec).prepare(raw, tok)


def masked_lm(data: dict[str, Any], **masking: Any) -> MaskedLM:
    """A masked-lm task with these data and masking settings."""
    return make_task("masked-lm", data=data, masking=masking)


def mlm_task(tok: Any, bert: Any, data_spec: dict[str, Any], **spec: Any) -> MaskedLM:
    task = masked_lm(data_spec, **spec)
    task.setup(bert, tok)
    return task


@pytest.fixture(scope="module")
def train_batch(prepared: Any) -> dict[str, torch.Tensor]:
    rows = prepared.splits["train"][:32]
    assert rows["input_ids"].shape == (32, BLOCK)
    return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}


def special_mask(tok: Any, ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(ids, torch.tensor(sorted(set(tok.all_special_ids))))


def padded_batch(tok: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """Hand-built rows: [CLS] text [SEP] [PAD]..., attention_mask 0 on the padding."""
    enc = tok(texts, padding="max_length", max_length=BLOCK, truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# --- BERT statistics ---------------------------------------------------------------------------------


def test_masking_statistics_match_bert(tok: Any, bert: Any, data_spec: dict[str, Any], train_batch: Any) -> None:
    task = mlm_task(tok, bert, data_spec)
    ids = train_batch["input_ids"]
    maskable = ~special_mask(tok, ids) & (train_batch["attention_mask"] == 1)
    mask_id, vocab = tok.mask_token_id, len(tok)
    n_maskable = n_chosen = n_mask = n_random = n_same = 0
    for seed in range(200):
        out = task.draw(train_batch, seed)
        labels, inputs = out["labels"], out["input_ids"]
        chosen = labels != IGNORE
        # Labels: -100 exactly where not chosen, the original id where chosen.
        assert torch.equal(labels[chosen], ids[chosen])
        assert (labels[~chosen] == IGNORE).all()
        # Nothing outside the chosen positions changes.
        assert torch.equal(inputs[~chosen], ids[~chosen])
        assert torch.equal(out["attention_mask"], train_batch["attention_mask"])
        assert not (chosen & ~maskable).any()
        n_maskable += int(maskable.sum())
        n_chosen += int(chosen.sum())
        n_mask += int((chosen & (inputs == mask_id)).sum())
        n_same += int((chosen & (inputs == ids)).sum())
        n_random += int((chosen & (inputs != ids) & (inputs != mask_id)).sum())
    assert n_mask + n_same + n_random == n_chosen
    assert abs(n_chosen / n_maskable - 0.15) < 0.01
    # A random replacement equals the original (counted as unchanged) or [MASK] with chance 1/vocab each.
    assert abs(n_mask / n_chosen - (0.8 + 0.1 / vocab)) < 0.02
    assert abs(n_random / n_chosen - 0.1 * (1 - 2 / vocab)) < 0.02
    assert abs(n_same / n_chosen - (0.1 + 0.1 / vocab)) < 0.02


def test_special_tokens_and_padding_never_chosen(tok: Any, bert: Any, data_spec: dict[str, Any]) -> None:
    rng = random.Random(0)
    texts = [
        " ".join(rng.choice(NOUNS + VERBS + ADJECTIVES) for _ in range(rng.randint(1, 40))) + " [MASK] [UNK]"
        for _ in range(16)
    ]
    batch = padded_batch(tok, texts)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    # A real token under attention_mask 0 (e.g. a collator's filler) must not be chosen either.
    real = ids[0, 1].item()
    short = int(attention.sum(dim=1).argmin())
    ids[short, -1] = real
    special = special_mask(tok, ids)
    assert (ids == tok.pad_token_id).any() and (attention == 0).any()
    assert (ids == tok.cls_token_id).sum() == len(texts) and (ids == tok.sep_token_id).sum() == len(texts)
    assert (ids == tok.mask_token_id).any() and (ids == tok.unk_token_id).any()
    maskable = ~special & (attention == 1)
    task = mlm_task(tok, bert, data_spec, mlm_probability=0.99)
    chosen_total = 0
    for seed in range(50):
        out = task.draw({"input_ids": ids, "attention_mask": attention}, seed)
        chosen = out["labels"] != IGNORE
        assert not (chosen & special).any(), "a special token was chosen"
        assert not (chosen & (attention == 0)).any(), "a padding position was chosen"
        assert torch.equal(out["input_ids"][~maskable], ids[~maskable])
        chosen_total += int(chosen.sum())
    assert chosen_total / (50 * int(maskable.sum())) > 0.97  # the check is not vacuous


# --- whole-word masking ------------------------------------------------------------------------------


def words_of(ids: torch.Tensor, continues: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per row, each word as its (row, column) positions: a first piece followed by its continuations."""
    words: list[list[tuple[int, int]]] = []
    for r, row in enumerate(ids.tolist()):
        current: list[tuple[int, int]] = []
        for c, token in enumerate(row):
            if continues[token] and current:
                current.append((r, c))
            else:
                if current:
                    words.append(current)
                current = [(r, c)]
        if current:
            words.append(current)
    return words


def split_words(words: list[list[tuple[int, int]]], chosen: torch.Tensor) -> int:
    """Words some but not all of whose pieces were chosen."""
    broken = 0
    for word in words:
        picks = {bool(chosen[r, c]) for r, c in word}
        broken += len(picks) > 1
    return broken


@pytest.fixture(scope="module")
def multi_piece_batch(tok: Any) -> dict[str, torch.Tensor]:
    """Rows full of compound words the vocabulary splits into several pieces (e.g. 'parsersocket')."""
    rng = random.Random(1)
    words = NOUNS + VERBS + ADJECTIVES
    texts = []
    for _ in range(32):
        row = []
        for _ in range(12):
            word = rng.choice(words) + rng.choice([*words, "", "s", "ed", "ing"])
            row.append(word)
        texts.append(" ".join(row))
    return padded_batch(tok, texts)


def test_multi_piece_words_exist(tok: Any, multi_piece_batch: Any) -> None:
    continues = continuation_table(tok)
    words = words_of(multi_piece_batch["input_ids"], continues)
    multi = [w for w in words if len(w) >= 2]
    assert len(multi) >= 200
    assert tok.tokenize("parsersocket")[0] == "parser" and len(tok.tokenize("parsersocket")) >= 2
    # continuation_table marks exactly the '##' pieces.
    vocab = tok.get_vocab()
    assert all(continues[i] == t.startswith("##") for t, i in vocab.items())


def test_whole_word_masking_keeps_words_whole(
    tok: Any, bert: Any, data_spec: dict[str, Any], multi_piece_batch: Any
) -> None:
    task = mlm_task(tok, bert, data_spec, whole_word_masking=True)
    words = words_of(multi_piece_batch["input_ids"], continuation_table(tok))
    chosen_words = 0
    for seed in range(40):
        out = task.draw(multi_piece_batch, seed)
        chosen = out["labels"] != IGNORE
        assert split_words(words, chosen) == 0
        chosen_words += sum(bool(chosen[w[0]]) for w in words if len(w) >= 2)
        assert torch.equal(out["labels"][chosen], multi_piece_batch["input_ids"][chosen])
    assert chosen_words > 0


def test_without_whole_word_masking_words_are_split(
    tok: Any, bert: Any, data_spec: dict[str, Any], multi_piece_batch: Any
) -> None:
    """The same check on token-level masking fails: the whole-word test discriminates."""
    task = mlm_task(tok, bert, data_spec, whole_word_masking=False)
    words = words_of(multi_piece_batch["input_ids"], continuation_table(tok))
    broken = sum(split_words(words, task.draw(multi_piece_batch, seed)["labels"] != IGNORE) for seed in range(40))
    assert broken > 100


# --- seeding -----------------------------------------------------------------------------------------


def test_same_seed_same_masks_other_seed_other_masks(
    tok: Any, bert: Any, data_spec: dict[str, Any], train_batch: Any
) -> None:
    task = mlm_task(tok, bert, data_spec)
    a, b, c = task.draw(train_batch, 7), task.draw(train_batch, 7), task.draw(train_batch, 8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])
    # A fresh task object with the same settings draws the same masks for the same seed.
    again = mlm_task(tok, bert, data_spec).draw(train_batch, 7)
    assert torch.equal(a["input_ids"], again["input_ids"]) and torch.equal(a["labels"], again["labels"])
    # The input batch is not modified in place.
    assert not (train_batch["input_ids"] == tok.mask_token_id).any()


def test_higher_probability_chooses_more(tok: Any, bert: Any, data_spec: dict[str, Any], train_batch: Any) -> None:
    def share(task: MaskedLM) -> float:
        return float(np.mean([(task.draw(train_batch, s)["labels"] != IGNORE).sum().item() for s in range(20)]))

    base = share(mlm_task(tok, bert, data_spec))
    double = share(mlm_task(tok, bert, data_spec, mlm_probability=0.3))
    assert 1.8 < double / base < 2.2


# --- setup refusals ----------------------------------------------------------------------------------


def test_setup_refuses_tokenizer_without_mask_token(bert: Any, data_spec: dict[str, Any]) -> None:
    bpe = train_byte_level_bpe(synthetic_documents(50), vocab_size=300)
    assert bpe.mask_token_id is None
    with pytest.raises(UserError, match="mask"):
        masked_lm(data_spec).setup(bert, bpe)


def test_setup_refuses_block_longer_than_positions(tok: Any, bert: Any, data_spec: dict[str, Any]) -> None:
    assert bert.config.max_position_embeddings == BLOCK
    masked_lm({**data_spec, "block_size": BLOCK}).setup(bert, tok)  # the limit itself is fine
    with pytest.raises(UserError, match="block_size"):
        masked_lm({**data_spec, "block_size": BLOCK + 1}).setup(bert, tok)


# --- evaluation --------------------------------------------------------------------------------------


def test_eval_masks_are_per_example(tok: Any, bert: Any, data_spec: dict[str, Any], prepared: Any) -> None:
    val = prepared.splits["validation"]
    assert len(val) >= 4
    last = len(val) - 1
    assert val[last]["attention_mask"].sum() < BLOCK  # the padded tail row is kept and included below
    picks = [0, 1, 2, last]
    rows = val[picks]
    batch = {k: rows[k] for k in ("input_ids", "attention_mask", "example_id")}
    task = mlm_task(tok, bert, data_spec)
    with torch.no_grad():
        together = task.eval_batch(bert, batch)
        alone = [task.eval_batch(bert, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(len(picks))]
        swapped = task.eval_batch(bert, {k: v.flip(0) for k, v in batch.items()})
    assert together["nll"].shape == (4,)
    for i in range(len(picks)):
        assert together["tokens"][i] == alone[i]["tokens"][0]
        assert together["correct"][i] == alone[i]["correct"][0]
        torch.testing.assert_close(together["nll"][i], alone[i]["nll"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(swapped["nll"].flip(0), together["nll"], rtol=1e-4, atol=1e-4)
    assert (together["tokens"] > 0).all()
    outputs = EvalOutputs()
    outputs.add(together)
    metrics = task.metrics(outputs)
    assert metrics["eval/masked_tokens"] == float(together["tokens"].sum())
    assert metrics["eval/mlm_perplexity"] == pytest.approx(np.exp(metrics["eval/loss"]))


# --- recipe validation -------------------------------------------------------------------------------

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def tree(task: str, **extra: Any) -> dict[str, Any]:
    kind = {"masked-lm": "wordpiece", "span-corruption": "unigram", "causal-lm": "byte-level-bpe"}[task]
    model = TINY_BERT if task != "span-corruption" else {"model_type": "t5", "d_model": 32}
    return {
        "task": task,
        "model": {"from_scratch": dict(model)},
        "tokenizer": {"train": {"kind": kind, "vocab_size": 300}},
        "data": {"source": "builtin:pydoc", "block_size": 64},
        **extra,
    }


def test_minimal_trees_are_valid() -> None:
    recipe = build_recipe(tree("masked-lm"), Path("."))
    assert recipe.masking == MaskingSpec()
    recipe = build_recipe(tree("span-corruption", span_corruption={"noise_density": 0.3}), Path("."))
    assert recipe.span_corruption is not None and recipe.span_corruption.noise_density == 0.3
    assert build_recipe(tree("masked-lm", masking={"mlm_probability": 0.99}), Path(".")).masking.mlm_probability == 0.99


@pytest.mark.parametrize("p", [0, 0.0, 1, 1.0, -0.1, 1.5])
def test_recipe_refuses_mlm_probability_out_of_range(p: float) -> None:
    with pytest.raises(UserError, match="mlm_probability"):
        build_recipe(tree("masked-lm", masking={"mlm_probability": p}), Path("."))


def test_recipe_refuses_fractions_over_one() -> None:
    with pytest.raises(UserError, match="mask_fraction"):
        build_recipe(tree("masked-lm", masking={"mask_fraction": 0.9, "random_fraction": 0.2}), Path("."))


@pytest.mark.parametrize("density", [0, 1, -0.2, 1.5])
def test_recipe_refuses_noise_density_out_of_range(density: float) -> None:
    with pytest.raises(UserError, match="noise_density"):
        build_recipe(tree("span-corruption", span_corruption={"noise_density": density}), Path("."))


@pytest.mark.parametrize("length", [0, 0.5, 0.99, -3])
def test_recipe_refuses_short_mean_span(length: float) -> None:
    with pytest.raises(UserError, match="mean_noise_span_length"):
        build_recipe(tree("span-corruption", span_corruption={"mean_noise_span_length": length}), Path("."))


@pytest.mark.parametrize(
    ("task", "key"),
    [
        ("causal-lm", "masking"),
        ("causal-lm", "span_corruption"),
        ("masked-lm", "span_corruption"),
        ("span-corruption", "masking"),
    ],
)
def test_recipe_refuses_options_of_another_task(task: str, key: str) -> None:
    with pytest.raises(UserError, match=key):
        build_recipe(tree(task, **{key: {}}), Path("."))
