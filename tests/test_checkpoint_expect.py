"""Checkpoint listing, RNG state round trips, atomic directories, and the expect: table."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtune.atomic import atomic_dir
from llmtune.checkpoint import checkpoint_name, list_checkpoints, rng_state, set_rng_state
from llmtune.expect import check_expectations, format_checks
from llmtune.recipe import Bound

# --- list_checkpoints ---------------------------------------------------------------------------


def test_list_checkpoints_ignores_temporary_and_foreign_entries_and_sorts(tmp_path: Path) -> None:
    for name in (checkpoint_name(200), checkpoint_name(30), checkpoint_name(1000), "step-5"):
        (tmp_path / name).mkdir()
    for name in (f".tmp-{checkpoint_name(400)}", "best", "step-abc", "step-12x", "xstep-0000001", "step-"):
        (tmp_path / name).mkdir()
    (tmp_path / checkpoint_name(999)).write_text("a file, not a checkpoint")
    found = list_checkpoints(tmp_path)
    assert [step for step, _ in found] == [5, 30, 200, 1000]
    assert [p.name for _, p in found] == ["step-5", "step-0000030", "step-0000200", "step-0001000"]
    assert all(p.parent == tmp_path for _, p in found)


def test_list_checkpoints_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path / "nope") == []


def test_checkpoint_name_sorts_lexically_like_numerically() -> None:
    names = [checkpoint_name(s) for s in (3, 20, 100, 9999)]
    assert names == sorted(names)
    assert checkpoint_name(42) == "step-0000042"


# --- RNG state ----------------------------------------------------------------------------------


def _draws() -> tuple[list[float], list[float], list[float]]:
    """Draws from python, numpy (a gaussian first: it uses the cached second value) and torch."""
    return (
        [random.random() for _ in range(5)],
        [float(np.random.standard_normal()), *np.random.rand(5).tolist()],
        torch.rand(5).tolist(),
    )


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_set_rng_state_restores_a_different_earlier_state(tmp_path: Path) -> None:
    random.seed(10)
    np.random.seed(10)
    torch.manual_seed(10)
    state = rng_state()
    first = _draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != first  # sanity: different seeds, different numbers
    set_rng_state(state)
    assert _draws() == first


# --- atomic_dir ---------------------------------------------------------------------------------


def test_atomic_dir_leaves_nothing_when_the_block_raises(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("partial")
        assert not final.exists()
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_the_previous_dir(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_replaces_an_existing_dir(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        assert tmp != final
        assert tmp.parent == final.parent
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # the old one stays readable until the block is done
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert (final / "new.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .tmp-/.old- leftovers


def test_atomic_dir_creates_parents(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "out"
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("1")
    assert (final / "x").read_text() == "1"


# --- expect -------------------------------------------------------------------------------------


def test_check_expectations_bounds_and_missing_metric() -> None:
    expect = {
        "eval/perplexity": Bound(max=100),
        "eval/loss": Bound(min=1.0, max=4.0),
        "eval/accuracy": Bound(min=0.5),
        "eval/missing": Bound(max=1.0),
        "eval/edge": Bound(min=2.0, max=2.0),
    }
    metrics = {"eval/perplexity": 120.0, "eval/loss": 3.0, "eval/accuracy": 0.4, "eval/edge": 2.0, "other": 1.0}
    checks = check_expectations(metrics, expect)
    assert [c.metric for c in checks] == list(expect)  # the recipe's order, only expected metrics
    by_name = {c.metric: c for c in checks}
    assert by_name["eval/perplexity"].ok is False  # above max
    assert by_name["eval/loss"].ok is True
    assert by_name["eval/accuracy"].ok is False  # below min
    assert by_name["eval/missing"].value is None
    assert by_name["eval/missing"].ok is False  # a missing metric is a miss
    assert by_name["eval/edge"].ok is True  # bounds are inclusive


@pytest.mark.parametrize(("value", "ok"), [(0.99, False), (1.0, True), (2.5, True), (4.0, True), (4.01, False)])
def test_bound_edges(value: float, ok: bool) -> None:
    (check,) = check_expectations({"m": value}, {"m": Bound(min=1.0, max=4.0)})
    assert check.ok is ok


def test_format_checks_table_marks_missed() -> None:
    expect = {"eval/perplexity": Bound(max=100), "eval/loss": Bound(min=1.0, max=4.0), "eval/gone": Bound(min=0.5)}
    table = format_checks(check_expectations({"eval/perplexity": 123.456789, "eval/loss": 2.0}, expect))
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value", "expected", "result"]
    assert len(lines) == 4
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["eval/perplexity"].split() == ["eval/perplexity", "123.4568", "<=", "100", "MISSED"]
    assert rows["eval/loss"].split() == ["eval/loss", "2.0000", ">=", "1", "and", "<=", "4", "ok"]
    assert rows["eval/gone"].split() == ["eval/gone", "missing", ">=", "0.5", "MISSED"]
    # columns line up: the value column starts at the same offset on every line
    starts = {line.index(line.split()[1]) for line in lines}
    assert len(starts) == 1
    assert all(line == line.rstrip() for line in lines)


def test_format_checks_all_ok_has_no_missed() -> None:
    table = format_checks(check_expectations({"a": 1.0}, {"a": Bound(max=2.0)}))
    assert "MISSED" not in table
    assert table.splitlines()[1].split()[-1] == "ok"
