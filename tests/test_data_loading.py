"""Raw data: how text files become examples (data.sample_by), blank examples skipped and counted, the validation
carve-off refused when there is too little, cell checks, and a tokenizer trained on the columns a task reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmtune.data import Required, load_raw
from llmtune.errors import UserError
from llmtune.recipe import build_recipe
from tests.helpers import make_task, run_cli_in_process, tiny_config, write_jsonl, write_parallel, write_recipe

LINES = "The parser returns a list.\nThe module raises.\n\nA token splits.\n   \nThe frame holds a thread.\n"


def spec(tmp_path: Path, **data: Any) -> Any:
    tree = {"task": "causal-lm", "model": {"pretrained": "unused"}, "data": data}
    return build_recipe(tree, tmp_path).data


def text_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_one_sentence_per_line_files_are_read_by_line(tmp_path: Path) -> None:
    lines = text_file(tmp_path, "lines.txt", "".join(f"Sentence number {i} is here.\n" for i in range(40)))
    raw = load_raw(spec(tmp_path, files={"train": lines}))
    assert len(raw.splits["train"]) + len(raw.splits["validation"]) == 40  # auto: no blank line, so by line
    assert len(raw.splits["validation"]) == 2  # 5% of 40 carved off


@pytest.mark.parametrize(
    ("sample_by", "examples", "skipped"),
    # the loader splits paragraphs at empty lines; a whitespace-only line stays inside its paragraph
    [("auto", 2, 0), ("paragraph", 2, 0), ("line", 4, 2), ("document", 1, 0)],
)
def test_sample_by_cuts_text_files_and_counts_blank_examples(
    tmp_path: Path, sample_by: str, examples: int, skipped: int
) -> None:
    path = text_file(tmp_path, "mixed.txt", LINES)
    raw = load_raw(spec(tmp_path, files={"train": path}, sample_by=sample_by), splits=("train",))
    assert len(raw.splits["train"]) == examples
    assert raw.stats.get("train_skipped_blank", 0) == skipped


def test_too_few_examples_to_carve_a_validation_split_is_one_clear_line(tmp_path: Path) -> None:
    one = text_file(tmp_path, "one.txt", "One single document.\nWith two lines.\n")
    with pytest.raises(UserError) as caught:
        load_raw(spec(tmp_path, files={"train": one}, sample_by="document"))
    message = str(caught.value)
    assert "the train split has 1 examples (text files read by document), too few to carve off a validation" in message
    assert "data.files.validation" in message and "\n" not in message


def test_cells_are_checked_by_kind_and_blanks_named_by_row(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": 3}])
    data = spec(tmp_path, files={"train": str(rows)})
    with pytest.raises(UserError, match=r"data.label_column: column 'label' has no value in row 2 of the train split"):
        load_raw(data, splits=("train",), columns=[Required("data.label_column", "label", "scalar")])
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": 1, "label": 1}, {"text": 2, "label": 0}])
    with pytest.raises(UserError, match="column 'text' of the train split holds number values, not text"):
        load_raw(spec(tmp_path, files={"train": str(numbers)}), splits=("train",))


def test_each_task_trains_its_tokenizer_on_the_columns_it_reads(tmp_path: Path) -> None:
    from datasets import Dataset

    seq2seq = make_task("seq2seq", data={"source_column": "translation.en", "target_column": "translation.de"})
    rows = Dataset.from_list([{"translation": {"en": "a list", "de": "eine liste"}, "other": "never"}])
    assert list(seq2seq.tokenizer_texts(rows)) == ["a list", "eine liste"]
    ner = make_task("token-classification")
    words = Dataset.from_dict({"tokens": [["John", "lives"]], "ner_tags": [["B-PER", "O"]]})
    assert list(ner.tokenizer_texts(words)) == ["John lives"]
    pairs = make_task("sequence-classification", data={"text_pair_column": "b"})
    table = Dataset.from_dict({"text": ["first"], "b": ["second"], "label": [1]})
    assert list(pairs.tokenizer_texts(table)) == ["first", "second"]
    chat = make_task("causal-lm", data={"messages_column": "m"})
    talk = Dataset.from_dict({"m": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]})
    assert list(chat.tokenizer_texts(talk)) == ["hi", "hello"]


def test_a_translation_model_from_scratch_trains_its_own_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    pairs = [(f"the {w} returns", f"der {w} kehrt zurück") for w in ("parser", "module", "list", "token") * 10]
    recipe = {
        "task": "seq2seq",
        "model": {"from_scratch": tiny_config("t5")},
        "tokenizer": {"train": {"kind": "unigram", "vocab_size": 300, "num_sentinels": 4}},
        "data": {"files": {"train": write_parallel(tmp_path, "train", pairs)}, "format": "parallel"},
        "seq2seq": {"num_beams": 1, "max_target_length": 16},
        "train": {"max_steps": 3, "batch_size": 8},
        "output_dir": str(tmp_path / "run"),
    }
    code, out, err = run_cli_in_process(capsys, "finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert code == 0, err[-2000:]
    assert "tokenizer: trained unigram" in out
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "final"))
    assert "zurück" in tokenizer.decode(tokenizer("kehrt zurück")["input_ids"], skip_special_tokens=True)
