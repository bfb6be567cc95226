"""Optimizers, parameter groups and learning-rate schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtune.recipe import TrainSpec

if TYPE_CHECKING:
    import torch

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr: float | None = None,
    head_lr: float | None = None,
    layer_lr_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Groups by (learning rate, weight decay): decay on matrices, none on biases and norm weights.

    The decay rule is "decay only tensors of two or more dimensions" (as nanoGPT does): every bias and
    every LayerNorm/RMSNorm weight is 1-d, in every architecture, with no list of module names to keep
    up. With `head_lr` the task head trains at its own rate; with `layer_lr_decay`, of L blocks numbered
    1..L, block i trains at lr * decay**(L - i) and the embeddings at lr * decay**L (as in ELECTRA).
    Frozen parameters are left out, so they get no optimizer state.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if lr is None or (head_lr is None and layer_lr_decay is None):
        return [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]
    from llmtune.strategies import head_parameter_names, layer_depths

    head = head_parameter_names(model)
    depths = layer_depths([n for n, _ in named], head)
    top = max(depths.values(), default=0)
    groups: dict[tuple[float, float], list[Any]] = {}
    for name, param in named:
        if name in head:
            rate = head_lr if head_lr is not None else lr
        else:
            rate = lr * (layer_lr_decay ** (top - 1 - depths[name]) if layer_lr_decay else 1.0)
        decay = weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((rate, decay), []).append(param)
    return [{"params": ps, "lr": rate, "weight_decay": decay} for (rate, decay), ps in groups.items()]


def build_optimizer(model: torch.nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """AdamW (fused where torch has it), SGD or Adafactor over the model's trainable parameters."""
    import torch

    groups = parameter_groups(model, train.weight_decay, train.lr, train.head_lr, train.layer_lr_decay)
    spec = train.optimizer
    if spec.kind == "adamw":
        fused = spec.fused
        if fused is None:
            fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=train.lr, betas=spec.betas, eps=spec.eps, fused=fused)
    if spec.kind == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=spec.momentum)
    from transformers.optimization import Adafactor

    # A fixed learning rate, as the schedule drives it; Adafactor's own relative-step schedule is off.
    return Adafactor(groups, lr=train.lr, scale_parameter=False, relative_step=False, warmup_init=False)


def build_schedule(optimizer: torch.optim.Optimizer, train: TrainSpec, total_steps: int) -> Any:
    """Constant, linear or cosine decay to zero after linear warmup (transformers' `get_scheduler`)."""
    from transformers import get_scheduler

    return get_scheduler(
        _SCHEDULES[train.schedule.kind],
        optimizer,
        num_warmup_steps=train.schedule.warmup_steps,
        num_training_steps=total_steps,
    )
