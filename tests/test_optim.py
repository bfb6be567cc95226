"""Parameter groups, optimizers and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from llmtune.optim import build_optimizer, build_schedule, parameter_groups
from llmtune.recipe import TrainSpec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=50))


def _ids(params: list[torch.nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def _group_of(groups: list[dict[str, Any]], param: torch.nn.Parameter) -> dict[str, Any]:
    found = [g for g in groups if id(param) in _ids(g["params"])]
    assert len(found) == 1, "every trainable parameter is in exactly one group"
    return found[0]


def test_decay_only_on_matrices_and_embeddings(gpt2: Any) -> None:
    groups = parameter_groups(gpt2, 0.1)
    named = dict(gpt2.named_parameters())
    decayed = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"}
    decayed |= {
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.h.0.attn.c_proj.weight",
    }
    undecayed = {
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.h.0.ln_2.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.1.mlp.c_fc.bias",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    }
    for name in decayed:
        assert _group_of(groups, named[name])["weight_decay"] == 0.1, name
    for name in undecayed:
        assert _group_of(groups, named[name])["weight_decay"] == 0.0, name
    # every bias and every LayerNorm parameter, not just the sample above
    for name, p in named.items():
        expect = 0.0 if name.endswith(".bias") or ".ln_" in name else 0.1
        assert _group_of(groups, p)["weight_decay"] == expect, name
    # each parameter once (the tied lm_head is the embedding, not a second tensor)
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(gpt2.parameters()))
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight


def test_frozen_parameters_are_left_out(gpt2: Any) -> None:
    frozen = [gpt2.transformer.wpe.weight, gpt2.transformer.h[0].ln_1.weight, gpt2.transformer.h[0].attn.c_attn.bias]
    for p in frozen:
        p.requires_grad_(False)
    groups = parameter_groups(gpt2, 0.01)
    in_groups = set().union(*(_ids(g["params"]) for g in groups))
    assert not (_ids(frozen) & in_groups)
    trainable = [p for p in gpt2.parameters() if p.requires_grad]
    assert in_groups == _ids(trainable)
    optimizer = build_optimizer(gpt2, TrainSpec(optimizer={"kind": "sgd"}, weight_decay=0.01))
    assert not (_ids(frozen) & set().union(*(_ids(g["params"]) for g in optimizer.param_groups)))


@pytest.mark.parametrize(
    ("kind", "cls_name"),
    [("adamw", "AdamW"), ("sgd", "SGD"), ("adafactor", "Adafactor")],
)
def test_build_optimizer_kinds(gpt2: Any, kind: str, cls_name: str) -> None:
    spec = TrainSpec(lr=0.02, weight_decay=0.3, optimizer={"kind": kind, "momentum": 0.5, "betas": [0.8, 0.9]})
    optimizer = build_optimizer(gpt2, spec)
    assert type(optimizer).__name__ == cls_name
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]
    assert all(g["lr"] == 0.02 for g in optimizer.param_groups)
    if kind == "adamw":
        assert isinstance(optimizer, torch.optim.AdamW)
        assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    elif kind == "sgd":
        assert isinstance(optimizer, torch.optim.SGD)
        assert optimizer.param_groups[0]["momentum"] == 0.5
    else:
        assert optimizer.param_groups[0]["relative_step"] is False
        assert optimizer.param_groups[0]["scale_parameter"] is False


def test_optimizers_take_a_step(gpt2: Any) -> None:
    for kind in ("adamw", "sgd", "adafactor"):
        model = gpt2
        optimizer = build_optimizer(model, TrainSpec(lr=0.01, optimizer={"kind": kind}))
        before = model.transformer.wte.weight.detach().clone()
        ids = torch.randint(0, 50, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert not torch.equal(before, model.transformer.wte.weight), kind


# --- schedules ----------------------------------------------------------------------------------

PEAK, WARMUP, TOTAL = 0.5, 4, 20


def lrs(kind: str, warmup: int = WARMUP, total: int = TOTAL) -> list[float]:
    """The learning rate used at each optimizer step 0..total."""
    param = torch.nn.Parameter(torch.zeros(2))
    train = TrainSpec(lr=PEAK, optimizer={"kind": "sgd"}, schedule={"kind": kind, "warmup_steps": warmup})
    optimizer = torch.optim.SGD([param], lr=PEAK)
    schedule = build_schedule(optimizer, train, total)
    seen = []
    for _ in range(total + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_starts_at_zero_and_reaches_peak(kind: str) -> None:
    seen = lrs(kind)
    assert seen[0] == 0.0
    for step in range(1, WARMUP):
        assert seen[step] == pytest.approx(PEAK * step / WARMUP)
    assert seen[WARMUP] == pytest.approx(PEAK)
    assert max(seen) == pytest.approx(PEAK)


def test_constant_stays_at_peak() -> None:
    seen = lrs("constant")
    assert seen[WARMUP:] == pytest.approx([PEAK] * (TOTAL + 1 - WARMUP))


def test_linear_decays_linearly_to_zero() -> None:
    seen = lrs("linear")
    for step in range(WARMUP, TOTAL + 1):
        assert seen[step] == pytest.approx(PEAK * (TOTAL - step) / (TOTAL - WARMUP), abs=1e-12)
    assert seen[TOTAL] == pytest.approx(0.0, abs=1e-12)


def test_cosine_is_half_at_midpoint_and_zero_at_end() -> None:
    seen = lrs("cosine")
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert seen[mid] == pytest.approx(PEAK / 2)
    assert seen[TOTAL] == pytest.approx(0.0, abs=1e-12)
    for step in range(WARMUP, TOTAL + 1):
        progress = (step - WARMUP) / (TOTAL - WARMUP)
        assert seen[step] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert all(a >= b for a, b in zip(seen[WARMUP:], seen[WARMUP + 1 :], strict=False))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_no_warmup_starts_at_peak(kind: str) -> None:
    assert lrs(kind, warmup=0)[0] == pytest.approx(PEAK)
