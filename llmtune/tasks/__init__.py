"""Task registry: one module per task; a new task is one file and one line here."""

from __future__ import annotations

from llmtune.tasks.base import Task


def get_task(name: str) -> Task:
    """The task object registered under `name` (the recipe's `task:`)."""
    from llmtune.tasks.causal_lm import CausalLM

    registry: dict[str, type] = {"causal-lm": CausalLM}
    return registry[name]()
