"""token-classification units: label alignment, word-level predictions, metrics, tag maps, tokenizers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.errors import UserError
from llmtune.recipe import build_recipe
from llmtune.tasks import get_task
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.finetune import LabelMap
from llmtune.tasks.token_classification import (
    TokenClassification,
    align_labels,
    check_tags,
    continuation_ids,
    entity_spans,
    tag_map,
    use_prefix_space,
    word_level,
    word_starts,
    word_tags,
)

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
LABEL2ID = {t: i for i, t in enumerate(LABELS)}
ID2LABEL = dict(enumerate(LABELS))


def make_task(tmp_path: Path, model: Path, data: dict[str, Any] | None = None, **options: Any) -> TokenClassification:
    """A task built from a recipe on two small CoNLL files (written here)."""
    train = tmp_path / "train.conll"
    long = "Mary B-PER\nJones I-PER\nlives O\nin O\nthe O\nold O\ncity O\nof O\nNew B-LOC\nYork I-LOC\n"
    train.write_text("John B-PER\nlives O\nin O\nParis B-LOC\n\n" + long, encoding="utf-8")
    tree = {
        "task": "token-classification",
        "model": {"pretrained": str(model)},
        "data": {"files": {"train": str(train), "validation": str(train)}, **(data or {})},
        "output_dir": str(tmp_path / "run"),
        **({"token_classification": options} if options else {}),
    }
    return get_task(build_recipe(tree, tmp_path))


def with_labels(task: TokenClassification, id2label: dict[int, str]) -> TokenClassification:
    """The task as `setup` leaves it for a model with this tag map."""
    task.labels = LabelMap({v: k for k, v in id2label.items()}, id2label, len(id2label))
    return task


# --- label alignment ---------------------------------------------------------------------------------


def test_first_sub_token_gets_the_word_label() -> None:
    # [CLS] John Sm ##ith lives in Par ##is [SEP]
    word_ids = [None, 0, 1, 1, 2, 3, 4, 4, None]
    labels = [LABEL2ID[t] for t in ["B-PER", "I-PER", "O", "O", "B-LOC"]]
    assert align_labels(word_ids, labels) == [-100, 1, 2, -100, 0, 0, 3, -100, -100]


def test_label_all_tokens_continues_b_as_i() -> None:
    word_ids = [None, 0, 0, 0, 1, 2, 2, None]
    labels = [LABEL2ID[t] for t in ["B-PER", "O", "B-LOC"]]
    continuation = continuation_ids(LABEL2ID)
    assert continuation == {1: 2, 3: 4}
    assert align_labels(word_ids, labels, True, continuation) == [-100, 1, 2, 2, 0, 3, 4, -100]
    # An I- tag (or a B- without its I-) repeats as it is.
    assert align_labels([0, 0], [LABEL2ID["I-PER"]], True, continuation) == [2, 2]
    assert align_labels([0, 0], [7], True, continuation) == [7, 7]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_alignment_with_real_sub_word_tokenizers(family: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Every word's label sits on the first token whose word_id is that word, on a real tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models[family]))
    use_prefix_space(tokenizer)
    words = ["Mary", "Jonesberg", "works", "at", "Acmeflux", "in", "Paris"]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "B-LOC"]
    encoding = tokenizer(words, is_split_into_words=True)
    ids = encoding.word_ids()
    assert len(ids) > len(words)  # some words really are split into several sub-tokens
    labels = align_labels(ids, [LABEL2ID[t] for t in tags])
    for position, word in enumerate(ids):
        first = word is not None and ids.index(word) == position
        assert labels[position] == (LABEL2ID[tags[word]] if first else -100)
    assert [labels[s] for s in word_starts(ids)] == [LABEL2ID[t] for t in tags]


def test_word_starts_with_truncation_and_empty_words() -> None:
    assert word_starts([None, 0, 0, 1, 2, 2, None]) == [1, 3, 4]
    assert word_starts([None, 0, 2, 2, None]) == [1, -1, 2]  # word 1 became no token at all
    assert word_starts([None, 0, 0, 1]) == [1, 3]  # truncated: words 2.. are absent
    assert word_starts([0, 1, 1, 2]) == [0, 1, 3]  # GPT-2: no special tokens, position 0 is a word


# --- predictions back to words ---------------------------------------------------------------------------


def test_word_level_takes_the_first_sub_token_prediction() -> None:
    token_predictions = torch.tensor([[0, 1, 2, 2, 0, 3], [0, 3, 4, 0, 0, 0]])
    starts = torch.tensor([[1, 2, 4, -100], [1, -1, 2, 3]])
    assert word_level(token_predictions, starts).tolist() == [[1, 2, 0, -100], [3, -100, 4, 0]]


def test_word_tags_fill_truncated_and_tokenless_words_with_o() -> None:
    assert word_tags([1, 2, 0], 3, ID2LABEL) == ["B-PER", "I-PER", "O"]
    assert word_tags([1, -100, 3, -100, -100], 3, ID2LABEL) == ["B-PER", "O", "B-LOC"]  # padding dropped
    assert word_tags([1, 2], 5, ID2LABEL) == ["B-PER", "I-PER", "O", "O", "O"]  # cut off by truncation


def test_entity_spans_are_end_exclusive_word_positions() -> None:
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]
    assert entity_spans(tags, "IOB2") == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6)]
    assert entity_spans(["S-PER", "O", "B-LOC", "E-LOC"], "IOBES") == [("PER", 0, 1), ("LOC", 2, 4)]
    assert entity_spans(["O", "O"], "IOB2") == []


# --- metrics ---------------------------------------------------------------------------------------------


def outputs_of(references: list[list[str]], predictions: list[list[str]]) -> EvalOutputs:
    """EvalOutputs as eval_batch would give them: one batch, rows padded with -100."""
    width = max(len(r) for r in references)

    def pad(rows: list[list[str]]) -> torch.Tensor:
        return torch.tensor([[LABEL2ID[t] for t in row] + [-100] * (width - len(row)) for row in rows])

    outputs = EvalOutputs()
    outputs.add(
        {
            "index": torch.arange(len(references)),
            "word_predictions": pad(predictions),
            "word_labels": pad(references),
            "loss": torch.tensor([2.0, 1.0]),
            "tokens": torch.tensor([3, 1]),
        }
    )
    return outputs


def test_metrics_match_hand_computed_values(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    task = with_labels(make_task(tmp_path, tiny_models["bert"]), ID2LABEL)
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "O"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["B-PER", "B-LOC"]]
    metrics = task.metrics(outputs_of(references, predictions))
    # gold: PER 0-1, LOC 3, PER 0 (3); predicted: PER 0-1, PER 0, LOC 1 (3); right: both PER (2).
    assert metrics["eval/precision"] == pytest.approx(100 * 2 / 3)
    assert metrics["eval/recall"] == pytest.approx(100 * 2 / 3)
    assert metrics["eval/f1"] == pytest.approx(100 * 2 / 3)
    assert metrics["eval/f1_PER"] == pytest.approx(100.0)
    assert metrics["eval/f1_LOC"] == pytest.approx(0.0)
    assert metrics["eval/accuracy"] == pytest.approx(4 / 6)  # words tagged right
    assert metrics["eval/loss"] == pytest.approx(3.0 / 4)  # summed loss / labelled tokens
    assert {m.name for m in task.recipe.reported_metrics() if "*" not in m.name} <= set(metrics)


def test_metrics_agree_with_seqeval(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    rng = random.Random(0)
    references = [[rng.choice(LABELS) for _ in range(rng.randint(1, 9))] for _ in range(2)]
    predictions = [[t if rng.random() < 0.6 else rng.choice(LABELS) for t in row] for row in references]
    task = with_labels(make_task(tmp_path, tiny_models["bert"]), ID2LABEL)
    metrics = task.metrics(outputs_of(references, predictions))
    assert metrics["eval/f1"] == pytest.approx(100 * f1_score(references, predictions))
    assert metrics["eval/precision"] == pytest.approx(100 * precision_score(references, predictions))
    assert metrics["eval/recall"] == pytest.approx(100 * recall_score(references, predictions))
    assert metrics["eval/accuracy"] == pytest.approx(accuracy_score(references, predictions))
    report = classification_report(references, predictions, output_dict=True, zero_division=0)
    for kind in ("PER", "LOC"):
        if kind in report:
            assert metrics[f"eval/f1_{kind}"] == pytest.approx(100 * report[kind]["f1-score"])


# --- tag maps and schemes ----------------------------------------------------------------------------


def test_tag_map_from_strings_and_class_labels() -> None:
    assert tag_map([["O", "B-PER"], ["I-PER", "O"]], None) == {"B-PER": 0, "I-PER": 1, "O": 2}
    names = ["O", "B-PER", "I-PER"]
    assert tag_map([[0, 1, 2]], names) == {"O": 0, "B-PER": 1, "I-PER": 2}
    with pytest.raises(UserError, match="integer tags"):
        tag_map([[0, 1]], None)


def test_class_label_tags_map_through_their_names(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, Features, List, Value

    from llmtune.data import RawData
    from llmtune.tasks.token_classification import class_label_names

    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=["O", "B-PER", "I-PER"]))})
    ds = Dataset.from_dict({"tokens": [["John", "Smith", "runs"]], "ner_tags": [[1, 2, 0]]}, features=features)
    assert class_label_names(ds, "ner_tags") == ["O", "B-PER", "I-PER"]
    task = make_task(tmp_path, tiny_models["bert"])
    overrides = task.model_overrides(RawData({"train": ds}, "x"))
    assert overrides["id2label"] == {0: "O", 1: "B-PER", 2: "I-PER"} and overrides["num_labels"] == 3
    # At evaluation the ints go through the dataset's names to the model's ids, whatever their order.
    from transformers import AutoTokenizer

    with_labels(task, {0: "B-PER", 1: "I-PER", 2: "O"})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))
    prepared = task.prepare(RawData({"validation": ds}, "class-label"), tokenizer)
    assert prepared.splits["validation"][0]["word_labels"].tolist() == [0, 1, 2]


def test_check_tags_follows_the_scheme() -> None:
    check_tags(["O", "B-PER", "I-PER"], "IOB2")
    check_tags(["S-PER", "E-LOC", "O"], "IOBES")
    with pytest.raises(UserError, match=r"'PER' does not fit token_classification\.scheme IOB2"):
        check_tags(["O", "PER"], "IOB2")
    with pytest.raises(UserError, match="'S-PER'"):
        check_tags(["S-PER"], "IOB2")


def test_label_all_tokens_needs_an_iob_scheme(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="label_all_tokens is supported for IOB1/IOB2"):
        make_task(tmp_path, tiny_models["bert"], label_all_tokens=True, scheme="IOBES")


# --- tokenizers, setup, prepare --------------------------------------------------------------------------


def test_byte_level_tokenizer_gets_prefix_spaces(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["gpt2"]))
    words = ["the", "parser", "returns"]
    glued = tokenizer.convert_ids_to_tokens(tokenizer(words, is_split_into_words=True)["input_ids"])
    assert use_prefix_space(tokenizer) is True
    spaced = tokenizer.convert_ids_to_tokens(tokenizer(words, is_split_into_words=True)["input_ids"])
    plain = tokenizer.convert_ids_to_tokens(tokenizer(" the parser returns")["input_ids"])
    assert spaced == plain != glued  # pre-split words tokenise as in running text
    assert use_prefix_space(tokenizer) is False  # already on
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    saved = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert saved["pre_tokenizer"]["add_prefix_space"] is True
    wordpiece = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))
    assert use_prefix_space(wordpiece) is False


def test_setup_refuses_a_slow_tokenizer(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    task = make_task(tmp_path, tiny_models["bert"])
    model = AutoModelForTokenClassification.from_pretrained(str(tiny_models["bert"]), num_labels=3)

    class SlowTokenizer:
        is_fast = False
        pad_token_id = 0

    with pytest.raises(UserError, match="needs a fast tokenizer; SlowTokenizer is a slow one"):
        task.setup(model, SlowTokenizer())


def _built(tmp_path: Path, model_dir: Path, **options: Any) -> tuple[TokenClassification, Any, Any, Any]:
    from transformers import AutoTokenizer

    from llmtune.data import load_raw
    from llmtune.modeling import build_model

    task = make_task(tmp_path, model_dir, **options)
    raw = load_raw(task.data, columns=task.required_columns())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model = build_model(task.recipe.model, tokenizer, task.auto_class, task.name, task.model_overrides(raw))
    task.setup(model, tokenizer)
    return task, raw, tokenizer, model


def test_unknown_tag_at_evaluation_is_one_clear_line(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from datasets import Dataset

    from llmtune.data import RawData

    task, _, tokenizer, _ = _built(tmp_path, tiny_models["bert"])
    rows = Dataset.from_dict({"tokens": [["John"], ["Acme", "Corp"]], "ner_tags": [["B-PER"], ["B-ORG", "I-ORG"]]})
    with pytest.raises(UserError) as error:
        task.prepare(RawData({"validation": rows}, "unknown-tag"), tokenizer)
    message = str(error.value)
    assert "\n" not in message
    assert "tag 'B-ORG' (validation split, row 1) is not in the model's label map" in message
    assert "(B-LOC, B-PER, I-LOC, I-PER, O)" in message


def test_loss_and_eval_batch_against_transformers(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    task, raw, tokenizer, model = _built(tmp_path, tiny_models["bert"])
    prepared = task.prepare(raw, tokenizer)
    batch = task.collator(tokenizer)([prepared.splits["train"][i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        ours = task.loss(model, batch, task.count_items(batch))
        reference = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        values = task.eval_batch(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    assert float(values["loss"].sum() / values["tokens"].sum()) == pytest.approx(float(reference), rel=1e-5)
    # Row 0 is "John lives in Paris": 4 words, each predicted from its first sub-token.
    starts = batch["word_starts"][0]
    expected = [int(logits[0, s].argmax()) for s in starts[starts >= 0]]
    assert values["word_predictions"][0][: len(expected)].tolist() == expected
    assert all(v.shape[0] == 2 for v in values.values())
    assert values["word_predictions"].ndim == 2 and "logits" not in values


def test_truncated_words_count_as_o(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """With max_length 8 the last words fall off: they are predicted O and their entities are missed."""
    task, raw, tokenizer, model = _built(tmp_path, tiny_models["bert"], data={"max_length": 8})
    prepared = task.prepare(raw, tokenizer)
    assert prepared.stats["validation_words_without_token"] > 0

    rows = prepared.splits["validation"]
    batch = task.collator(tokenizer)([rows[i] for i in range(len(rows))])
    outputs = EvalOutputs()
    model.eval()
    with torch.no_grad():
        outputs.add(task.eval_batch(model, batch))
    records = task.predictions(outputs)
    assert [len(r["tags"]) for r in records] == [4, 10]  # every word has a tag
    kept = [int((s >= 0).sum()) for s in prepared.splits["validation"]["word_starts"]]
    for record, n in zip(records, kept, strict=True):
        assert record["tags"][n:] == ["O"] * (len(record["words"]) - n)
    metrics = task.metrics(outputs)
    assert 0.0 <= metrics["eval/recall"] <= 100.0


def test_gpt2_trains_on_pre_split_words(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2 through the task: prefix spaces switched on, labels on first sub-tokens, the loss falls."""
    task, raw, tokenizer, model = _built(tmp_path, tiny_models["gpt2"])
    assert tokenizer.backend_tokenizer.pre_tokenizer.add_prefix_space is True
    assert type(model).__name__ == "GPT2ForTokenClassification"
    prepared = task.prepare(raw, tokenizer)
    rows = prepared.splits["train"]
    batch = task.collator(tokenizer)([rows[i] for i in range(len(rows))])
    first = batch["word_starts"][0]
    first = first[first >= 0]
    assert int(first[0]) == 0  # no special tokens: the first word starts at position 0
    assert batch["labels"][0, first].tolist() == [task.labels.label2id[t] for t in ["B-PER", "O", "O", "B-LOC"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = task.loss(model, batch, task.count_items(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        values = task.eval_batch(model, batch)
    outputs = EvalOutputs()
    outputs.add(values)
    assert task.metrics(outputs)["eval/accuracy"] > 0.5
