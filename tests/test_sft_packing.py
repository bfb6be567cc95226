"""Packing for causal SFT (`instruction.pack`): no example sees another, and packed training equals unpacked
training (loss and gradients) on a tiny GPT-2; end to end through the CLI."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.batching import pad_collator
from llmtune.tasks.sft_packing import pack_examples, packed_split
from llmtune.tasks.token_loss import IGNORE
from tests.helpers import (
    TINY_GPT2,
    instruction_pairs,
    instruction_recipe,
    make_task,
    read_metrics,
    run_cli,
    write_jsonl,
    write_recipe,
)

VOCAB = 97


def _model() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    keys = {k: v for k, v in TINY_GPT2.items() if k != "model_type"}
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**keys, vocab_size=VOCAB)).eval()


def _examples(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Token rows with a prompt part (labels -100) and a response part (labels = the tokens)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, response = rng.randint(1, 9), rng.randint(1, 12)
        ids = [rng.randrange(1, VOCAB) for _ in range(prompt + response)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


def _dataset(rows: list[dict[str, list[int]]]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "labels")})


@pytest.mark.parametrize("seed", range(6))
def test_rows_hold_every_example_once_within_the_block(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([8, 32, 64])
    lengths = [rng.randint(1, capacity) for _ in range(rng.choice([1, 10, 300]))]
    rows = pack_examples(lengths, capacity)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    # Best-fit decreasing leaves at most one row half empty or worse.
    assert sum(1 for r in rows if 2 * sum(lengths[i] for i in r) <= capacity) <= 1


def test_packed_rows_restart_positions_and_mask_the_boundaries() -> None:
    rows = _examples(30, seed=1)
    packed = packed_split(_dataset(rows), 40)
    assert len(packed) < len(rows)
    starts = 0
    for row in packed:
        ids, labels, positions = (row[k].tolist() for k in ("input_ids", "labels", "position_ids"))
        assert len(ids) == len(labels) == len(positions) <= 40
        for at in (i for i, p in enumerate(positions) if p == 0):
            starts += 1
            assert labels[at] == IGNORE  # nothing predicts an example's first token from the one before
    assert starts == len(rows)


def _loss_and_grads(model: Any, task: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = task.loss(model, batch, task.count_items(batch))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_training_equals_unpacked_loss_and_gradients() -> None:
    task = make_task(
        "causal-lm", data={"prompt_column": "p", "response_column": "r", "max_length": 48}, instruction={"pack": True}
    )
    rows = _examples(24, seed=2)
    collate = pad_collator(0)
    unpacked = collate([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
    packed_ds = packed_split(_dataset(rows), 48)
    packed = collate([{k: v.tolist() for k, v in row.items()} for row in packed_ds])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < len(rows)
    assert int(task.count_items(packed)) == int(task.count_items(unpacked))  # the same targets

    model = _model()
    loss_a, grads_a = _loss_and_grads(model, task, unpacked)
    loss_b, grads_b = _loss_and_grads(model, task, packed)
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_example_attends_to_another_in_a_packed_row() -> None:
    model = _model()
    a, b = list(range(3, 13)), list(range(40, 52))
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    # No cache (as in training, `task.loss`): transformers reads packed positions only without one.
    with torch.no_grad():
        first = model(input_ids=torch.tensor([a + b]), position_ids=positions, use_cache=False).logits
        changed = model(input_ids=torch.tensor([[t + 20 for t in a] + b]), position_ids=positions, use_cache=False)
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits
    changed = changed.logits
    assert not torch.allclose(first[0, : len(a)], changed[0, : len(a)])  # A's change is seen by A
    torch.testing.assert_close(first[0, len(a) :], changed[0, len(a) :], rtol=0, atol=1e-6)  # and not by B
    torch.testing.assert_close(first[0, len(a) :], alone[0], rtol=1e-5, atol=1e-5)  # B as if alone


@pytest.mark.slow
def test_packed_instruction_run_through_the_cli(
    tiny_models: dict[str, Path], tmp_path: Path, one_thread_cli: None
) -> None:
    write_jsonl(tmp_path / "train.jsonl", instruction_pairs(240, seed=1))
    write_jsonl(tmp_path / "valid.jsonl", instruction_pairs(24, seed=2))
    recipe = instruction_recipe(tiny_models["gpt2"], tmp_path, tmp_path / "run")
    recipe["instruction"]["pack"] = True
    recipe["train"]["batch_size"] = 2
    done = run_cli("finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train_packed_rows" in done.stdout
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    evals = [r["eval/loss"] for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
    assert evals[-1] < 0.5 * losses[0]  # evaluation (one example per row) learnt too


def test_pack_on_another_task_is_one_line(tmp_path: Path) -> None:
    recipe = {
        "task": "sequence-classification",
        "model": {"pretrained": "unused"},
        "data": {"files": {"train": "t.tsv"}, "text_column": "sentence"},
        "instruction": {"pack": True},
        "output_dir": str(tmp_path / "out"),
    }
    bad = run_cli("validate", str(write_recipe(tmp_path / "bad.yaml", recipe)))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "'instruction' applies to task causal-lm" in lines[0], bad.stderr
