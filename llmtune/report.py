"""`llmtune report`: figures (PNG, matplotlib) and a Markdown summary of one or more run directories.

Everything comes from what a run wrote (`metrics.jsonl`, `final_metrics.json`, `recipe.resolved.yaml`,
`environment.json`), so a report can be made of a finished, an interrupted or a running run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmtune.atomic import write_text_atomic
from llmtune.errors import UserError
from llmtune.run_dir import RunDir, run_dir_of

# TensorBoard's default smoothing: each point is 0.6 x the previous smoothed value + 0.4 x the new one.
EMA_WEIGHT = 0.6
# Keys that every run of a comparison has different by construction; left out of the recipe differences.
_ALWAYS_DIFFERENT = ("output_dir",)
MISSING_EXTRA = "llmtune report draws its figures with matplotlib; install it: pip install 'llmtune[report]'"


@dataclass
class RunRecord:
    """What one run directory holds, read once."""

    run: RunDir
    label: str
    recipe: dict[str, Any]
    environment: dict[str, Any]
    records: list[dict[str, Any]]
    final: dict[str, float] | None
    directions: dict[str, bool | None] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every record that has `key`, one value per step (an evaluation logged twice at
        the same step, as a resumed run may, counts once)."""
        points: dict[int, float] = {}
        for record in self.records:
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                points[int(record["step"])] = float(value)
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    def last(self, key: str) -> float | None:
        """The last logged value of `key`, or None."""
        _, values = self.series(key)
        return values[-1] if values else None

    def eval_keys(self) -> list[str]:
        """The evaluation metrics this run logged, in the order first seen."""
        keys: dict[str, None] = {}
        for record in self.records:
            keys.update({k: None for k in record if k.startswith("eval/")})
        return list(keys)

    @property
    def status(self) -> str:
        """finished, running (its lock is held) or stopped (interrupted or crashed: `--resume` continues it)."""
        if self.run.is_complete():
            return "finished"
        return "running" if self.run.holder() is not None else "stopped"

    def wall_seconds(self) -> float | None:
        """From the resolved recipe's write (the run's start, after data preparation) to its last write."""
        end = self.run.final_metrics if self.run.final_metrics.is_file() else self.run.metrics
        try:
            return max(end.stat().st_mtime - self.run.recipe.stat().st_mtime, 0.0)
        except OSError:
            return None


def read_run(path: str) -> RunRecord:
    """Read one run directory; a path that is not one, or a run with no metrics yet, is a `UserError`."""
    run = run_dir_of(path)
    if run is None:
        what = "does not exist" if not Path(path).exists() else "is not a run directory (no recipe.resolved.yaml)"
        raise UserError(f"{path} {what}; pass a directory that llmtune pretrain / finetune wrote")
    records = _read_metrics(run)
    if not any("train/loss" in r for r in records):
        raise UserError(f"{path}: no metrics yet (metrics.jsonl has no training step); report it after its first log")
    try:
        recipe = yaml.safe_load(run.recipe.read_text(encoding="utf-8")) or {}
        environment = json.loads(run.environment.read_text(encoding="utf-8")) if run.environment.is_file() else {}
        final = json.loads(run.final_metrics.read_text(encoding="utf-8")) if run.final_metrics.is_file() else None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: a run file cannot be read ({exc.__class__.__name__}: {exc})") from None
    record = RunRecord(run, run.root.resolve().name, recipe, environment, records, final)
    record.directions = _directions(recipe, record.eval_keys())
    return record


def _read_metrics(run: RunDir) -> list[dict[str, Any]]:
    if not run.metrics.is_file():
        return []
    records = []
    lines = run.metrics.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # a line being written by a running run
            raise UserError(f"{run.metrics}: line {number} is not JSON; the file is damaged") from None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _directions(recipe: dict[str, Any], keys: list[str]) -> dict[str, bool | None]:
    """Each metric's declared direction (True: higher is better, None: a count), from the task registry."""
    from llmtune.recipe import build_recipe

    try:
        parsed = build_recipe(recipe, Path.cwd())
    except UserError:  # e.g. its data files are gone; the figures do without directions
        return {}
    found = {}
    for key in keys:
        metric = parsed.metric(key)
        found[key] = metric.higher_is_better if metric is not None else None
    return found


def unique_labels(runs: list[RunRecord]) -> None:
    """Label each run by its directory name, or parent/name where names repeat."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.run.root.resolve().parent.name}/{r.run.root.resolve().name}"


def default_output(runs: list[RunRecord]) -> Path:
    """RUN/report for one run; for several, `compare-A-B[-C]` (or `compare-N-runs`) beside the first run."""
    if len(runs) == 1:
        return runs[0].run.root / "report"
    names = [r.run.root.resolve().name for r in runs]
    name = "compare-" + "-".join(names) if len(runs) <= 3 else f"compare-{len(runs)}-runs"
    return runs[0].run.root.resolve().parent / name


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**index))
    return out


# --- figures --------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError(MISSING_EXTRA) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Write the PNG under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _legend(ax: Any) -> None:
    """Whole-step ticks on the x axis, a light grid, and the runs' legend."""
    ax.xaxis.get_major_locator().set_params(integer=True)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, frameon=False)


def plot_loss(plt: Any, runs: list[RunRecord], path: Path) -> None:
    """Training loss per log step: raw (faint) and EMA-smoothed (bold), one colour per run."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, r in enumerate(runs):
        steps, loss = r.series("train/loss")
        colour = f"C{index % 10}"
        ax.plot(steps, loss, color=colour, alpha=0.3, linewidth=1)
        ax.plot(steps, ema(loss), color=colour, linewidth=2, label=r.label)
    ax.set(
        title=f"Training loss (faint: raw per log step; bold: EMA smoothed, weight {EMA_WEIGHT})",
        xlabel="optimizer step",
        ylabel="cross-entropy loss (nats per target)",
    )
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, path)
    plt.close(fig)


def plot_lr(plt: Any, runs: list[RunRecord], path: Path) -> None:
    """The learning rate at each log step."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, r in enumerate(runs):
        steps, lr = r.series("train/lr")
        ax.plot(steps, lr, color=f"C{index % 10}", linewidth=2, label=r.label)
    ax.set(title="Learning rate (schedule)", xlabel="optimizer step", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, path)
    plt.close(fig)


def _arrow(runs: list[RunRecord], key: str) -> str:
    """The metric's declared direction for its title ("" when no run's recipe could say)."""
    known = [r.directions[key] for r in runs if key in r.directions]
    if not known:
        return ""
    return " (higher is better)" if known[0] is True else " (lower is better)" if known[0] is False else " (count)"


def plot_evals(plt: Any, runs: list[RunRecord], keys: list[str], path: Path) -> None:
    """Every evaluation metric against steps, one panel each."""
    columns = min(len(keys), 2)
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for index, r in enumerate(runs):
            steps, values = r.series(key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=4, color=f"C{index % 10}", linewidth=1.5, label=r.label)
        ax.set(title=key + _arrow(runs, key), xlabel="optimizer step", ylabel=key.removeprefix("eval/"))
        ax.grid(alpha=0.3)
        _legend(ax)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle("Evaluation metrics on the validation split", y=1.0)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    _save(fig, path)
    plt.close(fig)


def plot_throughput(plt: Any, runs: list[RunRecord], path: Path) -> None:
    """Training tokens/s and examples/s per log window (evaluation and checkpoint time left out)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, unit in zip(axes, ("train/tokens_per_s", "train/examples_per_s"), ("tokens", "examples"), strict=True):
        for index, r in enumerate(runs):
            steps, values = r.series(key)
            ax.plot(steps, values, color=f"C{index % 10}", linewidth=1.5, label=r.label)
        ax.set(title=f"Training throughput: {unit} / s", xlabel="optimizer step", ylabel=f"{unit} per second")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle("Throughput per log window, all processes (tokens include padding)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    _save(fig, path)
    plt.close(fig)


# --- the summary ------------------------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe as dotted keys (the form `--set` takes); lists stay values."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def recipe_differences(runs: list[RunRecord]) -> dict[str, list[Any]]:
    """Dotted recipe keys whose values differ between the runs (absent keys count as a difference)."""
    flats = [flatten(r.recipe) for r in runs]
    keys = sorted({k for flat in flats for k in flat} - set(_ALWAYS_DIFFERENT))
    missing = object()
    differences = {}
    for key in keys:
        values = [flat.get(key, missing) for flat in flats]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            differences[key] = ["(absent)" if v is missing else v for v in values]
    return differences


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"`{value}`" if value not in (None, "(absent)") else str(value)
    return f"{value:.6g}" if isinstance(value, float) else f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _band(bound: dict[str, Any]) -> str:
    parts = [f">= {bound['min']:g}" if bound.get("min") is not None else ""]
    parts.append(f"<= {bound['max']:g}" if bound.get("max") is not None else "")
    return " and ".join(p for p in parts if p)


def _met(value: float | None, bound: dict[str, Any]) -> bool:
    if value is None:
        return False
    return (bound.get("min") is None or value >= bound["min"]) and (bound.get("max") is None or value <= bound["max"])


def _run_section(r: RunRecord) -> list[str]:
    lines = [f"### {r.label}", ""]
    if r.final is not None:
        metrics, source = r.final, "final_metrics.json"
    else:
        evals = [rec for rec in r.records if any(k.startswith("eval/") for k in rec)]
        metrics = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")}
        source = f"not finished: the last evaluation (step {evals[-1]['step']})" if evals else "not finished"
    expect = r.recipe.get("expect") or {}
    lines += [f"Final metrics ({source}):", "", "| metric | value | expected | result |", "| --- | ---: | --- | --- |"]
    for key, value in metrics.items():
        bound = expect.get(key)
        verdict = ("met" if _met(value, bound) else "**missed**") if bound else ""
        lines.append(f"| {key} | {_number(value)} | {_band(bound) if bound else ''} | {verdict} |")
    for key, bound in expect.items():
        if key not in metrics:
            lines.append(f"| {key} | missing | {_band(bound)} | **missed** |")
    return [*lines, ""]


def summary(runs: list[RunRecord], figures: list[tuple[str, str]]) -> str:
    """The Markdown report: runs, final metrics against `expect:`, recipe differences, figures."""
    header = "| run | task | model | status | steps | training time | wall time | tokens/s | examples/s | directory |"
    lines = ["# llmtune report", "", header]
    lines.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in runs:
        model = r.recipe.get("model") or {}
        source = model.get("pretrained") or "from scratch"
        steps = max(int(rec["step"]) for rec in r.records)
        seconds, tokens, examples = r.last("train/seconds"), r.last("train/tokens"), r.last("train/examples")

        def per_s(count: float | None, seconds: float | None = seconds) -> str:
            return f"{count / seconds:,.0f}" if count is not None and seconds else "?"

        lines.append(
            f"| {r.label} | {r.recipe.get('task', '?')} | {source} | {r.status} | {steps:,} | {_duration(seconds)} | "
            f"{_duration(r.wall_seconds())} | {per_s(tokens)} | {per_s(examples)} | `{r.run.root.resolve()}` |"
        )
    device = {r.environment.get("device", "?") for r in runs}
    lines += [
        "",
        "Training time counts optimizer steps only (evaluation and checkpoints left out); wall time runs from the "
        "run's start (its resolved recipe, written after data preparation) to its last write. Tokens include "
        f"padding; throughput is over all processes. Device: {', '.join(sorted(device))}.",
        "",
        "## Final metrics",
        "",
    ]
    for r in runs:
        lines += _run_section(r)
    if len(runs) > 1:
        differences = recipe_differences(runs)
        lines += ["## Recipe differences", ""]
        if differences:
            lines += [f"Resolved recipe keys that differ ({', '.join(_ALWAYS_DIFFERENT)} left out):", ""]
            lines += ["| key | " + " | ".join(r.label for r in runs) + " |", "| --- |" + " --- |" * len(runs)]
            lines += [f"| `{k}` | " + " | ".join(_number(v) for v in vs) + " |" for k, vs in differences.items()]
        else:
            lines.append(f"The resolved recipes are the same (apart from {', '.join(_ALWAYS_DIFFERENT)}).")
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{title}]({name})\n" for name, title in figures]
    return "\n".join(lines)


def make_report(paths: list[str], output: str | None) -> Path:
    """Read the runs, draw the figures and write `report.md` into `output` (default: see `default_output`)."""
    runs = [read_run(p) for p in paths]
    unique_labels(runs)
    target = Path(output) if output is not None else default_output(runs)
    if target.exists() and not target.is_dir():
        raise UserError(f"--output {target} is a file; pass a directory")
    plt = _pyplot()
    target.mkdir(parents=True, exist_ok=True)
    figures = [("loss.png", "Training loss"), ("lr.png", "Learning rate")]
    plot_loss(plt, runs, target / "loss.png")
    plot_lr(plt, runs, target / "lr.png")
    keys = list(dict.fromkeys(k for r in runs for k in r.eval_keys()))
    if keys:
        plot_evals(plt, runs, keys, target / "eval.png")
        figures.append(("eval.png", "Evaluation metrics"))
    plot_throughput(plt, runs, target / "throughput.png")
    figures.append(("throughput.png", "Throughput"))
    write_text_atomic(target / "report.md", summary(runs, figures))
    return target
