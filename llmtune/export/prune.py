"""Structured pruning: uniformly remove the least important feed-forward neurons of every block.

The model stays a plain transformers model: every block keeps the same number of neurons, and the
config's feed-forward width (`intermediate_size`, GPT-2's `n_inner`, T5's `d_ff`) is rewritten, so the
pruned directory loads with `from_pretrained` and fine-tunes again like any checkpoint. A neuron's
importance is the product of the L2 norms of its input row(s) and its output column: a data-free,
per-layer criterion; a short recovery fine-tune (`llmtune finetune` with `model.pretrained:` the pruned
directory) restores most of what it loses.

Attention heads are not pruned: transformers 5 removed `prune_heads` and `config.pruned_heads`, so a
model with fewer heads in some layers can no longer be described by its config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass
class FeedForward:
    """One block's feed-forward pair: the layers that make the neurons and the layer that reads them."""

    inputs: list[tuple[Any, str]]  # (parent module, attribute) of each layer producing the neurons
    output: tuple[Any, str]  # (parent module, attribute) of the layer consuming them


# config attribute holding the feed-forward width, per family
WIDTH_KEYS = ("intermediate_size", "n_inner", "d_ff")


def feed_forwards(model: Any) -> list[FeedForward]:
    """Every feed-forward pair of a BERT-, GPT-2- or T5-style model, in order."""
    found = []
    for module in model.modules():
        intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
        if hasattr(intermediate, "dense") and hasattr(output, "dense"):  # BERT, RoBERTa, ELECTRA, ...
            found.append(FeedForward([(intermediate, "dense")], (output, "dense")))
        elif hasattr(module, "c_fc") and hasattr(module, "c_proj"):  # GPT-2's MLP
            found.append(FeedForward([(module, "c_fc")], (module, "c_proj")))
        elif hasattr(module, "wo") and (hasattr(module, "wi") or hasattr(module, "wi_0")):  # T5 (gated or not)
            names = ["wi"] if hasattr(module, "wi") else ["wi_0", "wi_1"]
            found.append(FeedForward([(module, n) for n in names], (module, "wo")))
    return found


def _rows(layer: Any) -> torch.Tensor:
    """The layer's weight with one row per output neuron (Conv1D stores it transposed)."""
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


def _columns(layer: Any) -> torch.Tensor:
    """The layer's weight with one column per input neuron."""
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


def neuron_importance(pair: FeedForward) -> torch.Tensor:
    """Per neuron: the product of the L2 norms of its input rows and of its output column."""
    score = _columns(getattr(*pair.output)).norm(dim=0)
    for parent, name in pair.inputs:
        score = score * _rows(getattr(parent, name)).norm(dim=1)
    return score


def _keep_outputs(layer: Any, keep: torch.Tensor) -> Any:
    """A copy of `layer` producing only the neurons `keep`."""
    import torch

    if type(layer).__name__ == "Conv1D":
        new = type(layer)(len(keep), layer.weight.shape[0])
        new.weight.data = layer.weight.data[:, keep].clone()
        new.bias.data = layer.bias.data[keep].clone()
        return new
    new = torch.nn.Linear(layer.in_features, len(keep), bias=layer.bias is not None)
    new.weight.data = layer.weight.data[keep].clone()
    if layer.bias is not None:
        new.bias.data = layer.bias.data[keep].clone()
    return new


def _keep_inputs(layer: Any, keep: torch.Tensor) -> Any:
    """A copy of `layer` reading only the neurons `keep`."""
    import torch

    if type(layer).__name__ == "Conv1D":
        new = type(layer)(layer.weight.shape[1], len(keep))
        new.weight.data = layer.weight.data[keep].clone()
        new.bias.data = layer.bias.data.clone()
        return new
    new = torch.nn.Linear(len(keep), layer.out_features, bias=layer.bias is not None)
    new.weight.data = layer.weight.data[:, keep].clone()
    if layer.bias is not None:
        new.bias.data = layer.bias.data.clone()
    return new


def prune_feed_forward(model: Any, amount: float) -> dict[str, Any]:
    """Remove the `amount` share of least important neurons from every feed-forward block (the same number in
    each, so the config holds the new width). Returns what was done, for the export record."""
    import torch

    if not 0 < amount < 1:
        raise UserError(f"--prune: {amount} is not a share of neurons in (0, 1); e.g. --prune 0.4")
    pairs = feed_forwards(model)
    key = next((k for k in WIDTH_KEYS if hasattr(model.config, k)), None)  # GPT-2's n_inner may be None (4 x)
    if not pairs or key is None:
        raise UserError(
            f"--prune: no feed-forward blocks found in a {model.config.model_type!r} model; "
            "structured pruning knows BERT-, GPT-2- and T5-style blocks"
        )
    width = _rows(getattr(*pairs[0].inputs[0])).shape[0]
    kept = max(1, round(width * (1 - amount)))
    with torch.no_grad():
        for pair in pairs:
            keep = neuron_importance(pair).topk(kept).indices.sort().values
            for parent, name in pair.inputs:
                setattr(parent, name, _keep_outputs(getattr(parent, name), keep))
            parent, name = pair.output
            setattr(parent, name, _keep_inputs(getattr(parent, name), keep))
    setattr(model.config, key, kept)
    return {
        "method": "structured feed-forward neurons",
        "criterion": "|w_in row| * |w_out column|",
        "amount": amount,
        "config_key": key,
        "width_before": width,
        "width_after": kept,
        "blocks": len(pairs),
    }
