"""`llmtune sweep`: the space checked like `--set`, a grid that finds the better learning rate, a study that
continues after `--trials 1` and after a real SIGINT, and a hopeless trial pruned from its evaluations."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_metrics, run_cli, run_cli_in_process, tiny_recipe, write_recipe

GOOD_LR, TINY_LR, MIDDLE_LR = 3e-3, 1e-6, 3e-4


def _recipe(corpus: dict[str, Path], root: Path) -> Path:
    recipe = tiny_recipe(corpus, root / "base", train={"max_steps": 40, "log_every": 2, "eval_every": 10})
    return write_recipe(root / "recipe.yaml", recipe)


def _space(root: Path, text: str) -> Path:
    path = root / "space.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _study(sweep_dir: Path) -> Any:
    import optuna

    return optuna.load_study(study_name="llmtune-sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")


def _states(sweep_dir: Path) -> list[tuple[str, float]]:
    return [(t.state.name, t.params["train.lr"]) for t in _study(sweep_dir).trials]


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("train.lrr: {low: 1.0e-4, high: 1.0e-2}", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ("trian.lr: {choices: [0.1]}", "unknown key 'trian'; did you mean 'train'?"),
        ("train.lr: {low: 0.01, high: 0.01}", "train.lr: an empty range (low 0.01, high 0.01)"),
        ("train.lr: {low: 0.1, high: 0.01}", "train.lr: low above high (low 0.1, high 0.01)"),
        ("train.lr: {choices: []}", "train.lr: choices is empty"),
        ("train.lr: {low: 0, high: 0.1, log: true}", "a log range needs low > 0"),
        ("train.batch_size: {choices: [8, many]}", "train.batch_size: expected a valid integer"),
        ("output_dir: {choices: [a, b]}", "output_dir is set by the sweep"),
    ],
)
def test_bad_space_is_one_line(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], space: str, message: str
) -> None:
    recipe, space_file = _recipe(corpus, tmp_path), _space(tmp_path, space)
    out = tmp_path / "sweep"
    code, _, err = run_cli_in_process(capsys, "sweep", str(recipe), "--space", str(space_file), "--trials", "2")
    assert code == 2 and err.count("\n") == 1, err
    assert message in err and str(space_file) in err, err
    code, _, err = run_cli_in_process(
        capsys, "sweep", str(recipe), "--space", str(space_file), "--trials", "2", "--output", str(out)
    )
    assert code == 2 and not out.exists()


def test_grid_needs_choices_and_sampler_is_checked(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, space = _recipe(corpus, tmp_path), _space(tmp_path, "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}")
    args = ["sweep", str(recipe), "--space", str(space), "--trials", "2"]
    code, _, err = run_cli_in_process(capsys, *args, "--sampler", "grid")
    assert code == 2 and "--sampler grid needs choices" in err
    code, _, err = run_cli_in_process(capsys, *args, "--sampler", "bayes")
    assert code == 2 and "--sampler bayes: choose one of tpe, random, grid" in err
    assert not (tmp_path / "base-sweep").exists()


def test_sweep_directory_in_use(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe, space = _recipe(corpus, tmp_path), _space(tmp_path, "train.lr: {choices: [0.001]}")
    out = tmp_path / "sweep"
    out.mkdir()
    with (out / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        code, _, err = run_cli_in_process(
            capsys, "sweep", str(recipe), "--space", str(space), "--trials", "1", "--output", str(out)
        )
    assert code == 2 and err.count("\n") == 1
    assert f"sweep directory {out} is in use by process 4242" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_missing_extra_names_it(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, space = _recipe(corpus, tmp_path), _space(tmp_path, "train.lr: {choices: [0.001]}")
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    out = tmp_path / "sweep"
    code, _, err = run_cli_in_process(
        capsys, "sweep", str(recipe), "--space", str(space), "--trials", "1", "--output", str(out)
    )
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'llmtune[sweep]'" in err and not out.exists()


# --- end to end --------------------------------------------------------------------------------------------------


def _sigint_during_second_trial(args: list[str], sweep_dir: Path) -> subprocess.CompletedProcess[str]:
    """Start the sweep; once trial 1 has logged a training step, SIGINT the sweep (only it: it forwards)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    run = sweep_dir / "trial-001"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and read_metrics(run):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_grid_sweep_finds_the_better_lr_and_continues(
    corpus: dict[str, Path], tmp_path: Path, one_thread_cli: Any
) -> None:
    from llmtune.recipe import load_recipe

    recipe = _recipe(corpus, tmp_path)
    space = _space(tmp_path, f"train.lr: {{choices: [{TINY_LR}, {GOOD_LR}, {MIDDLE_LR}]}}\n")
    sweep_dir = tmp_path / "sweep"
    args = ["sweep", str(recipe), "--space", str(space), "--sampler", "grid", "--output", str(sweep_dir)]

    first = run_cli(*args, "--trials", "1")  # stops after one trial: an interrupted sweep, continued below
    assert first.returncode == 0, first.stderr[-3000:]
    assert _states(sweep_dir) == [("COMPLETE", TINY_LR)]

    stopped = _sigint_during_second_trial([*args, "--trials", "3"], sweep_dir)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "run the same command again" in stopped.stderr
    assert _states(sweep_dir) == [("COMPLETE", TINY_LR), ("FAIL", GOOD_LR)]
    interrupted = sweep_dir / "trial-001"
    assert (interrupted / "checkpoints").is_dir() and not (interrupted / "final_metrics.json").exists()

    done = run_cli(*args, "--trials", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trial 1 was interrupted; its parameters are queued again" in done.stdout
    assert _states(sweep_dir) == [
        ("COMPLETE", TINY_LR),
        ("FAIL", GOOD_LR),
        ("COMPLETE", GOOD_LR),  # the interrupted point, run again
        ("COMPLETE", MIDDLE_LR),
    ]
    study = _study(sweep_dir)
    assert study.best_trial.params["train.lr"] == GOOD_LR
    assert study.best_trial.user_attrs["retry_of"] == 1
    values = {t.params["train.lr"]: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert values[GOOD_LR] < values[MIDDLE_LR] < values[TINY_LR]  # eval/loss: lower is better
    best = load_recipe(sweep_dir / "best_recipe.yaml")
    assert best.train.lr == GOOD_LR and best.train.max_steps == 40
    assert "| 2 | train.lr=0.003 |" in done.stdout and "complete (retry)" in done.stdout
    assert (sweep_dir / "sweep.png").stat().st_size > 10_000
    # the retry continued the interrupted run from its checkpoint rather than starting over
    assert "trial 2: train.lr=0.003 (run " in done.stdout and "continuing trial 1's run" in done.stdout
    assert "resumed from" in (sweep_dir / "logs" / "trial-002.log").read_text()
    assert study.best_trial.user_attrs["run_dir"] == str(interrupted.resolve())
    assert not (sweep_dir / "trial-002").exists()
    for trial in (0, 1, 3):
        assert (sweep_dir / f"trial-{trial:03d}" / "final_metrics.json").is_file()


@pytest.mark.slow
def test_prune_stops_a_hopeless_trial(corpus: dict[str, Path], tmp_path: Path, one_thread_cli: Any) -> None:
    # 200 steps: the sweep reads evaluations every 0.2 s and a tiny model trains tens of steps in that time, so
    # the trial must be long enough for the pruner's SIGTERM to land well before its end.
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tiny_recipe(corpus, tmp_path / "base", train={"max_steps": 200, "log_every": 2, "eval_every": 10}),
    )
    space = _space(tmp_path, f"train.lr: {{choices: [{GOOD_LR}, {TINY_LR}]}}\n")
    sweep_dir = tmp_path / "sweep"
    done = run_cli(
        "sweep", str(recipe), "--space", str(space), "--sampler", "grid", "--prune", "--trials", "2",
        "--output", str(sweep_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert _states(sweep_dir) == [("COMPLETE", GOOD_LR), ("PRUNED", TINY_LR)]
    assert "trial 1: pruned at step 10 " in done.stdout  # judged at its first evaluation, of twenty
    steps = [r["step"] for r in read_metrics(sweep_dir / "trial-001")]
    assert max(steps) < 200 and not (sweep_dir / "trial-001" / "final_metrics.json").exists()
    assert "trial 1: pruned at step 10" in done.stdout


def test_a_trial_left_running_by_a_dead_sweep_is_failed_and_queued_again(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmtune.sweep import Sweep, SweepOptions

    recipe = _recipe(corpus, tmp_path)
    space = _space(tmp_path, f"train.lr: {{choices: [{GOOD_LR}, {TINY_LR}]}}\n")
    out = tmp_path / "sweep"
    out.mkdir()
    dead = Sweep(SweepOptions(str(recipe), str(space), 2, "grid", output=str(out)))
    study = dead._study()
    trial = study.ask()
    drawn = trial.suggest_categorical("train.lr", [GOOD_LR, TINY_LR])  # then the sweep "dies": the trial stays RUNNING

    again = Sweep(SweepOptions(str(recipe), str(space), 2, "grid", output=str(out)))
    study = again._study()
    again._recover(study)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[1].user_attrs == {"retry_of": 0}
    assert "trial 0 was left running by a sweep that died" in capsys.readouterr().out
    assert again._finished(study) == 0  # an interrupted trial does not count towards --trials
    assert again._enqueue_grid_point(study)  # the retry is queued: no new point yet
    retry = study.ask()
    assert retry.suggest_categorical("train.lr", [GOOD_LR, TINY_LR]) == drawn  # the queued parameters
    assert retry.user_attrs == {"retry_of": 0}
