"""`llmtune sweep`: hyper-parameter search with optuna, each trial a normal run directory.

Each trial runs `llmtune pretrain|finetune RECIPE --set output_dir=SWEEP/trial-NNN --set KEY=VALUE ...` in a
subprocess: the same code path as a user's run, its memory returned to the OS when it ends, and a signal to
it is all it takes to stop it cleanly (the trainer turns SIGINT / SIGTERM into a checkpoint and exit 130).
While it runs, the sweep reads the evaluations it appends to `metrics.jsonl`, reports each to optuna
(`trial.report`) and, with `--prune`, sends it SIGTERM when the pruner says so: the trainer needs no hook.

The study lives in `SWEEP/study.db` (SQLite), so running the same command again continues it up to N
finished trials; trials a dead sweep left running, and trials stopped by Ctrl-C, are marked failed and their
parameters queued again (the retry resumes the stopped run from its checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.atomic import write_text_atomic
from llmtune.errors import UserError
from llmtune.launch import die_with_parent, signals_caught
from llmtune.recipe import dump_recipe, load_recipe
from llmtune.run_dir import exclusive_lock, lock_holder
from llmtune.sweep_space import Param, Space, load_space, overrides_for

MISSING_EXTRA = "llmtune sweep needs optuna and matplotlib; install them: pip install 'llmtune[sweep]'"
SAMPLERS = ("tpe", "random", "grid")
STUDY_NAME = "llmtune-sweep"
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class SweepOptions:
    """What the command line asked for."""

    recipe: str
    space: str
    trials: int
    sampler: str = "tpe"
    prune: bool = False
    output: str | None = None
    seed: int = 0
    overrides: tuple[str, ...] = ()


def _optuna() -> Any:
    try:
        import matplotlib  # noqa: F401  (the figure; checked now rather than after the trials)
        import optuna
    except ImportError:
        raise UserError(MISSING_EXTRA) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _locked(root: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the sweep directory's lock (the run directory's kind: an OS `flock` with the holder's PID)."""

    def refuse() -> None:
        holder = lock_holder(root / ".lock")
        who = f"process {holder}" if holder is not None and holder > 0 else "another process"
        raise UserError(
            f"sweep directory {root} is in use by {who} (a live llmtune sweep); wait for it to end, or pass "
            "another --output"
        )

    return exclusive_lock(root / ".lock", refuse)


class Sweep:
    """One `llmtune sweep` invocation: the study, its trials, the summary."""

    def __init__(self, options: SweepOptions) -> None:
        if options.sampler not in SAMPLERS:
            raise UserError(f"--sampler {options.sampler}: choose one of {', '.join(SAMPLERS)}")
        if options.trials < 1:
            raise UserError(f"--trials {options.trials}: run at least 1 trial")
        self.options = options
        self.overrides = list(options.overrides)
        self.space: Space = load_space(options.space, options.recipe, self.overrides)
        recipe = load_recipe(options.recipe, self.overrides)
        self.metric = recipe.train.best_metric
        declared = recipe.metric(self.metric)
        assert declared is not None and declared.higher_is_better is not None  # the recipe validator checked
        self.direction = "maximize" if declared.higher_is_better else "minimize"
        self.command = "pretrain" if "pretrain" in recipe.entry.commands else "finetune"
        if options.prune and recipe.train.eval_every is None:
            print(
                "warning: --prune judges trials by their evaluations, and the recipe evaluates only at the end; "
                "set train.eval_every (e.g. --set train.eval_every=100)",
                flush=True,
            )
        self.grid = self.space.grid(options.space) if options.sampler == "grid" else None
        self.root = Path(options.output) if options.output is not None else Path(f"{recipe.output_dir}-sweep")
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--output {self.root} is a file; pass a directory for the sweep")
        self.optuna = _optuna()
        self.signal: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    # --- the study ------------------------------------------------------------------------------------------
    def _study(self) -> Any:
        optuna = self.optuna
        storage = f"sqlite:///{(self.root / 'study.db').resolve()}"
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage)] if self._has_db() else []
        seed = self.options.seed
        if STUDY_NAME in existing:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
            self._refuse_other_study(study)
            seed += len(study.trials)  # a continued sweep must not redraw the points it drew before
        sampler: Any = {
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            # Grid points are queued in the space file's order (`_enqueue_grid_point`), so the sampler is never
            # asked; optuna's GridSampler picks points at random and calls study.stop(), which only works in
            # study.optimize.
            "grid": lambda: optuna.samplers.RandomSampler(seed=seed),
        }[self.options.sampler]()
        # Once one trial has finished, a trial whose evaluation is worse than the median of the finished
        # trials' evaluations at the same step stops (optuna's default waits for 5 trials: too many for
        # the small sweeps a CPU affords).
        pruner = optuna.pruners.MedianPruner(n_startup_trials=1) if self.options.prune else optuna.pruners.NopPruner()
        study = optuna.create_study(
            storage=storage,
            study_name=STUDY_NAME,
            direction=self.direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
        if STUDY_NAME not in existing:
            study.set_user_attr("metric", self.metric)
            study.set_user_attr("space", self.space.as_dict())
            study.set_user_attr("recipe", str(Path(self.options.recipe).resolve()))
        return study

    def _has_db(self) -> bool:
        return (self.root / "study.db").is_file()

    def _refuse_other_study(self, study: Any) -> None:
        attrs = study.user_attrs
        if attrs.get("metric") != self.metric or attrs.get("space") != self.space.as_dict():
            raise UserError(
                f"sweep directory {self.root} holds a study of another space or metric "
                f"({attrs.get('metric')} over {', '.join(attrs.get('space', {}))}); pass another --output"
            )

    def _recover(self, study: Any) -> None:
        """Trials left running by a dead sweep are failed; every interrupted trial's parameters are queued again."""
        states = self.optuna.trial.TrialState
        for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            study.tell(trial.number, state=states.FAIL)  # the lock says no live sweep is running it
            print(f"trial {trial.number} was left running by a sweep that died; marked failed", flush=True)
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        for trial in trials:
            if trial.state == states.FAIL and "crashed" not in trial.user_attrs and trial.number not in retried:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                print(f"trial {trial.number} was interrupted; its parameters are queued again", flush=True)

    def _finished(self, study: Any) -> int:
        states = self.optuna.trial.TrialState
        return sum(
            t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and "crashed" in t.user_attrs)
            for t in study.get_trials(deepcopy=False)
        )

    def _enqueue_grid_point(self, study: Any) -> bool:
        """Queue the next untried grid point (in the space file's order); False when all are taken."""
        assert self.grid is not None
        states = self.optuna.trial.TrialState
        trials = study.get_trials(deepcopy=False)
        if any(t.state == states.WAITING for t in trials):
            return True
        # An interrupted trial's point is taken by its retry (queued by `_recover`), not by itself.
        taken = [t.params for t in trials if t.state != states.FAIL or "crashed" in t.user_attrs]
        point = next((p for p in self.grid if p not in taken), None)
        if point is None:
            return False
        study.enqueue_trial(point)
        return True

    # --- one trial ------------------------------------------------------------------------------------------
    def _suggest(self, trial: Any, param: Param) -> Any:
        if param.choices is not None:
            return trial.suggest_categorical(param.key, list(param.choices))
        assert param.low is not None and param.high is not None
        if param.is_int:
            step = int(param.step or 1)
            return trial.suggest_int(param.key, int(param.low), int(param.high), step=step, log=param.log)
        return trial.suggest_float(param.key, float(param.low), float(param.high), step=param.step, log=param.log)

    def _evaluations(self, run_dir: Path, seen: set[int]) -> list[tuple[int, float]]:
        """Evaluations of the objective metric logged since the last call."""
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        found = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line being written
            value, step = record.get(self.metric), record.get("step")
            if isinstance(value, int | float) and isinstance(step, int) and step not in seen:
                seen.add(step)
                found.append((step, float(value)))
        return found

    def _run_dir(self, study: Any, trial: Any) -> tuple[Path, bool]:
        """The trial's run directory, and whether it continues one: a retry of an interrupted trial resumes that
        trial's run from its last checkpoint (or completes it, if it had saved its final model)."""
        retry_of = trial.user_attrs.get("retry_of")
        if retry_of is not None:
            earlier = Path(study.trials[retry_of].user_attrs.get("run_dir", self.root / "none"))
            if (earlier / "final").is_dir() or any((earlier / "checkpoints").glob("step-*")):
                return earlier, True
        return self.root / f"trial-{trial.number:03d}", False

    def _run_trial(self, study: Any, trial: Any) -> str:
        """Run one trial to its end; tell the study; the state it ended in."""
        states = self.optuna.trial.TrialState
        params = {p.key: self._suggest(trial, p) for p in self.space}
        run_dir, resume = self._run_dir(study, trial)
        log_path = self.root / "logs" / f"trial-{trial.number:03d}.log"
        log_path.parent.mkdir(exist_ok=True)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        again = f", continuing trial {trial.user_attrs['retry_of']}'s run" if resume else ""
        print(f"trial {trial.number}: {shown} (run {run_dir}{again}, log {log_path})", flush=True)
        command = [sys.executable, "-m", "llmtune", self.command, str(Path(self.options.recipe).resolve())]
        command += ["--resume"] if resume else []
        for item in [*self.overrides, f"output_dir={run_dir.resolve()}", *overrides_for(params)]:
            command += ["--set", item]
        started, pruned_at = time.monotonic(), None
        seen: set[int] = set()
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            while self.process.poll() is None:
                time.sleep(_POLL_SECONDS)
                pruned_at = self._report(trial, run_dir, seen, pruned_at)
            code = self.process.wait()
            self.process = None
        self._report(trial, run_dir, seen, pruned_at)
        seconds = time.monotonic() - started
        trial.set_user_attr("seconds", round(seconds, 1))
        final = run_dir / "final_metrics.json"
        if code in (0, 1) and final.is_file():  # 1: an expect: bound missed, a result all the same
            value = float(json.loads(final.read_text(encoding="utf-8"))[self.metric])
            study.tell(trial, value)
            print(f"trial {trial.number}: {self.metric} {value:.6g} ({seconds:.0f} s)", flush=True)
            return "complete"
        if pruned_at is not None and self.signal is None:
            study.tell(trial, state=states.PRUNED)
            print(f"trial {trial.number}: pruned at step {pruned_at} (worse than the median)", flush=True)
            return "pruned"
        if self.signal is not None:
            study.tell(trial, state=states.FAIL)
            print(f"trial {trial.number}: interrupted; its run directory can be resumed ({run_dir})", flush=True)
            return "interrupted"
        last = _last_line(log_path)
        trial.set_user_attr("crashed", f"exit {code}: {last}")
        study.tell(trial, state=states.FAIL)
        if code == 2:  # bad input the space let through (e.g. a combination): the next trial would say it again
            raise UserError(f"trial {trial.number} ({shown}): {last.removeprefix('error: ')}")
        print(f"trial {trial.number}: failed with exit code {code}: {last} (see {log_path})", flush=True)
        return "failed"

    def _report(self, trial: Any, run_dir: Path, seen: set[int], pruned_at: int | None) -> int | None:
        """Report new evaluations to optuna; with --prune, stop the trial when the pruner says so."""
        for step, value in self._evaluations(run_dir, seen):
            trial.report(value, step)
            if self.options.prune and pruned_at is None and self.signal is None and trial.should_prune():
                if self.process is not None and self.process.poll() is None:
                    self.process.send_signal(signal.SIGTERM)
                return step
        return pruned_at

    # --- signals --------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signal = signum
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)  # the trial saves a checkpoint and stops

    # --- the whole sweep ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run trials until N have finished (or the grid is done, or a signal); write the summary; exit code."""
        with _locked(self.root), signals_caught(self._on_signal):
            study = self._study()
            self._recover(study)
            while self._finished(study) < self.options.trials and self.signal is None:
                if self.grid is not None and not self._enqueue_grid_point(study):
                    print(f"every point of the grid ({len(self.grid)}) has been tried", flush=True)
                    break
                if self._run_trial(study, study.ask()) == "interrupted":
                    break
            write_summary(self, study)
        if self.signal is not None:
            print("sweep interrupted; run the same command again to continue it", file=sys.stderr, flush=True)
            return 130
        return 0


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


# --- the summary ------------------------------------------------------------------------------------------------


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_table(study: Any, metric: str) -> str:
    """The trials as a Markdown table: number, parameters, objective value, state, seconds, run directory."""
    rows = ["| trial | " + " | ".join(["parameters", metric, "state", "seconds", "run"]) + " |"]
    rows.append("| ---: | --- | ---: | --- | ---: | --- |")
    for t in study.get_trials(deepcopy=False):
        params = ", ".join(f"{k}={_format(v)}" for k, v in t.params.items())
        value = t.value if t.value is not None else (t.intermediate_values.get(t.last_step) if t.last_step else None)
        shown = "" if value is None else f"{value:.6g}" + (f" (step {t.last_step})" if t.value is None else "")
        state = t.state.name.lower() + (" (retry)" if "retry_of" in t.user_attrs else "")
        if t.state.name == "FAIL":
            state += (
                f" ({str(t.user_attrs['crashed']).replace('|', '/')})"
                if "crashed" in t.user_attrs
                else " (interrupted: a rerun retries it)"
            )
        run = Path(t.user_attrs["run_dir"]).name if "run_dir" in t.user_attrs else ""
        rows.append(f"| {t.number} | {params} | {shown} | {state} | {t.user_attrs.get('seconds', '')} | {run} |")
    return "\n".join(rows)


def write_summary(sweep: Sweep, study: Any) -> None:
    """The table (printed, and trials.md), the best recipe (best_recipe.yaml) and the figure (sweep.png)."""
    table = trial_table(study, sweep.metric)
    print(table, flush=True)
    states = sweep.optuna.trial.TrialState
    complete = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    lines = [f"# llmtune sweep: {sweep.options.recipe}", "", f"Objective: {sweep.metric} ({sweep.direction}).", ""]
    if complete:
        best = study.best_trial
        text = dump_recipe(load_recipe(sweep.options.recipe, [*sweep.overrides, *overrides_for(best.params)]))
        header = (
            f"# The best trial of the sweep in {sweep.root}: trial {best.number}, {sweep.metric} {best.value:.6g}\n"
        )
        write_text_atomic(sweep.root / "best_recipe.yaml", header + text)
        print(
            f"best: trial {best.number}, {sweep.metric} {best.value:.6g}; recipe written to "
            f"{sweep.root / 'best_recipe.yaml'}",
            flush=True,
        )
        lines += [f"Best: trial {best.number}, {sweep.metric} {best.value:.6g}: `best_recipe.yaml`.", ""]
    lines += [table, "", "![the sweep](sweep.png)", ""]
    write_text_atomic(sweep.root / "trials.md", "\n".join(lines))
    if study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)):
        plot_sweep(study, sweep.space, sweep.metric, sweep.direction, sweep.root / "sweep.png")


def plot_sweep(study: Any, space: Space, metric: str, direction: str, path: Path) -> None:
    """Optimisation history (each trial, best so far) and each parameter against the objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    panels = 1 + len(space.params)
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    history = axes.flat[0]
    history.scatter([t.number for t in complete], [t.value for t in complete], color="C0", label="complete", zorder=3)
    history.scatter(
        [t.number for t in pruned],
        [t.intermediate_values[t.last_step] for t in pruned],
        color="C3",
        marker="x",
        label="pruned (last evaluation)",
        zorder=3,
    )
    best, xs, ys = None, [], []
    for t in sorted(complete, key=lambda t: t.number):
        if best is None or (t.value > best if direction == "maximize" else t.value < best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    if xs:  # carry the best to the last trial, so that one complete trial still draws a line
        xs.append(max(t.number for t in trials))
        ys.append(ys[-1])
    history.step(xs, ys, where="post", color="C1", label="best so far")
    history.set(title="Optimisation history", xlabel="trial", ylabel=f"{metric} ({direction})")
    history.xaxis.get_major_locator().set_params(integer=True)
    for ax, param in zip(list(axes.flat)[1:], space.params, strict=False):
        values = [t.params.get(param.key) for t in complete]
        labels = [str(v) for v in values] if param.choices is not None and _non_numeric(param.choices) else values
        ax.scatter(labels, [t.value for t in complete], color="C0", zorder=3)
        if pruned:
            pvals = [t.params.get(param.key) for t in pruned]
            plabels = [str(v) for v in pvals] if param.choices is not None and _non_numeric(param.choices) else pvals
            ax.scatter(plabels, [t.intermediate_values[t.last_step] for t in pruned], color="C3", marker="x")
        if _log_axis(param):
            ax.set_xscale("log")
        ax.set(title=f"{param.key} against {metric}", xlabel=param.key, ylabel=metric)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[panels:]:
        ax.set_visible(False)
    history.legend(fontsize=8, frameon=False)
    fig.suptitle(f"Sweep: {len(complete)} complete, {len(pruned)} pruned trials")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def _non_numeric(choices: tuple[Any, ...]) -> bool:
    return any(isinstance(c, bool) or not isinstance(c, int | float) for c in choices)


def _log_axis(param: Param) -> bool:
    if param.log:
        return True
    if param.choices is None or _non_numeric(param.choices):
        return False
    positive = [float(c) for c in param.choices if c > 0]
    return len(positive) == len(param.choices) and max(positive) / min(positive) >= 100


def sweep(options: SweepOptions) -> int:
    """`llmtune sweep`: the exit code (0 done, 130 interrupted; bad input raises `UserError`)."""
    return Sweep(options).run()
