"""Unit tests of the fine-tuning core: padding, length grouping, strategies, LR groups, metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtune.batching import LengthGroupedSampler, length_grouped_order, longest_first, pad_collator
from llmtune.errors import UserError
from llmtune.metrics import classification_metrics, regression_metrics
from llmtune.optim import parameter_groups
from llmtune.recipe import StrategySpec
from llmtune.strategies import apply_strategy, head_parameter_names, layer_depths

# --- padding -----------------------------------------------------------------------------------------


def test_pad_collator_pads_each_column_with_its_own_value() -> None:
    collate = pad_collator(pad_token_id=7)
    rows = [
        {"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.tensor([1, 1, 1]), "labels": torch.tensor(1)},
        {"input_ids": torch.tensor([4]), "attention_mask": torch.tensor([1]), "labels": torch.tensor(0)},
    ]
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]  # scalars are stacked, not padded
    tokens = collate([{"input_ids": [1, 2], "labels": [5, 6]}, {"input_ids": [3], "labels": [8]}])
    assert tokens["labels"].tolist() == [[5, 6], [8, -100]]  # token labels pad with the ignore index
    floats = collate([{"input_ids": [1], "labels": torch.tensor(0.5)}, {"input_ids": [2], "labels": torch.tensor(2.0)}])
    assert floats["labels"].dtype == torch.float32 and floats["labels"].tolist() == [0.5, 2.0]


# --- length grouping ---------------------------------------------------------------------------------


def test_length_grouped_order_is_a_seeded_permutation_of_similar_length_batches() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 200, size=1000).tolist()
    order = length_grouped_order(lengths, batch_size=16, seed=1)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=16, seed=1)
    assert order != length_grouped_order(lengths, batch_size=16, seed=2)

    def padded_tokens(order: list[int]) -> int:
        return sum(16 * max(lengths[i] for i in order[s : s + 16]) for s in range(0, len(order), 16))

    random_order = rng.permutation(1000).tolist()
    assert padded_tokens(order) < 0.7 * padded_tokens(random_order)
    # batches, not just rows, are shuffled: the longest batch is not always first
    firsts = {max(lengths[i] for i in length_grouped_order(lengths, 16, seed)[:16]) for seed in range(5)}
    assert len(firsts) > 1


def test_only_the_last_batch_is_short() -> None:
    lengths = list(range(1, 1 + 16 * 50 + 5)) + list(range(1, 30))  # more than one mega-batch, ragged tail
    order = length_grouped_order(lengths, batch_size=16, seed=0)
    batches = [order[s : s + 16] for s in range(0, len(order), 16)]
    assert sorted(order) == list(range(len(lengths)))
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == len(lengths) % 16
    # boundaries fall where the sampler grouped, so batches stay narrow (random batches span ~800)
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches[:-1]]
    assert np.median(spreads) < 40


def test_sampler_reshuffles_per_epoch_and_repeats_an_epoch_exactly() -> None:
    sampler = LengthGroupedSampler(list(range(100)), batch_size=8, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first != second
    assert longest_first([3, 9, 1]) == [1, 0, 2]


# --- strategies and parameter groups ---------------------------------------------------------------


def _bert_classifier() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return BertForSequenceClassification(config)


def test_head_strategy_freezes_the_body_only() -> None:
    model = _bert_classifier()
    apply_strategy(model, StrategySpec(kind="head"), "AutoModelForSequenceClassification", 10)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    groups = parameter_groups(model, 0.01)
    assert sum(len(g["params"]) for g in groups) == 2  # frozen parameters never reach the optimizer


def test_head_strategy_refuses_a_tied_lm_head() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    assert head_parameter_names(model) == set()
    with pytest.raises(UserError, match="tied"):
        apply_strategy(model, StrategySpec(kind="head"), "AutoModelForSequenceClassification", 10)
    untied = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, tie_word_embeddings=False)
    )
    assert head_parameter_names(untied) == {"lm_head.weight"}


def test_head_lr_and_layer_decay_groups() -> None:
    model = _bert_classifier()
    groups = parameter_groups(model, 0.01, lr=1.0, head_lr=10.0, layer_lr_decay=0.5)
    rate_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert rate_of[id(params["classifier.weight"])] == 10.0
    assert rate_of[id(params["bert.encoder.layer.2.attention.self.query.weight"])] == 1.0
    assert rate_of[id(params["bert.encoder.layer.1.attention.self.query.weight"])] == 0.5
    assert rate_of[id(params["bert.encoder.layer.0.output.dense.weight"])] == 0.25
    assert rate_of[id(params["bert.embeddings.word_embeddings.weight"])] == 0.125
    assert rate_of[id(params["bert.pooler.dense.weight"])] == 1.0  # above the blocks, below the head
    assert decay_of[id(params["bert.encoder.layer.0.output.dense.bias"])] == 0.0
    assert decay_of[id(params["bert.encoder.layer.0.output.dense.weight"])] == 0.01
    assert len(rate_of) == len(params)


def test_layer_depths_of_gpt2_and_t5_names() -> None:
    names = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]
    names += ["transformer.ln_f.weight", "score.weight"]
    assert layer_depths(names, {"score.weight"}) == {
        "transformer.wte.weight": 0,
        "transformer.h.0.attn.c_attn.weight": 1,
        "transformer.h.1.mlp.c_fc.weight": 2,
        "transformer.ln_f.weight": 2,
        "score.weight": 3,
    }
    t5 = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.1.layer.0.SelfAttention.q"]
    assert layer_depths(t5, set()) == {t5[0]: 0, t5[1]: 1, t5[2]: 2}


# --- metrics against hand-computed values ----------------------------------------------------------


def test_classification_metrics_by_hand() -> None:
    references = [0, 0, 1, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0, 2]
    m = classification_metrics(predictions, references)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: class 0 p=1/2 r=1/2 -> 0.5; class 1 p=2/3 r=2/3 -> 2/3; class 2 -> 1
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    binary = classification_metrics([1, 1, 0, 0], [1, 0, 0, 0])
    tp, tn, fp, fn = 1, 2, 1, 0
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert binary["matthews"] == pytest.approx(mcc)


def test_regression_metrics_by_hand() -> None:
    p, r = [1.0, 2.0, 3.0, 5.0], [1.0, 3.0, 2.0, 6.0]
    m = regression_metrics(p, r)
    pm, rm = np.mean(p), np.mean(r)
    cov = sum((a - pm) * (b - rm) for a, b in zip(p, r, strict=True))
    pearson = cov / math.sqrt(sum((a - pm) ** 2 for a in p) * sum((b - rm) ** 2 for b in r))
    assert m["pearson"] == pytest.approx(pearson)
    # ranks: p -> 1 2 3 4, r -> 1 3 2 4; spearman = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6*2/60
    assert m["spearman"] == pytest.approx(0.8)
    assert m["mse"] == pytest.approx((0 + 1 + 1 + 1) / 4)
    assert regression_metrics([1.0, 1.0], [0.0, 2.0])["pearson"] == 0.0  # undefined for a constant prediction


def test_tiny_models_fixture_builds_loadable_checkpoints(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoConfig

    assert {AutoConfig.from_pretrained(str(d)).model_type for d in tiny_models.values()} == {"bert", "gpt2", "t5"}
