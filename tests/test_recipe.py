"""Recipe loading: error messages, `--set` parsing, path resolution, source rules, dump round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtune.errors import UserError
from llmtune.recipe import Recipe, build_recipe, dump_recipe, load_recipe, parse_override


def base_tree(**sections: Any) -> dict[str, Any]:
    """A minimal valid recipe tree; `sections` replace whole top-level entries."""
    tree: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"pretrained": "gpt2"},
        "data": {"files": {"train": "train.txt"}},
    }
    tree.update(sections)
    return tree


def build_error(tree: dict[str, Any], overrides: list[str] | None = None, base: Path = Path("/nonexistent")) -> str:
    with pytest.raises(UserError) as info:
        build_recipe(tree, base, overrides)
    return str(info.value)


# --- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "typo", "bad_path", "suggestion"),
    [
        ("train", {"lrr": 1e-3}, "train.lrr", "train.lr"),
        ("train", {"optimizer": {"kindd": "sgd"}}, "train.optimizer.kindd", "train.optimizer.kind"),
        ("train", {"schedule": {"warmup_step": 3}}, "train.schedule.warmup_step", "train.schedule.warmup_steps"),
        (
            "train",
            {"early_stopping": {"patiense": 3}},
            "train.early_stopping.patiense",
            "train.early_stopping.patience",
        ),
        ("tokenizer", {"train": {"vocab_sise": 512}}, "tokenizer.train.vocab_sise", "tokenizer.train.vocab_size"),
        ("model", {"pretrained": "gpt2", "revison": "main"}, "model.revison", "model.revision"),
    ],
)
def test_unknown_nested_key_names_full_path_and_closest_key(
    section: str, typo: dict[str, Any], bad_path: str, suggestion: str
) -> None:
    message = build_error(base_tree(**{section: typo}))
    assert f"unknown key '{bad_path}'" in message
    assert f"did you mean '{suggestion}'?" in message
    assert "valid keys here" not in message


def test_unknown_data_key_suggests_block_size() -> None:
    message = build_error(base_tree(data={"files": {"train": "t.txt"}, "blok_size": 64}))
    assert "unknown key 'data.blok_size'" in message
    assert "did you mean 'data.block_size'" in message


def test_unknown_top_level_key_suggests_section() -> None:
    tree = base_tree()
    tree["modle"] = {}
    assert "did you mean 'model'" in build_error(tree)


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    message = build_error(base_tree(train={"zzzzqq": 1}))
    assert "unknown key 'train.zzzzqq'" in message
    assert "did you mean" not in message
    listed = message.split("valid keys here:", 1)[1]
    for key in ("batch_size", "grad_accum", "lr", "max_steps", "optimizer", "schedule"):
        assert key in listed


def test_unknown_key_inside_an_expect_bound_gets_a_hint() -> None:
    # expect: maps metric names to Bound sections; a typo inside one deserves the same help.
    message = build_error(base_tree(expect={"eval/loss": {"mx": 3.0}}))
    assert "unknown key 'expect.eval/loss.mx'" in message
    assert "did you mean 'expect.eval/loss.max'" in message


# --- wrong types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "path", "expected"),
    [
        ({"batch_size": "many"}, "train.batch_size", "integer"),
        ({"lr": "fast"}, "train.lr", "number"),
        ({"compile": "maybe"}, "train.compile", "boolean"),
        ({"max_steps": "lots"}, "train.max_steps", "integer"),
    ],
)
def test_wrong_type_names_path_and_expected_type(train: dict[str, Any], path: str, expected: str) -> None:
    message = build_error(base_tree(train=train))
    assert f"{path}:" in message
    assert expected in message
    assert repr(next(iter(train.values()))) in message  # the offending value is shown


def test_wrong_type_in_union_field_names_the_key_not_the_union_member() -> None:
    # data.files.<split> is `str | list[str]`; the message must name the key the user wrote.
    message = build_error(base_tree(data={"files": {"train": 5}}))
    assert "data.files.train:" in message
    assert "data.files.train.str" not in message


def test_out_of_range_value_is_reported() -> None:
    message = build_error(base_tree(tokenizer={"train": {"vocab_size": 3}}))
    assert "tokenizer.train.vocab_size" in message
    assert "300" in message


def test_missing_required_key() -> None:
    tree = base_tree()
    del tree["task"]
    assert "missing required key 'task'" in build_error(tree)


# --- --set --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "path", "value"),
    [
        ("train.compile=true", ["train", "compile"], True),
        ("train.compile=false", ["train", "compile"], False),
        ("train.lr=0.001", ["train", "lr"], 0.001),
        ("data.text_column=body", ["data", "text_column"], "body"),
        ("train.max_steps=5", ["train", "max_steps"], 5),
        ("train.max_grad_norm=", ["train", "max_grad_norm"], None),
        ("train.max_grad_norm=null", ["train", "max_grad_norm"], None),
        ("tracking=[tensorboard]", ["tracking"], ["tensorboard"]),
    ],
)
def test_parse_override_values_parse_like_yaml(item: str, path: list[str], value: Any) -> None:
    got_path, got_value = parse_override(item)
    assert got_path == path
    assert got_value == value
    assert type(got_value) is type(value)


@pytest.mark.parametrize("item", ["train.lr", "=3", "  =x"])
def test_parse_override_without_key_or_equals_is_user_error(item: str) -> None:
    with pytest.raises(UserError, match=r"expected key\.path=value"):
        parse_override(item)


def test_parse_override_invalid_yaml_is_user_error() -> None:
    with pytest.raises(UserError, match="not valid YAML"):
        parse_override("train.lr=[1")


def test_overrides_are_typed_and_create_missing_sections() -> None:
    recipe = build_recipe(
        base_tree(),
        Path("/nonexistent"),
        [
            "train.compile=true",
            "train.lr=0.001",
            "data.text_column=body",
            "train.max_steps=5",
            "train.optimizer.kind=sgd",
            "train.early_stopping.patience=7",
            "expect.eval/loss.max=4.5",
        ],
    )
    assert recipe.train.compile is True
    assert recipe.train.lr == 0.001
    assert recipe.data.text_column == "body"
    assert recipe.train.max_steps == 5
    assert recipe.train.optimizer.kind == "sgd"
    assert recipe.train.early_stopping is not None
    assert recipe.train.early_stopping.patience == 7
    assert recipe.expect["eval/loss"].max == 4.5


def test_override_replaces_file_value_and_input_tree_is_not_mutated() -> None:
    tree = base_tree(train={"lr": 0.5, "batch_size": 4})
    recipe = build_recipe(tree, Path("/nonexistent"), ["train.lr=1e-4", "train.max_grad_norm="])
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.train.batch_size == 4
    assert recipe.train.max_grad_norm is None
    assert tree["train"] == {"lr": 0.5, "batch_size": 4}


def test_override_through_a_value_is_user_error() -> None:
    message = build_error(base_tree(train={"lr": 0.1}), ["train.lr.x=3"])
    assert "train.lr is a value, not a section" in message


def test_malformed_override_through_load_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_tree()), encoding="utf-8")
    with pytest.raises(UserError, match=r"expected key\.path=value"):
        load_recipe(path, ["train.lr"])


# --- paths --------------------------------------------------------------------------------------


def _write(folder: Path, tree: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def test_relative_paths_in_file_resolve_against_recipe_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    folder = tmp_path / "recipes"
    path = _write(
        folder,
        base_tree(
            model={"from_scratch": "../configs/tiny.json"},
            tokenizer={"pretrained": "gpt2"},
            data={"files": {"train": "data/train.txt", "validation": ["data/v1.txt", "data/v2.txt"]}},
            output_dir="../runs/x",
        ),
    )
    recipe = load_recipe(path)
    root = tmp_path.resolve()
    assert recipe.model.from_scratch == str(root / "configs" / "tiny.json")
    assert recipe.data.files == {
        "train": str(root / "recipes" / "data" / "train.txt"),
        "validation": [str(root / "recipes" / "data" / "v1.txt"), str(root / "recipes" / "data" / "v2.txt")],
    }
    assert recipe.output_dir == str(root / "runs" / "x")


def test_relative_paths_given_with_set_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = _write(tmp_path / "recipes", base_tree(data={"files": {"train": "in_file.txt"}}, output_dir="out"))
    recipe = load_recipe(
        path,
        ["data.files.validation=valid.txt", "output_dir=runs/mine", "data.cache_dir=cache"],
    )
    root = tmp_path.resolve()
    assert recipe.data.files == {
        "train": str(root / "recipes" / "in_file.txt"),  # still the file's own, recipe-relative
        "validation": str(root / "cwd" / "valid.txt"),
    }
    assert recipe.output_dir == str(root / "cwd" / "runs" / "mine")
    assert recipe.data.cache_dir == str(root / "cwd" / "cache")


def test_set_of_a_whole_section_resolves_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "recipes", base_tree())
    recipe = load_recipe(path, ["data.files={train: mine.txt}"])
    assert recipe.data.files == {"train": str(tmp_path.resolve() / "mine.txt")}


def test_hub_ids_stay_ids_and_local_model_paths_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "recipes"
    hub = load_recipe(_write(folder, base_tree(model={"pretrained": "gpt2"}, tokenizer={"pretrained": "org/name"})))
    assert hub.model.pretrained == "gpt2"
    assert hub.tokenizer.pretrained == "org/name"

    local = load_recipe(_write(folder, base_tree(model={"pretrained": "./local"})))
    assert local.model.pretrained == str(folder.resolve() / "local")

    from_cwd = load_recipe(_write(folder, base_tree()), ["model.pretrained=./mine"])
    assert from_cwd.model.pretrained == str(tmp_path.resolve() / "mine")


def test_existing_folder_named_like_a_hub_id_is_a_path(tmp_path: Path) -> None:
    (tmp_path / "gpt2").mkdir()
    recipe = load_recipe(_write(tmp_path, base_tree(model={"pretrained": "gpt2"})))
    assert recipe.model.pretrained == str(tmp_path.resolve() / "gpt2")


def test_absolute_and_builtin_values_are_untouched(tmp_path: Path) -> None:
    absolute = str(tmp_path.resolve() / "abs.txt")
    recipe = load_recipe(_write(tmp_path / "r", base_tree(data={"files": {"train": absolute}})))
    assert recipe.data.files == {"train": absolute}
    builtin = load_recipe(_write(tmp_path / "r", base_tree(data={"source": "builtin:pydoc"})))
    assert builtin.data.source == "builtin:pydoc"


def test_inline_from_scratch_config_is_not_a_path(tmp_path: Path) -> None:
    config = {"model_type": "gpt2", "n_layer": 1}
    tree = base_tree(model={"from_scratch": config}, tokenizer={"pretrained": "gpt2"})
    recipe = load_recipe(_write(tmp_path, tree))
    assert recipe.model.from_scratch == config


# --- exactly one source -------------------------------------------------------------------------


@pytest.mark.parametrize("model", [{}, {"pretrained": "gpt2", "from_scratch": "cfg.json"}])
def test_model_needs_exactly_one_source(model: dict[str, Any]) -> None:
    message = build_error(base_tree(model=model, tokenizer={"pretrained": "gpt2"}))
    assert "exactly one of model.pretrained or model.from_scratch" in message


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"source": "builtin:pydoc", "files": {"train": "t.txt"}},
        {"hub": "wikitext", "files": {"train": "t.txt"}},
        {"source": "builtin:pydoc", "hub": "wikitext"},
    ],
)
def test_data_needs_exactly_one_source(data: dict[str, Any]) -> None:
    assert "exactly one of data.source, data.hub or data.files" in build_error(base_tree(data=data))


@pytest.mark.parametrize("data", [{"source": "builtin:pydoc"}, {"hub": "wikitext"}, {"files": {"train": "t.txt"}}])
def test_each_single_data_source_is_accepted(data: dict[str, Any]) -> None:
    recipe = build_recipe(base_tree(data=data), Path("/nonexistent"))
    assert sum(getattr(recipe.data, k) is not None for k in ("source", "hub", "files")) == 1


def test_data_source_must_be_builtin() -> None:
    assert "built-in corpus" in build_error(base_tree(data={"source": "pydoc"}))


def test_from_scratch_model_needs_a_tokenizer() -> None:
    message = build_error(base_tree(model={"from_scratch": {"n_layer": 1}}))
    assert "tokenizer.pretrained or tokenizer.train" in message


def test_tokenizer_pretrained_and_train_are_exclusive() -> None:
    message = build_error(base_tree(tokenizer={"pretrained": "gpt2", "train": {"vocab_size": 512}}))
    assert "only one of tokenizer.pretrained or tokenizer.train" in message


def test_eval_stride_longer_than_block_is_refused() -> None:
    message = build_error(base_tree(data={"files": {"train": "t"}, "block_size": 8, "eval_stride": 16}))
    assert "eval_stride" in message


def test_expect_bound_needs_min_or_max() -> None:
    assert "needs min, max or both" in build_error(base_tree(expect={"eval/loss": {}}))


# --- the file itself ----------------------------------------------------------------------------


def test_missing_file_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_directory_is_not_a_recipe(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is a directory; pass the path of a \.yaml recipe"):
        load_recipe(tmp_path)


def test_invalid_yaml_is_user_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("task: causal-lm\nmodel: {pretrained: gpt2\ndata: [\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        load_recipe(path)


def test_binary_file_is_user_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81 task")
    with pytest.raises(UserError, match="not UTF-8 text; save the recipe as UTF-8"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_non_mapping_yaml_is_user_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_recipe(path)


def test_error_message_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, base_tree(train={"lrr": 1}))
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


# --- dump ---------------------------------------------------------------------------------------


def test_dump_recipe_reloads_to_an_equal_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tree = base_tree(
        model={"from_scratch": "cfg/tiny.json", "config": {"n_layer": 1}},
        tokenizer={"train": {"vocab_size": 512, "special_tokens": ["<sep>"]}},
        data={"files": {"train": "d/train.txt", "validation": ["d/a.txt", "d/b.txt"]}, "block_size": 32},
        train={
            "max_steps": 7,
            "optimizer": {"kind": "adamw", "betas": [0.8, 0.95]},
            "schedule": {"kind": "linear", "warmup_steps": 2},
            "early_stopping": {"patience": 2},
        },
        expect={"eval/perplexity": {"max": 100.0}, "eval/loss": {"min": 0.5, "max": 5.0}},
        tracking=["tensorboard"],
        output_dir="out/run",
    )
    original = load_recipe(_write(tmp_path / "a", tree), ["data.cache_dir=cache"])
    dumped = dump_recipe(original)
    # Loaded from another folder: every path in the dump must already be absolute.
    other = tmp_path / "b" / "c"
    other.mkdir(parents=True)
    (other / "dumped.yaml").write_text(dumped, encoding="utf-8")
    reloaded = load_recipe(other / "dumped.yaml")
    assert reloaded == original
    assert isinstance(reloaded, Recipe)
    assert dump_recipe(reloaded) == dumped


def test_dump_of_a_recipe_with_default_output_dir_reloads_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run.py writes dump_recipe into the run folder as recipe.resolved.yaml, promising "every path
    # absolute"; a default output_dir must survive being reloaded from there too.
    monkeypatch.chdir(tmp_path)
    original = load_recipe(_write(tmp_path / "a", base_tree()))
    other = tmp_path / "runs"
    other.mkdir()
    (other / "recipe.resolved.yaml").write_text(dump_recipe(original), encoding="utf-8")
    reloaded = load_recipe(other / "recipe.resolved.yaml")
    assert Path(reloaded.output_dir).resolve() == (tmp_path / "runs" / "llmtune").resolve()
    assert reloaded == original


def test_dump_fills_defaults() -> None:
    recipe = build_recipe(base_tree(), Path("/nonexistent"))
    dumped = yaml.safe_load(dump_recipe(recipe))
    assert dumped["train"]["batch_size"] == 8
    assert dumped["train"]["epochs"] == 1.0
    assert dumped["data"]["block_size"] == 256
    assert list(dumped)[:4] == ["task", "model", "tokenizer", "data"]


# --- import weight ------------------------------------------------------------------------------


def test_cli_and_recipe_do_not_import_torch() -> None:
    code = (
        "import sys, llmtune.cli, llmtune.recipe, llmtune.errors; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- fine-tuning sections -----------------------------------------------------------------------


def test_a_task_gets_its_own_section_with_defaults() -> None:
    recipe = build_recipe(base_tree(task="question-answering"), Path("/nonexistent"))
    assert recipe.question_answering is not None and recipe.question_answering.doc_stride == 128
    assert recipe.classification is None and recipe.instruction is None and recipe.strategy.kind == "full"
    plain = build_recipe(base_tree(), Path("/nonexistent"))
    assert plain.instruction is None  # causal-lm on plain text: no instruction section


def test_a_section_of_another_task_is_refused() -> None:
    message = build_error(base_tree(task="seq2seq", token_classification={"label_all_tokens": True}))
    assert message == "recipe: 'token_classification' applies to task token-classification, not seq2seq; remove it"


def test_instruction_tuning_needs_prompt_and_response_columns() -> None:
    tree = base_tree(data={"files": {"train": "a.jsonl"}, "prompt_column": "q"})
    assert "set both data.prompt_column and data.response_column" in build_error(tree)
    tree = base_tree(instruction={"template": "Q: {prompt}\nA: "})
    assert "'instruction' needs data.prompt_column" in build_error(tree)
    tree = base_tree(data={"files": {"train": "a.jsonl"}, "prompt_column": "q", "response_column": "a"})
    recipe = build_recipe(tree, Path("/nonexistent"))
    assert recipe.entry.name == "instruction-tuning" and recipe.instruction is not None


def test_unknown_strategy_and_bad_lr_decay_name_the_key() -> None:
    assert "strategy.kind: expected 'full'" in build_error(base_tree(strategy={"kind": "everything"}))
    assert "train.layer_lr_decay" in build_error(base_tree(train={"layer_lr_decay": 1.5}))
