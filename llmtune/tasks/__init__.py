"""Task registry: one module per task; a new task is one file and one line here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llmtune.errors import UserError
from llmtune.tasks.base import Task

if TYPE_CHECKING:
    from llmtune.recipe import Recipe

# name -> (module:class, the recipe section it takes, or "recipe" for the whole recipe)
REGISTRY: dict[str, tuple[str, str | None]] = {
    "causal-lm": ("llmtune.tasks.causal_lm:CausalLM", None),
    "masked-lm": ("llmtune.tasks.masked_lm:MaskedLM", "masking"),
    "span-corruption": ("llmtune.tasks.span_corruption:SpanCorruption", "span_corruption"),
    "sequence-classification": ("llmtune.tasks.sequence_classification:SequenceClassification", "recipe"),
    "token-classification": ("llmtune.tasks.token_classification:TokenClassification", "recipe"),
    "question-answering": ("llmtune.tasks.question_answering:QuestionAnswering", "recipe"),
    "seq2seq": ("llmtune.tasks.seq2seq:Seq2Seq", "recipe"),
}
# causal-lm on prompt/response pairs or chats (data.prompt_column / data.messages_column)
INSTRUCTION = ("llmtune.tasks.instruction:InstructionTuning", "recipe")


def get_task(name: str, recipe: Recipe | None = None) -> Task:
    """The task registered under `name` (the recipe's `task:`), configured from the recipe if given.

    Fine-tuning tasks need a recipe (their columns and options live in it); pretraining tasks
    fall back to their defaults without one.
    """
    if name not in REGISTRY:
        raise UserError(f"--task: unknown task {name!r}; known: {', '.join(REGISTRY)}")
    target, options = REGISTRY[name]
    if name == "causal-lm" and recipe is not None and recipe.data.instruction:
        target, options = INSTRUCTION
    module, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if options == "recipe":
        if recipe is None:
            raise UserError(f"task {name} needs its recipe settings; evaluate a run directory or pass --task")
        return cls(recipe)
    if recipe is None:
        return cls()
    return cls(getattr(recipe, options) if options else None, seed=recipe.train.seed)
