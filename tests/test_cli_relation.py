"""End to end: `llmtune finetune` relation-classification -> eval -> predict, a plain-transformers reload of final/,
pooling `cls` with span columns, and bad rows refused in one line with exit 2."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import ADJECTIVES, NOUNS, VERBS, read_metrics, run_cli, run_cli_in_process, write_jsonl, write_recipe

pytestmark = pytest.mark.slow

RELATIONS = ["Other", "Uses(e1,e2)", "Uses(e2,e1)"]


def relation_rows(n: int, seed: int, spans: bool = False) -> list[dict[str, Any]]:
    """A synthetic relation: the verb says whether there is one (the first five verbs) and which entity comes first
    in the sentence says its direction."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(NOUNS, 2)
        verb = rng.choice(VERBS)
        first = rng.random() < 0.5
        x, y = (f"<e1>{a}</e1>", f"<e2>{b}</e2>") if first else (f"<e2>{b}</e2>", f"<e1>{a}</e1>")
        text = f"The {rng.choice(ADJECTIVES)} {x} {verb} a {rng.choice(ADJECTIVES)} {y}."
        label = "Other" if verb in VERBS[5:] else ("Uses(e1,e2)" if first else "Uses(e2,e1)")
        row: dict[str, Any] = {"text": text, "label": label}
        if spans:  # the same sentence without markers, the entities as [start, end) character offsets
            from llmtune.tasks.relation import parse_marked

            clean, e1, e2 = parse_marked(text)
            row = {"sentence": clean, "head": list(e1), "tail": list(e2), "label": label}
        rows.append(row)
    return rows


def relation_recipe(model: Path, train: Path, valid: Path, out: Path, steps: int, **sections: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "task": "relation-classification",
        "model": {"pretrained": str(model)},
        "data": {"files": {"train": str(train), "validation": str(valid)}},
        "relation": {"per_relation": True},
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "lr": 1e-2,
            "log_every": 5,
            "seed": 0,
            "schedule": {"kind": "constant", "warmup_steps": 2},
        },
        "output_dir": str(out),
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("relations")
    return {
        "train": write_jsonl(root / "train.jsonl", relation_rows(400, seed=1)),
        "valid": write_jsonl(root / "valid.jsonl", relation_rows(64, seed=2)),
        "root": root,
    }


@pytest.fixture(scope="module")
def run(data: dict[str, Path], tiny_models: dict[str, Path]) -> Path:
    out = data["root"] / "run"
    recipe = write_recipe(
        data["root"] / "r.yaml", relation_recipe(tiny_models["bert"], data["train"], data["valid"], out, 40)
    )
    result = run_cli("finetune", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def plain_transformers_relations(final: Path, texts: list[str]) -> list[str]:
    """What a user without llmtune does with an entity-start final/ (the README shows the same lines)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForTokenClassification.from_pretrained(str(final)).eval()
    relations = model.config.relation_classification["labels"]
    e1, e2 = tokenizer.convert_tokens_to_ids(["<e1>", "<e2>"])
    out = []
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        scores = logits[ids.index(e1), : len(relations)] + logits[ids.index(e2), len(relations) :]
        out.append(relations[int(scores.argmax())])
    return out


def test_finetune_learns_the_synthetic_relation(run: Path) -> None:
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    assert max(losses[-2:]) < 0.3 * losses[0]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["eval/accuracy"] >= 0.9
    assert final["eval/semeval_macro_f1"] >= 85 and final["eval/micro_f1"] >= 85
    assert {f"eval/f1_{r}" for r in RELATIONS} <= final.keys()


def test_predict_gives_relation_and_score_equal_to_plain_transformers(run: Path, data: dict[str, Path]) -> None:
    texts = [r["text"] for r in relation_rows(12, seed=3)]
    unlabelled = write_jsonl(data["root"] / "unlabelled.jsonl", [{"text": t} for t in texts])
    out = data["root"] / "predictions.jsonl"
    result = run_cli("predict", str(run), "--data", str(unlabelled), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"index", "relation", "score"}] * 12
    assert [r["index"] for r in rows] == list(range(12))
    assert all(r["relation"] in RELATIONS and 1 / 3 <= r["score"] <= 1 for r in rows)
    # final/ reloads with plain transformers and its saved tokenizer, and predicts the same relations
    assert plain_transformers_relations(run / "final", texts) == [r["relation"] for r in rows]
    tokenizer_files = json.loads((run / "final" / "tokenizer.json").read_text())["added_tokens"]
    assert {t["content"] for t in tokenizer_files if t["special"]} >= {"<e1>", "</e1>", "<e2>", "</e2>"}


def test_predict_reads_an_unlabelled_semeval_test_file(run: Path, data: dict[str, Path]) -> None:
    texts = [r["text"] for r in relation_rows(3, seed=5)]
    release = data["root"] / "TEST_FILE.TXT"  # the release's unlabelled form: numbered sentences only, CRLF
    release.write_bytes("".join(f'{8001 + i}\t"{t}"\r\n' for i, t in enumerate(texts)).encode())
    out = data["root"] / "semeval-predictions.jsonl"
    result = run_cli(
        "predict", str(run), "--data", str(release), "--output", str(out), "--set", "data.format=semeval2010"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [8001, 8002, 8003]
    assert [r["relation"] for r in rows] == plain_transformers_relations(run / "final", texts)


def test_eval_reproduces_the_final_metrics_and_refuses_unknown_relations(run: Path, data: dict[str, Path]) -> None:
    result = run_cli("eval", str(run), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)["metrics"]
    final = json.loads((run / "final_metrics.json").read_text())
    assert metrics.keys() == final.keys()
    for key, value in final.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    bad = write_jsonl(data["root"] / "bad.jsonl", [{"text": "The <e1>list</e1> holds a <e2>token</e2>.", "label": "X"}])
    result = run_cli("eval", str(run), "--data", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: data.label_column: relation 'X' ({bad}, row 0) is not one the model knows "
        f"({', '.join(RELATIONS)}); evaluate on data with the relations it was trained on"
    ]


def test_cls_pooling_with_span_columns(data: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification

    root = data["root"]
    train = write_jsonl(root / "spans-train.jsonl", relation_rows(400, seed=1, spans=True))
    valid = write_jsonl(root / "spans-valid.jsonl", relation_rows(32, seed=2, spans=True))
    out = root / "cls"
    spans = {"text_column": "sentence", "e1_span_column": "head", "e2_span_column": "tail"}
    recipe = relation_recipe(tiny_models["bert"], train, valid, out, 10, data=spans, relation={"pooling": "cls"})
    result = run_cli("finetune", str(write_recipe(root / "cls.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForSequenceClassification.from_pretrained(str(out / "final"))
    assert model.config.id2label == dict(enumerate(RELATIONS))  # a plain sequence classifier of the relations
    assert model.config.relation_classification["pooling"] == "cls"
    predictions = root / "cls.jsonl"
    result = run_cli("predict", str(out), "--output", str(predictions))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(predictions.read_text().splitlines()) == 32


BAD_ROWS = [
    ({"text": "The <e1>list</e1> holds a token.", "label": "Other"}, "'text' has no <e2>..</e2> entity"),
    ({"text": "The <e1>list <e2>token</e2></e1>.", "label": "Other"}, "nested or overlapping entities"),
    ({"text": "The <e1>list <e2>holds</e1> a</e2> token.", "label": "Other"}, "nested or overlapping entities"),
]
BAD_SPANS = [
    ({"sentence": "The list holds a token.", "head": [4, 8], "tail": [17, 40], "label": "Other"}, "outside the text"),
    ({"sentence": "The list holds a token.", "head": [4, 8], "tail": [6, 12], "label": "Other"}, "overlap"),
]


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS + BAD_SPANS)
def test_bad_rows_are_one_line_naming_the_row(
    row: dict[str, Any],
    reason: str,
    data: dict[str, Path],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    spans = "head" in row
    good = relation_rows(6, seed=4, spans=spans)
    train = write_jsonl(tmp_path / "train.jsonl", [*good[:3], row, *good[3:]])
    keys = {"text_column": "sentence", "e1_span_column": "head", "e2_span_column": "tail"} if spans else {}
    recipe = relation_recipe(tiny_models["bert"], train, data["valid"], tmp_path / "out", 2, data=keys)
    if spans:
        recipe["data"]["files"]["validation"] = str(write_jsonl(tmp_path / "valid.jsonl", good))
    code, _, err = run_cli_in_process(capsys, "finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{train}, row 3: " in lines[0] and reason in lines[0], err
    assert not (tmp_path / "out").exists()


def test_resume_grows_the_embeddings_for_the_saved_markers(
    data: dict[str, Path],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    import shutil

    from tests.helpers import load_tensors

    out = tmp_path / "run"
    recipe = relation_recipe(tiny_models["bert"], data["train"], data["valid"], out, 6)
    recipe["train"]["save_every"] = 3
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = run_cli_in_process(capsys, "finetune", str(path))
    assert code == 0, err[-2000:]
    uninterrupted = load_tensors(out / "final" / "model.safetensors")
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-0000006")
    (out / "final_metrics.json").unlink()
    # the saved tokenizer holds the four markers the pretrained checkpoint's embeddings lack
    code, stdout, err = run_cli_in_process(capsys, "finetune", str(path), "--resume")
    assert code == 0, err[-2000:]
    assert "resumed from" in stdout
    resumed = load_tensors(out / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_serve_relates_as_predict_does(run: Path, data: dict[str, Path], one_thread_cli: None) -> None:
    from llmtune.tasks.relation import parse_marked
    from tests.helpers import Server

    texts = [r["text"] for r in relation_rows(6, seed=7)]
    unlabelled = write_jsonl(data["root"] / "serve.jsonl", [{"text": t} for t in texts])
    out = data["root"] / "serve-predictions.jsonl"
    assert run_cli("predict", str(run), "--data", str(unlabelled), "--output", str(out)).returncode == 0
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    server = Server(run, log=data["root"] / "serve.log")
    try:
        assert server.client.get("/info").json()["labels"] == RELATIONS
        inline = server.post("/v1/relate", {"text": texts}).json()["results"]
        parsed = [parse_marked(t) for t in texts]  # the same sentences as plain text and character spans
        spans = {"text": [p[0] for p in parsed], "e1": [p[1] for p in parsed], "e2": [p[2] for p in parsed]}
        by_spans = server.post("/v1/relate", spans).json()["results"]
        unmarked = server.post("/v1/relate", {"text": ["The parser returns a list.", texts[0]]})
        one_span = server.post("/v1/relate", {"text": parsed[0][0], "e1": parsed[0][1]})
        elsewhere = server.post("/v1/classify", {"text": "hello"})
    finally:
        assert server.stop() == 0
    assert [r["relation"] for r in inline] == [p["relation"] for p in predicted]
    for got, want in zip(inline, predicted, strict=True):
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert by_spans == inline
    assert unmarked.status_code == 422 and "text 0 has no <e1>..</e1> entity" in unmarked.json()["error"]
    assert one_span.status_code == 422 and "give both entities' spans" in one_span.json()["error"]
    assert elsewhere.status_code == 404
