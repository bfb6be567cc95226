"""Unit tests of question-answering: span post-processing on hand-made scores, window labels, SQuAD metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llmtune.batching import pad_collator
from llmtune.data import RawData
from llmtune.errors import UserError
from llmtune.metrics import normalize_answer, squad_metrics
from llmtune.recipe import Recipe
from llmtune.tasks import get_task
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.qa_postprocess import NOT_CONTEXT, WindowCandidates, best_answer
from llmtune.tasks.question_answering import QuestionAnswering, label_window

X = NOT_CONTEXT
# chars:   the 0-3, quick 4-9, brown 10-15, fox 16-19, jumps 20-25, over 26-30, the 31-34, lazy 35-39, dog 40-43
CONTEXT = "the quick brown fox jumps over the lazy dog"
SPANS = {"the": (0, 3), "quick": (4, 9), "brown": (10, 15), "fox": (16, 19), "jumps": (20, 25), "over": (26, 30)}


def window(starts: dict[int, tuple[int, float]], ends: dict[int, tuple[int, float]], null: float) -> WindowCandidates:
    """Candidates from {token position: (char offset, score)} for starts and ends."""
    return WindowCandidates(
        start_tokens=list(starts),
        start_scores=[s for _, s in starts.values()],
        start_chars=[c for c, _ in starts.values()],
        end_tokens=list(ends),
        end_scores=[s for _, s in ends.values()],
        end_chars=[c for c, _ in ends.values()],
        null_score=null,
    )


# --- post-processing on hand-made windows ------------------------------------------------------------


def test_answer_crossing_a_window_boundary_comes_from_the_window_holding_it_whole() -> None:
    # Window A holds "the quick brown" (tokens 6-8), window B "brown fox jumps over" (tokens 6-9): the
    # answer "brown fox" is whole only in B. A's best start (brown, 6.0) is the best start overall, but
    # A cannot end it at "fox"; starts and ends are never paired across windows (that would score 10).
    a = window(
        {8: (SPANS["brown"][0], 6.0), 7: (SPANS["quick"][0], 1.0), 1: (X, 9.0)},
        {8: (SPANS["brown"][1], -3.0), 7: (SPANS["quick"][1], -4.0), 2: (X, 9.0)},
        null=0.0,
    )
    b = window(
        {6: (SPANS["brown"][0], 4.0), 8: (SPANS["jumps"][0], 0.5)},
        {7: (SPANS["fox"][1], 4.0), 9: (SPANS["over"][1], 1.0)},
        null=0.0,
    )
    answer = best_answer(CONTEXT, [a, b], max_answer_length=30)
    assert answer.text == "brown fox" == CONTEXT[10:19]
    assert answer.score == pytest.approx(8.0)
    assert answer.start_char == 10
    assert best_answer(CONTEXT, [b, a], max_answer_length=30).text == "brown fox"  # window order is irrelevant


def test_max_answer_length_and_reversed_spans_are_rejected() -> None:
    w = window(
        {7: (SPANS["quick"][0], 5.0), 9: (SPANS["fox"][0], 1.0)},
        {9: (SPANS["fox"][1], 5.0), 7: (SPANS["quick"][1], 3.0), 8: (SPANS["brown"][1], 0.0)},
        null=-50.0,
    )
    assert best_answer(CONTEXT, [w], max_answer_length=3).text == "quick brown fox"  # tokens 7..9: 3 tokens
    # 2 tokens at most: quick..fox (3) is out; fox..quick ends before it starts; quick..brown (5 + 0) loses
    # to quick..quick (5 + 3)
    two = best_answer(CONTEXT, [w], max_answer_length=2)
    assert (two.text, two.score) == ("quick", 8.0)
    assert best_answer(CONTEXT, [w], max_answer_length=1).text == "quick"


def test_spans_touching_tokens_outside_the_context_are_rejected() -> None:
    # The question tokens (char offset -100) score highest; they never start or end an answer.
    w = window({1: (X, 20.0), 6: (SPANS["the"][0], 1.0)}, {2: (X, 20.0), 7: (SPANS["quick"][1], 1.0)}, null=0.0)
    answer = best_answer(CONTEXT, [w], max_answer_length=30)
    assert answer.text == "the quick" and answer.score == pytest.approx(2.0)


def test_null_answer_of_squad_v2() -> None:
    span = {6: (SPANS["fox"][0], 2.0)}, {6: (SPANS["fox"][1], 2.0)}
    windows = [window(*span, null=9.0), window(*span, null=7.0)]  # the smallest null score counts: 7
    assert best_answer(CONTEXT, windows, 30).text == "fox"  # v1: always a span
    no_answer = best_answer(CONTEXT, windows, 30, allow_no_answer=True)
    assert (no_answer.text, no_answer.score, no_answer.start_char) == ("", 7.0, None)
    assert best_answer(CONTEXT, windows, 30, allow_no_answer=True, null_threshold=2.9).text == ""  # 7 - 4 > 2.9
    assert best_answer(CONTEXT, windows, 30, allow_no_answer=True, null_threshold=3.0).text == "fox"
    # no valid span at all: the answer is empty whatever the mode
    nothing = window({1: (X, 1.0)}, {2: (X, 1.0)}, null=-1.0)
    assert best_answer(CONTEXT, [nothing], 30).text == ""


# --- labels of windows -------------------------------------------------------------------------------

OFFSETS = [(0, 0), (0, 4), (5, 7), (0, 0), (4, 9), (10, 15), (16, 19), (0, 0)]  # [CLS] q q [SEP] quick brown fox [SEP]
SEQUENCE_IDS = [None, 0, 0, None, 1, 1, 1, None]


def test_label_window_on_hand_made_offsets() -> None:
    assert label_window(OFFSETS, SEQUENCE_IDS, 10, 19, cls_index=0) == (5, 6)  # "brown fox"
    assert label_window(OFFSETS, SEQUENCE_IDS, 16, 19, cls_index=0) == (6, 6)  # the window's last context token
    assert label_window(OFFSETS, SEQUENCE_IDS, 12, 18, cls_index=0) == (5, 6)  # inside words: the words holding it
    assert label_window(OFFSETS, SEQUENCE_IDS, 10, 25, cls_index=0) == (0, 0)  # ends after the window: CLS
    assert label_window(OFFSETS, SEQUENCE_IDS, 0, 9, cls_index=0) == (0, 0)  # starts before the window: CLS


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "cat",
    "sat",
    "on",
    "mat",
    "what",
    "who",
    "is",
    "did",
    "a",
    "red",
    "big",
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny whole-word WordPiece vocabulary."""
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    return vocab


@pytest.fixture(scope="module")
def tokenizer(vocab_file: Path) -> Any:
    """A fast WordPiece tokenizer over the tiny vocabulary."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(str(vocab_file))


LONG_CONTEXT = "the cat sat on the mat the dog sat on the mat the quick brown fox jumps over the lazy dog the cat sat"


def qa_task(tmp_path: Path, max_length: int = 16, doc_stride: int = 4, **options: Any) -> QuestionAnswering:
    recipe = Recipe.model_validate(
        {
            "task": "question-answering",
            "model": {"pretrained": "unused"},
            "data": {"files": {"train": "unused.json"}, "max_length": max_length, "cache_dir": str(tmp_path)},
            "question_answering": {"doc_stride": doc_stride, **options},
        }
    )
    return get_task(recipe)


def prepared(task: QuestionAnswering, tokenizer: Any, rows: dict[str, list[Any]]) -> Any:
    from datasets import Dataset

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    task.setup(model, tokenizer)
    ds = Dataset.from_dict(rows)
    raw = RawData({"train": ds, "validation": ds}, fingerprint=str(sorted(rows.items())))
    return task.prepare(raw, tokenizer)


def column(ds: Any, name: str) -> list[Any]:
    """A prepared split's column as plain Python values."""
    return list(ds.with_format(None)[name])


def squad_rows(answer: str, context: str = LONG_CONTEXT, question: str = "what did the fox") -> dict[str, list[Any]]:
    start = context.index(answer) if answer else 0
    answers = {"text": [answer], "answer_start": [start]} if answer else {"text": [], "answer_start": []}
    return {"id": ["q1"], "question": [question], "context": [context], "answers": [answers]}


def test_windows_are_labelled_with_the_answer_tokens_or_cls(tmp_path: Path, tokenizer: Any) -> None:
    answer = "quick brown fox jumps"
    start_char = LONG_CONTEXT.index(answer)
    splits = prepared(qa_task(tmp_path), tokenizer, squad_rows(answer)).splits
    train, valid = splits["train"], splits["validation"]
    assert len(train) > 3  # 22 context words, 10 per window
    assert set(column(train, "index")) == {0}
    holding = 0
    for w in range(len(valid)):
        row = valid[w]
        starts, ends = row["offset_start"].tolist(), row["offset_end"].tolist()
        context_tokens = [i for i, c in enumerate(starts) if c != NOT_CONTEXT]
        assert context_tokens == list(range(context_tokens[0], context_tokens[-1] + 1))  # one contiguous run
        assert tokenizer.convert_ids_to_tokens(int(row["input_ids"][0])) == "[CLS]" and int(row["cls_index"]) == 0
        whole = starts[context_tokens[0]] <= start_char and ends[context_tokens[-1]] >= start_char + len(answer)
        s, e = int(row["start_positions"]), int(row["end_positions"])
        assert (s, e) == (int(train[w]["start_positions"]), int(train[w]["end_positions"]))
        if whole:
            holding += 1
            assert LONG_CONTEXT[starts[s] : ends[e]] == answer
        else:
            assert (s, e) == (0, 0)
    assert 1 <= holding < len(valid)  # some windows hold it, others (e.g. one cut through it) get CLS
    assert "offset_start" not in train.column_names  # only evaluation maps tokens back to text


def test_v2_questions_without_answer_label_every_window_cls(tmp_path: Path, tokenizer: Any) -> None:
    task = qa_task(tmp_path, allow_no_answer=True)
    train = prepared(task, tokenizer, squad_rows("")).splits["train"]
    assert set(column(train, "start_positions")) == {0} and set(column(train, "end_positions")) == {0}


@pytest.mark.parametrize(
    ("rows", "options", "words"),
    [
        (
            {**squad_rows("lazy dog"), "answers": [{"text": ["lazy dog"], "answer_start": [3]}]},
            {},
            ["'q1'", "'lazy dog'", "answer_start 3", "' cat sat'"],  # id, answer, start, what is there
        ),
        (squad_rows(""), {}, ["'q1'", "allow_no_answer"]),
        ({**squad_rows("lazy dog"), "answers": [{"text": ["lazy dog"], "answer_start": [3, 4]}]}, {}, ["'q1'"]),
        (squad_rows("mat", question="what " * 12), {}, ["'q1'", "doc_stride", "max_length"]),
    ],
)
def test_bad_examples_are_refused_naming_the_example(
    tmp_path: Path, tokenizer: Any, rows: dict[str, list[Any]], options: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(UserError) as err:
        prepared(qa_task(tmp_path, **options), tokenizer, rows)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_slow_tokenizer_and_oversized_stride_are_refused(tmp_path: Path, tokenizer: Any, vocab_file: Path) -> None:
    from transformers import BertTokenizerLegacy  # the pure-Python (slow) WordPiece tokenizer

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    task = qa_task(tmp_path)
    with pytest.raises(UserError, match="fast"):
        task.setup(model, BertTokenizerLegacy(str(vocab_file)))
    wide = qa_task(tmp_path, max_length=16, doc_stride=16)
    with pytest.raises(UserError, match="doc_stride"):
        wide.setup(model, tokenizer)


# --- eval_batch and metrics through a stub model ------------------------------------------------------


class StubModel(torch.nn.Module):
    """Returns fixed start/end logits: the best-scoring tokens are question tokens, then the answer."""

    def __init__(self, answer_start: int, answer_end: int) -> None:
        super().__init__()
        self.answer_start, self.answer_end = answer_start, answer_end

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        start = torch.zeros(input_ids.shape)
        end = torch.zeros(input_ids.shape)
        start[:, 1], end[:, 1] = 50.0, 50.0  # a question token: must never be chosen
        start[:, self.answer_start], end[:, self.answer_end] = 10.0, 10.0
        return SimpleNamespace(start_logits=start, end_logits=end)


def test_eval_batch_keeps_n_best_context_candidates_and_metrics_give_the_span(tmp_path: Path, tokenizer: Any) -> None:
    context = "the cat sat on the mat"
    rows = {
        "id": ["a", "b"],
        "question": ["who sat", "what sat on"],
        "context": [context, context],
        "answers": [{"text": ["cat"], "answer_start": [4]}, {"text": ["the mat", "the cat"], "answer_start": [15, 0]}],
    }
    task = qa_task(tmp_path, max_length=32, doc_stride=4, n_best=3)
    valid = prepared(task, tokenizer, rows).splits["validation"]
    batch = pad_collator(tokenizer.pad_token_id)([valid[i] for i in range(len(valid))])
    # tokens 5-6 are "cat sat" in a's window ([CLS] who sat [SEP] the cat ...), "the cat" in b's (3-word question)
    model = StubModel(answer_start=5, answer_end=6)
    values = task.eval_batch(model, batch)
    assert values["start_tokens"].shape == (2, 3)
    assert (values["start_chars"] >= 0).all() and (values["end_chars"] >= 0).all()  # context only
    assert values["start_tokens"][0, 0] == 5 and values["null_score"].tolist() == [0.0, 0.0]
    assert values["loss"].shape == (2,)
    outputs = EvalOutputs()
    outputs.add(values)
    answers = task.answers(outputs)
    assert [answers[0].text, answers[1].text] == ["cat sat", "the cat"]
    metrics = task.metrics(outputs)
    # a: "cat sat" vs "cat": EM 0, F1 2/3 (P 1/2, R 1); b: "the cat" matches its second answer: EM 1, F1 1
    assert metrics["eval/exact_match"] == pytest.approx(50.0)
    assert metrics["eval/f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert metrics["eval/loss"] == pytest.approx(float(values["loss"].mean()))
    assert [p["answer"] for p in task.predictions(outputs)] == ["cat sat", "the cat"]
    assert task.predictions(outputs)[1]["id"] == "b" and task.predictions(outputs)[1]["question"] == "what sat on"


# --- SQuAD metrics -----------------------------------------------------------------------------------


def test_squad_metrics_against_hand_computed_values() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    predictions = ["The Eiffel Tower!", "big red dog", "Paris", "", "something"]
    references = [["eiffel tower"], ["red dog", "a big red dog"], ["London"], [], []]
    got = squad_metrics(predictions, references)
    # EM: 1 (normalised equal), 1 (second gold), 0, 1 (v2: empty vs no answer), 0 -> 3/5
    # F1: 1, 1, 0, 1, 0 -> 3/5; and a partial overlap on its own: P 2/3, R 1 -> 0.8
    assert got == {"exact_match": pytest.approx(60.0), "f1": pytest.approx(60.0)}
    assert squad_metrics(["big red dog"], [["red dog"]]) == {"exact_match": 0.0, "f1": pytest.approx(80.0)}
    assert squad_metrics(["red red dog"], [["red dog dog"]])["f1"] == pytest.approx(100 * 2 / 3)  # counts clip
