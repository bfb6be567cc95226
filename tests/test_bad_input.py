"""Bad input: one line saying what is wrong, exit code 2, no traceback, nothing on disk changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.errors import UserError
from tests.helpers import TINY_GPT2, run_cli, tiny_recipe, write_recipe


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
