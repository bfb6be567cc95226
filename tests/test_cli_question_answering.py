"""End to end: `llmtune finetune` question-answering on SQuAD-format json -> eval -> predict, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import qa_examples, qa_recipe, read_metrics, run_cli, write_recipe, write_squad

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("squad")
    train, valid = qa_examples(48, seed=1), qa_examples(12, seed=2)
    return {
        "train": write_squad(root / "train.json", train),
        "valid": write_squad(root / "dev.json", valid),
        "valid_examples": valid,
        "root": root,
    }


@pytest.fixture(scope="module")
def run(data: dict[str, Any], tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qa") / "run"
    recipe = write_recipe(out.parent / "r.yaml", qa_recipe(tiny_models["bert"], data["train"], data["valid"], out))
    result = run_cli("finetune", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_questions 48" in result.stdout, result.stdout  # 48 questions ...
    windows = int(result.stdout.split("train_examples ")[1].split(",")[0])
    assert windows >= 2 * 48, result.stdout  # ... cut into several windows each
    return out


def test_loss_falls_and_final_loads_with_plain_transformers(run: Path) -> None:
    records = read_metrics(run)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    final = json.loads((run / "final_metrics.json").read_text())
    assert set(final) >= {"eval/loss", "eval/exact_match", "eval/f1"}
    assert 0.0 <= final["eval/exact_match"] <= final["eval/f1"] <= 100.0

    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(str(run / "final")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "final"))
    inputs = tokenizer("Who holds the shared list?", "Mary holds the shared list.", return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    assert out.start_logits.shape == out.end_logits.shape == inputs["input_ids"].shape


def test_eval_reproduces_the_final_metrics(run: Path) -> None:
    result = run_cli("eval", str(run), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout)["metrics"]
    final = json.loads((run / "final_metrics.json").read_text())
    for key in ("eval/loss", "eval/exact_match", "eval/f1"):
        assert got[key] == pytest.approx(final[key], rel=1e-6, abs=1e-9), key


def test_predict_writes_answers_that_are_spans_of_the_contexts(run: Path, data: dict[str, Any]) -> None:
    examples = data["valid_examples"]
    unlabelled = data["root"] / "questions.jsonl"
    unlabelled.write_text(
        "".join(json.dumps({k: e[k] for k in ("id", "question", "context")}) + "\n" for e in examples), "utf-8"
    )
    out = data["root"] / "predictions.jsonl"
    result = run_cli("predict", str(run), "--data", str(unlabelled), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [e["id"] for e in examples]
    for row, example in zip(rows, examples, strict=True):
        assert row["question"] == example["question"]
        assert row["answer"] and row["answer"] in example["context"]
        assert isinstance(row["score"], float)


def damaged_recipe(damage: str, data: dict[str, Any], model: Path, tmp_path: Path) -> dict[str, Any]:
    """The test recipe with one thing wrong in its validation data (or its columns)."""
    examples = [dict(e) for e in data["valid_examples"]]
    valid = write_squad(tmp_path / "dev.json", examples)
    if damage == "answer_start":
        examples[3]["answer_start"] += 1
        write_squad(valid, examples)
    elif damage == "no_answer":
        tree = json.loads(valid.read_text())
        tree["data"][0]["paragraphs"][3]["qas"][0]["answers"] = []
        valid.write_text(json.dumps(tree), "utf-8")
    recipe = qa_recipe(model, data["train"], valid, tmp_path / "out")
    if damage == "no_question":
        recipe["data"]["question_column"] = "query"
        recipe["data"]["format"] = None
        rows = [{k: e[k] for k in ("id", "question", "context")} for e in examples]
        valid = tmp_path / "dev.jsonl"
        valid.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
        recipe["data"]["files"] = {"train": str(valid), "validation": str(valid)}
    return recipe


def test_answer_outside_its_context_exits_2_with_one_line_and_writes_nothing(
    data: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    recipe = damaged_recipe("answer_start", data, tiny_models["bert"], tmp_path)
    result = run_cli("finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    wrong = data["valid_examples"][3]
    expected = (
        f"example 'q2-3' (validation split): answer '{wrong['answer']}' with answer_start {wrong['answer_start'] + 1}"
    )
    assert expected in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_answer", r"example 'q2-3' \(validation split\) has no answer; .*allow_no_answer"),
        ("no_question", r"data.question_column: column 'query' not in the train split"),
    ],
)
def test_other_bad_input_is_refused_before_anything_is_written(
    damage: str, message: str, data: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from llmtune.errors import UserError
    from llmtune.run import train

    recipe = damaged_recipe(damage, data, tiny_models["bert"], tmp_path)
    with pytest.raises(UserError, match=message) as err:  # in process: the CLI turns it into exit 2 as above
        train(str(write_recipe(tmp_path / "r.yaml", recipe)), [], command="finetune")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
