"""Inference without padding for BERT-family encoders (`llmtune serve`, `predict` and `eval`).

A batch of texts of different lengths is padded to its longest; the encoder's dense layers (query, key and value,
attention output, feed-forward: about nine tenths of its FLOPs on short texts) then spend most of their time on
padding. Here each layer runs those dense layers on the real tokens only, packed into one matrix, and puts them
back into the padded layout just for the attention itself (where the padding mask keeps them out of every real
token's result). Real tokens get the same values as the model's own forward, to float rounding: the layers are
the model's own modules, called in the same order, and attention is torch's scaled-dot-product attention with
the model's key mask. Positions that are padding come out as zeros (the model's own forward leaves numbers no
head reads there).

transformers has no unpadded path for these models on CPU (its varlen kernels are flash-attention's, on GPU),
so this one walks the model's own `BertLayer`-shaped modules. It is used only where it is the same function:
inference (no gradients, eval mode), self-attention without caches or cross-attention, absolute positions,
no feed-forward chunking, a padding-only mask; any other call, and a batch without padding, runs the model's own
encoder.
"""

from __future__ import annotations

import types
from typing import Any

# Encoders whose layers are BERT's (attention.self.{query,key,value}, attention.output, intermediate, output).
MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text"})


def _layer_fits(layer: Any) -> bool:
    attention = getattr(layer, "attention", None)
    attn_self = getattr(attention, "self", None)
    return (
        attn_self is not None
        and all(hasattr(attn_self, name) for name in ("query", "key", "value", "attention_head_size"))
        and hasattr(attention, "output")
        and hasattr(layer, "intermediate")
        and hasattr(layer, "output")
        and not getattr(layer, "is_decoder", False)
        and not getattr(layer, "add_cross_attention", False)
        and not getattr(layer, "chunk_size_feed_forward", 0)
    )


def unpadded_applies(model: Any) -> bool:
    """Whether `model` (a transformers model, possibly an adapter-merged one) has an encoder this module runs."""
    base = getattr(model, "base_model", None)
    config = getattr(base, "config", None)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    return (
        config is not None
        and layers is not None
        and getattr(config, "model_type", None) in MODEL_TYPES
        and not getattr(config, "is_decoder", False)
        and getattr(config, "position_embedding_type", "absolute") in (None, "absolute")
        and all(_layer_fits(layer) for layer in layers)
    )


def key_mask(attention_mask: Any, batch: int, length: int) -> Any:
    """The (batch, length) bool mask of real key positions behind the 4-D mask the model built, or None where the
    model's own forward is as fast (no padding: the model built no mask) or the only right one (a mask that is
    more than padding: rows differ by query)."""
    import torch

    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-1] != length:
        return None
    real = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    real = real.expand(batch, 1, length, length)
    if not bool((real == real[:, :, :1, :]).all()):
        return None
    return real[:, 0, 0, :]


def _attend(layer: Any, packed: Any, index: Any, mask: Any) -> Any:
    """One layer's self-attention output (before its output dense) for the packed real tokens."""
    import torch.nn.functional as F

    attn = layer.attention.self
    batch, length = mask.shape
    heads, size = attn.num_attention_heads, attn.attention_head_size
    padded = packed.new_zeros(3, batch * length, heads * size)
    padded[0].index_copy_(0, index, attn.query(packed))
    padded[1].index_copy_(0, index, attn.key(packed))
    padded[2].index_copy_(0, index, attn.value(packed))
    q, k, v = padded.view(3, batch, length, heads, size).transpose(2, 3).unbind(0)
    scores = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=attn.scaling)
    return scores.transpose(1, 2).reshape(batch * length, heads * size).index_select(0, index)


def unpadded_encoder_forward(layers: Any, hidden: Any, mask: Any) -> Any:
    """The encoder's last hidden state for `hidden` (batch, length, dim) and key mask `mask`, dense layers on real
    tokens only; padding positions are zeros."""
    batch, length, dim = hidden.shape
    index = mask.reshape(-1).nonzero().squeeze(1)
    packed = hidden.reshape(batch * length, dim).index_select(0, index)
    for layer in layers:
        context = _attend(layer, packed, index, mask)
        attended = layer.attention.output(context, packed)  # dense, dropout (off), LayerNorm(+ residual)
        packed = layer.output(layer.intermediate(attended), attended)
    out = hidden.new_zeros(batch * length, dim)
    out.index_copy_(0, index, packed)
    return out.view(batch, length, dim)


def _capturing() -> Any:
    """A function telling whether the caller asked transformers for per-layer outputs (hidden states, attentions):
    they are collected by hooks on the model's own layers, which the unpadded forward does not call. None where
    this transformers has no such collector to ask (then the unpadded forward is not used)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return lambda: bool(_active_collector.get())


def apply_unpadded(model: Any) -> bool:
    """Route `model`'s encoder through the unpadded forward at inference (in place; nothing saved changes). Returns
    whether it applies; where it does not, the model is left as it was."""
    capturing = _capturing()
    if capturing is None or not unpadded_applies(model):
        return False
    encoder = model.base_model.encoder
    original = encoder.forward

    def forward(self: Any, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        busy = (
            args
            or any(kwargs.get(k) is not None for k in ("encoder_hidden_states", "cache", "past_key_values"))
            or capturing()
        )
        mask = None
        if not busy and not self.training and not torch.is_grad_enabled() and not kwargs.get("use_cache"):
            mask = key_mask(attention_mask, hidden_states.shape[0], hidden_states.shape[1])
        if mask is None:
            return original(hidden_states, attention_mask, *args, **kwargs)
        last = unpadded_encoder_forward(self.layer, hidden_states, mask.to(hidden_states.device))
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=last)

    encoder.forward = types.MethodType(forward, encoder)
    return True
