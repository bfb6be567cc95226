"""`llmtune runs [DIR]`: the run directories under a folder, one line each — task, model, strategy, steps, best
metric, status, wall time — read from what each run wrote (no torch: it answers at once).

A run's status: `running` while a live process holds its lock; `finished` once `final_metrics.json` exists;
otherwise what `run_status.json` says (`failed` with the error, `interrupted`), where a record still saying
"running" with nobody holding the lock is a run that was killed outright: interrupted too (`--resume`
continues it from its last checkpoint). A run from before `run_status.json` existed is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from llmtune.errors import UserError
from llmtune.run_dir import RunDir, run_dir_of
from llmtune.run_status import read_status

SEARCH_DEPTH = 4  # how many folder levels below DIR are searched for run directories


@dataclass
class RunSummary:
    """One run, as `llmtune runs` lists it."""

    path: str
    task: str
    model: str
    strategy: str
    steps_done: int
    steps_total: int | None
    best_metric: str | None
    best_value: float | None
    status: str
    wall_seconds: float | None
    pid: int | None = None
    error: str | None = None
    # every metric's best value over the run's evaluations (in its declared direction), for --sort
    metrics: dict[str, float] = field(default_factory=dict)
    directions: dict[str, bool | None] = field(default_factory=dict, repr=False)


def find_runs(root: Path, depth: int = SEARCH_DEPTH) -> list[RunDir]:
    """Run directories at `root` or up to `depth` levels below it (not inside a run, not in hidden folders)."""
    found: list[RunDir] = []

    def walk(folder: Path, level: int) -> None:
        run = run_dir_of(folder)
        if run is not None:
            found.append(run)
            return
        if level >= depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:  # unreadable folder: nothing to list there
            return
        for child in children:
            walk(child, level + 1)

    walk(root, 0)
    return found


def _records(run: RunDir) -> list[dict[str, Any]]:
    try:
        lines = run.metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill: skip it
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _recipe(run: RunDir) -> tuple[Any, dict[str, Any]]:
    """(the validated recipe or None when it no longer validates, the raw resolved tree)."""
    import yaml

    from llmtune.recipe import load_recipe

    try:
        tree = yaml.safe_load(run.recipe.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        tree = {}
    try:
        return load_recipe(run.recipe), tree if isinstance(tree, dict) else {}
    except UserError:
        return None, tree if isinstance(tree, dict) else {}


def _model_name(tree: dict[str, Any]) -> str:
    model = tree.get("model") or {}
    if model.get("pretrained"):
        path = Path(str(model["pretrained"]))
        if not path.is_absolute():
            return str(path)  # a hub id
        return path.parent.name if path.name in ("final", "model") else path.name
    scratch = model.get("from_scratch")
    if isinstance(scratch, dict):
        return f"scratch {scratch.get('model_type', '')}".strip()
    return f"scratch {Path(str(scratch)).stem}" if scratch else "?"


def _status(run: RunDir, record: dict[str, Any] | None) -> tuple[str, int | None]:
    pid = run.holder()
    if pid is not None:
        return "running", pid
    if run.is_complete():
        return "finished", None
    if record is not None and record["status"] == "failed":
        return "failed", None
    return "interrupted", None


def _wall(record: dict[str, Any] | None, status: str) -> float | None:
    if record is None or "wall_seconds" not in record:
        return None
    seconds = float(record["wall_seconds"])
    if status == "running" and record.get("updated"):
        with contextlib.suppress(ValueError):  # an unreadable time: the recorded figure stands
            seconds += max(time.time() - datetime.fromisoformat(record["updated"]).timestamp(), 0.0)
    return seconds


def summarize(run: RunDir, root: Path) -> RunSummary:
    """What `llmtune runs` shows of one run directory."""
    recipe, tree = _recipe(run)
    record = read_status(run.root)
    status, pid = _status(run, record)
    records = _records(run)
    train = tree.get("train") or {}
    best_name = train.get("best_metric")
    directions: dict[str, bool | None] = {}
    best: dict[str, float] = {}
    try:
        final = json.loads(run.final_metrics.read_text(encoding="utf-8")) if run.final_metrics.is_file() else {}
    except ValueError:
        final = {}
    for values in [*records, final]:
        for name, value in values.items():
            if not name.startswith("eval/") or not isinstance(value, int | float):
                continue
            if name not in directions:
                declared = recipe.metric(name) if recipe is not None else None
                directions[name] = declared.higher_is_better if declared is not None else None
            up = directions[name]
            if name not in best or (up is True and value > best[name]) or (up is False and value < best[name]):
                best[name] = float(value)
    done = max([int(r.get("step", 0)) for r in records] + [int((record or {}).get("step") or 0)])
    total = (record or {}).get("total_steps") or train.get("max_steps")
    try:
        shown = str(run.root.relative_to(root)) if run.root != root else run.root.name
    except ValueError:
        shown = str(run.root)
    return RunSummary(
        path=shown,
        task=str(tree.get("task", "?")),
        model=_model_name(tree),
        strategy=str((tree.get("strategy") or {}).get("kind", "full")),
        steps_done=done,
        steps_total=int(total) if total else None,
        best_metric=best_name,
        best_value=best.get(best_name) if best_name else None,
        status=status,
        wall_seconds=_wall(record, status),
        pid=pid,
        error=(record or {}).get("error") if status == "failed" else None,
        metrics=best,
        directions=directions,
    )


def sort_runs(runs: list[RunSummary], metric: str) -> list[RunSummary]:
    """Best first by `metric` in its declared direction; runs without it last."""
    declared = {r.directions[metric] for r in runs if metric in r.directions} - {None}
    if not declared:
        every = sorted({m for r in runs for m in r.metrics})
        if any(metric in r.directions for r in runs):
            raise UserError(f"--sort {metric}: a count, not a quality; sort by one of {', '.join(every)}")
        hint = f"metrics these runs report: {', '.join(every)}" if every else "no run has evaluated yet"
        raise UserError(f"--sort {metric}: no run reports it; {hint}")
    higher = declared.pop()
    having = [r for r in runs if metric in r.metrics]
    having.sort(key=lambda r: r.metrics[metric], reverse=higher)
    return having + [r for r in runs if metric not in r.metrics]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_table(runs: list[RunSummary], sort: str | None = None) -> str:
    """The runs as a plain-text table (with a column for the --sort metric when it is not each run's best)."""
    header = ["run", "task", "model", "strategy", "steps", "best metric", "status", "wall"]
    extra = sort is not None and any(r.best_metric != sort for r in runs)
    if extra:
        header.insert(6, sort)
    rows = [header]
    for r in runs:
        steps = f"{r.steps_done}/{r.steps_total}" if r.steps_total else str(r.steps_done)
        best = f"{r.best_metric} {r.best_value:.4g}" if r.best_metric and r.best_value is not None else "-"
        status = f"{r.status} (pid {r.pid})" if r.status == "running" and r.pid and r.pid > 0 else r.status
        row = [r.path, r.task, r.model, r.strategy, steps, best, status, _duration(r.wall_seconds)]
        if extra:
            row.insert(6, f"{r.metrics[sort]:.4g}" if sort in r.metrics else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    failures = [f"{r.path}: {r.error}" for r in runs if r.error]
    return "\n".join(lines + (["", *failures] if failures else []))


def list_runs(folder: str, sort: str | None) -> list[RunSummary]:
    """The runs under `folder`, sorted by `sort` (a metric) or by path."""
    root = Path(folder)
    if not root.exists():
        raise UserError(f"DIR {folder}: no such folder; pass a folder that holds run directories")
    if not root.is_dir():
        raise UserError(f"DIR {folder}: a file, not a folder; pass a folder that holds run directories")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"DIR {folder}: not readable")
    runs = [summarize(run, root) for run in find_runs(root)]
    return sort_runs(runs, sort) if sort is not None and runs else runs


def as_json(runs: list[RunSummary]) -> str:
    """The runs as JSON (every field, the per-metric bests included)."""
    return json.dumps([{k: v for k, v in asdict(r).items() if k != "directions"} for r in runs], indent=1)
