"""`llmtune export`: ONNX (fp32 equal to PyTorch within 1e-4), int8 (agreeing with fp32), structured pruning (a
plain transformers model that fine-tunes again), the report, exported models served by eval / predict, and
the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import (
    classification_recipe,
    instruction_pairs,
    instruction_recipe,
    ner_recipe,
    ner_sentences,
    qa_examples,
    qa_recipe,
    run_cli_in_process,
    sentiment_rows,
    write_conll,
    write_jsonl,
    write_recipe,
    write_squad,
    write_tsv,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_cli")]


def _train(capsys: pytest.CaptureFixture[str], recipe: dict[str, Any], path: Path) -> Path:
    code, _, err = run_cli_in_process(capsys, "finetune", str(write_recipe(path, recipe)))
    assert code == 0, err[-2000:]
    return Path(recipe["output_dir"])


@pytest.fixture(scope="module")
def runs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short run per exportable task on the tiny BERT (and a LoRA one), trained once for the module."""
    from _pytest.capture import CaptureFixture, SysCapture

    root = tmp_path_factory.mktemp("export-runs")
    capsys = CaptureFixture(SysCapture, None, _ispytest=True)  # type: ignore[arg-type]
    capsys._start()
    try:
        train, valid = (
            write_tsv(root / "train.tsv", sentiment_rows(400, 1)),
            write_tsv(root / "dev.tsv", sentiment_rows(64, 2)),
        )
        cls = classification_recipe(tiny_models["bert"], train, valid, root / "cls", max_steps=60)
        cls["train"]["schedule"] = {"kind": "linear", "warmup_steps": 2}
        cls["expect"] = {"eval/accuracy": {"min": 0.9}}
        lora = classification_recipe(tiny_models["bert"], train, valid, root / "lora", max_steps=2)
        lora["strategy"] = {"kind": "lora", "r": 2, "target_modules": ["query", "value"]}
        ner = ner_recipe(
            tiny_models["bert"],
            write_conll(root / "train.conll", ner_sentences(200, 1)),
            write_conll(root / "valid.conll", ner_sentences(32, 2)),
            root / "ner",
            max_steps=30,
        )
        qa = qa_recipe(
            tiny_models["bert"],
            write_squad(root / "train.json", qa_examples(64, 1)),
            write_squad(root / "valid.json", qa_examples(16, 2)),
            root / "qa",
        )
        write_jsonl(root / "train.jsonl", instruction_pairs(64, 1))
        write_jsonl(root / "valid.jsonl", instruction_pairs(8, 2))
        chat = instruction_recipe(tiny_models["gpt2"], root, root / "gen")
        chat["train"].update(max_steps=2, eval_every=None)
        t5 = classification_recipe(tiny_models["t5"], train, valid, root / "t5cls", max_steps=2)
        recipes = {"cls": cls, "lora": lora, "ner": ner, "qa": qa, "gen": chat, "t5cls": t5}
        return {name: _train(capsys, recipe, root / f"{name}.yaml") for name, recipe in recipes.items()}
    finally:
        capsys.close()


def _export(capsys: pytest.CaptureFixture[str], run: Path, out: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    code, stdout, err = run_cli_in_process(capsys, "export", str(run), "--output", str(out), *args)
    assert code in (0, 1), err[-2000:]
    return code, stdout, json.loads((out / "export_report.json").read_text())


@pytest.mark.parametrize("name", ["cls", "ner", "qa"])
def test_onnx_fp32_matches_pytorch_and_int8_agrees(
    runs: dict[str, Path], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs[name]
    _, stdout, fp32 = _export(capsys, run, tmp_path / "fp32", "--format", "onnx")
    assert fp32["max_abs_output_difference"] < 1e-4
    assert "largest output difference from the PyTorch model" in stdout
    source, export = fp32["source"], fp32["export"]
    assert export["runtime"] == "onnxruntime" and source["runtime"] == "pytorch"
    for key in ("size_mib", "parameters", "latency_ms_p50", "throughput", "metrics"):
        assert export[key] and source[key], key
    for metric, value in source["metrics"].items():
        assert export["metrics"][metric] == pytest.approx(value, abs=1e-3), metric
    assert sorted(p.name for p in (tmp_path / "fp32").iterdir()) == sorted(
        ["README.md", "config.json", "export_report.json", "llmtune_export.json", "llmtune_recipe.yaml", "model.onnx"]
        + [p.name for p in (run / "final").iterdir() if p.name.startswith("tokenizer")]
    )
    record = json.loads((tmp_path / "fp32" / "llmtune_export.json").read_text())
    assert [s["method"] for s in record["steps"]] == ["onnx"] and "onnxruntime" in record["versions"]

    _, _, int8 = _export(capsys, run, tmp_path / "int8", "--quantize", "int8")
    assert [s["method"] for s in int8["what"]] == ["onnx", "quantize"]
    main = {"cls": "eval/accuracy", "ner": "eval/f1", "qa": "eval/f1"}[name]
    tolerance = {"cls": 0.05, "ner": 10.0, "qa": 15.0}[name]  # fractions for accuracy, percent for F1
    assert abs(int8["export"]["metrics"][main] - fp32["export"]["metrics"][main]) <= tolerance

    # eval and predict take the exported directories, on ONNX Runtime, with the run's data by default
    code, out, err = run_cli_in_process(capsys, "eval", str(tmp_path / "fp32"), "--json")
    assert code == 0, err[-2000:]
    assert json.loads(out)["metrics"][main] == pytest.approx(fp32["export"]["metrics"][main], abs=1e-6)
    if name == "cls":
        predictions = {}
        for kind in ("fp32", "int8"):
            target = tmp_path / f"{kind}.jsonl"
            code, _, err = run_cli_in_process(capsys, "predict", str(tmp_path / kind), "--output", str(target))
            assert code == 0, err[-2000:]
            predictions[kind] = [json.loads(line)["label"] for line in target.read_text().splitlines()]
        same = sum(a == b for a, b in zip(predictions["fp32"], predictions["int8"], strict=True))
        assert same >= 0.9 * len(predictions["fp32"])


def test_int8_is_smaller_and_checks_the_runs_expect_bands(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, report = _export(capsys, runs["cls"], tmp_path / "int8", "--quantize", "int8")
    assert "expectations (export):" in stdout
    assert code == (0 if report["export"]["metrics"]["eval/accuracy"] >= 0.9 else 1)
    onnx_fp32 = _export(capsys, runs["cls"], tmp_path / "fp32", "--format", "onnx")[2]
    assert report["export"]["size_mib"] < onnx_fp32["export"]["size_mib"]  # int8 weights


def test_pruned_model_loads_with_transformers_has_fewer_parameters_and_fine_tunes_again(
    runs: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "pruned"
    _, _, report = _export(capsys, runs["cls"], out, "--prune", "0.5")
    source = AutoModelForSequenceClassification.from_pretrained(str(runs["cls"] / "final"))
    pruned = AutoModelForSequenceClassification.from_pretrained(str(out))
    width = source.config.intermediate_size
    assert pruned.config.intermediate_size == width // 2
    hidden, layers = source.config.hidden_size, source.config.num_hidden_layers
    removed = layers * (width - width // 2) * (2 * hidden + 1)  # each neuron: an input row + bias, an output column
    count = sum(p.numel() for p in pruned.parameters())
    assert count == sum(p.numel() for p in source.parameters()) - removed
    assert report["export"]["parameters"] == count
    # a recovery fine-tune is a normal fine-tune from the pruned directory
    recipe = json.loads(json.dumps(_recipe_of(runs["cls"])))
    recipe.update(model={"pretrained": str(out)}, output_dir=str(tmp_path / "recovered"), expect={})
    recipe["train"].update(max_steps=10)
    _train(capsys, recipe, tmp_path / "recover.yaml")
    recovered = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "recovered" / "final"))
    assert recovered.config.intermediate_size == width // 2
    with torch.no_grad():
        assert not torch.equal(recovered.classifier.weight, pruned.classifier.weight)  # it trained


def _recipe_of(run: Path) -> dict[str, Any]:
    import yaml

    tree = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    return {k: v for k, v in tree.items() if v is not None}


def test_pruning_serves_generating_tasks_too(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, report = _export(capsys, runs["gen"], tmp_path / "pruned", "--prune", "0.25")
    assert report["export"]["parameters"] < report["source"]["parameters"]
    assert "eval/perplexity" in report["export"]["metrics"]


def test_merge_then_onnx(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, report = _export(capsys, runs["lora"], tmp_path / "merged", "--merge", "--format", "onnx")
    assert [s["method"] for s in report["what"]] == ["merge", "onnx"]
    assert report["max_abs_output_difference"] < 1e-4


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("lora", ["--quantize", "int8"], "holds lora adapter weights; pass --merge"),
        ("cls", ["--merge"], "trained with strategy full: nothing to merge"),
        ("gen", ["--format", "onnx"], "instruction-tuning is not exported to ONNX"),
        ("t5cls", ["--format", "onnx"], "torch.export cannot capture this t5 T5ForSequenceClassification"),
        ("cls", ["--prune", "1.5"], "--prune: 1.5 is not a share of neurons in (0, 1)"),
        ("cls", ["--prune", "0"], "--prune: 0.0 is not a share of neurons in (0, 1)"),
        ("cls", ["--quantize", "int8", "--format", "torch"], "int8 is exported as ONNX Runtime dynamic quantisation"),
        ("cls", ["--quantize", "int4"], "--quantize int4: the one quantisation is int8"),
        ("cls", ["--format", "tflite"], "--format tflite: choose torch or onnx"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(
    runs: dict[str, Path], name: str, args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(str(p) for p in runs[name].rglob("*"))
    code, _, err = run_cli_in_process(capsys, "export", str(runs[name]), "--output", str(tmp_path / "x"), *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists() and sorted(str(p) for p in runs[name].rglob("*")) == before


def test_an_existing_output_needs_overwrite(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli_in_process(capsys, "export", str(runs["cls"]), "--output", str(out), "--prune", "0.5")
    assert code == 2 and "already exists; pass --overwrite" in err and (out / "keep.txt").exists()
    code, _, err = run_cli_in_process(
        capsys, "export", str(runs["cls"]), "--output", str(out), "--prune", "0.5", "--overwrite"
    )
    assert code in (0, 1), err[-2000:]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_a_missing_optional_dependency_names_the_extra() -> None:
    from llmtune.errors import UserError
    from llmtune.export.onnx import require

    with pytest.raises(
        UserError, match=r"needs the no_such_package package, in the export extra: pip install 'llmtune\[export\]'"
    ):
        require("no_such_package", "--format onnx")


def test_plain_export_copies_final_and_reports(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, report = _export(capsys, runs["ner"], tmp_path / "plain")
    assert report["what"] == [] and report["export"]["metrics"] == pytest.approx(report["source"]["metrics"])
    shutil.rmtree(tmp_path / "plain")
