"""Every strategy on every family: exactly the intended parameters train, counts, save/load, merge."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.errors import UserError
from llmtune.recipe import StrategySpec
from llmtune.strategies import apply_strategy, count_parameters, load_trained, merge, save_model

H, LAYERS, VOCAB = 16, 3, 60


def build(family: str) -> tuple[torch.nn.Module, str]:
    """A tiny random model of `family` for its natural task, and that task's auto class."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=H,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=2 * H,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForSequenceClassification(config), "AutoModelForSequenceClassification"
    if family == "gpt2":
        config = GPT2Config(
            n_layer=LAYERS, n_embd=H, n_head=2, vocab_size=VOCAB, n_positions=64, pad_token_id=0, bos_token_id=1
        )
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        config.eos_token_id = 1
        return GPT2LMHeadModel(config), "AutoModelForCausalLM"
    config = T5Config(
        vocab_size=VOCAB,
        d_model=H,
        d_ff=2 * H,
        d_kv=8,
        num_heads=2,
        num_layers=LAYERS,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config), "AutoModelForSeq2SeqLM"


def batch(auto_class: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1]) if auto_class == "AutoModelForSequenceClassification" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def train_a_little(applied: Any, auto_class: str, steps: int = 3) -> None:
    model = applied.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**batch(auto_class)).loss.backward()
        optimizer.step()
        if applied.on_step is not None:
            applied.on_step(step + 1)
        optimizer.zero_grad()


# Per strategy: the pattern every trainable parameter name matches (besides the head).
INTENDED = {
    "head": r"^(classifier|score)\.",
    "top_k": r"(\.(h|layer|block)\.2\.|^(classifier|score)\.|ln_f|final_layer_norm|pooler)",
    "adapter": r"\.adapter\.|^(classifier|score)\.",
    "lora": r"\.lora_[AB]\.|modules_to_save",
    "adalora": r"\.lora_[ABE]\.|modules_to_save",
    "prefix": r"prompt_encoder|modules_to_save",
    "prompt": r"prompt_encoder|modules_to_save",
    "ia3": r"\.ia3_l\.|modules_to_save",
}
SPECS = {
    "head": {},
    "top_k": {"k": 1},
    "adapter": {"reduction_factor": 2, "non_linearity": "gelu"},
    "lora": {"r": 2},
    "adalora": {"r": 4, "target_r": 2},
    "prefix": {"num_virtual_tokens": 3},
    "prompt": {"num_virtual_tokens": 3},
    "ia3": {},
}
# What cannot work, and says so: a tied LM head has no separate head; BERT has no key/value cache for prefixes.
REFUSED = {("head", "gpt2"): "tied", ("head", "t5"): "tied", ("prefix", "bert"): "peft cannot apply prefix"}


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("kind", list(SPECS))
def test_exactly_the_intended_parameters_change(kind: str, family: str, one_thread: None) -> None:
    model, auto_class = build(family)
    spec = StrategySpec(kind=kind, **SPECS[kind])
    if (kind, family) in REFUSED:
        with pytest.raises(UserError, match=REFUSED[kind, family]):
            apply_strategy(model, spec, auto_class, total_steps=10)
        return
    applied = apply_strategy(model, spec, auto_class, total_steps=10)
    before = {n: p.detach().clone() for n, p in applied.model.named_parameters()}
    train_a_little(applied, auto_class)
    trainable = {n for n, p in applied.model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(INTENDED[kind], n) for n in trainable), sorted(trainable)[:5]
    for name, param in applied.model.named_parameters():
        if name not in trainable:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    changed = {n for n, p in applied.model.named_parameters() if not torch.equal(p, before[n])}
    if kind == "adalora":  # AdaLoRA zeroes the singular values it prunes, which start at zero
        assert changed and changed <= trainable
    else:
        assert changed == trainable


def test_trainable_counts_follow_the_formulas() -> None:
    head = H * 2 + 2  # the classifier of a 2-label BERT
    model, auto = build("bert")
    _, trainable = count_parameters(apply_strategy(model, StrategySpec(kind="lora", r=4), auto, 10).model)
    assert trainable == LAYERS * 2 * (2 * H * 4) + head  # rank r on a d x d projection adds 2 d r (query, value)
    model, auto = build("bert")
    _, trainable = count_parameters(apply_strategy(model, StrategySpec(kind="ia3"), auto, 10).model)
    # peft's BERT defaults: key, value (scaled outputs, H each) and every `output.dense`, counted as
    # feed-forward (scaled inputs): attention.output.dense (H) and the block's output.dense (2H)
    assert trainable == LAYERS * (H + H + H + 2 * H) + head
    model, auto = build("bert")
    spec = StrategySpec(kind="adapter", reduction_factor=4)
    _, trainable = count_parameters(apply_strategy(model, spec, auto, 10).model)
    inner = H // 4
    assert trainable == LAYERS * 2 * (H * inner + inner + inner * H + H) + head  # Houlsby: two adapters a block
    model, auto = build("bert")
    _, trainable = count_parameters(apply_strategy(model, StrategySpec(kind="top_k", k=1), auto, 10).model)
    block = sum(p.numel() for n, p in model.named_parameters() if ".layer.2." in n)
    pooler = sum(p.numel() for n, p in model.named_parameters() if "pooler" in n)
    assert trainable == block + pooler + head


def test_top_k_and_targets_refuse_what_does_not_exist() -> None:
    model, auto = build("bert")
    with pytest.raises(UserError, match=r"strategy\.k: 4 is more than the model's 3 blocks"):
        apply_strategy(model, StrategySpec(kind="top_k", k=4), auto, 10)
    with pytest.raises(UserError, match=r"no module 'c_attn' in this bert model; candidates: .*query"):
        apply_strategy(model, StrategySpec(kind="lora", target_modules=["c_attn"]), auto, 10)
    with pytest.raises(UserError, match=r"model\.from_scratch has none"):
        apply_strategy(model, StrategySpec(kind="lora"), auto, 10, from_scratch=True)


@pytest.mark.parametrize(("kind", "family"), [("lora", "bert"), ("ia3", "gpt2"), ("adapter", "t5"), ("prompt", "t5")])
def test_save_load_gives_the_same_predictions_and_merge_the_same_outputs(
    kind: str, family: str, tmp_path: Path, one_thread: None
) -> None:
    import transformers

    model, auto_class = build(family)
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    spec = StrategySpec(kind=kind, **SPECS[kind])
    applied = apply_strategy(model, spec, auto_class, total_steps=10)
    train_a_little(applied, auto_class)
    trained = applied.model.eval()
    saved = tmp_path / "final"
    saved.mkdir()
    save_model(trained, saved, {}, kind, str(base), applied.settings)
    assert not (saved / "model.safetensors").exists()  # the adapter and head alone
    adapter_bytes = sum(f.stat().st_size for f in saved.glob("adapter*.safetensors"))
    assert 0 < adapter_bytes < (base / "model.safetensors").stat().st_size / 2

    inputs = {k: v for k, v in batch(auto_class).items() if k != "labels"}
    if auto_class == "AutoModelForSeq2SeqLM":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :3]
    # no spec given: final/ alone says how the adapter was built
    loaded = load_trained(str(saved), getattr(transformers, auto_class), None, False).eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
        if kind in ("lora", "ia3"):
            merged = merge(loaded, kind)
            assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
            torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    if kind in ("adapter", "prompt"):
        with pytest.raises(UserError, match="cannot be merged"):
            merge(loaded, kind)
