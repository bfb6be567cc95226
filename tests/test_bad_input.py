"""Bad input: one line saying what is wrong, exit code 2, no traceback, nothing on disk changed."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmtune.errors import UserError
from tests.helpers import (
    TINY_GPT2,
    run_cli,
    run_cli_in_process,
    synthetic_documents,
    tiny_recipe,
    write_jsonl,
    write_recipe,
)


def _pretrain_error(tmp_path: Path, recipe: dict, *overrides: str) -> str:
    from llmtune.run import train as pretrain

    path = write_recipe(tmp_path / "bad.yaml", recipe)
    with pytest.raises(UserError) as caught:
        pretrain(str(path), list(overrides))
    message = str(caught.value)
    assert "\n" not in message
    assert not Path(recipe["output_dir"]).exists()  # nothing was written
    return message


def test_cli_reports_one_line_and_exit_2(corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, tmp_path / "out"))
    done = run_cli("pretrain", str(recipe), "--set", "train.batch_sise=4")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {recipe}: unknown key 'train.batch_sise'; did you mean 'train.batch_size'?"
    ]
    assert not (tmp_path / "out").exists()
    missing = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "broken.yaml").write_text("task: causal-lm\nmodel: [unclosed\n")
    broken = run_cli("validate", str(tmp_path / "broken.yaml"))
    assert broken.returncode == 2 and "not valid YAML at line" in broken.stderr


def test_cli_data_error_exit_2(corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(corpus, tmp_path / "out", data={"files": {"train": str(corpus["jsonl"])}, "text_column": "text"}),
    )
    done = run_cli("pretrain", str(recipe))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "column 'text' not in the train split; columns found: body" in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_data_file(corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = tiny_recipe(corpus, tmp_path / "out", data={"files": {"train": str(tmp_path / "none.txt")}})
    assert "data.files.train: file" in _pretrain_error(tmp_path, recipe) and "does not exist" in _pretrain_error(
        tmp_path, recipe
    )


def test_non_utf8_text_file(corpus: dict[str, Path], tmp_path: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    recipe = tiny_recipe(corpus, tmp_path / "out", data={"files": {"train": str(latin)}})
    assert "not UTF-8 text (invalid byte at offset 3)" in _pretrain_error(tmp_path, recipe)


def test_empty_split(corpus: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    recipe = tiny_recipe(
        corpus, tmp_path / "out", data={"files": {"train": str(corpus["train"]), "validation": str(empty)}}
    )
    assert "validation split is empty" in _pretrain_error(tmp_path, recipe)


def test_block_size_longer_than_context(corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = tiny_recipe(corpus, tmp_path / "out", data={"block_size": 128})
    message = _pretrain_error(tmp_path, recipe)
    assert "data.block_size: 128 is longer than the model's context (64)" in message


def test_tokenizer_model_vocabulary_mismatch(corpus: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune.tokenizer_training import train_byte_level_bpe

    small = {k: v for k, v in TINY_GPT2.items() if k != "model_type"}
    model_dir = tmp_path / "small-model"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=300, **small)).save_pretrained(model_dir)
    tok_dir = tmp_path / "big-tokenizer"
    train_byte_level_bpe(corpus["train"].read_text().split("\n\n"), vocab_size=400).save_pretrained(tok_dir)
    recipe = tiny_recipe(corpus, tmp_path / "out")
    recipe["model"], recipe["tokenizer"] = {"pretrained": str(model_dir)}, {"pretrained": str(tok_dir)}
    message = _pretrain_error(tmp_path, recipe)
    assert "tokenizer has" in message and "embeddings hold 300" in message


def test_model_directory_without_tokenizer(corpus: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {k: v for k, v in TINY_GPT2.items() if k != "model_type"}
    model_dir = tmp_path / "bare-model"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=300, **small)).save_pretrained(model_dir)
    recipe = tiny_recipe(corpus, tmp_path / "out")
    recipe["model"], recipe["tokenizer"] = {"pretrained": str(model_dir)}, {}
    assert "has no tokenizer files" in _pretrain_error(tmp_path, recipe)


def test_unknown_expected_metric_is_refused_before_training(corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = tiny_recipe(corpus, tmp_path / "out", expect={"eval/accuracy": {"min": 0.5}})
    assert "expect.eval/accuracy: causal-lm reports no metric" in _pretrain_error(tmp_path, recipe)


def test_fp16_on_cpu_is_refused(corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = tiny_recipe(corpus, tmp_path / "out", train={"precision": "fp16"})
    assert "fp16 needs a GPU" in _pretrain_error(tmp_path, recipe)


def test_existing_run_is_not_touched(corpus: dict[str, Path], tmp_path: Path) -> None:
    from llmtune.run import train as pretrain

    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.resolved.yaml").write_text("precious")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, out))
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        pretrain(str(path), [])
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        pretrain(str(path), [], resume=True)
    assert (out / "recipe.resolved.yaml").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "recipe.resolved.yaml"]


# --- the table: every command, every task, one line and exit 2 ------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """What a case builds its command line from: its own folder (also the working directory), the shared
    corpus, the tiny model directories and the module's one trained run (none of which a case may change)."""

    tmp: Path
    corpus: dict[str, Path]
    models: dict[str, Path]
    run: Path

    def file(self, name: str, text: str) -> Path:
        """A file of this case, holding `text`."""
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return path

    def rows(self, name: str, rows: list[Any]) -> Path:
        """A JSON-lines file of this case."""
        return write_jsonl(self.tmp / name, rows)

    def model_copy(self, family: str, drop: tuple[str, ...] = ()) -> Path:
        """A copy of a tiny model directory without the files whose names start with `drop`."""
        target = self.tmp / f"{family}-copy"
        shutil.copytree(self.models[family], target, ignore=lambda _, names: [n for n in names if n.startswith(drop)])
        return target


# the tiny model each task trains, and one good row of its data
FAMILY = {
    "causal-lm": "gpt2",
    "masked-lm": "bert",
    "span-corruption": "t5",
    "sequence-classification": "bert",
    "token-classification": "bert",
    "question-answering": "bert",
    "seq2seq": "t5",
    "instruction": "gpt2",
    "chat": "gpt2",
}
GOOD_ROW: dict[str, dict[str, Any]] = {
    "causal-lm": {"text": "The small parser returns a list."},
    "masked-lm": {"text": "The small parser returns a list."},
    "span-corruption": {"text": "The small parser returns a list."},
    "sequence-classification": {"text": "The small parser returns a list.", "label": "pos"},
    "token-classification": {"tokens": ["John", "reads", "Paris"], "ner_tags": ["B-PER", "O", "B-LOC"]},
    "question-answering": {
        "id": "q1",
        "question": "Who reads?",
        "context": "John reads.",
        "answers": {"text": ["John"], "answer_start": [0]},
    },
    "seq2seq": {"source": "parser module", "target": "class list"},
    "instruction": {"prompt": "the small parser", "response": "returns"},
    "chat": {"messages": [{"role": "user", "content": "the parser"}, {"role": "assistant", "content": "returns"}]},
}
_TASK_KEYS = {
    "instruction": {"prompt_column": "prompt", "response_column": "response"},
    "chat": {"messages_column": "messages"},
}


def good_rows(task: str, n: int) -> list[dict[str, Any]]:
    """`n` good rows of `task`'s data (classification: of two labels)."""
    other = {"label": "neg"} if task == "sequence-classification" else {}
    return [{**GOOD_ROW[task], **(other if i % 2 else {})} for i in range(n)]


def recipe_for(env: Env, task: str, *files: Path, **sections: Any) -> Path:
    """A small valid recipe for `task` (instruction and chat are causal-lm variants) on its tiny model, with
    `files` as its train (and validation) data, default a few good rows; `sections` update its parts (a None
    value removes a key)."""
    good = env.rows(f"good-{task}.jsonl", good_rows(task, 8))
    train, valid = (*files, good, good)[:2]
    tree: dict[str, Any] = {
        "task": "causal-lm" if task in ("instruction", "chat") else task,
        "model": {"pretrained": str(env.models[FAMILY[task]])},
        "data": {"files": {"train": str(train), "validation": str(valid)}, **_TASK_KEYS.get(task, {})},
        "train": {"max_steps": 2, "batch_size": 2},
        "output_dir": str(env.tmp / "out"),
    }
    if task in ("causal-lm", "masked-lm", "span-corruption"):
        tree["data"]["block_size"] = 16
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {k: v for k, v in {**tree[key], **value}.items() if v is not None}
        else:
            tree[key] = value
    return write_recipe(env.tmp / f"{task}.yaml", tree)


def command_for(task: str) -> str:
    """The command that trains `task`."""
    return "pretrain" if task in ("masked-lm", "span-corruption") else "finetune"


def train_rows(task: str, **changes: Any) -> Callable[[Env], list[str]]:
    """A case: train `task` on good JSON-lines rows, row 3 with its keys changed by `changes` (None: a JSON null)."""

    def build(env: Env) -> list[str]:
        rows = [*good_rows(task, 3), {**GOOD_ROW[task], **changes}, *good_rows(task, 3)]
        return [command_for(task), str(recipe_for(env, task, env.rows("train.jsonl", rows)))]

    return build


def train_file(task: str, name: str, text: str, **data: Any) -> Callable[[Env], list[str]]:
    """A case: train `task` on a file `name` holding `text` (with data keys `data`)."""

    def build(env: Env) -> list[str]:
        train = env.file(name, text)
        return [command_for(task), str(recipe_for(env, task, train, data=data))]

    return build


def with_recipe(task: str, *extra: str, command: str | None = None, **sections: Any) -> Callable[[Env], list[str]]:
    """A case: run `command` (default: the one that trains `task`) on a good `task` recipe changed by
    `sections`, with `extra` arguments."""

    def build(env: Env) -> list[str]:
        return [command or command_for(task), str(recipe_for(env, task, **sections)), *extra]

    return build


def recipe_text(text: str, command: str = "validate") -> Callable[[Env], list[str]]:
    """A case: `command` on a recipe file holding `text`."""
    return lambda env: [command, str(env.file("recipe.yaml", text))]


def argv(*args: str, data: tuple[str, str] | None = None) -> Callable[[Env], list[str]]:
    """A case: these arguments, with `{run}`, `{tmp}`, `{gpt2}` / `{bert}` / `{t5}` and `{data}` (a file of
    this case: `data` = (name, text)) filled in."""

    def build(env: Env) -> list[str]:
        path = env.file(*data) if data is not None else None
        return [a.format(run=env.run, tmp=env.tmp, data=path, **env.models) for a in args]

    return build


def output_dir_under_file(task: str) -> Callable[[Env], list[str]]:
    """A case: train `task` into output_dir FILE/run (no one can create it: permissions aside, as root too)."""

    def build(env: Env) -> list[str]:
        blocker = env.file("blocker", "a file")
        return [command_for(task), str(recipe_for(env, task, output_dir=str(blocker / "run")))]

    return build


def output_dir_read_only(task: str) -> Callable[[Env], list[str]]:
    """A case: train `task` into output_dir READ_ONLY/run, READ_ONLY a folder no one may write to."""

    def build(env: Env) -> list[str]:
        (env.tmp / "read-only").mkdir(mode=0o555)
        return [command_for(task), str(recipe_for(env, task, output_dir=str(env.tmp / "read-only" / "run")))]

    return build


def output_dir_is_file(task: str) -> Callable[[Env], list[str]]:
    """A case: train `task` into an output_dir that is an existing file."""

    def build(env: Env) -> list[str]:
        return [command_for(task), str(recipe_for(env, task, output_dir=str(env.file("out", "a file"))))]

    return build


def model_without(source: str, drop: tuple[str, ...], *args: str) -> Callable[[Env], list[str]]:
    """A case: `args` (`{model}` and `{data}`, a text file, filled) on a copy of a model lacking the files whose
    names start with `drop`: the run's final/ (`final`, a BertForMaskedLM) or the tiny GPT-2 as a causal LM
    (`causal-gpt2`)."""

    def build(env: Env) -> list[str]:
        model = env.tmp / f"{source}-copy"
        origin = env.run / "final" if source == "final" else env.models["gpt2"]
        shutil.copytree(origin, model, ignore=lambda _, names: [n for n in names if n.startswith(drop)])
        if source == "causal-gpt2":  # saved as a bare GPT2Model; its LM head is the tied embeddings
            config = json.loads((model / "config.json").read_text())
            (model / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
        data = env.file("data.txt", "The small parser returns a list.\n" * 4)
        return [a.format(model=model, data=data) for a in args]

    return build


def broken_config(*args: str) -> Callable[[Env], list[str]]:
    """A case: `args` (their `{model}` filled) on a copy of the tiny GPT-2 whose config.json is not JSON."""

    def build(env: Env) -> list[str]:
        model = env.model_copy("gpt2")
        (model / "config.json").write_text('{"model_type": "gpt2",', encoding="utf-8")
        data = env.file("data.txt", "The small parser returns a list.\n" * 4)
        return [a.format(model=model, data=data) for a in args]

    return build


def finetune_on(task: str, family: str) -> Callable[[Env], list[str]]:
    """A case: fine-tune `task` on the tiny model of another `family`."""

    def build(env: Env) -> list[str]:
        return [command_for(task), str(recipe_for(env, task, model={"pretrained": str(env.models[family])}))]

    return build


def dir_exists(*args: str) -> Callable[[Env], list[str]]:
    """A case: `args` with `{dir}`, an existing folder of this case (holding one file), and `{run}` filled."""

    def build(env: Env) -> list[str]:
        (env.tmp / "taken").mkdir()
        env.file("taken/keep.txt", "keep")
        return [a.format(dir=env.tmp / "taken", run=env.run, **env.models) for a in args]

    return build


def one_paragraph(task: str) -> Callable[[Env], list[str]]:
    """A case: pretrain `task` on one paragraph of text and no validation file (nothing to carve one from)."""

    def build(env: Env) -> list[str]:
        train = env.file("train.txt", "The small parser returns a list. The lazy token holds a frame.\n")
        return ["pretrain", str(recipe_for(env, task, data={"files": {"train": str(train)}}))]

    return build


NULL_COLUMN = [{"text": None, "label": "pos"}] * 4

CASES = [
    # --- missing and null values ---
    pytest.param(
        train_rows("sequence-classification", text=None),
        "data.text_column: column 'text' has no value in row 3",
        id="cls-null-text",
    ),
    pytest.param(
        train_rows("sequence-classification", label=None),
        "data.label_column: column 'label' has no value in row 3",
        id="cls-null-label",
    ),
    pytest.param(
        train_file("sequence-classification", "train.csv", "text,label\na b,pos\n,neg\nc d,pos\n"),
        "column 'text' has no value in row 1",
        id="cls-empty-csv-cell",
    ),
    pytest.param(
        train_rows("token-classification", ner_tags=None),
        "data.tags_column: column 'ner_tags' has no value in row 3",
        id="ner-null-tags",
    ),
    pytest.param(
        train_rows("instruction", response=None),
        "data.response_column: column 'response' has no value in row 3",
        id="instruction-null-response",
    ),
    pytest.param(
        train_file("instruction", "train.csv", "prompt,response\nthe parser,returns\n  ,reads\n"),
        "data.prompt_column: column 'prompt' has no value in row 1",
        id="instruction-blank-csv-prompt",
    ),
    pytest.param(
        train_rows("seq2seq", target=None),
        "data.target_column: column 'target' has no value in row 3",
        id="seq2seq-null-target",
    ),
    pytest.param(
        train_rows("seq2seq", source="   "),
        "data.source_column: column 'source' has no value in row 3",
        id="seq2seq-blank-source",
    ),
    pytest.param(
        train_rows("question-answering", context=None),
        "data.context_column: column 'context' has no value in row 3",
        id="qa-null-context",
    ),
    pytest.param(
        train_rows("chat", messages=None),
        "data.messages_column: column 'messages' has no value in row 3",
        id="chat-null-messages",
    ),
    pytest.param(
        lambda env: ["finetune", str(recipe_for(env, "sequence-classification", env.rows("train.jsonl", NULL_COLUMN)))],
        "column 'text' is empty in every row of the train split",
        id="cls-all-null-column",
    ),
    pytest.param(
        train_file("span-corruption", "train.jsonl", '{"text": null}\n' * 4),
        "column 'text' is empty in every row of the train split",
        id="span-all-null-text",
    ),
    # --- wrong kinds of cells ---
    pytest.param(
        train_rows("sequence-classification", text=12),
        "column 'text' holds a number in row 3 of the train split, not text",
        id="cls-number-text",
    ),
    pytest.param(
        train_rows("sequence-classification", label=["pos"]),
        "column 'label' holds a list in row 3 of the train split, not a label",
        id="cls-list-label",
    ),
    pytest.param(
        train_rows("token-classification", tokens="John reads Paris"),
        "column 'tokens' holds text in row 3 of the train split, not a list",
        id="ner-string-tokens",
    ),
    pytest.param(
        train_rows("token-classification", ner_tags="B-PER O B-LOC"),
        "column 'ner_tags' holds text in row 3 of the train split, not a list",
        id="ner-string-tags",
    ),
    pytest.param(
        train_rows("token-classification", ner_tags=["B-PER", "O"]),
        "data.tags_column: row 3 of the train split has 3 words but 2 tags",
        id="ner-tags-shorter-than-tokens",
    ),
    pytest.param(
        train_rows("chat", messages="hello"),
        "column 'messages' holds text in row 3 of the train split, not a list",
        id="chat-string-messages",
    ),
    pytest.param(
        train_rows("chat", messages=["hello", "hi"]),
        "row 3 of the train split is not a non-empty list of {role, content} messages",
        id="chat-messages-not-mappings",
    ),
    pytest.param(
        train_rows("seq2seq", source=7),
        "column 'source' holds a number in row 3 of the train split, not text",
        id="seq2seq-number-source",
    ),
    pytest.param(
        train_rows("masked-lm", text=3.5),
        "column 'text' holds a number in row 3 of the train split, not text",
        id="mlm-number-text",
    ),
    pytest.param(
        train_rows("question-answering", answers="John"),
        "example 'q1' (train split): 'answers' must be {text: [...], answer_start: [...]}, got 'John'",
        id="qa-string-answers",
    ),
    pytest.param(
        train_rows("instruction", prompt=["the", "parser"]),
        "column 'prompt' holds a list in row 3 of the train split, not text",
        id="instruction-list-prompt",
    ),
    # --- malformed files ---
    pytest.param(
        train_file("sequence-classification", "train.csv", "text,label\na b,pos\nc, d,neg\n"),
        "train.csv, line 3: 3 fields but the header has 2",
        id="cls-csv-too-many-fields",
    ),
    pytest.param(
        train_file("sequence-classification", "train.tsv", "text\tlabel\na b\tpos\nc d\n"),
        "train.tsv, line 3: 1 field but the header has 2",
        id="cls-tsv-too-few-fields",
    ),
    pytest.param(
        train_file("causal-lm", "train.jsonl", '{"text": "a b"}\n{"text": "c d"}\n{"text": "e f"\n'),
        "train.jsonl, line 3: not valid JSON",
        id="clm-broken-json-line",
    ),
    pytest.param(
        train_file("token-classification", "train.json", '{"tokens": ["a"], "ner_tags": ["O"]'),
        "train.json, line 1: not valid JSON",
        id="ner-json-not-json",
    ),
    pytest.param(
        train_file("masked-lm", "train.parquet", "not parquet at all\n"),
        "train.parquet' as parquet: Parquet magic bytes not found",
        id="mlm-parquet-not-parquet",
    ),
    pytest.param(
        train_file("sequence-classification", "train.csv", "text,label\n"),
        "train.csv: only a header row (text, label), no data rows",
        id="cls-csv-header-only",
    ),
    pytest.param(train_file("seq2seq", "train.jsonl", ""), "data: the train split is empty", id="seq2seq-empty-file"),
    pytest.param(
        train_file("causal-lm", "train.jsonl", '{"text": "a b"}\n["a", "b"]\n'),
        "line 2: a JSON-lines row must be an object",
        id="clm-json-row-a-list",
    ),
    pytest.param(
        train_file("token-classification", "train.conll", "John B-PER\nreads\n"),
        "train.conll, line 2: a CoNLL line needs a word and a tag",
        id="ner-conll-no-tag",
    ),
    pytest.param(
        train_file("question-answering", "train.json", '{"version": "1.1"}', format="squad"),
        "train.json: not SQuAD json (KeyError: 'data')",
        id="qa-squad-without-data",
    ),
    pytest.param(
        train_file("causal-lm", "train.txt", "\n  \n\t\n"),
        "every document of the train split is blank (3 skipped)",
        id="clm-only-blank-lines",
    ),
    pytest.param(
        train_file("instruction", "train.jsonl", "\n \n"),
        "only blank lines, no JSON rows",
        id="instruction-blank-jsonl",
    ),
    pytest.param(one_paragraph("span-corruption"), "too few to carve off a validation split", id="span-one-paragraph"),
    pytest.param(one_paragraph("masked-lm"), "too few to carve off a validation split", id="mlm-one-paragraph"),
    pytest.param(one_paragraph("causal-lm"), "too few to carve off a validation split", id="clm-one-paragraph"),
    pytest.param(
        lambda env: ["pretrain", str(recipe_for(env, "causal-lm", env.tmp / "none.txt"))],
        "none.txt' does not exist",
        id="clm-missing-file",
    ),
    # --- recipes ---
    pytest.param(
        recipe_text("task: causal-lm\ntask: masked-lm\n"),
        "key 'task' given twice (lines 1 and 2)",
        id="validate-duplicate-key",
    ),
    pytest.param(
        recipe_text(
            "task: causal-lm\nmodel: {pretrained: gpt2}\ndata: {hub: x}\ntrain: {lr: 0.1, lr: 0.2}\n", "pretrain"
        ),
        "key 'lr' given twice",
        id="pretrain-duplicate-nested-key",
    ),
    pytest.param(
        with_recipe("sequence-classification", command="validate", train={"batch_sise": 4}),
        "unknown key 'train.batch_sise'; did you mean 'train.batch_size'?",
        id="validate-unknown-key",
    ),
    pytest.param(
        with_recipe("seq2seq", command="validate", train={"lr": "fast"}),
        "train.lr: expected a valid number",
        id="validate-wrong-type",
    ),
    pytest.param(
        with_recipe("causal-lm", "--set", "train.lr=-0.1"),
        "train.lr: expected greater than 0",
        id="pretrain-negative-lr",
    ),
    pytest.param(
        with_recipe("token-classification", data={"validation_fraction": 1.5}),
        "data.validation_fraction: expected less than 1 (got 1.5)",
        id="finetune-validation-fraction",
    ),
    pytest.param(
        with_recipe("masked-lm", data={"block_size": 1}),
        "data.block_size: expected greater than or equal to 2",
        id="pretrain-block-size-1",
    ),
    pytest.param(
        with_recipe("causal-lm", "--set", "task=causal_lm", command="validate"),
        "unknown task 'causal_lm'; did you mean 'causal-lm'?",
        id="validate-unknown-task",
    ),
    pytest.param(
        with_recipe("causal-lm", "--set", "train.lr"),
        "--set 'train.lr': expected key.path=value",
        id="set-without-value",
    ),
    pytest.param(
        with_recipe("seq2seq", "--set", "train.lr=[1", command="validate"),
        "the value is not valid YAML",
        id="set-bad-yaml",
    ),
    pytest.param(
        with_recipe("instruction", "--set", "train.max_steps.peak=1"),
        "train.max_steps is a value, not a section",
        id="set-into-a-value",
    ),
    pytest.param(recipe_text("- task: causal-lm\n"), "a recipe must be a YAML mapping", id="validate-recipe-a-list"),
    pytest.param(
        with_recipe("causal-lm", command="validate", data={"label_column": "sentiment"}),
        "data.label_column: causal-lm does not read it",
        id="validate-column-not-read",
    ),
    pytest.param(
        with_recipe("masked-lm", command="finetune"),
        "masked-lm is a pretrain task, not a finetune one",
        id="finetune-a-pretrain-task",
    ),
    pytest.param(
        with_recipe("seq2seq", command="pretrain"),
        "seq2seq is a finetune task, not a pretrain one",
        id="pretrain-a-finetune-task",
    ),
    # --- metrics the task does not report, counts ranked ---
    pytest.param(
        with_recipe("sequence-classification", train={"best_metric": "eval/perplexity"}),
        "train.best_metric: sequence-classification reports no metric 'eval/perplexity'",
        id="cls-best-metric",
    ),
    pytest.param(
        with_recipe("causal-lm", train={"best_metric": "eval/tokens"}),
        "train.best_metric: eval/tokens is a count",
        id="clm-best-metric-count",
    ),
    pytest.param(
        with_recipe("masked-lm", train={"early_stopping": {"metric": "eval/accuracy"}}),
        "train.early_stopping.metric: masked-lm reports no metric 'eval/accuracy'",
        id="mlm-early-stopping",
    ),
    pytest.param(
        with_recipe("seq2seq", train={"early_stopping": {"metric": "eval/gen_len"}}),
        "train.early_stopping.metric: eval/gen_len is a count",
        id="seq2seq-early-stopping-count",
    ),
    pytest.param(
        with_recipe("span-corruption", expect={"eval/bleu": {"min": 1}}),
        "expect.eval/bleu: span-corruption reports no metric",
        id="span-expect",
    ),
    pytest.param(
        with_recipe("question-answering", command="validate", expect={"eval/rouge1": {"min": 1}}),
        "question-answering reports no metric 'eval/rouge1'",
        id="qa-expect",
    ),
    # --- output paths ---
    pytest.param(
        output_dir_is_file("causal-lm"),
        "is a file, not a directory; choose another output_dir",
        id="clm-output-dir-a-file",
    ),
    pytest.param(
        output_dir_under_file("masked-lm"), "blocker is a file, not a directory", id="mlm-output-dir-under-a-file"
    ),
    pytest.param(
        output_dir_under_file("question-answering"),
        "blocker is a file, not a directory",
        id="qa-output-dir-under-a-file",
    ),
    pytest.param(
        output_dir_read_only("token-classification"),
        "read-only is not writable; choose an output_dir you can write to",
        id="ner-output-dir-read-only",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders"),
    ),
    pytest.param(output_dir_is_file("chat"), "is a file, not a directory", id="chat-output-dir-a-file"),
    pytest.param(
        dir_exists("eval", "{run}", "--output", "{dir}"),
        "taken: is a directory; give a file path",
        id="eval-output-a-directory",
    ),
    pytest.param(
        argv("predict", "{run}", "--output", "{data}/p.jsonl", data=("blocker", "a file")),
        "is a file, not a directory",
        id="predict-output-under-a-file",
    ),
    pytest.param(
        argv("eval", "{run}", "--predictions", "{data}/p.jsonl", data=("blocker", "a file")),
        "is a file, not a directory",
        id="eval-predictions-under-a-file",
    ),
    pytest.param(
        dir_exists("export", "{run}", "--output", "{dir}"),
        "already exists; pass --overwrite to replace it",
        id="export-output-exists",
    ),
    pytest.param(
        argv("export", "{run}", "--output", "{data}/export", data=("blocker", "a file")),
        "is a file, not a directory",
        id="export-output-under-a-file",
    ),
    # --- model directories ---
    pytest.param(
        model_without("final", ("model.",), "eval", "{model}", "--task", "masked-lm", "--data", "{data}"),
        "has a config but no weights",
        id="eval-model-without-weights",
    ),
    pytest.param(
        model_without(
            "final", ("tokenizer", "vocab", "special"), "eval", "{model}", "--task", "masked-lm", "--data", "{data}"
        ),
        "final-copy' has no tokenizer files",
        id="eval-model-without-tokenizer",
    ),
    pytest.param(
        model_without("causal-gpt2", ("model.",), "generate", "{model}"),
        "has a config but no weights",
        id="generate-model-without-weights",
    ),
    pytest.param(
        model_without("causal-gpt2", ("tokenizer", "vocab", "merges", "special"), "generate", "{model}"),
        "causal-gpt2-copy' has no tokenizer files",
        id="generate-model-without-tokenizer",
    ),
    pytest.param(
        broken_config("eval", "{model}", "--data", "{data}"),
        "config.json' is not a valid JSON file",
        id="eval-config-not-json",
    ),
    pytest.param(
        broken_config("generate", "{model}"), "config.json' is not a valid JSON file", id="generate-config-not-json"
    ),
    pytest.param(
        lambda env: [
            "finetune",
            str(
                recipe_for(
                    env, "sequence-classification", model={"pretrained": str(env.model_copy("bert", ("model.",)))}
                )
            ),
        ],
        "model.pretrained: cannot load",
        id="finetune-model-without-weights",
    ),
    pytest.param(argv("generate", "{bert}"), "is an encoder (bidirectional), not a causal LM", id="generate-on-bert"),
    pytest.param(argv("generate", "{run}"), "is an encoder (bidirectional), not a causal LM", id="generate-on-mlm-run"),
    pytest.param(argv("generate", "{t5}"), "a 't5' model cannot do generate", id="generate-on-t5"),
    pytest.param(
        argv(
            "eval",
            "{run}",
            "--task",
            "sequence-classification",
            "--data",
            "{data}",
            data=("d.jsonl", '{"text": "a", "label": "pos"}\n'),
        ),
        "holds a BertForMaskedLM, not a model trained for sequence-classification",
        id="eval-classification-on-mlm-run",
    ),
    pytest.param(finetune_on("seq2seq", "gpt2"), "a 'gpt2' model cannot do seq2seq", id="seq2seq-on-gpt2"),
    pytest.param(finetune_on("span-corruption", "bert"), "a 'bert' model cannot do span-corruption", id="span-on-bert"),
    pytest.param(
        finetune_on("instruction", "bert"), "is an encoder (bidirectional), not a causal LM", id="instruction-on-bert"
    ),
    # --- command misuse ---
    pytest.param(argv("nosuchcommand"), "No such command 'nosuchcommand'", id="unknown-command"),
    pytest.param(argv("finetune"), "Missing argument 'recipe'", id="finetune-missing-argument"),
    pytest.param(argv("predict", "{run}"), "Missing option '--output'", id="predict-missing-output"),
    pytest.param(
        with_recipe("causal-lm", "--resume", "--overwrite"),
        "--resume and --overwrite exclude each other",
        id="resume-and-overwrite",
    ),
    pytest.param(
        with_recipe("sequence-classification", "--resume"),
        "has no checkpoint to resume from; run without --resume",
        id="resume-without-checkpoint",
    ),
    pytest.param(
        argv(
            "predict",
            "{gpt2}",
            "--task",
            "causal-lm",
            "--data",
            "{data}",
            "--output",
            "{tmp}/p.jsonl",
            data=("d.txt", "a b\n"),
        ),
        "predict: causal-lm gives no per-example predictions",
        id="predict-plain-causal-lm",
    ),
    pytest.param(
        argv("predict", "{run}", "--output", "{tmp}/p.jsonl"),
        "masked-lm gives no per-example predictions",
        id="predict-mlm-run",
    ),
    pytest.param(
        argv("generate", "{gpt2}", "--max-new-tokens", "0"),
        "Invalid value for '--max-new-tokens'",
        id="generate-zero-tokens",
    ),
    pytest.param(
        argv("generate", "{gpt2}", "--num-return", "2"),
        "--num-return > 1 needs sampling; add --sample",
        id="generate-num-return-greedy",
    ),
    pytest.param(
        argv("keys", "nosuchsection"), "keys: no recipe section 'nosuchsection'; sections: ", id="keys-unknown-section"
    ),
    pytest.param(
        argv("eval", "{gpt2}"), "--data is needed when MODEL is not a run directory", id="eval-model-without-data"
    ),
    pytest.param(
        argv("eval", "{run}", "--data", "{data}", data=("d.jsonl", '{"body": "a b"}\n')),
        "column 'text' not in the validation split",
        id="eval-data-without-column",
    ),
    pytest.param(
        argv("eval", "{run}", "--data", "{data}", data=("d.jsonl", '{"text": "a b"}\n{"text": \n')),
        "d.jsonl, line 2: not valid JSON",
        id="eval-broken-json-line",
    ),
    pytest.param(
        argv("eval", "{run}", "--data", "{data}", data=("d.csv", "text\n")),
        "d.csv: only a header row (text), no data rows",
        id="eval-csv-header-only",
    ),
    pytest.param(
        argv("generate", "{data}", data=("model.bin", "x")),
        "is a file; pass a run directory",
        id="generate-on-a-file",
    ),
    pytest.param(argv("export", "{gpt2}"), "not an llmtune run directory", id="export-model-directory"),
    pytest.param(
        argv("export", "{run}", "--merge"), "trained with strategy full: nothing to merge", id="export-merge-full-run"
    ),
    # --- found by this table (each was a traceback, a misleading line or a silent acceptance) ---
    pytest.param(
        train_rows("sequence-classification", label=3),
        "column 'label' mixes labels of two kinds in the train split (text in row 0, a number in row 3)",
        id="cls-text-and-number-labels",
    ),
    pytest.param(
        train_rows("token-classification", ner_tags=["B-PER", None, "O"]),
        "column 'ner_tags' has a null at position 1 of the list in row 3 of the train split",
        id="ner-null-tag-in-list",
    ),
    pytest.param(
        train_file("token-classification", "train.jsonl", '{"tokens": ["a", null], "ner_tags": ["O", "B-PER"]}\n' * 3),
        "column 'tokens' has a null at position 1 of the list in row 0 of the train split",
        id="ner-null-word-in-every-list",
    ),
    pytest.param(
        train_rows("token-classification", tokens=[1, 2, 3]),
        "word 0 of row 3 of the train split is 1, not text",
        id="ner-number-words",
    ),
    pytest.param(
        train_rows("question-answering", answers={"text": "John", "answer_start": 0}),
        "(lists, one item per answer)",
        id="qa-answers-not-lists",
    ),
    pytest.param(
        argv("eval", "{run}", "--batch-size", "0"), "Invalid value for '--batch-size'", id="eval-batch-size-0"
    ),
    pytest.param(
        argv("eval", "{run}", "--task", "nosuch"),
        "--task nosuch: no such task; choose one of",
        id="eval-unknown-task",
    ),
    # --- more shapes of bad input ---
    pytest.param(
        train_rows("seq2seq", target={"de": "eine"}),
        "column 'target' holds a mapping in row 3 of the train split, not text",
        id="seq2seq-mapping-target",
    ),
    pytest.param(
        train_file("causal-lm", "train.jsonl", '{"text": {"a": "b"}}\n' * 4),
        "column 'text' of the train split holds mapping values, not text",
        id="clm-mapping-text",
    ),
    pytest.param(
        with_recipe("instruction", instruction={"template": "{prompt} {context}"}),
        "instruction.template {context}: column 'context' not in the train split",
        id="instruction-template-column-missing",
    ),
    pytest.param(
        with_recipe("sequence-classification", data={"text_pair_column": "nope"}),
        "data.text_pair_column: column 'nope' not in the train split; columns found: text, label",
        id="cls-pair-column-missing",
    ),
    pytest.param(
        train_file("seq2seq", "train.src", "a\nb\n", format="parallel"),
        "format parallel takes [source_file, target_file], got 1 file(s)",
        id="seq2seq-parallel-one-file",
    ),
    pytest.param(
        argv("eval", "{run}", "--stride", "0"),
        "data.eval_stride: expected greater than or equal to 1",
        id="eval-stride-0",
    ),
    pytest.param(
        argv("eval", "{run}", "--block-size", "100000"),
        "data.block_size: 100000 is longer than the model's context (128)",
        id="eval-block-size-too-long",
    ),
    pytest.param(
        argv("eval", "{run}", "--data", "nosuchdataset"),
        "data.hub: cannot load 'nosuchdataset'",
        id="eval-hub-offline",
    ),
    pytest.param(
        argv("eval", "{run}", "--data", "{data}", data=("d.xyz", "a")),
        "d.xyz' has an unknown extension; use one of",
        id="eval-unknown-extension",
    ),
    pytest.param(
        argv("eval", "{run}", "--set", "data.text_column"),
        "--set 'data.text_column': expected key.path=value",
        id="eval-set-malformed",
    ),
    pytest.param(
        argv("generate", "{gpt2}", "--top-p", "1.5"), "Invalid value for '--top-p'", id="generate-top-p-above-1"
    ),
    pytest.param(
        with_recipe("masked-lm", strategy={"kind": "lora"}),
        "strategy.kind: lora freezes a pretrained body",
        id="mlm-lora",
    ),
    pytest.param(
        with_recipe("causal-lm", model={"pretrained": None}),
        "set exactly one of model.pretrained or model.from_scratch",
        id="clm-no-model",
    ),
    pytest.param(
        with_recipe("span-corruption", data={"hub": "x"}),
        "set exactly one of data.source, data.hub or data.files",
        id="span-hub-and-files",
    ),
    pytest.param(
        with_recipe("causal-lm", "--set", "data.files.train="),
        "data.files.train: expected a valid string",
        id="set-empty-value",
    ),
    pytest.param(
        lambda env: ["validate", str(env.tmp)],
        "is a directory; pass the path of a .yaml recipe",
        id="validate-a-directory",
    ),
    pytest.param(recipe_text(""), "a recipe must be a YAML mapping", id="validate-empty-recipe"),
]


@pytest.fixture(scope="module")
def mlm_run(corpus: dict[str, Path], tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny masked-LM run (two steps on the tiny BERT) that the eval / predict / generate / export cases
    read; none may change it."""
    from llmtune.run import train

    root = tmp_path_factory.mktemp("mlm-run")
    recipe = {
        "task": "masked-lm",
        "model": {"pretrained": str(tiny_models["bert"])},
        "data": {"files": {"train": str(corpus["valid"])}, "block_size": 32},
        "train": {"max_steps": 2, "batch_size": 4, "seed": 0},
        "output_dir": str(root / "run"),
    }
    assert train(str(write_recipe(root / "mlm.yaml", recipe)), [], command="pretrain") == 0
    return root / "run"


def _snapshot(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (size, modification time) and folder (None) under `roots`."""
    found: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.stat()
            found[str(path)] = None if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize(("build", "fragment"), CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    build: Callable[[Env], list[str]],
    fragment: str,
    corpus: dict[str, Path],
    tiny_models: dict[str, Path],
    mlm_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    monkeypatch.chdir(tmp_path)  # a default relative path would land here, and be caught
    args = build(Env(tmp_path, corpus, tiny_models, mlm_run))
    watched = (tmp_path, mlm_run, tiny_models["gpt2"].parent, corpus["train"].parent)
    before = _snapshot(*watched)
    code, _, err = run_cli_in_process(capsys, *args)
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert fragment in lines[0], lines[0]
    assert code == 2, (code, lines[0])
    assert _snapshot(*watched) == before, lines[0]


def test_the_table_covers_every_task_and_command(
    corpus: dict[str, Path], tiny_models: dict[str, Path], mlm_run: Path, tmp_path: Path
) -> None:
    ids = [case.id for case in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    commands = set()
    for index, case in enumerate(CASES):
        (tmp_path / str(index)).mkdir()
        commands.add(case.values[0](Env(tmp_path / str(index), corpus, tiny_models, mlm_run))[0])
    assert {"pretrain", "finetune", "validate", "keys", "eval", "predict", "generate", "export"} <= commands
    tasks = ("cls", "ner", "qa", "seq2seq", "instruction", "chat", "clm", "mlm", "span")
    assert all(any(i.startswith(task + "-") for i in ids) for task in tasks)


def test_blank_documents_are_skipped_and_the_run_log_counts_them(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    docs = synthetic_documents(40, seed=3)
    lines = [*docs[:10], "", "   ", *docs[10:20], "\t", "", *docs[20:30], " \t ", *docs[30:]]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(synthetic_documents(8, seed=4)) + "\n", encoding="utf-8")
    recipe = {
        "task": "causal-lm",
        "model": {"pretrained": str(tiny_models["gpt2"])},
        "data": {"files": {"train": str(train), "validation": str(valid)}, "sample_by": "line", "block_size": 16},
        "train": {"max_steps": 1, "batch_size": 4},
        "output_dir": str(tmp_path / "out"),
    }
    code, out, err = run_cli_in_process(capsys, "pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert code == 0, err[-3000:]
    sequences = next(line for line in out.splitlines() if line.startswith("sequences: "))
    assert "train_skipped_blank 5" in sequences and "validation_skipped_blank" not in sequences
