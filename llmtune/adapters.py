"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), a small module of our own.

Why not a library: AdapterHub's `adapters` pins transformers 4.x and does not install with
transformers 5, and peft has no bottleneck adapter. An adapter is down-projection -> non-linearity
-> up-projection with a residual connection, applied to the output of a sublayer's output projection
(before the block's own residual and layer norm); the up-projection starts at zero, so a fresh
adapter is the identity and the pretrained model's outputs are unchanged at step 0.

The adapter is a child module of the projection it follows (`...output.dense.adapter`) and a forward
hook applies it, so the base model's parameter names stay as they were: its checkpoint loads as is.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from llmtune.errors import UserError

if TYPE_CHECKING:
    import torch

# Per family: the output projection of each attention sublayer and of each feed-forward sublayer.
PLACEMENTS: dict[str, dict[str, str]] = {
    "bert": {"attention": r"attention\.output\.dense$", "feed_forward": r"layer\.\d+\.output\.dense$"},
    "gpt2": {"attention": r"attn\.c_proj$", "feed_forward": r"mlp\.c_proj$"},
    "t5": {"attention": r"SelfAttention\.o$", "feed_forward": r"DenseReluDense\.wo$"},
}
STYLES = {"houlsby": ("attention", "feed_forward"), "pfeiffer": ("feed_forward",)}


def _bottleneck(width: int, reduction_factor: int, non_linearity: str) -> torch.nn.Module:
    import torch

    activations = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "swish": torch.nn.SiLU, "tanh": torch.nn.Tanh}

    class Bottleneck(torch.nn.Module):
        """h + up(act(down(h))), with `up` starting at zero (an identity at initialisation)."""

        def __init__(self) -> None:
            super().__init__()
            inner = max(1, width // reduction_factor)
            self.down = torch.nn.Linear(width, inner)
            self.act = activations[non_linearity]()
            self.up = torch.nn.Linear(inner, width)
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden + self.up(self.act(self.down(hidden)))

    return Bottleneck()


def _width(module: torch.nn.Module) -> int:
    """Output features of a Linear, or of GPT-2's Conv1D (weight stored transposed, `nf` outputs)."""
    return int(getattr(module, "out_features", None) or module.nf)


def adapter_targets(model: torch.nn.Module, style: str) -> list[str]:
    """Names of the projections the adapters follow, for this model's family and the adapter style."""
    family = model.config.model_type
    if family not in PLACEMENTS:
        raise UserError(
            f"strategy.kind: adapter has no known placement for {family!r} models (known: "
            f"{', '.join(PLACEMENTS)}); use kind: lora"
        )
    patterns = [re.compile(PLACEMENTS[family][where]) for where in STYLES[style]]
    names = [name for name, _ in model.named_modules() if any(p.search(name) for p in patterns)]
    if not names:
        raise UserError(f"strategy.kind: adapter found no sublayer outputs in this {family} model")
    return names


def add_adapters(model: torch.nn.Module, style: str, reduction_factor: int, non_linearity: str) -> list[str]:
    """Insert one adapter after each target projection; returns the targets' names."""
    targets = adapter_targets(model, style)
    modules = dict(model.named_modules())
    for name in targets:
        projection = modules[name]
        projection.adapter = _bottleneck(_width(projection), reduction_factor, non_linearity)
        projection.register_forward_hook(lambda module, _inputs, output: module.adapter(output))
    return targets
