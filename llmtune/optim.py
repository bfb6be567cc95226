"""Optimizers, parameter groups and learning-rate schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtune.recipe import TrainSpec

if TYPE_CHECKING:
    import torch

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on matrices, none on biases and normalisation weights.

    The rule is "decay only tensors of two or more dimensions" (as nanoGPT does): every bias and every
    LayerNorm/RMSNorm weight is 1-d, in every architecture, with no list of module names to keep up.
    Frozen parameters are left out, so they get no optimizer state.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """AdamW (fused where torch has it), SGD or Adafactor over the model's trainable parameters."""
    import torch

    groups = parameter_groups(model, train.weight_decay)
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
