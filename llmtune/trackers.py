"""The experiment trackers a recipe names (`tracking: [tensorboard, wandb, mlflow]`), built for accelerate.

accelerate's own tracker classes do the logging; this module only decides where each one writes and under
which name, because their defaults do not suit a run directory:

- W&B: offline into `RUN/tracking/wandb/` unless the user has credentials (`WANDB_API_KEY`, a `~/.netrc`
  entry) or sets `WANDB_MODE`; project `WANDB_PROJECT` or "llmtune"; the run named after its directory.
- MLflow: a SQLite store `RUN/tracking/mlflow.db` with artifacts in `RUN/tracking/mlflow-artifacts/`, unless
  `MLFLOW_TRACKING_URI` names another store; experiment `MLFLOW_EXPERIMENT_NAME` or "llmtune".
- TensorBoard: `RUN/tracking/tensorboard/` (`tensorboard --logdir RUN/tracking/tensorboard`).

A resumed run continues the same W&B and MLflow runs: their ids are kept in `RUN/tracking/ids.json`.
Everything here runs on the main process only (accelerate's trackers are main-process objects).
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
from pathlib import Path
from typing import Any

from llmtune.atomic import write_text_atomic
from llmtune.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# tracker -> (the module it needs, the pip extra that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_installed(names: list[str]) -> None:
    """Refuse, in one line, a tracker whose package is not installed (before anything is written)."""
    for name in names:
        module, extra = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"tracking: {name} needs the {module} package: pip install 'llmtune[{extra}]'")


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """The resolved recipe as `section.key` -> scalar, the form every tracker's config/params accepts (lists and
    empty values as text)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_trackers(names: list[str], folder: Path, run_name: str, resume: bool) -> list[Any]:
    """accelerate tracker objects for `names`, writing under `folder` (the run's `tracking/`); ids of a resumed
    run's W&B and MLflow runs come from `folder/ids.json`."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    ids = _read_ids(folder) if resume else {}
    trackers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", str(folder)))
        elif name == "wandb":
            kwargs: dict[str, Any] = {"name": run_name, "dir": os.environ.get("WANDB_DIR", str(folder))}
            if "WANDB_MODE" not in os.environ and not _wandb_has_credentials():
                kwargs["mode"] = "offline"
            if "wandb" in ids:
                kwargs.update(id=ids["wandb"], resume="allow")
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", "llmtune"), **kwargs))
        else:
            trackers.append(_mlflow_tracker(folder, run_name, ids.get("mlflow")))
    return trackers


def _mlflow_tracker(folder: Path, run_name: str, run_id: str | None) -> Any:
    """accelerate's MLflowTracker, pointed at the run's own SQLite store unless `MLFLOW_TRACKING_URI` is set.

    accelerate's tracker uses mlflow's global default store (`./mlflow.db` in the working directory); setting
    the URI in `start` keeps each run's store, and its artifacts, inside its run directory.
    """
    from accelerate.tracking import MLflowTracker

    class RunMLflowTracker(MLflowTracker):
        def start(self) -> None:
            import logging

            import mlflow

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "creating tables" lines are noise
            if "MLFLOW_TRACKING_URI" not in os.environ:
                folder.mkdir(parents=True, exist_ok=True)
                mlflow.set_tracking_uri(f"sqlite:///{folder.resolve() / 'mlflow.db'}")
                self.logging_dir = (folder.resolve() / "mlflow-artifacts").as_uri()
            super().start()

    return RunMLflowTracker(
        experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "llmtune"), run_id=run_id, run_name=run_name
    )


def _read_ids(folder: Path) -> dict[str, str]:
    path = folder / "ids.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def remember_ids(accelerator: Any, folder: Path) -> None:
    """Write the W&B / MLflow run ids to `folder/ids.json`, so that `--resume` continues the same runs."""
    ids: dict[str, str] = {}
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
    if ids:
        write_text_atomic(folder / "ids.json", json.dumps(ids, indent=1))


def log_final(accelerator: Any, step: int, metrics: dict[str, float], final_dir: Path) -> None:
    """The final metrics (as `final/<name>`) to every tracker; to MLflow also `final/` (model card and weights)
    as artifacts. Main process only."""
    if not accelerator.trackers:
        return
    accelerator.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            import mlflow

            mlflow.log_artifacts(str(final_dir), artifact_path="final")
