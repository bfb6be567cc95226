"""Faster kernels that compute the same function as the model's own, for training (`train.fast_kernels`).

Five substitutions, all made on the model object in memory only: no parameter, buffer or saved config key
changes, so the state dict, `config.json` and `final/` are exactly what the unpatched model saves, and the saved
model loads and runs with plain transformers. Four are below; the fifth, BERT-family encoders without wasted work (no
dense layer on padding, a sequence classifier's last layer for the first token only), lives in
`llmtune/lean_encoder.py` because inference uses it too.

* **GELU (tanh approximation)**: transformers' `NewGELUActivation` (`gelu_new`: GPT-2, T5 v1.1's gated-gelu,
  BERT configs that ask for it) is written as seven elementwise tensor operations, each a pass over the
  activation (and about as many again in backward). torch's `F.gelu(x, approximate="tanh")` is the same formula
  in one fused kernel (one in backward). The module keeps the original formula in eval mode, so evaluation,
  prediction and generation give bit-identical outputs; the fused kernel runs only while training.
* **Dropout masks from 64-bit words** (every `nn.Dropout`, CPU training only): torch's CPU dropout draws one
  double per element from the serial generator; `keep_mask` takes two 31-bit integers from each 64-bit draw of
  the same seeded generator, about three times faster, for the same Bernoulli(1 - p) masks, kept as floats so
  that applying one is a single multiplication. The random stream differs from torch's, so a run's masks differ
  from the unpatched model's (as they would with another seed).
* **GPT-2's attention with dropout** (CPU training, no mask tensor): torch's sdpa has no fused CPU kernel with
  dropout and takes its math path, whose `bernoulli_` over the attention probabilities dominates. `dropout_attention`
  is registered with transformers as the attention implementation `ATTENTION_NAME` (the config's in-memory
  `_attn_implementation`, which `config.json` does not hold); it computes the same attention with `keep_mask` and
  hands every other call (evaluation, masks, caches) to transformers' sdpa.
* **Causal-LM loss without full logits** (GPT-2 heads: a bias-free `lm_head` on the base model's last hidden
  state, the model types in `FUSED_LOSS_MODEL_TYPES`): transformers' loss materialises the full
  (batch, length, vocabulary) logits, a log-softmax of the same size in forward and its gradient in backward.
  `linear_cross_entropy` computes the same summed cross-entropy chunk by chunk of rows, and the gradients of
  the hidden states and of the output weight in the same pass (softmax minus one-hot, which is what
  log-softmax's backward computes), so only one chunk of logits ever exists. Used only when the forward is
  given labels with gradients enabled in training mode and nothing else the fast path does not handle;
  every other call (evaluation, generation, `logits_to_keep`, caches) runs the model's own forward.
"""

from __future__ import annotations

import functools
import math
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE = -100
# Causal LMs whose forward is `lm_head(base(...).last_hidden_state)` with a bias-free lm_head and transformers'
# ForCausalLMLoss, with nothing in between (no logit scaling or soft-capping): the fused loss is the same function.
FUSED_LOSS_MODEL_TYPES = frozenset({"gpt2"})
# Inputs the fast path passes through to the base model; any other keyword sends the call to the model's own forward.
_FAST_PATH_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "token_type_ids", "use_cache"})
# Rows of logits per chunk: about 4 MiB of fp32 logits (this CPU's L2 cache), and at least 128 rows so the matrix
# products stay efficient for large vocabularies (measured fastest here: 256 rows at vocabulary 4,096, 128 at 50,257).
_CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNK_ROWS = 128
# Model types whose attention calls transformers' registered attention function as (module, query, key, value,
# attention_mask, dropout=, scaling=, **kwargs) in (batch, heads, length, head_dim) layout.
FAST_ATTENTION_MODEL_TYPES = frozenset({"gpt2"})
ATTENTION_NAME = "llmtune_sdpa"
# Keywords the attention fast path ignores because they do not change the result without a mask or cache.
_ATTENTION_KWARGS = frozenset({"position_ids", "use_cache", "output_attentions"})


def _gelu_module() -> Any:
    import torch
    import torch.nn.functional as F
    from transformers.activations import NewGELUActivation

    class FastGELUTanh(NewGELUActivation):
        """`gelu_new` as torch's fused tanh-approximate GELU while training; the original formula in eval."""

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if self.training:
                return F.gelu(input, approximate="tanh")
            return super().forward(input)

    del torch
    return FastGELUTanh


def _swap_modules(model: Any, matches: Any, make: Any) -> int:
    """Replace every registered submodule `matches(child)` accepts with `make(child)` (same training mode); how
    many were replaced. Modules held as plain attributes (not registered submodules) are left as they are: none of
    the supported architectures does that, and a missed swap only costs speed."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if matches(child):
                replacement = make(child)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped += 1
    return swapped


def _replace_gelu(model: Any) -> int:
    """Swap every `NewGELUActivation` submodule for the fused one; how many were swapped."""
    from transformers.activations import NewGELUActivation

    fast = _gelu_module()
    return _swap_modules(model, lambda child: type(child) is NewGELUActivation, lambda _child: fast())


def keep_mask(shape: Any, p: float) -> torch.Tensor:
    """A CPU float32 mask of `shape`, each element 1.0 (kept) with probability 1 - p and 0.0 otherwise, independently.

    torch's CPU dropout draws each element with `bernoulli_`, one double per element from the serial generator
    (about 6 ns each on this project's CPU). Here the same generator fills 64-bit words (`random_`, about 1.75 ns
    per 32 bits), each giving two 31-bit uniform integers u, kept where u >= p * 2^31: the same Bernoulli draw, p
    resolved to 2^-31 (torch's float path resolves it to 2^-53), from the same seeded generator, so runs stay
    reproducible and resumable. The comparison is made in integer arithmetic (clamp(u - threshold + 1, 0, 1))
    because converting a bool mask to float is several times slower than the whole comparison; a float mask then
    costs one plain multiplication where it is applied.
    """
    import torch

    count = math.prod(shape)
    threshold = round(p * 2**31)
    if threshold == 0:
        return torch.ones(shape)
    words = torch.empty((count + 1) // 2, dtype=torch.int64).random_()  # the low 63 bits of each draw
    bits = words.view(torch.int32)[:count].bitwise_and_(0x7FFFFFFF)  # two 31-bit uniform integers per word
    return bits.sub_(threshold - 1).clamp_(0, 1).to(torch.float32).view(shape)


def _dropout_module() -> Any:
    import torch

    class FastDropoutFunction(torch.autograd.Function):
        """x * mask / (1 - p) with `keep_mask`; the backward is the same product, as torch's dropout's."""

        @staticmethod
        def forward(ctx: Any, x: Any, p: float) -> Any:
            mask = keep_mask(x.shape, p).mul_(1.0 / (1.0 - p)).to(x.dtype)  # 0 or 1 / (1 - p)
            ctx.save_for_backward(mask)
            return x * mask

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (mask,) = ctx.saved_tensors
            return grad * mask, None

    class FastDropout(torch.nn.Dropout):
        """`nn.Dropout` drawing its CPU training masks with `keep_mask`; anything else as `nn.Dropout`."""

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if self.training and 0.0 < self.p < 1.0 and input.device.type == "cpu" and not self.inplace:
                return FastDropoutFunction.apply(input, self.p)
            return super().forward(input)

    return FastDropout


def _replace_dropout(model: Any) -> int:
    """Swap every `nn.Dropout` submodule with p > 0 for `FastDropout`; how many were swapped."""
    import torch

    fast = _dropout_module()
    return _swap_modules(
        model,
        lambda child: type(child) is torch.nn.Dropout and child.p > 0,
        lambda child: fast(child.p, child.inplace),
    )


@functools.cache  # built once, lazily, so importing llmtune does not import torch
def _dropout_attention_function() -> Any:
    """softmax(q k^T * scale + causal) with dropout, then @ v, for CPU training with attention dropout.

    torch's scaled_dot_product_attention has no fused CPU kernel with dropout: it falls back to its math path,
    which draws the (batch, heads, length, length) dropout mask with `bernoulli_` (about 60% of that attention's
    time here) and makes several full-size temporaries. This computes the same function with `keep_mask`'s draw,
    the causal mask added inside the first matrix product, the scales folded into the products, and a backward
    written out (softmax's own backward kernel) that recomputes the dropped probabilities instead of saving them.
    """
    import torch

    class DropoutAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, p: float, scale: float, causal: bool) -> Any:
            batch, heads, length, dim = q.shape
            keys = k.shape[2]
            q3, k3, v3 = (t.reshape(batch * heads, -1, dim) for t in (q, k, v))
            if causal:
                bias = _causal_bias(length, keys, q.dtype)
                scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
            else:
                scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)
            probs = torch.softmax(scores, dim=-1)
            del scores
            keep = keep_mask(probs.shape, p)
            ctx.keep_scale = 1.0 / (1.0 - p)
            out = torch.baddbmm(q3.new_empty(()), probs * keep, v3, beta=0, alpha=ctx.keep_scale)
            ctx.save_for_backward(q3, k3, v3, probs, keep)
            ctx.scale, ctx.shapes = scale, (q.shape, k.shape, v.shape)
            return out.view(batch, heads, length, v.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            q3, k3, v3, probs, keep = ctx.saved_tensors
            q_shape, k_shape, v_shape = ctx.shapes
            g3 = grad.reshape(q3.shape[0], q3.shape[1], -1)
            grad_v = torch.baddbmm(v3.new_empty(()), (probs * keep).transpose(1, 2), g3, beta=0, alpha=ctx.keep_scale)
            grad_probs = torch.baddbmm(probs.new_empty(()), g3, v3.transpose(1, 2), beta=0, alpha=ctx.keep_scale)
            grad_probs.mul_(keep)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            del grad_probs
            grad_q = torch.baddbmm(q3.new_empty(()), grad_scores, k3, beta=0, alpha=ctx.scale)
            grad_k = torch.baddbmm(k3.new_empty(()), grad_scores.transpose(1, 2), q3, beta=0, alpha=ctx.scale)
            return grad_q.view(q_shape), grad_k.view(k_shape), grad_v.view(v_shape), None, None, None

    return DropoutAttention


@functools.cache
def _causal_bias(length: int, keys: int, dtype: Any) -> torch.Tensor:
    """(length, keys): 0 where a query may attend (key <= query, aligned at the end), -inf elsewhere; cached."""
    import torch

    blocked = torch.ones(length, keys, dtype=torch.bool).triu_(keys - length + 1)
    return torch.zeros(length, keys, dtype=dtype).masked_fill_(blocked, float("-inf"))


def dropout_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention (registered as `ATTENTION_NAME`), with `DropoutAttention` for CPU training
    with attention dropout and no mask tensor (causal or full attention over equal lengths); anything else goes to
    transformers' own `sdpa_attention_forward`."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    fast = (
        dropout > 0
        and module.training
        and attention_mask is None
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and query.shape[1] == key.shape[1]  # no grouped key/value heads
        and query.shape[2] == key.shape[2] > 1  # no cache
        and set(kwargs) <= _ATTENTION_KWARGS
    )
    if not fast:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _dropout_attention_function().apply(query, key, value, dropout, scale, bool(causal))
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    """Make `ATTENTION_NAME` an attention implementation transformers knows, with sdpa's mask preparation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, dropout_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _fast_attention_applies(model: Any) -> bool:
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in FAST_ATTENTION_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and getattr(config, "attn_pdrop", 0.0) > 0
    )


@functools.cache  # built once, lazily, so importing llmtune does not import torch
def _linear_cross_entropy_function() -> Any:
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """sum_i CE(hidden_i @ weight.T, target_i) / divisor, gradients computed chunk by chunk in forward."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, divisor: Any, chunk: int) -> Any:
            compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled() else weight.dtype
            rows = hidden.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            w = weight.to(compute)
            scale = 1.0 / divisor.to(torch.float32) if torch.is_tensor(divisor) else 1.0 / float(divisor)
            for start in range(0, rows, chunk):
                h = hidden[start : start + chunk].to(compute)
                t = targets[start : start + chunk]
                logits = (h @ w.t()).float()
                keep = t != IGNORE
                safe = torch.where(keep, t, 0)
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                top = logits.amax(dim=-1)
                # softmax is one fused kernel; log-sum-exp follows from its largest entry, exp(top - lse), which is
                # at least 1 / vocabulary: lse = top - log(max p). (torch.logsumexp makes a full-size temporary.)
                grad = torch.softmax(logits, dim=-1)
                del logits
                lse = top - grad.amax(dim=-1).log()
                total = total + torch.where(keep, lse - picked, 0.0).sum()
                # d(loss)/d(logits) = (softmax - onehot) * scale on labelled rows; the row factor is applied to the
                # two (chunk, dim) products below instead of to the (chunk, vocabulary) gradient.
                grad.scatter_add_(1, safe[:, None], torch.full_like(top[:, None], -1.0))
                rows_scale = (keep.to(torch.float32) * scale)[:, None]
                grad_c = grad.to(compute)
                grad_hidden[start : start + chunk] = ((grad_c @ w) * rows_scale.to(compute)).to(hidden.dtype)
                grad_weight.add_((grad_c.t() @ (h * rows_scale.to(compute))).float())
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            return total * scale

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            grad_hidden, grad_weight = ctx.saved_tensors
            scale = grad_output.to(grad_hidden.dtype)
            return grad_hidden * scale, grad_weight * grad_output.to(grad_weight.dtype), None, None, None

    return LinearCrossEntropy


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, divisor: Any = None
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (-100: ignored), over `divisor` (default: the
    number of labelled targets, i.e. the mean), without materialising the full logits.

    `hidden` is (rows, dim), `targets` (rows,); the logits are made and freed `_CHUNK_ELEMENTS / vocabulary`
    rows at a time (at least `_MIN_CHUNK_ROWS`), in fp32 (as transformers' loss upcasts them). Gradients flow to
    `hidden` and `weight`.
    """
    if divisor is None:
        divisor = (targets != IGNORE).sum().clamp(min=1)
    chunk = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // weight.shape[0])
    return _linear_cross_entropy_function().apply(hidden, weight, targets, divisor, chunk)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: Any) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` on `lm_head(hidden)` (position t predicts labels[t+1]), fused as above."""
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # the last position predicts nothing
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    return linear_cross_entropy(rows, weight, targets, num_items)


def _fused_loss_forward(model: Any) -> Any:
    """A forward for `model` that takes the fused loss on the fast path and the model's own forward otherwise."""
    original = model.forward

    def forward(self: Any, *args: Any, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        import torch

        fast = (
            labels is not None
            and not args
            and self.training
            and torch.is_grad_enabled()
            and set(kwargs) <= _FAST_PATH_INPUTS
            and not kwargs.get("use_cache")
        )
        weight = self.get_output_embeddings().weight
        # DeepSpeed ZeRO-3 gathers a partitioned weight only inside its own module's forward: leave it to lm_head.
        if not fast or hasattr(weight, "ds_id"):
            return original(*args, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

        kwargs["use_cache"] = False
        hidden = self.base_model(**kwargs).last_hidden_state
        loss = causal_lm_loss(hidden, weight, labels, num_items_in_batch)
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=None)

    return types.MethodType(forward, model)


def _fused_loss_applies(model: Any) -> bool:
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        getattr(model.config, "model_type", None) in FUSED_LOSS_MODEL_TYPES
        and type(model).__name__.endswith("LMHeadModel")
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and getattr(model.config, "loss_type", None) in (None, "ForCausalLM")
    )


def apply_fast_kernels(model: Any) -> list[str]:
    """Substitute the faster kernels in `model` (in place; nothing saved changes); what was substituted."""
    done = []
    swapped = _replace_gelu(model)
    if swapped:
        done.append(f"gelu_new -> fused tanh GELU ({swapped} modules)")
    dropped = _replace_dropout(model)
    if dropped:
        done.append(f"dropout masks from 64-bit words on CPU ({dropped} modules)")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    if _fast_attention_applies(inner):
        _register_attention()
        inner.config._attn_implementation = ATTENTION_NAME  # not saved: config.json is unchanged
        done.append("attention dropout -> CPU attention with 64-bit-word masks (sdpa has no fused dropout on CPU)")
    if _fused_loss_applies(inner):
        inner.forward = _fused_loss_forward(inner)
        done.append("causal-LM loss -> chunked linear cross-entropy (no full logits)")
    from llmtune.lean_encoder import apply_lean_encoder

    done.extend(apply_lean_encoder(model))
    return done


def gelu_new_reference(x: torch.Tensor) -> torch.Tensor:
    """transformers' `gelu_new` formula, for comparisons in tests."""
    import torch

    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
