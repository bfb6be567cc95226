"""llmtune/lean_encoder.py: BERT-family encoders skip padding in their dense layers, and a sequence classifier's
last layer runs for the first token only; outputs on every token a head reads, and gradients, equal the model's
own forward; every case the lean forward does not handle runs the model's own encoder."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llmtune import lean_encoder
from tests.helpers import TINY_CONFIGS

VOCAB = 120
HEADS = {
    "AutoModelForSequenceClassification": lambda out: out.logits,
    "AutoModelForTokenClassification": lambda out: out.logits,
    "AutoModelForQuestionAnswering": lambda out: torch.stack([out.start_logits, out.end_logits]),
}


def build(model_type: str, auto: str, **changes: Any) -> Any:
    """A tiny BERT-family model with seeded weights (dropout off unless `changes` set it), in eval mode."""
    import transformers
    from transformers import AutoConfig

    keys = {**TINY_CONFIGS["bert"], **changes}
    keys.pop("model_type")
    labels = 2 if auto == "AutoModelForQuestionAnswering" else 3
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=1, num_labels=labels, **keys)
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(config).eval()


def padded_batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    """Random token ids right-padded to the longest of `lengths`, with their attention mask."""
    generator = torch.Generator().manual_seed(sum(lengths))
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), 1)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, VOCAB, (length,), generator=generator)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def calls_of(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record each lean forward that runs (its first_token_only flag)."""
    calls: list[bool] = []
    original = lean_encoder.lean_encoder_forward

    def counted(layers: Any, hidden: Any, mask: Any, first_token_only: bool, fuse: bool = False) -> Any:
        calls.append(first_token_only)
        return original(layers, hidden, mask, first_token_only, fuse)

    monkeypatch.setattr(lean_encoder, "lean_encoder_forward", counted)
    return calls


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("auto", sorted(HEADS))
def test_outputs_equal_the_models_own_on_every_token_a_head_reads(
    model_type: str, auto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, lean = build(model_type, auto), build(model_type, auto)
    applied = lean_encoder.apply_lean_encoder(lean)
    classifier = auto == "AutoModelForSequenceClassification"
    assert len(applied) == (2 if classifier else 1)
    calls = calls_of(monkeypatch)
    batch = padded_batch([3, 11, 7, 16, 2])
    with torch.no_grad():
        want, got = HEADS[auto](reference(**batch)), HEADS[auto](lean(**batch))
    assert calls == [classifier]
    real = batch["attention_mask"].bool()
    if classifier:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # per-token heads: real tokens agree; what the model leaves at padding is nobody's output
        where = real if auto == "AutoModelForTokenClassification" else real.expand(2, *real.shape)
        torch.testing.assert_close(got[where], want[where], atol=1e-5, rtol=1e-5)
    # Nothing saved changes: the same parameters and buffers, no new ones.
    assert reference.state_dict().keys() == lean.state_dict().keys()


@pytest.mark.parametrize("lengths", [[3, 11, 7, 16, 2], [9, 9, 9]])
@pytest.mark.parametrize("auto", ["AutoModelForSequenceClassification", "AutoModelForTokenClassification"])
def test_training_loss_and_gradients_equal_the_models_own(
    auto: str, lengths: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In training mode (dropout 0 so both draw nothing random), with padding and without (the classifier's
    first-token last layer still applies), the loss and every parameter's gradient agree."""
    reference, lean = build("bert", auto).train(), build("bert", auto).train()
    lean_encoder.apply_lean_encoder(lean)
    calls = calls_of(monkeypatch)
    batch = padded_batch(lengths)
    if auto == "AutoModelForSequenceClassification":
        labels = torch.arange(len(lengths)) % 3
    else:
        labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"] % 3, -100)
    losses = []
    for model in (reference, lean):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    grads = {name: p.grad for name, p in reference.named_parameters()}
    for name, parameter in lean.named_parameters():
        want = grads[name] if grads[name] is not None else torch.zeros_like(parameter)
        got = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
    padded = len(set(lengths)) > 1
    assert calls == ([auto == "AutoModelForSequenceClassification"] if padded or "Sequence" in auto else [])


def test_dropout_trains_in_the_lean_forward() -> None:
    """With dropout on, training-mode outputs are random (masks are drawn), eval-mode outputs are not."""
    model = build(
        "bert", "AutoModelForSequenceClassification", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3
    )
    lean_encoder.apply_lean_encoder(model)
    batch = padded_batch([5, 8])
    model.train()
    torch.manual_seed(1)
    first = model(**batch).logits
    second = model(**batch).logits
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, model(**batch).logits)


def test_the_models_own_encoder_runs_where_the_lean_one_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    tagger = build("bert", "AutoModelForTokenClassification")
    assert lean_encoder.apply_lean_encoder(tagger)
    classifier = build("bert", "AutoModelForSequenceClassification")
    assert lean_encoder.apply_lean_encoder(classifier)
    calls = calls_of(monkeypatch)
    batch = padded_batch([4, 9])
    with torch.no_grad():
        tagger(**padded_batch([6, 6]))  # no padding and nothing else to skip
        left = {k: v.flip(1) for k, v in batch.items()}  # left padding: the first token is padding
        classifier(**left)
        handle = classifier.bert.encoder.layer[0].attention.register_forward_hook(lambda *a: None)
        classifier(**batch)  # a hook the lean forward would skip
        handle.remove()
    classifier.gradient_checkpointing_enable()
    classifier.train()
    classifier(**batch)
    assert calls == [False]  # only the left-padded batch: dense layers skip padding, the last layer runs in full
    classifier.gradient_checkpointing_disable()
    with torch.no_grad():
        classifier.eval()
        classifier(**batch)
        assert calls == [False, True]
        # Attention weights asked for: transformers hooks the model's own attention modules to collect them.
        classifier(**batch, output_attentions=True)
    assert calls == [False, True]


@pytest.mark.parametrize(
    "model_type,changes",
    [
        ("gpt2", {}),  # not an encoder of BERT's shape
        ("bert", {"is_decoder": True}),
        ("bert", {"position_embedding_type": "relative_key"}),
        ("bert", {"chunk_size_feed_forward": 4}),
    ],
)
def test_models_it_does_not_handle_are_left_as_they_are(model_type: str, changes: dict[str, Any]) -> None:
    if model_type == "gpt2":
        from transformers import GPT2Config, GPT2ForSequenceClassification

        model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    else:
        model = build(model_type, "AutoModelForSequenceClassification", **changes)
    assert lean_encoder.apply_lean_encoder(model) == []
    if hasattr(model.base_model, "encoder"):
        assert "forward" not in vars(model.base_model.encoder)


def test_key_mask_reads_padding_and_refuses_other_masks() -> None:
    padding = torch.tensor([[True, True, False], [True, True, True]])
    four_d = padding[:, None, None, :].expand(2, 1, 3, 3)
    assert torch.equal(lean_encoder.key_mask(four_d, 2, 3), padding)
    additive = torch.where(four_d, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(lean_encoder.key_mask(additive, 2, 3), padding)
    assert bool(lean_encoder.key_mask(None, 2, 3).all())  # no mask built: no padding
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None, None].expand(2, 1, 3, 3)
    assert lean_encoder.key_mask(causal, 2, 3) is None  # rows differ by query: not a padding mask


def test_serving_fuses_query_key_value_and_follows_weight_changes() -> None:
    import types

    reference, lean = (
        build("bert", "AutoModelForSequenceClassification"),
        build("bert", "AutoModelForSequenceClassification"),
    )
    lean_encoder.apply_lean_encoder(lean, fuse_projections=True)  # as serve loads it
    batch = padded_batch([4, 9, 6])
    attn = lean.bert.encoder.layer[0].attention.self
    with torch.no_grad():
        lean(**batch)
        assert ("query", "key", "value") in attn.__dict__["_llmtune_fused"]
        for model in (reference, lean):  # an in-place update that bumps the version: the fused copy follows
            model.bert.encoder.layer[0].attention.self.key.weight.mul_(1.5)
        torch.testing.assert_close(lean(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)
    names = ("query", "key", "value")
    assert lean_encoder._fused_projection(attn, names) is None  # gradients on: each projection's own forward
    wrapped = types.SimpleNamespace(query=torch.nn.Sequential(attn.query), key=attn.key, value=attn.value)
    with torch.no_grad():  # a wrapped projection (LoRA's, say) runs its own forward
        assert lean_encoder._fused_projection(wrapped, names) is None
        assert lean_encoder._fused_projection(attn, names) is not None


def test_training_processes_do_not_fuse_projections() -> None:
    lean = build("bert", "AutoModelForSequenceClassification")
    lean_encoder.apply_lean_encoder(lean)  # as training, predict and eval apply it
    with torch.no_grad():
        lean(**padded_batch([4, 9, 6]))
    assert "_llmtune_fused" not in lean.bert.encoder.layer[0].attention.self.__dict__
