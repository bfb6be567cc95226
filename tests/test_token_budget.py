"""Token-budget batches (`train.max_tokens`): within the budget, every example once per epoch, on any number of
ranks, and exact resume through the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmtune.batching import TokenBudgetBatchSampler, token_budget_batches, token_budget_problem
from tests.helpers import (
    assert_same_tensors,
    classification_recipe,
    launch_two_ranks,
    read_metrics,
    run_cli,
    run_cli_in_process,
    run_interrupted,
    sentiment_rows,
    tiny_recipe,
    write_recipe,
    write_tsv,
)


def _lengths(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    shape = rng.choice(["uniform", "skewed", "constant"])
    if shape == "constant":
        return [rng.randint(1, 40)] * n
    if shape == "skewed":
        return [min(64, int(rng.expovariate(1 / 8)) + 1) for _ in range(n)]
    return [rng.randint(1, 64) for _ in range(n)]


@pytest.mark.parametrize("case", range(12))
def test_batches_fit_the_budget_and_cover_every_example_once(case: int) -> None:
    rng = random.Random(case)
    n = rng.choice([1, 2, 7, 50, 333, 1000])
    lengths = _lengths(case, n)
    budget = max(lengths) + rng.randint(0, 300)
    world = rng.choice([1, 2, 3, 4])
    counts = set()
    for epoch in range(3):
        batches = token_budget_batches(lengths, budget, seed=case * 1000 + epoch, world_size=world)
        counts.add(len(batches))
        assert sorted(i for b in batches for i in b) == list(range(n))
        for batch in batches:
            assert batch and len(batch) * max(lengths[i] for i in batch) <= budget
        if n >= world:
            assert len(batches) % world == 0
    assert len(counts) == 1  # as many batches every epoch: the schedule and resume rely on it


def test_batches_are_reshuffled_per_epoch_and_reproducible() -> None:
    lengths = _lengths(3, 500)
    sampler = TokenBudgetBatchSampler(lengths, 200, seed=7)
    first = list(sampler)
    assert list(sampler) == first  # the same epoch again: the same batches
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and len(second) == len(first) == len(sampler)
    again = TokenBudgetBatchSampler(lengths, 200, seed=7)
    again.set_epoch(1)
    assert list(again) == second
    # Length-sorted: the rows of a batch are close in length, so padding is small.
    padded = sum(len(b) * max(lengths[i] for i in b) for b in first)
    assert padded <= 1.1 * sum(lengths) + 200


@pytest.mark.parametrize("world", [2, 3])
def test_accelerate_sharding_covers_every_example_once(world: int) -> None:
    from accelerate.data_loader import BatchSamplerShard

    lengths = _lengths(11, 301)
    sampler = TokenBudgetBatchSampler(lengths, 150, seed=1, world_size=world)
    sampler.set_epoch(2)
    seen: list[int] = []
    sizes = set()
    for rank in range(world):
        shard = BatchSamplerShard(sampler, num_processes=world, process_index=rank)
        batches = list(shard)
        sizes.add(len(batches))
        assert len(batches) == len(shard) == len(sampler) // world
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(len(lengths)))
    assert len(sizes) == 1  # every rank takes as many steps


def test_a_budget_below_the_longest_example_is_named() -> None:
    assert token_budget_problem([3, 9, 4], 9) is None
    problem = token_budget_problem([3, 9, 4], 8)
    assert problem is not None
    assert "train.max_tokens: 8" in problem and "longest training example (9 tokens)" in problem


# --- through the CLI ------------------------------------------------------------------------------------------------


def _recipe(tiny_models: dict[str, Path], root: Path, out: Path) -> dict:
    train = write_tsv(root / "train.tsv", sentiment_rows(160, seed=1))
    valid = write_tsv(root / "valid.tsv", sentiment_rows(40, seed=2))
    recipe = classification_recipe(tiny_models["bert"], train, valid, out, max_tokens=64, epochs=3, log_every=1)
    recipe["train"].pop("max_steps")
    recipe["train"].update(save_every=10, grad_accum=2)
    return recipe


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_same_batches_and_metrics(
    tiny_models: dict[str, Path], tmp_path: Path, one_thread_cli: None
) -> None:
    straight = tmp_path / "straight"
    done = run_cli("finetune", str(write_recipe(tmp_path / "a.yaml", _recipe(tiny_models, tmp_path, straight))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "per-device batch up to 64 tokens" in done.stdout
    records = [r for r in read_metrics(straight) if "train/loss" in r]
    steps = records[-1]["step"]
    # 160 examples, 3 epochs: every example seen three times, in fewer, larger batches than 16 rows.
    assert 480 <= records[-1]["train/examples"] < 480 + 160  # the last step's accumulation may start epoch 4

    broken = tmp_path / "broken"
    recipe = write_recipe(tmp_path / "b.yaml", _recipe(tiny_models, tmp_path, broken))
    stopped_at = run_interrupted(recipe, broken, after_step=steps // 2 - 3, command="finetune")
    assert stopped_at < steps
    resumed = run_cli("finetune", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped_at})" in resumed.stdout
    assert_same_tensors(straight / "final" / "model.safetensors", broken / "final" / "model.safetensors")
    losses = [(r["step"], r["train/loss"], r["train/examples"]) for r in read_metrics(broken) if "train/loss" in r]
    assert losses == [(r["step"], r["train/loss"], r["train/examples"]) for r in records]
    final = json.loads((broken / "final_metrics.json").read_text())
    assert final == json.loads((straight / "final_metrics.json").read_text())


def test_bad_token_budgets_are_one_line(
    tiny_models: dict[str, Path],
    corpus: dict[str, Path],
    tmp_path: Path,
    one_thread_cli: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = _recipe(tiny_models, tmp_path, tmp_path / "out")
    recipe["train"]["max_tokens"] = 4
    code, _, err = run_cli_in_process(capsys, "finetune", str(write_recipe(tmp_path / "bad.yaml", recipe)))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "train.max_tokens: 4 is smaller than the longest training example" in lines[0]
    assert not (tmp_path / "out").exists()

    blocks = tiny_recipe(corpus, tmp_path / "out2", train={"max_tokens": 256})
    code, _, err = run_cli_in_process(capsys, "pretrain", str(write_recipe(tmp_path / "blocks.yaml", blocks)))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "train.max_tokens: this task's training rows all have one length" in lines[0]
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_two_ranks_see_every_example_once_per_epoch(
    tiny_models: dict[str, Path], tmp_path: Path, one_thread_cli: None
) -> None:
    out = tmp_path / "two"
    recipe = _recipe(tiny_models, tmp_path, out)
    recipe["train"].update(epochs=2, grad_accum=1, save_every=None)
    two = launch_two_ranks("finetune", str(write_recipe(tmp_path / "two.yaml", recipe)), port=29531)
    assert two.returncode == 0, two.stderr[-3000:]
    records = [r for r in read_metrics(out) if "train/loss" in r]
    # Both ranks' examples summed at each log step: 2 epochs of 160, each example once per epoch.
    assert records[-1]["train/examples"] == 320
    one_epoch = records[-1]["step"] // 2
    assert [r["train/examples"] for r in records if r["step"] == one_epoch] == [160]
