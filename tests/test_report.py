"""`llmtune report`: figures that exist and are real PNGs, a Markdown summary that holds the runs' numbers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from llmtune.report import ema, flatten
from tests.helpers import read_metrics, run_cli_in_process, tiny_recipe, write_recipe

LRS = {"lr-high": 3e-3, "lr-low": 3e-4}
BAND = 150.0  # eval/perplexity max: the high-lr run gets below it in 20 steps, the low-lr one does not


@pytest.fixture(scope="module")
def two_runs(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, one_thread: Any) -> dict[str, Path]:
    """Two 20-step tiny GPT-2 runs that differ in train.lr only."""
    from llmtune.run import train

    root = tmp_path_factory.mktemp("report-runs")
    runs = {}
    for name, lr in LRS.items():
        recipe = tiny_recipe(
            corpus,
            root / name,
            train={"lr": lr, "max_steps": 20, "log_every": 2, "eval_every": 5},
            expect={"eval/perplexity": {"max": BAND}},
        )
        train(str(write_recipe(root / f"{name}.yaml", recipe)), [], command="pretrain")
        runs[name] = root / name
    return runs


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.slow
def test_two_runs_figures_and_summary(
    two_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    code, stdout, err = run_cli_in_process(capsys, "report", *map(str, two_runs.values()), "--output", str(out))
    assert code == 0, err
    assert str(out / "report.md") in stdout
    for name in ("loss.png", "lr.png", "eval.png", "throughput.png"):
        width, height = _png_size(out / name)
        assert (out / name).stat().st_size > 10_000, name
        assert 600 <= width <= 2000 and 300 <= height <= 1600, (name, width, height)
    text = (out / "report.md").read_text()
    for name, run in two_runs.items():
        final = json.loads((run / "final_metrics.json").read_text())
        assert f"| eval/loss | {final['eval/loss']:.6g} |" in text
        perplexity = final["eval/perplexity"]
        verdict = "met" if perplexity <= BAND else "**missed**"
        assert f"| eval/perplexity | {perplexity:.6g} | <= {BAND:g} | {verdict} |" in text
        last = [r for r in read_metrics(run) if "train/tokens" in r][-1]
        tokens_per_s = last["train/tokens"] / last["train/seconds"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert "| finished | 20 |" in row and f"| {tokens_per_s:,.0f} |" in row
    # both verdicts occur, so the comparison above checked a met and a missed band
    assert "| met |" in text and "| **missed** |" in text
    differences = text.split("## Recipe differences")[1].split("## Figures")[0]
    assert "| `train.lr` | 0.003 | 0.0003 |" in differences
    assert differences.count("| `") == 1  # nothing else differs (output_dir is left out)
    for name in ("loss.png", "lr.png", "eval.png", "throughput.png"):
        assert f"]({name})" in text


def test_one_run_defaults_to_run_report(two_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = two_runs["lr-high"]
    code, _, err = run_cli_in_process(capsys, "report", str(run))
    assert code == 0, err
    text = (run / "report" / "report.md").read_text()
    assert "## Recipe differences" not in text and "| lr-high |" in text
    assert (run / "report" / "eval.png").stat().st_size > 10_000


def test_unfinished_run_reports_its_last_evaluation(two_runs: dict[str, Path], tmp_path: Path) -> None:
    from llmtune.report import read_run, summary

    run = tmp_path / "stopped"
    shutil.copytree(two_runs["lr-high"], run, ignore=shutil.ignore_patterns("final*", "report"))
    record = read_run(str(run))
    assert record.status == "stopped"
    last_eval = [r for r in read_metrics(run) if "eval/loss" in r][-1]
    text = summary([record], [])
    assert f"not finished: the last evaluation (step {last_eval['step']})" in text
    assert f"| eval/loss | {last_eval['eval/loss']:.6g} |" in text


def test_bad_input_is_one_line(two_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli_in_process(capsys, "report", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "is not a run directory" in err
    code, _, err = run_cli_in_process(capsys, "report", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(two_runs["lr-high"] / "recipe.resolved.yaml", fresh)
    code, _, err = run_cli_in_process(capsys, "report", str(fresh))
    assert code == 2 and err.count("\n") == 1 and "no metrics yet" in err
    assert not (fresh / "report").exists()


def test_missing_extra_names_it(
    two_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, _, err = run_cli_in_process(capsys, "report", str(two_runs["lr-high"]), "--output", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'llmtune[report]'" in err
    assert not (tmp_path / "r").exists()


def test_ema_is_debiased_and_flatten_dots() -> None:
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    smoothed = ema([0.0, 10.0])
    assert smoothed[0] == 0.0 and 0.0 < smoothed[1] < 10.0
    assert smoothed[1] == pytest.approx((0.4 * 10.0 * 1.0) / (1 - 0.6**2))
    assert flatten({"train": {"lr": 1, "schedule": {"kind": "cosine"}}, "expect": {}}) == {
        "train.lr": 1,
        "train.schedule.kind": "cosine",
        "expect": {},
    }
