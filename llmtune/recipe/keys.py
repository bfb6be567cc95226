"""Every recipe key with its type, default and description, read from the schema (`llmtune keys`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llmtune.errors import UserError
from llmtune.recipe.schema import Recipe


@dataclass(frozen=True)
class Key:
    """One documented recipe key."""

    path: str
    type: str
    default: str
    description: str


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + (
            " | null" if type(None) in args else ""
        )
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if origin is dict:
        return f"mapping of {_type_name(args[1])}"
    if isinstance(annotation, type):
        return "mapping" if issubclass(annotation, BaseModel) else annotation.__name__
    return re.sub(r"typing\.", "", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return "".join(f" {sign} {getattr(m, name)}" for m in metadata for name, sign in signs.items() if hasattr(m, name))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return "{...}" if isinstance(value, dict) and value else json.dumps(value)
    if field.default is PydanticUndefined:
        return "(required)"
    return json.dumps(field.default)


def _sections_in(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """('', Model) for a section, ('.<name>', Model) for a mapping of sections, ('[]', Model) for a list."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "", annotation
    if origin in (Union, UnionType):
        found = [_sections_in(a) for a in args if a is not type(None)]
        return next((f for f in found if f is not None), None)
    if origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return ".<metric>", args[1]
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "[]", args[0]
    return None


def _walk(model: type[BaseModel], prefix: str) -> list[Key]:
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        kind = _type_name(field.annotation) + _bounds(field.metadata)
        keys.append(Key(path, kind, _default(field), field.description or ""))
        nested = _sections_in(field.annotation)
        if nested is not None:
            suffix, section = nested
            keys.extend(_walk(section, f"{path}{suffix}."))
    return keys


def recipe_keys(section: str | None = None) -> list[Key]:
    """Every key of the recipe schema, or those under `section` (e.g. train, data, strategy)."""
    keys = _walk(Recipe, "")
    if section is None:
        return keys
    chosen = [k for k in keys if k.path == section or k.path.startswith((section + ".", section + "["))]
    if not chosen:
        top = sorted({k.path.split(".")[0].split("[")[0] for k in keys})
        raise UserError(f"keys: no recipe section {section!r}; sections: {', '.join(top)}")
    return chosen


def format_keys(keys: list[Key]) -> str:
    """The keys as an aligned plain-text table: key, type, default, then the description."""
    rows = [(k.path, k.type, k.default, k.description) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = []
    for path, kind, default, description in rows:
        lines.append(f"{path.ljust(widths[0])}  {kind.ljust(widths[1])}  default {default}")
        if description:
            lines.append(f"{'':{widths[0]}}  {description}")
    return "\n".join(lines)
