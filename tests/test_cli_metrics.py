"""Metrics end to end: the best checkpoint follows the metric's declared direction, and `evaluate` modules named in
the recipe are computed at every evaluation, ranked by, and reproduced by `llmtune eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    classification_recipe,
    read_metrics,
    run_cli_in_process,
    sentiment_rows,
    write_recipe,
    write_tsv,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_cli")]

AGREEMENT_MODULE = """
import datasets
import evaluate


class Agreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of predictions equal to their reference, and how many there were",
            citation="",
            inputs_description="predictions and references: class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        same = sum(int(p == r) for p, r in zip(predictions, references))
        return {"agreement": same / len(predictions), "n": len(predictions)}
"""


def test_a_regression_run_keeps_its_lowest_mse_evaluation(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"sentence": r["sentence"], "score": 4.5 if r["label"] == "pos" else 0.5} for r in sentiment_rows(200, seed=3)
    ]
    train = write_tsv(tmp_path / "train.tsv", rows, ("sentence", "score"))
    valid = write_tsv(tmp_path / "valid.tsv", rows[:48], ("sentence", "score"))
    recipe = classification_recipe(tiny_models["bert"], train, valid, tmp_path / "run", max_steps=40, lr=2e-2)
    recipe["data"]["label_column"] = "score"
    recipe["train"].update(eval_every=4, best_metric="eval/mse", schedule={"kind": "constant", "warmup_steps": 0})
    code, _, err = run_cli_in_process(capsys, "finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert code == 0, err[-2000:]
    evals = [(r["step"], r["eval/mse"]) for r in read_metrics(tmp_path / "run") if "eval/mse" in r]
    assert len(evals) == 10
    values = [mse for _, mse in evals]
    assert min(values) < max(values)  # otherwise the direction could not matter
    best_step, best = min(evals, key=lambda e: e[1])
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["eval/mse"] == pytest.approx(best)
    assert json.loads((tmp_path / "run" / "final" / "llmtune_metrics.json").read_text())["step"] == best_step


def test_an_evaluate_module_is_computed_ranked_by_and_reproduced_by_eval(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "agreement.py").write_text(AGREEMENT_MODULE, encoding="utf-8")
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(160, seed=1))
    valid = write_tsv(tmp_path / "valid.tsv", sentiment_rows(40, seed=2))
    recipe = classification_recipe(tiny_models["bert"], train, valid, tmp_path / "run", max_steps=20)
    recipe["metrics"] = [{"module": "./agreement.py", "name": "agree"}]  # relative to the recipe's folder
    recipe["train"].update(eval_every=10, best_metric="eval/agree_agreement")
    recipe["expect"] = {"eval/agree_n": {"min": 40, "max": 40}}
    code, out, err = run_cli_in_process(capsys, "finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert code == 0, err[-2000:]
    assert "eval/agree_n" in out and "ok" in out  # the expect table
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/agree_agreement" in r]
    assert len(evals) == 2
    for record in evals:
        assert record["eval/agree_agreement"] == pytest.approx(record["eval/accuracy"])  # the same quantity
        assert record["eval/agree_n"] == 40
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    code, out, err = run_cli_in_process(capsys, "eval", str(tmp_path / "run"), "--json")
    assert code == 0, err[-2000:]
    again = json.loads(out)["metrics"]
    assert again["eval/agree_agreement"] == pytest.approx(final["eval/agree_agreement"], abs=1e-6)
