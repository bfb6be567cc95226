"""The run directory: one writer at a time (an OS lock, released when the holder dies), resume of complete and
almost-complete runs, workers that stop when their launcher dies, and the warning when sharding is unavailable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtune.run_dir import RunDir
from tests.helpers import read_metrics, run_cli, run_cli_in_process, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def _wait_for(predicate: object, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_a_running_run_is_locked_and_kill_9_leaves_no_stale_lock(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(corpus, out, train={"max_steps": 100000, "save_every": 5, "log_every": 1})
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-m", "llmtune", "pretrain", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        _wait_for(lambda: (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")))
        assert RunDir(out).holder() == writer.pid
        for extra in (["--resume"], ["--overwrite"]):
            code, _, err = run_cli_in_process(capsys, "pretrain", str(recipe), *extra)
            assert code == 2 and err.count("\n") == 1
            assert f"output_dir {out} is in use by process {writer.pid}" in err
        before = len(read_metrics(out))
        assert before > 0
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert RunDir(out).holder() is None  # the OS released the lock with its holder
    code, stdout, err = run_cli_in_process(capsys, "pretrain", str(recipe), "--resume", "--set", "train.max_steps=6")
    assert code == 0, err[-2000:]
    assert "resumed from" in stdout and (out / "final_metrics.json").is_file()


def test_resume_of_a_complete_run_and_of_one_stopped_after_final(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(corpus, out, train={"max_steps": 6, "log_every": 3}, expect={"eval/loss": {"max": 100.0}}),
    )
    code, _, err = run_cli_in_process(capsys, "pretrain", str(recipe))
    assert code == 0, err[-2000:]
    final = json.loads((out / "final_metrics.json").read_text())
    listing = sorted(str(p) for p in out.rglob("*"))

    code, stdout, _ = run_cli_in_process(capsys, "pretrain", str(recipe), "--resume")
    assert code == 0 and "is complete" in stdout and "nothing to resume" in stdout
    assert sorted(str(p) for p in out.rglob("*")) == listing  # nothing written

    (out / "final_metrics.json").unlink()  # as if killed after final/ was written
    code, stdout, _ = run_cli_in_process(capsys, "pretrain", str(recipe), "--resume")
    assert code == 0 and "completed final_metrics.json" in stdout and "expectations:" in stdout
    assert json.loads((out / "final_metrics.json").read_text()) == final
    assert json.loads((out / "final" / "llmtune_metrics.json").read_text())["metrics"] == final


def test_workers_stop_with_a_checkpoint_when_their_launcher_is_killed(corpus: dict[str, Path], tmp_path: Path) -> None:
    """torchrun gives its workers sessions of their own: a kill -9 of the launcher used to leave them training."""
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(corpus, out, train={"max_steps": 100000, "batch_size": 4, "log_every": 1})
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", "29531", "-m", "llmtune", "pretrain", str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(launch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 3)
        workers = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(launcher.pid)], text=True).split()]
        assert len(workers) == 2
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=120)
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints, "the workers stopped without saving a checkpoint"
    step = int(checkpoints[-1].name.removeprefix("step-"))
    assert max(r["step"] for r in read_metrics(out)) == step  # both ranks stopped at the same step
    assert RunDir(out).holder() is None


def test_fsdp_asked_for_without_a_gpu_is_one_warning_line(corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, tmp_path / "run", train={"max_steps": 2}))
    env_before = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    try:
        done = run_cli("pretrain", str(recipe))
    finally:
        if env_before is None:
            os.environ.pop("ACCELERATE_USE_FSDP")
        else:
            os.environ["ACCELERATE_USE_FSDP"] = env_before
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: FSDP")]
    assert warnings == [
        "warning: FSDP was asked for, but accelerate cannot provide it here (it needs GPUs): training runs in one "
        "process without sharding instead"
    ]
