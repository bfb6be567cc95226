"""What trains: one rule per strategy, applied to a built model before training (never a different loop).

`full` trains every parameter; `head` freezes the pretrained body (`model.base_model`) so only the
task head trains: the classifier, token classifier, QA span head, or an LM head that is not tied
to the input embeddings. Frozen parameters get `requires_grad=False`, so the optimizer never sees
them and they hold no optimizer state.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from llmtune.errors import UserError
from llmtune.recipe import StrategySpec

if TYPE_CHECKING:
    import torch


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters outside the pretrained body: the task head.

    A parameter shared with the body (an LM head tied to the input embeddings) belongs to the body.
    """
    body = getattr(model, "base_model", model)
    if body is model:  # the class has no separate body (e.g. T5 seq2seq: the body is the model)
        inner = {id(p) for name, p in model.named_parameters() if not name.startswith(("lm_head", "score"))}
    else:
        inner = {id(p) for p in body.parameters()}
    return {name for name, p in model.named_parameters() if id(p) not in inner}


def apply_strategy(model: torch.nn.Module, spec: StrategySpec) -> None:
    """Freeze what the strategy says does not train; refuse a strategy that would train nothing."""
    if spec.kind == "full":
        return
    head = head_parameter_names(model)
    if not head:
        raise UserError(
            f"strategy.kind: head: a {model.config.model_type} {type(model).__name__} has no task head apart "
            "from its body (its LM head is tied to the input embeddings); use kind: full, or untie it with "
            "model.config.tie_word_embeddings: false"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(name in head)


_BLOCK = re.compile(r"(?:^|\.)(?:h|layer|layers|block|blocks)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:embed|wte|wpe|shared)")


def layer_depths(names: list[str], head: set[str]) -> dict[str, int]:
    """For layer-wise LR decay: each parameter's depth, 0 for the embeddings up to L+1 for the head.

    Blocks are found by their index in the name (`h.3.`, `layer.3.`, `block.3.`); an encoder-decoder's
    two stacks are numbered separately, each counted from its own first block. Parameters in no block
    that are not embeddings (final norms, poolers) sit with the last block.
    """
    indices = [int(m.group(1)) for n in names if (m := _BLOCK.search(n))]
    blocks = max(indices) + 1 if indices else 0
    depths = {}
    for name in names:
        match = _BLOCK.search(name)
        if name in head:
            depths[name] = blocks + 1
        elif match:
            depths[name] = int(match.group(1)) + 1
        elif _EMBEDDING.search(name):
            depths[name] = 0
        else:
            depths[name] = blocks
    return depths
