"""BERT-family encoders without wasted work, in training (`train.fast_kernels`) and at inference (`serve`,
`predict`, `eval`). Two savings, each the same function as the model's own forward:

* **No dense layer on padding.** A batch of texts of different lengths is padded to its longest, and the
  encoder's dense layers (query, key and value, attention output, feed-forward: about nine tenths of its FLOPs
  on short texts) spend that share of their time on padding. Here each layer runs them on the real tokens
  only, packed into one matrix, and puts keys, values and queries back into the padded layout just for the
  attention itself, where the padding mask keeps padding out of every real token's result.
* **A last layer for the token the head reads.** A sequence classifier's head reads the first token's final
  hidden state and nothing else (BERT's pooler, RoBERTa's and ELECTRA's classification heads), so the last
  layer computes its query, attention output and feed-forward for that token only (its keys and values still
  come from every token). That is five sixths of one layer's work: a seventh of a 6-layer encoder's.

Real tokens get the model's own values to float rounding, and gradients flow the same way: the layers are the
model's own modules (so their dropout, and hooks on their dense layers such as bottleneck adapters, still run),
called in the same order, and attention is torch's scaled-dot-product attention with the model's key mask and
attention dropout. Positions no head reads (padding; every position but the first under the second saving)
come out as zeros. For `serve` (weights fixed once loaded), at inference a layer's query, key and value
projections run as one matrix product on their concatenated weights (cached; not where a projection is wrapped,
e.g. by LoRA); training, `predict` and `eval` run them one by one, as the model does. Parameters, buffers and
config are untouched, so nothing saved changes. Dropout draws its masks for fewer elements, so in training the
random stream differs from the padded forward's (same distribution).

transformers has no unpadded path for these models on CPU (its varlen kernels are flash-attention's, on GPU),
so this walks the model's own `BertLayer`-shaped modules. Any call it does not handle runs the model's own
encoder: caches, cross-attention, per-layer outputs asked for (hidden states, attention weights), gradient
checkpointing, hooks on the layer modules themselves, a mask that is more than padding, and (for the second
saving) a first token that is padding.
"""

from __future__ import annotations

import types
from typing import Any

# Encoders whose layers are BERT's (attention.self.{query,key,value}, attention.output, intermediate, output).
MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text"})
# Sequence classifiers whose head reads only the first token's last hidden state.
FIRST_TOKEN_HEADS = frozenset(
    f"{name}ForSequenceClassification"
    for name in ("Bert", "Roberta", "XLMRoberta", "Camembert", "Electra", "Data2VecText")
)


def _hooked(module: Any) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None))


def _unwalkable(layer: Any) -> bool:
    """Whether calling the layer's sublayers directly would skip something: gradient checkpointing (done by the
    layer's own call), or hooks on the modules this forward does not call (the layer and its attention)."""
    return bool(getattr(layer, "gradient_checkpointing", False)) or any(
        _hooked(module) for module in (layer, layer.attention, layer.attention.self)
    )


def _layer_fits(layer: Any) -> bool:
    attention = getattr(layer, "attention", None)
    attn_self = getattr(attention, "self", None)
    return (
        attn_self is not None
        and all(hasattr(attn_self, name) for name in ("query", "key", "value", "attention_head_size", "scaling"))
        and hasattr(attention, "output")
        and hasattr(layer, "intermediate")
        and hasattr(layer, "output")
        and not getattr(layer, "is_decoder", False)
        and not getattr(layer, "add_cross_attention", False)
        and not getattr(layer, "chunk_size_feed_forward", 0)
    )


def lean_encoder_applies(model: Any) -> bool:
    """Whether `model` (a transformers model; under a peft wrapper, its base model) has an encoder this runs."""
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
    """The (batch, length) bool mask of real key positions behind the 4-D mask the model built (all True where it
    built none: no padding), or None where the mask is more than padding (rows differ by query)."""
    import torch

    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool)
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-1] != length:
        return None
    real = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    real = real.expand(batch, 1, length, length)
    if not bool((real == real[:, :, :1, :]).all()):
        return None
    return real[:, 0, 0, :]


def _heads(attn: Any, rows: Any, padded_rows: int, index: Any, batch: int) -> Any:
    """`rows` (real tokens, packed) put back at `index` of `padded_rows` zero rows, as (batch, heads, length, size)."""
    size = attn.attention_head_size
    padded = rows.new_zeros(padded_rows, rows.shape[-1]).index_copy(0, index, rows)
    return padded.view(batch, -1, rows.shape[-1] // size, size).transpose(1, 2)


def _fused_projection(attn: Any, names: tuple[str, ...]) -> tuple[Any, Any] | None:
    """At inference (no gradients), the projections `names` of `attn` as one matrix product: their weights and
    biases concatenated, cached on the module (rebuilt when a weight's identity or version counter changes: only
    for models whose weights stay put, as a server's; an optimizer's fused in-place step need not bump the
    counter). None where any is not a plain hook-free `nn.Linear` with a bias (a peft LoRA layer, say: its own
    forward must run) or gradients are on."""
    import torch

    if torch.is_grad_enabled():
        return None
    linears = [getattr(attn, name) for name in names]
    if any(type(m) is not torch.nn.Linear or _hooked(m) or m.bias is None for m in linears):
        return None
    stamp = tuple((id(m.weight), m.weight._version, id(m.bias), m.bias._version) for m in linears)
    cache = attn.__dict__.setdefault("_llmtune_fused", {})
    if names not in cache or cache[names][0] != stamp:
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears])
        cache[names] = (stamp, weight, bias)
    return cache[names][1], cache[names][2]


def _projected_heads(
    attn: Any, packed: Any, names: tuple[str, ...], padded_rows: int, index: Any, batch: int, fuse: bool
) -> Any:
    """The projections `names` of the packed tokens, each as (batch, heads, length, size) in the padded layout: with
    `fuse`, one matrix product and one scatter where they can be fused, else one each."""
    import torch.nn.functional as F

    fused = _fused_projection(attn, names) if fuse else None
    if fused is None:
        return [_heads(attn, getattr(attn, name)(packed), padded_rows, index, batch) for name in names]
    rows = F.linear(packed, *fused)
    padded = rows.new_zeros(padded_rows, rows.shape[-1]).index_copy(0, index, rows)
    size = attn.attention_head_size
    return padded.view(batch, -1, len(names), rows.shape[-1] // len(names) // size, size).permute(2, 0, 3, 1, 4)


def _layer(layer: Any, packed: Any, index: Any, mask: Any, first: Any, fuse: bool) -> Any:
    """One layer on the packed real tokens; with `first` (the packed positions of each row's first token), only
    those tokens' outputs, one row each."""
    import torch.nn.functional as F

    attn = layer.attention.self
    batch, length = mask.shape
    if first is None:
        query, key, value = _projected_heads(
            attn, packed, ("query", "key", "value"), batch * length, index, batch, fuse
        )
        queries = packed
    else:
        key, value = _projected_heads(attn, packed, ("key", "value"), batch * length, index, batch, fuse)
        queries = packed.index_select(0, first)
        query = attn.query(queries).view(batch, 1, -1, attn.attention_head_size).transpose(1, 2)
    dropout = attn.dropout.p if attn.training else 0.0
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask[:, None, None, :], dropout_p=dropout, scale=attn.scaling
    )
    context = context.transpose(1, 2).reshape(-1, queries.shape[-1])
    if first is None:
        context = context.index_select(0, index)
    attended = layer.attention.output(context, queries)  # dense, dropout, LayerNorm(+ residual)
    return layer.output(layer.intermediate(attended), attended)


def lean_encoder_forward(layers: Any, hidden: Any, mask: Any, first_token_only: bool, fuse: bool = False) -> Any:
    """The encoder's last hidden state for `hidden` (batch, length, dim) and key mask `mask`: dense layers on real
    tokens only; with `first_token_only`, the last layer for each row's first token only. Positions not computed
    are zeros."""
    import torch

    batch, length, dim = hidden.shape
    index = mask.reshape(-1).nonzero().squeeze(1)
    packed = hidden.reshape(batch * length, dim).index_select(0, index)
    last = len(layers) - 1
    for number, layer in enumerate(layers):
        if first_token_only and number == last:
            counts = mask.sum(dim=1)
            first = torch.cumsum(counts, 0) - counts  # each row's first token in the packed order
            out = _layer(layer, packed, index, mask, first, fuse)
            return torch.cat([out[:, None], out.new_zeros(batch, length - 1, dim)], dim=1)
        packed = _layer(layer, packed, index, mask, None, fuse)
    return packed.new_zeros(batch * length, dim).index_copy(0, index, packed).view(batch, length, dim)


def _capturing() -> Any:
    """A function telling whether the caller asked transformers for per-layer outputs (hidden states, attentions):
    they are collected by hooks on the model's own layers, which this forward does not call. None where this
    transformers has no such collector to ask (then the lean forward is not used)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return lambda: bool(_active_collector.get())


def apply_lean_encoder(model: Any, fuse_projections: bool = False) -> list[str]:
    """Route `model`'s encoder through the lean forward (in place; nothing saved changes); what applies (empty
    where nothing does, the model left as it was). `fuse_projections` (a server's model, whose weights never
    change after loading): at inference, query, key and value as one matrix product on cached weights."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    capturing = _capturing()
    if capturing is None or not lean_encoder_applies(inner):
        return []
    encoder = inner.base_model.encoder
    original = encoder.forward
    first_token_only = type(inner).__name__ in FIRST_TOKEN_HEADS
    done = ["encoder dense layers on real tokens only (no padding)"]
    if first_token_only:
        done.append("last encoder layer for the first token only (the classifier reads nothing else)")

    def forward(self: Any, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        batch, length = hidden_states.shape[:2]
        mask = None
        if not (
            args
            or any(kwargs.get(k) is not None for k in ("encoder_hidden_states", "cache", "past_key_values"))
            or kwargs.get("use_cache")
            or capturing()
            or getattr(self, "gradient_checkpointing", False)
            or any(_unwalkable(layer) for layer in self.layer)
        ):
            mask = key_mask(attention_mask, batch, length)
        first_only = first_token_only and mask is not None and bool(mask[:, 0].all())
        if mask is None or (attention_mask is None and not first_only):  # nothing to save: the model's own
            return original(hidden_states, attention_mask, *args, **kwargs)
        last = lean_encoder_forward(
            self.layer, hidden_states, mask.to(hidden_states.device), first_only, fuse=fuse_projections
        )
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=last)

    encoder.forward = types.MethodType(forward, encoder)
    return done
