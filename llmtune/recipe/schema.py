"""The recipe schema: the general sections (`llmtune.sections`) plus what the task registry declares.

`task:` takes the registry's task names, each task's options section is a recipe key of its own,
`data.*_column` keys are the columns the tasks declare, and `best_metric`, `early_stopping.metric`
and `expect:` are checked against the metrics the task reports (with their declared direction), so
`llmtune validate` catches all of it without importing torch.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import Field, create_model, field_validator, model_validator

from llmtune.sections import (
    Bound,
    DataSpecBase,
    MetricModuleSpec,
    ModelSpec,
    Section,
    StrategySpec,
    TokenizerSpec,
    TrainSpec,
)
from llmtune.tasks.registry import Metric, TaskEntry, all_columns, option_sections, recipe_tasks, task_entry
from llmtune.trackers import TRACKERS

DataSpec = create_model(
    "DataSpec",
    __base__=DataSpecBase,
    __doc__="The raw data, its columns (as the tasks declare them) and how it becomes model inputs.",
    **{c.key: (str | None, Field(c.default, description=c.description)) for c in all_columns().values()},  # type: ignore[call-overload]
)


class _RecipeBase(Section):
    """A whole run: task, model, tokenizer, data, training, expected metrics, output directory."""

    task: str = Field(description=f"What to train: {', '.join(recipe_tasks())}.")
    model: ModelSpec = Field(description="Where the model comes from.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The tokenizer.")
    data: DataSpec = Field(description="The data and its columns.")  # type: ignore[valid-type]
    train: TrainSpec = Field(default_factory=TrainSpec, description="The training loop.")
    strategy: StrategySpec = Field(default_factory=StrategySpec, description="What trains (fine-tuning).")
    expect: dict[str, Bound] = Field(
        default_factory=dict, description="Final metric -> {min, max}: missed bounds make the run exit 1."
    )
    metrics: list[MetricModuleSpec] = Field(
        default_factory=list, description="`evaluate` modules computed on the task's predictions at every evaluation."
    )
    tracking: list[str] = Field(
        default_factory=list,
        description="Trackers besides metrics.jsonl, any of tensorboard, wandb (offline into the run directory "
        "without credentials), mlflow (a store in the run directory unless MLFLOW_TRACKING_URI is set).",
    )
    output_dir: str = Field("runs/llmtune", description="The run directory.")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        known = recipe_tasks()
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(known)}"
            raise ValueError(f"unknown task {value!r}; {hint}")
        return value

    @field_validator("tracking")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else f"available: {', '.join(TRACKERS)}"
                raise ValueError(f"unknown tracker {name!r}; {hint}")
        if len(set(value)) != len(value):
            raise ValueError("a tracker is named twice")
        return value

    @property
    def entry(self) -> TaskEntry:
        """The registry entry this recipe's task (and data keys, for a variant) selects."""
        return task_entry(self.task, self.data)

    @property
    def options(self) -> Any:
        """The task's options section (filled with its defaults), or None for a task without options."""
        section = self.entry.section
        return getattr(self, section) if section is not None else None

    def reported_metrics(self) -> list[Metric]:
        """The metrics a run of this recipe reports: the task's, then each `metrics:` module's."""
        found = self.entry.reported(self)
        for module in self.metrics:
            found += [Metric(f"eval/{module.label}", module.higher_is_better)]
            found += [Metric(f"eval/{module.label}_*", module.higher_is_better)]
        return found

    def metric(self, name: str) -> Metric | None:
        """The declaration `name` falls under (exact names before patterns), or None if it is not reported."""
        declared = self.reported_metrics()
        return next((m for m in declared if m.name == name), None) or next(
            (m for m in declared if m.matches(name)), None
        )

    @model_validator(mode="after")
    def _fits_the_task(self) -> _RecipeBase:
        if self.model.from_scratch is not None and self.tokenizer == TokenizerSpec():
            raise ValueError("a from-scratch model needs tokenizer.pretrained or tokenizer.train")
        entry = self.entry
        self._check_sections(entry)
        self._check_columns(entry)
        self._check_metrics(entry)
        return self

    def _check_sections(self, entry: TaskEntry) -> None:
        for key, (owner, section) in option_sections().items():
            if key == entry.section:
                if getattr(self, key) is None:
                    setattr(self, key, section())
            elif getattr(self, key) is not None:
                if owner.recipe_task == self.task and owner.selected_by:
                    wanted = " or ".join(f"data.{k}" for k in owner.selected_by)
                    raise ValueError(f"'{key}' needs {wanted} ({owner.name})")
                raise ValueError(f"'{key}' applies to task {owner.recipe_task}, not {self.task}; remove it")

    def _check_columns(self, entry: TaskEntry) -> None:
        reads = {c.key for c in entry.columns}
        for key, column in all_columns().items():
            value = getattr(self.data, key)
            if key not in reads and value != column.default:
                raise ValueError(
                    f"data.{key}: {entry.name} does not read it; remove it "
                    f"(it reads {', '.join('data.' + k for k in sorted(reads))})"
                )
        if entry.check is not None:
            entry.check(self.data)

    def _check_metrics(self, entry: TaskEntry) -> None:
        builtin = entry.reported(self)
        for index, module in enumerate(self.metrics):
            if not entry.scored_pairs:
                raise ValueError(
                    f"metrics[{index}]: {entry.name} has no predictions and references for an evaluate module "
                    "to score; remove it"
                )
            clash = next((m.name for m in builtin if m.matches(f"eval/{module.label}")), None)
            if clash is not None:
                raise ValueError(
                    f"metrics[{index}].name: eval/{module.label} is already {entry.name}'s {clash}; "
                    f"set metrics[{index}].name to another name, e.g. hf_{module.label}"
                )
        names = ", ".join(m.name for m in self.reported_metrics())
        wanted = [(f"expect.{m}", m, False) for m in self.expect]
        wanted.append(("train.best_metric", self.train.best_metric, True))
        if self.train.early_stopping is not None:
            wanted.append(("train.early_stopping.metric", self.train.early_stopping.metric, True))
        for key, name, ranks in wanted:
            metric = self.metric(name)
            if metric is None:
                raise ValueError(f"{key}: {entry.name} reports no metric {name!r}; it reports {names}")
            if ranks and metric.higher_is_better is None:
                raise ValueError(f"{key}: {name} is a count, not a quality to rank evaluations by; choose another")


def _section_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, (entry, section) in option_sections().items():
        fields[key] = (section | None, Field(None, description=f"{entry.name} only: {section.__doc__}"))
    return fields


GENERAL_KEYS = tuple(_RecipeBase.model_fields)  # the top-level keys every recipe has, task sections aside
Recipe = create_model("Recipe", __base__=_RecipeBase, __doc__=_RecipeBase.__doc__, **_section_fields())
