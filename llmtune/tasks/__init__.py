"""Tasks: one module per task, declared once in `llmtune.tasks.registry`.

Adding a task:
1. Write `llmtune/tasks/<name>.py` with a class that follows the `Task` protocol of `llmtune.tasks.base`
   (derive from `FinetuneTask` for a fine-tuning task: it brings caching, padding, label maps and the
   shared checks). Its constructor is `__init__(self, recipe, labelled=True)` like every task's.
2. Add one `TaskEntry` to `TASKS` in `llmtune/tasks/registry.py` (and, next to it, the task's options
   section if it has options): its name, `"module:Class"`, the commands that train it, the data columns it
   reads and the metrics it reports with their direction.
The recipe's `task:` values, its sections and column keys, the metric checks and the CLI's commands all
follow from the entry; nothing else needs editing. Tests: a unit test of the task's pieces and one
end-to-end run through the CLI on a tiny model (see tests/helpers.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept out of import time: the recipe schema imports llmtune.tasks.registry
    from llmtune.recipe import Recipe
    from llmtune.tasks.base import Task


def get_task(recipe: Recipe, labelled: bool = True) -> Task:
    """The task the recipe's `task:` (and data keys, for a variant) selects, configured from the recipe.

    `labelled` is False for `llmtune predict` on data without labels.
    """
    module, cls_name = recipe.entry.target.split(":")
    cls: Any = getattr(importlib.import_module(module), cls_name)
    return cls(recipe, labelled=labelled)
