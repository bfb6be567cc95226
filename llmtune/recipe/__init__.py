"""The recipe: YAML file + `--set` overrides -> a validated `Recipe`.

Split by job: `schema` (the pydantic sections; the task-specific parts come from the task registry),
`loading` (YAML, overrides, paths), `messages` (validation errors as one line), `keys` (the documented
key listing). Callers import from here. Only pydantic and PyYAML are imported, so `llmtune validate`
answers without touching torch.
"""

from llmtune.recipe.loading import build_recipe, dump_recipe, load_recipe, parse_override, read_yaml
from llmtune.recipe.schema import GENERAL_KEYS, DataSpec, Recipe
from llmtune.sections import (
    BUILTIN_PREFIX,
    STRATEGY_KEYS,
    Bound,
    EarlyStoppingSpec,
    MetricModuleSpec,
    ModelSpec,
    OptimizerSpec,
    ScheduleSpec,
    Section,
    StrategySpec,
    TokenizerSpec,
    TokenizerTrainSpec,
    TrainSpec,
)
from llmtune.tasks.registry import (
    ClassificationSpec,
    InstructionSpec,
    MaskingSpec,
    QuestionAnsweringSpec,
    Seq2SeqSpec,
    SpanCorruptionSpec,
    TokenClassificationSpec,
)

__all__ = [
    "BUILTIN_PREFIX",
    "GENERAL_KEYS",
    "STRATEGY_KEYS",
    "Bound",
    "ClassificationSpec",
    "DataSpec",
    "EarlyStoppingSpec",
    "InstructionSpec",
    "MaskingSpec",
    "MetricModuleSpec",
    "ModelSpec",
    "OptimizerSpec",
    "QuestionAnsweringSpec",
    "Recipe",
    "ScheduleSpec",
    "Section",
    "Seq2SeqSpec",
    "SpanCorruptionSpec",
    "StrategySpec",
    "TokenClassificationSpec",
    "TokenizerSpec",
    "TokenizerTrainSpec",
    "TrainSpec",
    "build_recipe",
    "dump_recipe",
    "load_recipe",
    "parse_override",
    "read_yaml",
]
