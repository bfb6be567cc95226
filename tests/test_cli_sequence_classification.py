"""End to end: `llmtune finetune` sequence-classification -> eval -> predict, strategies, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import (
    classification_recipe,
    launch_two_ranks,
    load_tensors,
    read_metrics,
    run_cli,
    run_cli_in_process,
    sentiment_rows,
    tiny_config,
    write_recipe,
    write_tsv,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sst")
    return {
        "train": write_tsv(root / "train.tsv", sentiment_rows(400, seed=1)),
        "valid": write_tsv(root / "dev.tsv", sentiment_rows(64, seed=2)),
        "root": root,
    }


@pytest.fixture(scope="module")
def full_run(data: dict[str, Path], tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    recipe = write_recipe(
        out.parent / "r.yaml",
        classification_recipe(
            tiny_models["bert"],
            data["train"],
            data["valid"],
            out,
            max_steps=60,
            schedule={"kind": "linear", "warmup_steps": 2},
        ),
    )
    result = run_cli("finetune", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy: full" in result.stdout and "length-grouped batches" in result.stdout
    return out


def test_finetune_learns_and_saves_a_plain_transformers_model(full_run: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    losses = [r["train/loss"] for r in read_metrics(full_run) if "train/loss" in r]
    assert max(losses[-2:]) < 0.5 * losses[0]
    final = json.loads((full_run / "final_metrics.json").read_text())
    assert final["eval/accuracy"] >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(str(full_run / "final")).eval()
    assert model.config.id2label == {0: "neg", 1: "pos"}  # the label map built from the data
    tok = AutoTokenizer.from_pretrained(str(full_run / "final"))
    with torch.no_grad():
        logits = model(
            **tok(
                ["The small parser returns a value.", "The lazy socket returns a value."],
                return_tensors="pt",
                padding=True,
            )
        ).logits
    assert [model.config.id2label[int(i)] for i in logits.argmax(-1)] == ["pos", "neg"]


def test_eval_reproduces_the_final_metrics_and_predict_writes_labels(full_run: Path, data: dict[str, Path]) -> None:
    result = run_cli("eval", str(full_run), "--json", "--batch-size", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)["metrics"]
    final = json.loads((full_run / "final_metrics.json").read_text())
    assert metrics.keys() == final.keys()
    for key, value in final.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    unlabelled = data["root"] / "unlabelled.tsv"
    unlabelled.write_text("sentence\nThe sorted class returns a value.\nThe empty thread returns a value.\n")
    out = data["root"] / "predictions.jsonl"
    result = run_cli("predict", str(full_run), "--data", str(unlabelled), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert all(0.5 <= r["probability"] <= 1 for r in rows)


def test_eval_refuses_a_label_the_model_does_not_know(full_run: Path, data: dict[str, Path]) -> None:
    bad = write_tsv(data["root"] / "bad.tsv", [{"sentence": "The lazy list returns a value.", "label": "neutral"}])
    before = sorted(p.name for p in full_run.rglob("*"))
    result = run_cli("eval", str(full_run), "--data", str(bad))
    assert result.returncode == 2
    assert "label 'neutral'" in result.stderr and "neg, pos" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in full_run.rglob("*")) == before


def _train(recipe: dict[str, Any], path: Path) -> int:
    from llmtune.run import train

    return train(str(write_recipe(path, recipe)), [], command="finetune")


def test_head_strategy_changes_only_the_head(
    data: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path, one_thread: None
) -> None:
    out = tmp_path / "head"
    recipe = classification_recipe(tiny_models["bert"], data["train"], data["valid"], out, max_steps=6, save_every=6)
    recipe["strategy"] = {"kind": "head"}
    recipe["train"].update(head_lr=1e-2, lr=1e-4)
    assert _train(recipe, tmp_path / "r.yaml") == 0
    before = load_tensors(tiny_models["bert"] / "model.safetensors")
    after = load_tensors(out / "final" / "model.safetensors")
    changed = set()
    for name, tensor in after.items():
        body = name.removeprefix("bert.")
        if body in before:
            assert torch.equal(tensor, before[body]), name  # every body parameter bitwise unchanged
        else:
            changed.add(name)
    assert changed == {"classifier.weight", "classifier.bias"}
    optimizer = torch.load(out / "checkpoints" / "step-0000006" / "optimizer.bin", weights_only=True)
    assert len(optimizer["state"]) == 2  # frozen parameters hold no optimizer state
    assert {g["lr"] for g in optimizer["param_groups"]} == {1e-2}  # only the head's group, at head_lr


def test_gpt2_text_pairs_and_regression(
    data: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path, one_thread: None
) -> None:
    from transformers import AutoModelForSequenceClassification

    rows = sentiment_rows(120, seed=3)
    pairs = [{"a": r["sentence"], "b": "It is.", "score": 4.5 if r["label"] == "pos" else 0.5} for r in rows]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    recipe = classification_recipe(tiny_models["gpt2"], train, train, tmp_path / "gpt2", max_steps=20)
    recipe["data"].update(text_column="a", text_pair_column="b", label_column="score")
    recipe["expect"] = {"eval/pearson": {"min": 0.5}}
    assert _train(recipe, tmp_path / "r.yaml") == 0
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "gpt2" / "final"))
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    assert model.config.pad_token_id is not None  # GPT-2 finds its last non-pad token through it
    final = json.loads((tmp_path / "gpt2" / "final_metrics.json").read_text())
    assert {"eval/pearson", "eval/spearman", "eval/mse"} <= final.keys()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"label_column": "stars"}}, "data.label_column: column 'stars' not in the train split"),
        ({"model": {"pretrained": "T5"}}, "cannot do sequence-classification|has no tokenizer"),
        ({"strategy": {"kind": "head"}, "task": "causal-lm"}, "LM head is tied"),
        ({"task": "masked-lm"}, "masked-lm is a pretrain task"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    change: dict[str, Any],
    message: str,
    data: dict[str, Path],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = classification_recipe(tiny_models["bert"], data["train"], data["valid"], tmp_path / "out")
    if change.get("model", {}).get("pretrained") == "T5":
        bare = tmp_path / "bare-t5"  # a model directory without its tokenizer files
        bare.mkdir()
        (bare / "config.json").write_text((tiny_models["t5"] / "config.json").read_text())
        change = {"model": {"pretrained": str(bare)}}
    if change.get("task") == "causal-lm":
        change = {**change, "model": {"pretrained": str(tiny_models["gpt2"])}, "data": {"block_size": 64}}
    for key, value in change.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
    code, _, err = run_cli_in_process(capsys, "finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert code == 2, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_two_process_evaluation_counts_each_example_once(full_run: Path, tmp_path: Path) -> None:

    predictions = tmp_path / "p.jsonl"
    # 64 dev rows in batches of 5 per rank: the last global batch is padded by accelerate with repeats
    args = ["eval", str(full_run), "--json", "--batch-size", "5", "--predictions", str(predictions)]
    done = launch_two_ranks(*args, port=29519)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one JSON document: only the main process prints
    final = json.loads((full_run / "final_metrics.json").read_text())
    for key, value in final.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(64))


def test_finetune_from_a_pretraining_run_directory(
    data: dict[str, Path], corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pretrained = tmp_path / "mlm"
    recipe = {
        "task": "masked-lm",
        "model": {"from_scratch": tiny_config("bert")},
        "tokenizer": {"train": {"kind": "wordpiece", "vocab_size": 400, "lowercase": True}},
        "data": {"files": {"train": str(corpus["train"]), "validation": str(corpus["valid"])}, "block_size": 32},
        "train": {"max_steps": 4, "batch_size": 8, "log_every": 2},
        "output_dir": str(pretrained),
    }
    code, _, err = run_cli_in_process(capsys, "pretrain", str(write_recipe(tmp_path / "mlm.yaml", recipe)))
    assert code == 0, err[-2000:]
    tuned = classification_recipe(pretrained, data["train"], data["valid"], tmp_path / "tuned", max_steps=4)
    code, out, err = run_cli_in_process(capsys, "finetune", str(write_recipe(tmp_path / "cls.yaml", tuned)))
    assert code == 0, err[-2000:]
    assert f"pretrained {pretrained / 'final'}" in out  # the run directory stands for its final/ model
    assert (tmp_path / "tuned" / "final" / "model.safetensors").is_file()
