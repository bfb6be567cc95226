"""Experiment trackers for real: one tiny run logs to TensorBoard, W&B (offline) and MLflow (its own SQLite
store), and each is read back with its own client — `wandb leet inspect --json` for the W&B transaction log,
`MlflowClient` for MLflow, TensorBoard's `EventAccumulator` for the event files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_metrics, run_cli, run_cli_in_process, tiny_recipe, write_recipe

pytest.importorskip("wandb", reason="the W&B tracker test needs `pip install 'llmtune[wandb]'`")
pytest.importorskip("mlflow", reason="the MLflow tracker test needs `pip install 'llmtune[mlflow]'`")


def _clean_environment() -> dict[str, str]:
    """No user settings of either tracker leak into the test run: W&B offline and MLflow's default (the run's
    own store) are what is tested."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HOME": env.get("HOME", "/tmp")}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("tracked")
    out = root / "run"
    recipe = tiny_recipe(corpus, out, tracking=["tensorboard", "wandb", "mlflow"])
    recipe["train"].update(max_steps=10, eval_every=5)
    path = write_recipe(root / "recipe.yaml", recipe)
    done = subprocess.run(
        [sys.executable, "-m", "llmtune", "pretrain", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_clean_environment(),
        cwd=root,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()  # nothing in the working dir
    return out


def _logged(run_dir: Path, name: str) -> dict[int, float]:
    """step -> value of one metric in the run's metrics.jsonl."""
    return {r["step"]: r[name] for r in read_metrics(run_dir) if name in r}


def _wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    wandb_cli = shutil.which("wandb", path=str(Path(sys.executable).parent))
    assert wandb_cli is not None
    (log,) = (run_dir / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    done = subprocess.run(
        [wandb_cli, "leet", "inspect", "--json", str(log)], capture_output=True, text=True, timeout=120, check=True
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_wandb_offline_run_holds_config_steps_and_final_metrics(tracked_run: Path) -> None:
    records = _wandb_records(tracked_run)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "llmtune" and run["display_name"] == tracked_run.name
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    assert config["train.lr"] == 3e-3 and config["task"] == "causal-lm"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert logged == pytest.approx(_logged(tracked_run, "train/loss"))
    evals = [h["eval/loss"] for h in history if "eval/loss" in h]
    assert evals == pytest.approx([r["eval/loss"] for r in read_metrics(tracked_run) if "eval/loss" in r])
    final = json.loads((tracked_run / "final_metrics.json").read_text())
    finals = {k: v for h in history for k, v in h.items() if k.startswith("final/")}
    assert finals["final/eval/loss"] == pytest.approx(final["eval/loss"])


def test_mlflow_local_store_holds_params_metrics_and_final_artifacts(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    ids = json.loads((tracked_run / "tracking" / "ids.json").read_text())
    client = MlflowClient(f"sqlite:///{tracked_run / 'tracking' / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    assert run.data.params["train.max_steps"] == "10"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(ids["mlflow"], "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(_logged(tracked_run, "train/loss"))
    final = json.loads((tracked_run / "final_metrics.json").read_text())
    assert run.data.metrics["final/eval/loss"] == pytest.approx(final["eval/loss"])
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"], "final")}
    assert {"final/config.json", "final/model.safetensors"} <= artifacts
    stored = Path(run.info.artifact_uri.removeprefix("file://"))
    assert stored.is_relative_to(tracked_run / "tracking")


def test_tensorboard_events_hold_the_logged_steps(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tracking" / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(_logged(tracked_run, "train/loss"), rel=1e-6)  # TensorBoard stores float32


def test_resume_continues_the_same_tracker_runs(tmp_path: Path, corpus: dict[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    from tests.helpers import run_interrupted

    out = tmp_path / "run"
    recipe = tiny_recipe(corpus, out, tracking=["mlflow"])
    recipe["train"].update(max_steps=24, save_every=6)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    run_interrupted(path, out, after_step=12)
    first = json.loads((out / "tracking" / "ids.json").read_text())
    done = run_cli("pretrain", str(path), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "tracking" / "ids.json").read_text()) == first
    client = MlflowClient(f"sqlite:///{out / 'tracking' / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(first["mlflow"], "train/loss"))
    assert steps[-1] == 24 and len(client.search_runs([client.get_run(first["mlflow"]).info.experiment_id])) == 1


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        ("tracking=[wandbb]", "unknown tracker 'wandbb'; did you mean 'wandb'?"),
        ("tracking=[mlflow,mlflow]", "a tracker is named twice"),
    ],
)
def test_bad_tracker_is_one_line(
    tmp_path: Path, corpus: dict[str, Path], capsys: pytest.CaptureFixture[str], tracking: str, message: str
) -> None:
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(corpus, tmp_path / "run"))
    code, _, err = run_cli_in_process(capsys, "pretrain", str(path), "--set", tracking)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_tracker_without_its_package_names_the_extra(
    tmp_path: Path, corpus: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmtune.trackers

    # The real check (importlib's find_spec) on a module name that is not installed anywhere.
    monkeypatch.setitem(llmtune.trackers._NEEDS, "wandb", ("wandb_missing_for_this_test", "wandb"))
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(corpus, tmp_path / "run", tracking=["wandb"]))
    code, _, err = run_cli_in_process(capsys, "pretrain", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "tracking: wandb needs the wandb_missing_for_this_test package: pip install 'llmtune[wandb]'" in err
    assert not (tmp_path / "run").exists()
