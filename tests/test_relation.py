"""relation-classification pieces: the SemEval-2010 reader, entity markers, truncation around the entities,
entity-start pooling and the scores (the official SemEval macro-F1 against a hand-computed example)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmtune.errors import UserError
from llmtune.relation_scoring import micro_scores, per_label_f1, relation_metrics, relation_type, semeval_official
from llmtune.semeval_format import parse_semeval2010
from llmtune.tasks.relation import (
    MARKERS,
    check_spans,
    entity_start_logits,
    insert_markers,
    parse_marked,
    pooled_entity_starts,
    window,
)
from tests.helpers import TINY_CONFIGS, make_task

RELEASE = (
    '1\t"The system as described above has its greatest application in an arrayed <e1>configuration</e1> of '
    'antenna <e2>elements</e2>."\r\n'
    "Component-Whole(e2,e1)\r\n"
    "Comment: Not a collection: there is structure here, organisation.\r\n"
    "\r\n"
    '2\t"The <e1>child</e1> was carefully wrapped and bound into the <e2>cradle</e2> by means of a cord."\r\n'
    "Other\r\n"
    "Comment:\r\n"
    "\r\n"
    '3\t"The <e1>author</e1> of a keygen uses a <e2>disassembler</e2> to look at the raw assembly code."\r\n'
    "Instrument-Agency(e2,e1)\r\n"
    "Comment:\r\n"
    "\r\n"
)


def test_semeval_release_file_is_read_as_released(tmp_path: Path) -> None:
    path = tmp_path / "TRAIN_FILE.TXT"
    path.write_bytes(RELEASE.encode("ascii"))
    assert b"\r\n" in path.read_bytes()
    examples = parse_semeval2010(str(path))
    assert len(examples) == 3
    assert [e["id"] for e in examples] == [1, 2, 3]
    assert [e["label"] for e in examples] == ["Component-Whole(e2,e1)", "Other", "Instrument-Agency(e2,e1)"]
    assert [e["line"] for e in examples] == [1, 5, 9]
    text, e1, e2 = parse_marked(examples[1]["text"])
    assert text == "The child was carefully wrapped and bound into the cradle by means of a cord."
    assert (text[e1[0] : e1[1]], text[e2[0] : e2[1]]) == ("child", "cradle")
    assert e1 == (4, 9) and e2 == (51, 57)
    assert not any(c in examples[0]["text"] for c in '\r"')  # quotes and CR stripped


def test_semeval_reader_through_load_raw(tmp_path: Path) -> None:
    from llmtune.data import load_raw
    from llmtune.recipe import build_recipe

    (tmp_path / "t.txt").write_bytes((RELEASE * 4).replace("\r\n", "\n").encode())  # LF copy reads the same
    tree = {
        "task": "relation-classification",
        "model": {"pretrained": "unused"},
        "data": {"files": {"train": str(tmp_path / "t.txt")}, "format": "semeval2010", "validation_fraction": 0.25},
    }
    raw = load_raw(build_recipe(tree, tmp_path).data)
    assert (len(raw.splits["train"]), len(raw.splits["validation"])) == (9, 3)
    assert set(raw.splits["train"].column_names) == {"id", "text", "label"}


def test_unlabelled_semeval_file_and_broken_ones(tmp_path: Path) -> None:
    (tmp_path / "test.txt").write_text('8001\t"The <e1>a</e1> b <e2>c</e2>."\r\n8002\t"<e1>x</e1> <e2>y</e2>"\r\n')
    examples = parse_semeval2010(str(tmp_path / "test.txt"))
    assert [(e["id"], e["label"]) for e in examples] == [(8001, None), (8002, None)]
    (tmp_path / "bad.txt").write_text('1\t"<e1>a</e1> <e2>b</e2>"\nOther\nnot a comment\n')
    with pytest.raises(UserError, match=r"bad.txt, line 3: expected the 'Comment:' line"):
        parse_semeval2010(str(tmp_path / "bad.txt"))
    (tmp_path / "csv.txt").write_text("text,label\n")
    with pytest.raises(UserError, match=r"line 1: expected a numbered sentence"):
        parse_semeval2010(str(tmp_path / "csv.txt"))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The <e1>child</e1> was wrapped.", "has no <e2>..</e2> entity"),
        ("The <e1>child <e2>cradle</e2></e1>.", "nested or overlapping"),
        ("The <e1>child <e2>was</e1> wrapped</e2>.", "nested or overlapping"),
        ("The </e1>child<e1> <e2>x</e2>", "closes </e1> before opening <e1>"),
        ("<e1>a</e1> <e1>b</e1> <e2>c</e2>", "exactly one <e1>"),
    ],
)
def test_bad_inline_markers(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_marked(text)


def test_spans_and_marker_insertion() -> None:
    text = "Mary lives in Paris."
    assert insert_markers(text, *check_spans(text, [14, 19], [0, 4])) == "<e2>Mary</e2> lives in <e1>Paris</e1>."
    assert parse_marked("<e2>Mary</e2> lives in <e1>Paris</e1>.") == (text, (14, 19), (0, 4))
    with pytest.raises(ValueError, match="outside the text"):
        check_spans(text, [14, 40], [0, 4])
    with pytest.raises(ValueError, match="overlap"):
        check_spans(text, [0, 6], [3, 9])


def test_window_keeps_the_entities() -> None:
    # 100 tokens: 1 prefix, 1 suffix special; markers at 60 and 70; 20 tokens allowed
    start = window(100, 1, 1, 60, 70, 20)
    assert start is not None and start <= 60 and start + 18 > 70
    assert window(100, 1, 1, 2, 5, 20) == 1  # near the start: no gap after [CLS]
    assert window(100, 1, 1, 95, 98, 20) == 100 - 1 - 18  # near the end: the cut ends at [SEP]
    assert window(100, 1, 1, 10, 60, 20) is None  # the entities alone do not fit


def test_official_semeval_score_by_hand() -> None:
    references = [
        "Cause-Effect(e1,e2)",
        "Cause-Effect(e1,e2)",
        "Cause-Effect(e2,e1)",
        "Other",
        "Member-Collection(e1,e2)",
        "Member-Collection(e2,e1)",
        "Other",
        "Other",
    ]
    predictions = [
        "Cause-Effect(e1,e2)",  # right
        "Cause-Effect(e2,e1)",  # right type, wrong direction: wrong, yet proposed Cause-Effect
        "Other",
        "Cause-Effect(e1,e2)",
        "Member-Collection(e1,e2)",  # right
        "Cause-Effect(e2,e1)",
        "Other",
        "Instrument-Agency(e1,e2)",  # a type the references lack: not averaged
    ]
    # Cause-Effect: correct 1, proposed 4 (rows 1, 2, 4, 6), gold 3 -> P 1/4, R 1/3, F1 2/7
    # Member-Collection: correct 1, proposed 1, gold 2 -> P 1, R 1/2, F1 2/3
    official = semeval_official(predictions, references)
    assert official["semeval_f1_Cause-Effect"] == pytest.approx(100 * 2 / 7)
    assert official["semeval_f1_Member-Collection"] == pytest.approx(100 * 2 / 3)
    assert set(official) == {"semeval_macro_f1", "semeval_f1_Cause-Effect", "semeval_f1_Member-Collection"}
    assert official["semeval_macro_f1"] == pytest.approx(100 * 10 / 21)  # (2/7 + 2/3) / 2
    # TACRED micro: guesses 6 (not Other), gold 5, correct 2 -> P 1/3, R 2/5, F1 4/11
    micro = micro_scores(predictions, references, "Other")
    assert micro["micro_precision"] == pytest.approx(100 / 3)
    assert micro["micro_recall"] == pytest.approx(40.0)
    assert micro["micro_f1"] == pytest.approx(400 / 11)
    every = relation_metrics(predictions, references, "Other", per_relation=True)
    assert every["accuracy"] == pytest.approx(3 / 8)
    assert every["f1_Member-Collection(e1,e2)"] == pytest.approx(100.0)
    assert every["f1_Cause-Effect(e1,e2)"] == pytest.approx(100 * 2 * (1 / 2) * (1 / 2) / 1)  # P 1/2, R 1/2
    assert relation_type("Cause-Effect(e2,e1)") == "Cause-Effect" and relation_type("no_relation") == "no_relation"
    assert per_label_f1(["a"], ["b"]) == {"f1_a": 0.0, "f1_b": 0.0}
    assert micro_scores(["no_relation"], ["no_relation"], "no_relation")["micro_precision"] == 100.0  # TACRED: no guess


@pytest.fixture(scope="module")
def tiny(one_thread: Any) -> tuple[Any, Any]:
    """A tiny BERT token classifier with 2 x 3 outputs (3 relations) and a WordPiece tokenizer trained here."""
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification

    from llmtune.tokenizer_training import train_wordpiece

    texts = ["the child was wrapped into the cradle by a cord", "mary lives in paris and works at acme"] * 20
    tokenizer = train_wordpiece(texts, 200, 1, True, [])
    keys = dict(TINY_CONFIGS["bert"])
    config = AutoConfig.for_model(keys.pop("model_type"), **keys, vocab_size=len(tokenizer), num_labels=6)
    config.pad_token_id = tokenizer.pad_token_id
    config.relation_classification = {"pooling": "entity_start", "labels": ["Other", "R(e1,e2)", "R(e2,e1)"]}
    torch.manual_seed(0)
    return AutoModelForTokenClassification.from_config(config).eval(), tokenizer


def test_markers_are_added_and_entity_start_pooling_reads_them(tiny: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = tiny
    task = make_task("relation-classification", data={"max_length": 12})
    task.building = True  # as training does: the markers are added and the embeddings grow
    rows_before = model.get_input_embeddings().num_embeddings
    task.setup(model, tokenizer)
    assert all(m in tokenizer.get_vocab() for m in MARKERS)
    assert model.get_input_embeddings().num_embeddings == rows_before + 4 == len(tokenizer)
    rows = {
        "text": [
            "The <e1>child</e1> was wrapped into the <e2>cradle</e2>.",
            "mary lives in paris and works at acme and the child was wrapped into the "
            "<e2>cradle</e2> by a <e1>cord</e1> and mary lives in paris and works at acme",
        ],
        "label": ["R(e1,e2)", "Other"],
    }
    encoded = task.encode(rows, [0, 1], "train")
    e1, e2 = tokenizer.convert_tokens_to_ids(["<e1>", "<e2>"])
    ids = encoded["input_ids"]
    assert len(ids[1]) == 12  # cut to data.max_length around the entities
    assert ids[1][0] == tokenizer.cls_token_id and ids[1][-1] == tokenizer.sep_token_id
    for row, (p1, p2) in zip(ids, encoded["entity_starts"], strict=True):
        assert row[p1] == e1 and row[p2] == e2
        assert all(tokenizer.convert_tokens_to_ids(m) in row for m in MARKERS)  # no marker cut
    assert encoded["labels"] == [1, 0]

    batch = task.collator(tokenizer)([{k: v[i] for k, v in encoded.items()} for i in range(2)])
    starts = batch["entity_starts"]
    with torch.no_grad():
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = task.relation_logits(model, batch)
    pooled = pooled_entity_starts(hidden, starts)
    for i in range(2):  # the pooled vector is the two marker positions' hidden states
        assert torch.equal(pooled[i, :32], hidden[i, starts[i, 0]])
        assert torch.equal(pooled[i, 32:], hidden[i, starts[i, 1]])
    w, b = model.classifier.weight, model.classifier.bias
    concat_head = pooled @ torch.cat([w[:3], w[3:]], dim=1).T + (b[:3] + b[3:])  # a Linear(2H, L) over [h_e1; h_e2]
    assert torch.allclose(logits, concat_head, atol=1e-5)
    assert torch.equal(
        logits, entity_start_logits(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, starts, 3)
    )

    far = {"text": ["<e1>child</e1> " + "paris " * 20 + "<e2>cradle</e2>"], "label": ["Other"]}
    with pytest.raises(UserError, match=r"row 3: the two entities span \d+ tokens, more than data.max_length \(12\)"):
        task.encode(far, [3], "train")
    with pytest.raises(UserError, match=r"relation 'Unknown' .* is not one the model knows"):
        task.encode({"text": rows["text"][:1], "label": ["Unknown"]}, [0], "validation")


def test_a_saved_model_without_markers_is_refused(tiny: tuple[Any, Any]) -> None:
    from llmtune.tokenizer_training import train_wordpiece

    model, _ = tiny
    task = make_task("relation-classification")  # not building: evaluating a saved model
    with pytest.raises(UserError, match="has no entity markers"):
        task.setup(model, train_wordpiece(["a b c"] * 5, 60, 1, True, []))


def test_a_bad_row_of_a_carved_validation_split_names_its_sentence_id() -> None:
    task = make_task("relation-classification", data={"files": {"train": "TRAIN_FILE.TXT"}, "format": "semeval2010"})
    rows = {"id": [40], "text": ["The <e1>child</e1> was wrapped."], "label": ["Other"]}
    with pytest.raises(UserError) as caught:
        task.encode(rows, [2], "validation")
    message = str(caught.value)
    assert message.startswith("row 2 (sentence id 40) of the validation split carved from ")
    assert message.endswith(
        "TRAIN_FILE.TXT: 'text' has no <e2>..</e2> entity; mark both entities: 'The <e1>child</e1> was wrapped.'"
    )
