"""End to end: `llmtune finetune` token-classification (NER) -> eval -> predict, and bad input.

GPT-2 (byte-level BPE, no special tokens) is trained in process in tests/test_token_classification.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import ner_recipe, ner_sentences, read_metrics, run_cli, write_conll, write_jsonl, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ner")
    valid = ner_sentences(40, seed=2)
    return {
        "root": root,
        "train": write_conll(root / "train.conll", ner_sentences(300, seed=1)),
        "valid": write_conll(root / "valid.conll", valid),
        "valid_sentences": valid,
        # json rows with word lists and string tags, and an unlabelled copy for predict
        "train_jsonl": write_jsonl(
            root / "train.jsonl",
            [{"words": [w for w, _ in s], "tags": [t for _, t in s]} for s in ner_sentences(300, seed=3)],
        ),
        "valid_jsonl": write_jsonl(
            root / "valid.jsonl", [{"words": [w for w, _ in s], "tags": [t for _, t in s]} for s in valid]
        ),
        "unlabelled": write_jsonl(root / "unlabelled.jsonl", [{"tokens": [w for w, _ in s]} for s in valid[:12]]),
    }


@pytest.fixture(scope="module")
def bert_run(data: dict[str, Any], tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bert") / "run"
    recipe = ner_recipe(tiny_models["bert"], data["train"], data["valid"], out, eval_every=20)
    result = run_cli("finetune", str(write_recipe(out.parent / "r.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "task: token-classification" in result.stdout and "validation_words " in result.stdout
    return out


def first_sub_token_tags(model_dir: Path, sentences: list[list[str]]) -> list[list[str]]:
    """Tags by plain transformers: the argmax at each word's first sub-token (the model's id2label)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForTokenClassification.from_pretrained(str(model_dir)).eval()
    tags = []
    for words in sentences:
        encoding = tokenizer(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            predicted = model(**encoding).logits[0].argmax(-1).tolist()
        ids = encoding.word_ids()
        firsts = [ids.index(i) for i in range(len(words))]
        tags.append([model.config.id2label[predicted[p]] for p in firsts])
    return tags


def test_bert_learns_and_reports_entity_metrics(bert_run: Path) -> None:
    records = read_metrics(bert_run)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    final = json.loads((bert_run / "final_metrics.json").read_text())
    for key in ("eval/loss", "eval/precision", "eval/recall", "eval/f1", "eval/accuracy"):
        assert key in final
    assert {"eval/f1_PER", "eval/f1_LOC", "eval/f1_ORG"} <= set(final)
    assert final["eval/f1"] > 50 and final["eval/accuracy"] > 0.8  # an untrained head scores ~0
    evals = [r for r in records if "eval/f1" in r]
    assert evals[0]["step"] == 20 and evals[-1]["eval/loss"] < losses[0]


def test_final_loads_and_eval_reproduces_the_final_metrics(bert_run: Path) -> None:
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(str(bert_run / "final"))
    assert set(model.config.label2id) == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}
    result = run_cli("eval", str(bert_run), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout)["metrics"]
    final = json.loads((bert_run / "final_metrics.json").read_text())
    assert got.keys() == final.keys()
    for key, value in final.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_predict_gives_words_tags_and_entities(bert_run: Path, data: dict[str, Any]) -> None:
    target = data["root"] / "predictions.jsonl"
    result = run_cli("predict", str(bert_run), "--data", str(data["unlabelled"]), "--output", str(target))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    sentences = [[w for w, _ in s] for s in data["valid_sentences"][:12]]
    assert [r["index"] for r in rows] == list(range(12))
    assert [r["words"] for r in rows] == sentences
    assert [r["tags"] for r in rows] == first_sub_token_tags(bert_run / "final", sentences)
    for row in rows:
        for entity in row["entities"]:
            assert row["tags"][entity["start"]] in ("B-" + entity["type"], "I-" + entity["type"])
            assert entity["text"] == " ".join(row["words"][entity["start"] : entity["end"]])
    assert any(r["entities"] for r in rows)


def _refused(result: Any, out: Path, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not out.exists()


def test_unknown_tag_at_eval_is_refused(bert_run: Path, data: dict[str, Any]) -> None:
    rows = [{"tokens": ["Acme"], "ner_tags": ["B-ORG"]}, {"tokens": ["Rex", "barks"], "ner_tags": ["B-ANIMAL", "O"]}]
    bad = write_jsonl(data["root"] / "odd.jsonl", rows)
    out = data["root"] / "odd-eval.json"
    result = run_cli("eval", str(bert_run), "--data", str(bad), "--output", str(out))
    _refused(result, out, "tag 'B-ANIMAL' (validation split, row 1) is not in the model's label map", "B-PER")
    assert not (bert_run / "eval" / "odd-validation.json").exists()


def _finetune_error(tmp_path: Path, recipe: dict[str, Any]) -> str:
    """The one-line UserError `llmtune finetune` stops with (in process: the CLI prints it and exits 2)."""
    from llmtune.errors import UserError
    from llmtune.run import train

    with pytest.raises(UserError) as caught:
        train(str(write_recipe(tmp_path / "bad.yaml", recipe)), [], command="finetune")
    assert "\n" not in str(caught.value)
    assert not Path(recipe["output_dir"]).exists()  # nothing was written
    return str(caught.value)


def test_missing_tags_column_is_refused(data: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = ner_recipe(tiny_models["bert"], data["train_jsonl"], data["valid_jsonl"], tmp_path / "run")
    recipe["data"]["tokens_column"] = "words"  # tags_column stays ner_tags, which the files lack
    message = _finetune_error(tmp_path, recipe)
    assert "data.tags_column: column 'ner_tags' not in the train split; columns found: words, tags" in message


def test_model_without_token_classification_is_refused(
    data: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    recipe = ner_recipe(tiny_models["bert"], data["train"], data["valid"], tmp_path / "run")
    recipe["model"] = {"from_scratch": {"model_type": "bart", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1}}
    recipe["tokenizer"] = {"pretrained": str(tiny_models["bert"])}
    message = _finetune_error(tmp_path, recipe)
    assert "'bart' model cannot do token-classification (AutoModelForTokenClassification" in message


def test_model_dir_without_tokenizer_is_refused(
    data: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models["bert"] / name, bare / name)
    message = _finetune_error(tmp_path, ner_recipe(bare, data["train"], data["valid"], tmp_path / "run"))
    assert f"tokenizer: '{bare}' has no tokenizer files" in message


def test_integer_tags_without_names_are_refused(
    data: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    rows = [{"tokens": ["John", "runs"], "ner_tags": [1, 0]}, {"tokens": ["Mary"], "ner_tags": [1]}]
    train = write_jsonl(tmp_path / "ints.jsonl", rows)
    message = _finetune_error(tmp_path, ner_recipe(tiny_models["bert"], train, train, tmp_path / "run"))
    assert "data.tags_column: the train split has integer tags (0, ...) without names" in message
