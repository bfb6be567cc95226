"""Task registry: one module per task; a new task is one file and one line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtune.tasks.base import Task

if TYPE_CHECKING:
    from llmtune.recipe import Recipe


def get_task(name: str, recipe: Recipe | None = None) -> Task:
    """The task registered under `name` (the recipe's `task:`), configured from the recipe if given."""
    from llmtune.tasks.causal_lm import CausalLM
    from llmtune.tasks.masked_lm import MaskedLM
    from llmtune.tasks.span_corruption import SpanCorruption

    registry: dict[str, tuple[type, str | None]] = {
        "causal-lm": (CausalLM, None),
        "masked-lm": (MaskedLM, "masking"),
        "span-corruption": (SpanCorruption, "span_corruption"),
    }
    if name not in registry:
        from llmtune.errors import UserError

        raise UserError(f"--task: unknown task {name!r}; known: {', '.join(registry)}")
    cls, options = registry[name]
    if recipe is None:
        return cls()
    return cls(getattr(recipe, options) if options else None, seed=recipe.train.seed)
