"""Token-level cross-entropy shared by the objectives that compute their loss from logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over every labelled position (labels -100 are skipped), in fp32."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def per_example_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per example: summed NLL, correctly predicted labelled tokens, and labelled tokens."""
    import torch.nn.functional as F

    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    counted = labels != IGNORE
    correct = (logits.argmax(dim=-1) == labels) & counted
    return {"nll": nll.sum(dim=1), "correct": correct.sum(dim=1).float(), "tokens": counted.sum(dim=1).float()}
