"""Every shipped recipe and model config validates, so a recipe that rots fails CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    if isinstance(recipe.model.from_scratch, str):
        assert Path(recipe.model.from_scratch).is_file()
    if recipe.data.source is not None:  # the embedded defaults: no download, and a bound to reproduce
        assert recipe.expect, f"{path.name} names no metric it must reach"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "models").glob("*.json")), ids=lambda p: p.name)
def test_model_config_builds(path: Path) -> None:
    from transformers import AutoConfig

    keys = json.loads(path.read_text())
    config = AutoConfig.for_model(keys.pop("model_type"), **keys)
    for key, value in keys.items():
        assert getattr(config, key) == value, key


def test_there_are_embedded_defaults_for_every_objective() -> None:
    tasks = {load_recipe(p).task for p in RECIPES if load_recipe(p).data.source is not None}
    assert tasks == {"causal-lm", "masked-lm", "span-corruption"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_expects_metrics_its_task_reports(path: Path) -> None:
    recipe = load_recipe(path)  # the schema refuses metrics the task does not report; check it did its job
    declared = recipe.entry.reported(recipe)
    for name in [*recipe.expect, recipe.train.best_metric]:
        assert any(metric.matches(name) for metric in declared), name
