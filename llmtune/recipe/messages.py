"""Pydantic validation errors as one line that names the recipe key and the fix."""

from __future__ import annotations

import difflib
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel


def _tag(annotation: Any) -> str:
    """The name pydantic gives a union member in error locations (e.g. 'str', 'list[str]')."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace(" ", "").lower()


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Pydantic's error location as the recipe's key path (union-member tags dropped), and the section
    class that owns the last key (for suggesting the closest valid key)."""
    path: list[str] = []
    node: Any = root
    owner: type[BaseModel] | None = None
    for part in loc:
        args = [a for a in get_args(node) if a is not type(None)]
        if get_origin(node) in (Union, UnionType):
            if len(args) > 1:  # `part` names the union member the value was tried against: not a key
                node = next((a for a in args if _tag(a) == str(part).lower()), None)
                continue
            node = args[0]
        if isinstance(node, type) and issubclass(node, BaseModel):
            owner = node
            field = node.model_fields.get(part) if isinstance(part, str) else None
            node = field.annotation if field is not None else None
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        elif get_origin(node) in (list, tuple):
            node = get_args(node)[0] if get_args(node) else None
        else:
            node = None
        path.append(f"[{part}]" if isinstance(part, int) else str(part))
    return path, owner


def _dotted(parts: list[str]) -> str:
    return ".".join(parts).replace(".[", "[")


def describe(root: type[BaseModel], errors: list[dict[str, Any]]) -> str:
    """One line for the first validation error (merging what a union's members each said about it)."""
    error = errors[0]
    loc, owner = _walk(root, tuple(error["loc"]))
    path = _dotted(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        parent = _dotted(loc[:-1])
        hint = (
            f"did you mean '{parent + '.' if parent else ''}{close[0]}'?"
            if close
            else f"valid keys here: {', '.join(valid)}"
        )
        return f"unknown key '{path}'; {hint}"
    if kind == "missing":
        return f"missing required key '{path}'"
    if kind == "value_error":
        message = error["msg"].removeprefix("Value error, ")
        return f"{path}: {message}" if loc else message
    said = [e["msg"] for e in errors if _walk(root, tuple(e["loc"]))[0] == loc and e["type"] != "extra_forbidden"]
    expected = " or ".join(dict.fromkeys(m.removeprefix("Input should be ") for m in said))
    return f"{path}: expected {expected} (got {error.get('input')!r})"
