"""`llmtune runs DIR`: finished, interrupted (a real SIGTERM mid-training, and a kill -9 left on disk), failed
(an exception inside training) and running (the lock held by a live process) runs, --sort and --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import run_cli_in_process, run_interrupted, tiny_recipe, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_cli")]


@pytest.fixture(scope="module")
def runs_root(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Under one folder: two finished runs (different learning rates), one stopped by SIGTERM, one failed."""
    from _pytest.capture import CaptureFixture, SysCapture

    root = tmp_path_factory.mktemp("runs-table")
    recipes = root / "recipes"
    recipes.mkdir()
    capsys = CaptureFixture(SysCapture, None, _ispytest=True)  # type: ignore[arg-type]
    capsys._start()
    try:
        for name, lr in (("good", 3e-3), ("poor", 1e-5)):
            recipe = tiny_recipe(corpus, root / "sweep" / name, train={"max_steps": 8, "lr": lr, "log_every": 4})
            code, _, err = run_cli_in_process(capsys, "pretrain", str(write_recipe(recipes / f"{name}.yaml", recipe)))
            assert code == 0, err[-2000:]
        failing = tiny_recipe(corpus, root / "failed", train={"max_steps": 8})
        with pytest.MonkeyPatch.context() as patch:

            def boom(*_args: object) -> int:
                raise RuntimeError("out of memory (simulated)")

            patch.setattr("llmtune.run._fit", boom)
            with pytest.raises(RuntimeError, match="simulated"):
                run_cli_in_process(capsys, "pretrain", str(write_recipe(recipes / "failed.yaml", failing)))
    finally:
        capsys.close()
    stopped = tiny_recipe(corpus, root / "stopped", train={"max_steps": 100000, "save_every": 5, "log_every": 1})
    run_interrupted(write_recipe(recipes / "stopped.yaml", stopped), root / "stopped", after_step=6)
    return root


def _runs(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_cli_in_process(capsys, "runs", *args)


def _by_path(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> dict[str, dict]:
    code, out, err = _runs(capsys, str(root), "--json", *args)
    assert code == 0, err
    return {r["path"]: r for r in json.loads(out)}


def test_finished_interrupted_and_failed(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = _by_path(capsys, runs_root)
    assert set(runs) == {"sweep/good", "sweep/poor", "stopped", "failed"}
    good = runs["sweep/good"]
    assert good["status"] == "finished" and good["task"] == "causal-lm" and good["model"] == "scratch gpt2"
    assert good["steps_done"] == good["steps_total"] == 8 and good["strategy"] == "full"
    final = json.loads((runs_root / "sweep" / "good" / "final_metrics.json").read_text())
    assert good["best_metric"] == "eval/loss" and good["best_value"] == pytest.approx(final["eval/loss"])
    assert good["wall_seconds"] > 0
    stopped = runs["stopped"]
    assert stopped["status"] == "interrupted" and stopped["steps_total"] == 100000
    assert stopped["steps_done"] >= 6
    assert json.loads((runs_root / "stopped" / "run_status.json").read_text())["status"] == "interrupted"
    failed = runs["failed"]
    assert failed["status"] == "failed" and "RuntimeError: out of memory (simulated)" in failed["error"]

    code, out, _ = _runs(capsys, str(runs_root))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["run", "task", "model", "strategy", "steps", "best", "metric", "status", "wall"]
    assert any(line.startswith("stopped ") and " interrupted " in line for line in lines)
    assert "failed: RuntimeError: out of memory (simulated)" in out


def test_killed_outright_is_interrupted_and_a_held_lock_is_running(
    runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    # kill -9 leaves "running" in run_status.json and nobody holding the lock
    killed = tmp_path / "killed"
    shutil.copytree(runs_root / "stopped", killed)
    record = json.loads((killed / "run_status.json").read_text())
    (killed / "run_status.json").write_text(json.dumps({**record, "status": "running"}))
    assert _by_path(capsys, tmp_path)["killed"]["status"] == "interrupted"

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from llmtune.run_dir import RunDir
                with RunDir(Path({str(killed)!r})).locked():
                    print("held", flush=True)
                    time.sleep(120)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run = _by_path(capsys, tmp_path)["killed"]
        assert run["status"] == "running" and run["pid"] == holder.pid
        code, out, _ = _runs(capsys, str(tmp_path))
        assert code == 0 and f"running (pid {holder.pid})" in out
    finally:
        holder.kill()
        holder.wait()
    assert _by_path(capsys, tmp_path)["killed"]["status"] == "interrupted"  # the OS released the lock


def test_sort_by_a_metric_in_its_direction(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _runs(capsys, str(runs_root), "--json", "--sort", "eval/perplexity")
    assert code == 0, err
    order = [r["path"] for r in json.loads(out)]
    ppl = {r["path"]: r["metrics"].get("eval/perplexity") for r in json.loads(out)}
    assert ppl["sweep/good"] < ppl["sweep/poor"]
    assert order.index("sweep/good") < order.index("sweep/poor")  # lower perplexity is better
    assert set(order[-2:]) == {"failed", "stopped"}  # no evaluation: last
    code, out, _ = _runs(capsys, str(runs_root / "sweep"), "--sort", "eval/perplexity")
    assert code == 0 and out.splitlines()[1].startswith("good ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sort", "eval/f1"], "--sort eval/f1: no run reports it; metrics these runs report: eval/loss"),
        (["--sort", "eval/tokens"], "--sort eval/tokens: a count, not a quality"),
    ],
)
def test_bad_sort(runs_root: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, out, err = _runs(capsys, str(runs_root), *args)
    assert code == 2 and out == ""
    assert err.startswith("error: " + message) and len(err.strip().splitlines()) == 1


def test_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _runs(capsys, str(tmp_path / "nope"))
    assert code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    code, _, err = _runs(capsys, str(tmp_path / "file"))
    assert code == 2 and "a file, not a folder" in err
    code, out, _ = _runs(capsys, str(tmp_path))
    assert code == 0 and out.strip() == f"no run directories under {tmp_path}"


def test_runs_does_not_import_torch(runs_root: Path) -> None:
    code = "import sys; from llmtune.cli import main; sys.argv=['llmtune','runs',sys.argv[1]]\n"
    code += "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code, str(runs_root)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
