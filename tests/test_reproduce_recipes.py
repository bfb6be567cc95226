"""Re-run the embedded-default recipes and hold them to their `expect:` bounds (CI's second job).

Each takes a few minutes on a 2-core CPU, so they are marked `recipe` and left out of the default
`pytest` run; `.ci/run` runs them with `pytest -m recipe`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.recipe import load_recipe
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = [p for p in sorted((ROOT / "recipes").glob("*.yaml")) if load_recipe(p).data.source is not None]

pytestmark = pytest.mark.recipe


@pytest.mark.parametrize("path", DEFAULTS, ids=lambda p: p.stem)
def test_recipe_reaches_its_expectations(path: Path, tmp_path: Path) -> None:
    out = tmp_path / path.stem
    done = run_cli("pretrain", str(path), "--set", f"output_dir={out}", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "expectations:" in done.stdout and "MISSED" not in done.stdout
    metrics = json.loads((out / "final_metrics.json").read_text())
    first_eval_loss = next(r["eval/loss"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "eval/loss" in r)
    assert metrics["eval/loss"] <= first_eval_loss
