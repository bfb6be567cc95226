"""A sweep's search space: recipe keys (dotted, as `--set` takes them) with a range or a list of choices.

    train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}     # float range (log scale)
    train.batch_size: {choices: [8, 16, 32]}              # categorical
    strategy.lora.r: {low: 4, high: 32, step: 4}          # int range (both ends ints)

Each key is checked against the recipe with the recipe's own validation (at its range ends and every choice),
so an unknown key gets the same "did you mean" line as `--set`. Only PyYAML and pydantic are imported here.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmtune.errors import UserError
from llmtune.recipe import build_recipe, load_recipe, read_yaml

_RANGE_KEYS = {"low", "high", "log", "step"}
_MANAGED = ("output_dir",)  # the sweep sets it per trial


@dataclass(frozen=True)
class Param:
    """One searched recipe key."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def is_int(self) -> bool:
        """An integer range (both ends written as integers)."""
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int)

    def grid(self, where: str) -> list[Any]:
        """The values a grid search tries: the choices, or every step of an integer range."""
        if self.choices is not None:
            return list(self.choices)
        if self.is_int:
            assert self.low is not None and self.high is not None
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise UserError(
            f"{where}: {self.key}: --sampler grid needs choices: [...] (or an integer range), not a float range"
        )

    def ends(self) -> list[Any]:
        """The values the recipe validation is tried with."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def yaml_value(value: Any) -> str:
    """A value as `--set` reads it back unchanged (PyYAML reads `1e-05` as a string; it writes `1.0e-05`)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("...").strip()


# PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; YAML 1.2 and every user read it as a number.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _as_number(value: Any) -> Any:
    """`1e-5` written in the space file as the float it means; anything else unchanged."""
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _param(key: str, spec: Any, where: str) -> Param:
    """One entry of the space file, checked: a range with low < high (log: low > 0) or non-empty choices."""
    if not isinstance(spec, dict):
        raise UserError(
            f"{where}: {key}: expected {{low: L, high: H[, log: true]}} or {{choices: [...]}}, got {spec!r}"
        )
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise UserError(f"{where}: {key}: give either choices or low/high, not both")
        choices = spec["choices"]
        if isinstance(choices, list):
            choices = [_as_number(c) for c in choices]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: {key}: choices is empty; list at least one value, e.g. choices: [1, 2]")
        for value in choices:
            if value is not None and not isinstance(value, str | int | float | bool):
                raise UserError(f"{where}: {key}: choice {value!r} is not a single value (number, string, bool)")
        return Param(key, choices=tuple(choices))
    unknown = sorted(set(spec) - _RANGE_KEYS)
    if unknown:
        raise UserError(f"{where}: {key}: unknown field {unknown[0]!r}; a range has low, high, log, step")
    low, high = _as_number(spec.get("low")), _as_number(spec.get("high"))
    if not (_number(low) and _number(high)):
        raise UserError(f"{where}: {key}: a range needs numbers low and high (got low {low!r}, high {high!r})")
    if low >= high:
        what = "an empty range" if low == high else "low above high"
        raise UserError(f"{where}: {key}: {what} (low {low}, high {high}); make low < high, or use choices: [{low}]")
    log, step = spec.get("log", False), _as_number(spec.get("step"))
    if not isinstance(log, bool):
        raise UserError(f"{where}: {key}: log must be true or false")
    if log and low <= 0:
        raise UserError(f"{where}: {key}: a log range needs low > 0 (got {low})")
    if step is not None and (not _number(step) or step <= 0 or log):
        raise UserError(f"{where}: {key}: step must be a positive number, and not with log: true")
    return Param(key, low, high, log, step)


@dataclass(frozen=True)
class Space:
    """The checked search space of a recipe."""

    params: tuple[Param, ...]

    def grid(self, where: str) -> list[dict[str, Any]]:
        """Every combination, in the order the space file lists keys and values."""
        names = [p.key for p in self.params]
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*(p.grid(where) for p in self))]

    def __iter__(self) -> Any:
        return iter(self.params)

    def as_dict(self) -> dict[str, Any]:
        """A plain description (stored with the study, to refuse continuing it with another space)."""
        return {
            p.key: {"choices": list(p.choices)}
            if p.choices is not None
            else {"low": p.low, "high": p.high, "log": p.log, "step": p.step}
            for p in self
        }


def overrides_for(params: dict[str, Any]) -> list[str]:
    """`--set` items for one trial's values."""
    return [f"{key}={yaml_value(value)}" for key, value in params.items()]


def load_space(space_path: str, recipe_path: str, overrides: list[str]) -> Space:
    """Read the space file and check every key and value against the recipe (one-line `UserError`s)."""
    load_recipe(recipe_path, overrides)  # the recipe itself first: its own errors name its own file
    file = Path(space_path)
    if not file.is_file():
        raise UserError(f"--space {space_path}: file does not exist; pass a YAML file of key: {{low, high}} entries")
    try:
        tree = read_yaml(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{file}: not valid YAML; fix the syntax") from None
    if not isinstance(tree, dict) or not tree:
        raise UserError(
            f"{file}: a space is a YAML mapping of recipe keys, e.g. train.lr: {{low: 1.0e-5, high: 1.0e-2}}"
        )
    recipe_tree = read_yaml(Path(recipe_path).read_text(encoding="utf-8"))
    base = Path(recipe_path).resolve().parent
    params = []
    for key, spec in tree.items():
        if not isinstance(key, str):
            raise UserError(f"{file}: key {key!r} is not a dotted recipe key such as train.lr")
        if key in _MANAGED:
            raise UserError(f"{file}: {key} is set by the sweep (each trial has its own run directory); remove it")
        param = _param(key, spec, str(file))
        for value in param.ends():
            build_recipe(recipe_tree, base, [*overrides, f"{key}={yaml_value(value)}"], source=str(file))
        params.append(param)
    return Space(tuple(params))
