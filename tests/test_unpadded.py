"""llmtune/unpadded.py: BERT-family encoders at inference skip the batch's padding in their dense layers and give
the model's own outputs on every real token; every case the path does not handle runs the model's own encoder."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llmtune import unpadded
from tests.helpers import TINY_CONFIGS

VOCAB = 120
HEADS = {
    "AutoModelForSequenceClassification": lambda out: out.logits,
    "AutoModelForTokenClassification": lambda out: out.logits,
    "AutoModelForQuestionAnswering": lambda out: torch.stack([out.start_logits, out.end_logits]),
}


def build(model_type: str, auto: str, **changes: Any) -> Any:
    """A tiny BERT-family model with seeded weights, in eval mode."""
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


def calls_of(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the unpadded forwards that run."""
    calls: list[int] = []
    original = unpadded.unpadded_encoder_forward

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(unpadded, "unpadded_encoder_forward", counted)
    return calls


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("auto", sorted(HEADS))
def test_unpadded_outputs_equal_the_models_own_on_real_tokens(
    model_type: str, auto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, fast = build(model_type, auto), build(model_type, auto)
    assert unpadded.apply_unpadded(fast)
    calls = calls_of(monkeypatch)
    batch = padded_batch([3, 11, 7, 16, 1 + 1])
    with torch.no_grad():
        want, got = HEADS[auto](reference(**batch)), HEADS[auto](fast(**batch))
    assert calls == [1]
    real = batch["attention_mask"].bool()
    if auto == "AutoModelForSequenceClassification":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # per-token heads: real tokens agree; what the model leaves at padding is nobody's output
        where = real if auto == "AutoModelForTokenClassification" else real.expand(2, *real.shape)
        torch.testing.assert_close(got[where], want[where], atol=1e-5, rtol=1e-5)
    # Nothing saved changes: the same parameters and buffers, no new ones.
    assert reference.state_dict().keys() == fast.state_dict().keys()


def test_the_models_own_encoder_runs_where_the_unpadded_one_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("bert", "AutoModelForSequenceClassification")
    assert unpadded.apply_unpadded(model)
    calls = calls_of(monkeypatch)
    batch = padded_batch([4, 9])
    with torch.no_grad():
        model(**padded_batch([6, 6]))  # no padding: nothing to skip
        model.train()
        model(**batch)  # training mode
        model.eval()
    model(**batch)  # gradients enabled
    with torch.no_grad():
        model(**batch, output_attentions=True)  # attention weights asked for: the model's own layers give them
    assert calls == []
    with torch.no_grad():
        model(**batch)
    assert calls == [1]


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
    forward = model.base_model.forward
    assert not unpadded.apply_unpadded(model)
    assert model.base_model.forward == forward
    if hasattr(model.base_model, "encoder"):
        assert "forward" not in vars(model.base_model.encoder)


def test_key_mask_reads_padding_and_refuses_other_masks() -> None:
    padding = torch.tensor([[True, True, False], [True, True, True]])
    four_d = padding[:, None, None, :].expand(2, 1, 3, 3)
    assert torch.equal(unpadded.key_mask(four_d, 2, 3), padding)
    additive = torch.where(four_d, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(unpadded.key_mask(additive, 2, 3), padding)
    assert unpadded.key_mask(None, 2, 3) is None  # no padding at all
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None, None].expand(2, 1, 3, 3)
    assert unpadded.key_mask(causal, 2, 3) is None  # rows differ by query: not a padding mask
