"""Reading a recipe: YAML (a key given twice is an error), `--set` overrides, path resolution, validation.

Relative paths written in the recipe file resolve against the recipe's folder; relative paths given
with `--set`, and the default output_dir, resolve against the current directory (where the user typed them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llmtune.errors import UserError
from llmtune.recipe.messages import describe
from llmtune.recipe.schema import GENERAL_KEYS, Recipe
from llmtune.sections import BUILTIN_PREFIX

# Keys whose string values are filesystem paths (dotted, "*" = any key of a mapping).
_PATH_KEYS = ("model.from_scratch", "data.files.*", "data.cache_dir", "output_dir")
# Keys that may be a hub id or a local directory: a path only if it looks like one or exists.
_MAYBE_PATH_KEYS = ("model.pretrained", "tokenizer.pretrained")
# The order of the top-level keys in a resolved recipe (the task sections go after `train`).
_FIRST = ("task", "model", "tokenizer", "data", "train")


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping key given twice (PyYAML silently keeps the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (lines {seen[key]} and {line})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(text: str) -> Any:
    """Parse YAML safely (no object construction), refusing duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `--set key.path=value`; the value parses exactly like a YAML scalar in the file."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected key.path=value, e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {item}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value in (".", "..")


def _resolve(value: Any, base: Path, maybe: bool) -> Any:
    if isinstance(value, list):
        return [_resolve(v, base, maybe) for v in value]
    if not isinstance(value, str) or value.startswith(BUILTIN_PREFIX):
        return value
    expanded = Path(value).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    if maybe and not _looks_like_path(value) and not (base / value).exists():
        return value  # a hub id such as "gpt2" or "org/name"
    return str((base / expanded).resolve())


def _resolve_paths(tree: dict[str, Any], recipe_dir: Path, overridden: set[str]) -> None:
    cwd = Path.cwd()
    for pattern, maybe in [(k, False) for k in _PATH_KEYS] + [(k, True) for k in _MAYBE_PATH_KEYS]:
        *parents, leaf = pattern.split(".")
        node: Any = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        keys = list(node) if leaf == "*" else [leaf] if leaf in node else []
        for key in keys:
            dotted = ".".join([*parents, key])
            base = cwd if any(dotted == o or dotted.startswith(o + ".") for o in overridden) else recipe_dir
            if not (key == "from_scratch" and isinstance(node[key], dict)):
                node[key] = _resolve(node[key], base, maybe)
    metrics = tree.get("metrics")
    for entry in metrics if isinstance(metrics, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("module"), str):  # a local script, or a hub metric id
            base = cwd if any(o.startswith("metrics") for o in overridden) else recipe_dir
            entry["module"] = _resolve(entry["module"], base, maybe=True)


def build_recipe(
    tree: dict[str, Any], recipe_dir: Path, overrides: list[str] | None = None, source: str = "recipe"
) -> Any:
    """Apply `--set` overrides to a parsed recipe tree, resolve paths and validate it into a `Recipe`."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
    overridden: set[str] = set()
    for item in overrides or []:
        path, value = parse_override(item)
        _set_path(tree, path, value, item)
        overridden.add(".".join(path))
    if "output_dir" not in tree:
        tree["output_dir"] = Recipe.model_fields["output_dir"].default
        overridden.add("output_dir")  # a default is relative to where the user runs, like --set
    _resolve_paths(tree, recipe_dir, overridden)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{source}: {describe(Recipe, exc.errors())}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read, override and validate a recipe file; every problem is a one-line `UserError`."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise UserError(f"recipe file {str(file)!r} {what}; pass the path of a .yaml recipe")
    try:
        tree = read_yaml(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{file}: not UTF-8 text; save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or ""
        detail = f" ({problem})" if "given twice" in problem else ""
        raise UserError(f"{file}: not valid YAML{at}{detail}; fix the syntax (see `llmtune validate`)") from None
    if not isinstance(tree, dict):
        raise UserError(f"{file}: a recipe must be a YAML mapping (task:, model:, data:, ...)")
    return build_recipe(tree, file.resolve().parent, overrides, source=str(file))


def dump_recipe(recipe: Any) -> str:
    """The resolved recipe as YAML: every default filled in, every path absolute; unused task sections left out."""
    tree = recipe.model_dump(mode="json")
    ordered = {key: tree[key] for key in _FIRST}
    ordered.update({key: value for key, value in tree.items() if key not in GENERAL_KEYS and value is not None})
    ordered.update({key: tree[key] for key in GENERAL_KEYS if key not in _FIRST})
    return yaml.safe_dump(ordered, sort_keys=False)
