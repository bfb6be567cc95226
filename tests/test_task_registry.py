"""The task registry as the one seam: the recipe schema, the command checks and the metric checks derive from it;
every recipe key is documented and listed by `llmtune keys`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from llmtune.errors import UserError
from llmtune.recipe import Recipe, build_recipe
from llmtune.recipe.keys import recipe_keys
from llmtune.tasks.registry import TASKS, all_columns, option_sections, recipe_tasks, task_entry
from tests.helpers import run_cli_in_process


def recipe(task: str = "causal-lm", **sections: Any) -> Any:
    tree: dict[str, Any] = {"task": task, "model": {"pretrained": "unused"}, "data": {"files": {"train": "x.txt"}}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return build_recipe(tree, Path.cwd())


def refused(**tree: Any) -> str:
    with pytest.raises(UserError) as caught:
        recipe(**tree)
    return str(caught.value)


def test_every_entry_names_an_importable_task_class_with_its_name() -> None:
    from llmtune.tasks import get_task

    for entry in TASKS:
        module, cls_name = entry.target.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        assert cls.auto_class.startswith("AutoModelFor"), entry.name
        data = {key: "x" for key in entry.selected_by[:1]}
        if entry.name == "instruction-tuning":
            data["response_column"] = "y"
        task = get_task(recipe(entry.recipe_task, data=data))
        assert type(task) is cls and task.name == entry.name


def test_the_schema_takes_its_tasks_sections_and_columns_from_the_registry() -> None:
    assert recipe_tasks() == tuple(dict.fromkeys(e.recipe_task for e in TASKS))
    for key, (entry, section) in option_sections().items():
        assert Recipe.model_fields[key].annotation == section | None, key
        assert entry.section == key
    data_fields = Recipe.model_fields["data"].annotation.model_fields
    for key, column in all_columns().items():
        assert data_fields[key].default == column.default and data_fields[key].description == column.description
    assert "did you mean 'causal-lm'" in refused(task="casual-lm")


def test_a_variant_is_chosen_by_its_data_keys_and_commands_follow_the_entry() -> None:
    assert recipe().entry.name == "causal-lm" and recipe().entry.commands == ("pretrain", "finetune")
    chat = recipe(data={"messages_column": "m"})
    assert chat.entry.name == "instruction-tuning" and chat.entry.commands == ("finetune",)
    assert chat.instruction is not None  # the variant's options section is filled in
    assert task_entry("causal-lm").name == "causal-lm"


def test_sections_and_columns_of_other_tasks_are_refused() -> None:
    assert "'masking' applies to task masked-lm, not causal-lm" in refused(masking={"mlm_probability": 0.2})
    message = refused(task="causal-lm", data={"label_column": "y"})
    assert "data.label_column: causal-lm does not read it; remove it (it reads data.text_column)" in message
    assert "'instruction' needs data.prompt_column or data.messages_column" in refused(instruction={})


def test_metrics_know_their_direction() -> None:
    regression = recipe("sequence-classification", classification={"problem": "regression"})
    assert regression.metric("eval/mse").higher_is_better is False
    assert regression.metric("eval/pearson").higher_is_better is True
    assert regression.metric("eval/accuracy") is None  # a regression reports no accuracy
    assert recipe().metric("eval/perplexity").higher_is_better is False
    ner = recipe("token-classification", expect={"eval/f1_PER": {"min": 50}})  # a per-type pattern
    assert ner.metric("eval/f1_PER").higher_is_better is True and ner.metric("eval/f1_PER").name == "eval/f1_*"


def test_best_metric_expect_and_early_stopping_are_checked_against_the_task() -> None:
    message = refused(train={"best_metric": "eval/accuracy"})
    assert "train.best_metric: causal-lm reports no metric 'eval/accuracy'; it reports eval/loss" in message
    assert "eval/perplexity" in message
    assert "is a count, not a quality" in refused(train={"best_metric": "eval/tokens"})
    message = refused(train={"early_stopping": {"metric": "eval/bleu"}})
    assert "train.early_stopping.metric: causal-lm reports no metric 'eval/bleu'" in message
    assert "expect.eval/f1: causal-lm reports no metric" in refused(expect={"eval/f1": {"min": 1}})
    assert "min 5.0 is above max 1.0" in refused(expect={"eval/loss": {"min": 5, "max": 1}})


def test_evaluate_modules_are_named_apart_and_only_where_there_are_predictions() -> None:
    cls = recipe("sequence-classification", metrics=[{"module": "./agree.py"}])
    assert cls.metrics[0].module.endswith("agree.py") and Path(cls.metrics[0].module).is_absolute()
    assert cls.metric("eval/agree").higher_is_better is True
    assert cls.metric("eval/agree_n") is not None  # a module returning several values: eval/<name>_<key>
    down = recipe("sequence-classification", metrics=[{"module": "./err.py", "higher_is_better": False}])
    assert down.metric("eval/err").higher_is_better is False
    message = refused(task="sequence-classification", metrics=[{"module": "accuracy"}])
    assert "metrics[0].name: eval/accuracy is already sequence-classification's eval/accuracy" in message
    assert "has no predictions and references" in refused(metrics=[{"module": "./agree.py"}])


def test_every_recipe_key_is_documented() -> None:
    keys = recipe_keys()
    assert len(keys) > 100
    undocumented = [k.path for k in keys if not k.description.strip()]
    assert undocumented == []
    paths = {k.path for k in keys}
    assert {"train.lr", "data.sample_by", "strategy.r", "masking.mlm_probability", "metrics[].module"} <= paths


def test_keys_command_prints_a_section(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli_in_process(capsys, "keys", "train")
    assert code == 0
    lines = out.splitlines()
    lr = next(i for i, line in enumerate(lines) if line.startswith("train.lr "))
    assert "float > 0" in lines[lr] and "default 0.0003" in lines[lr] and "Peak learning rate." in lines[lr + 1]
    assert all(not line.startswith(("data.", "model.")) for line in lines)
    code, _, err = run_cli_in_process(capsys, "keys", "trian")
    assert code == 2 and err.startswith("error: keys: no recipe section 'trian'; sections:")
