"""`llmtune reproduce RECIPE ...`: what a CI job that reproduces recipes runs.

Every recipe (and every `--set`, and the output paths) is checked before anything trains; then each recipe
trains in a fresh run directory under `--output`, in its own `llmtune pretrain` / `finetune` process (the
command its task is trained by: the same code path a user runs, and one recipe's crash or memory cannot
touch the next). Its final metrics are checked against its `expect:` bands; one summary table follows, and
with `--junit FILE` a JUnit XML report in which each recipe (did it run?) and each band (was it met?) is a
test case, so any CI system shows them. Exit 0 when every band is met, 1 when one is missed or a run
failed, 2 for bad input (nothing is run), 130 when interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmtune.atomic import write_text_atomic
from llmtune.errors import UserError
from llmtune.expect import Check, check_expectations

OUTPUT_TAIL_LINES = 200  # of each run's output, kept for the JUnit report


@dataclass
class Reproduction:
    """One recipe: where it runs, how it ended, its bands."""

    recipe: str  # the path as given
    name: str  # its run directory's name under --output
    command: str  # pretrain | finetune
    expect: dict[str, Any]
    run_dir: Path
    exit_code: int | None = None
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    output_tail: str = ""

    @property
    def ran(self) -> bool:
        """The run finished and wrote its final metrics."""
        return self.exit_code in (0, 1) and (self.run_dir / "final_metrics.json").is_file()

    @property
    def ok(self) -> bool:
        """It ran and met every band."""
        return self.ran and all(c.ok for c in self.checks)


def _band(check: Check) -> str:
    parts = [f">= {check.bound.min:g}" if check.bound.min is not None else "", ""]
    parts[1] = f"<= {check.bound.max:g}" if check.bound.max is not None else ""
    return " and ".join(p for p in parts if p)


def _command(recipe: Any) -> str:
    """The command that trains the recipe's task: its only one, else pretrain from scratch, finetune otherwise."""
    commands = recipe.entry.commands
    if len(commands) == 1:
        return commands[0]
    return "pretrain" if recipe.model.from_scratch is not None else "finetune"


def _missing_files(recipe: Any, path: str) -> None:
    """Refuse a recipe whose data files are not there (before any recipe trains)."""
    for split, files in (recipe.data.files or {}).items():
        for file in [files] if isinstance(files, str) else files:
            if not Path(file).exists():
                raise UserError(f"{path}: data.files.{split}: {file} does not exist; fix the path or pass --set")


def plan(recipes: list[str], overrides: list[str], output: str | None) -> tuple[Path, list[Reproduction]]:
    """Validate every recipe, override and output path; the output folder and one `Reproduction` per recipe."""
    from llmtune.recipe import load_recipe

    if not recipes:
        raise UserError("reproduce: name at least one recipe file")
    if any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        raise UserError("--set output_dir: reproduce gives each recipe a fresh directory under --output; use --output")
    if output is not None:
        root = Path(output)
        if root.exists() and not root.is_dir():
            raise UserError(f"--output {output}: is a file; give a directory path")
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        root = Path(f"reproduce-{stamp}")
        n = 1
        while root.exists():
            n += 1
            root = Path(f"reproduce-{stamp}-{n}")
    existing = next(p for p in (root.resolve(), *root.resolve().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {root}: {existing} is not a writable directory; give a path you can write to")
    planned: list[Reproduction] = []
    names: set[str] = set()
    for path in recipes:
        recipe = load_recipe(path, overrides)
        if not recipe.expect:
            raise UserError(f"{path}: no expect: bands to check; add an expect: block (metric: {{min: ..., max: ...}})")
        _missing_files(recipe, path)
        name, n = Path(path).stem, 1
        while name in names:
            n += 1
            name = f"{Path(path).stem}-{n}"
        names.add(name)
        run_dir = (root / name).resolve()
        if run_dir.exists():
            raise UserError(
                f"--output {root}: {run_dir} already exists; reproduce runs each recipe afresh, choose a new --output"
            )
        planned.append(Reproduction(path, name, _command(recipe), dict(recipe.expect), run_dir))
    return root, planned


def _run_one(item: Reproduction, overrides: list[str]) -> None:
    """Train one recipe in its own `llmtune` process, echoing its output; read back and check its metrics."""
    args = [sys.executable, "-m", "llmtune", item.command, item.recipe]
    for override in [*overrides, f"output_dir={item.run_dir}"]:
        args += ["--set", override]
    print(f"\n=== {item.name}: llmtune {item.command} {item.recipe} -> {item.run_dir}", flush=True)
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    started = time.perf_counter()
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
        item.exit_code = proc.wait()
    item.seconds = time.perf_counter() - started
    item.output_tail = "".join(tail)
    if item.ran:
        metrics = json.loads((item.run_dir / "final_metrics.json").read_text(encoding="utf-8"))
        item.checks = check_expectations(metrics, item.expect)


def format_summary(items: list[Reproduction]) -> str:
    """One table: recipe, metric, band, value, ok (a run that did not finish is one row saying how it ended)."""
    rows = [("recipe", "metric", "band", "value", "ok", "wall")]
    for item in items:
        wall = f"{item.seconds:.0f}s" if item.exit_code is not None else "-"
        if item.exit_code is None:
            rows.append((item.name, "-", "-", "-", "not run", wall))
        elif not item.ran:
            rows.append((item.name, "-", "-", "-", f"FAILED (exit {item.exit_code})", wall))
        for c in item.checks:
            value = "missing" if c.value is None else f"{c.value:.4f}"
            rows.append((item.name, c.metric, _band(c), value, "ok" if c.ok else "MISSED", wall))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def junit_xml(items: list[Reproduction]) -> str:
    """The JUnit XML report: per recipe, a `run` test case and one per band."""
    suite = ET.Element("testsuite", name="llmtune reproduce", timestamp=datetime.now(timezone.utc).isoformat())
    tests = failures = errors = skipped = 0
    for item in items:
        klass = f"reproduce.{item.name}"
        case = ET.SubElement(suite, "testcase", classname=klass, name="run", time=f"{item.seconds:.3f}")
        tests += 1
        if item.exit_code is None:
            ET.SubElement(case, "skipped", message="not run: reproduce was interrupted")
            skipped += 1
        elif not item.ran:
            message = f"llmtune {item.command} {item.recipe} exited {item.exit_code} without final metrics"
            ET.SubElement(case, "error", message=message, type="RunFailed").text = item.output_tail
            errors += 1
        if item.output_tail:
            ET.SubElement(case, "system-out").text = item.output_tail
        for metric, bound in item.expect.items():
            check = next((c for c in item.checks if c.metric == metric), Check(metric, None, bound))
            band = _band(check)
            case = ET.SubElement(suite, "testcase", classname=klass, name=f"{metric} {band}", time="0")
            tests += 1
            if not item.ran:
                ET.SubElement(case, "skipped", message="not measured: the run did not finish")
                skipped += 1
            elif not check.ok:
                value = "missing from the final metrics" if check.value is None else f"{check.value:.6g}"
                message = f"{metric} = {value}, outside the band {band}"
                ET.SubElement(case, "failure", message=message, type="BandMissed").text = message
                failures += 1
    total = sum(i.seconds for i in items)
    counts = {"tests": tests, "failures": failures, "errors": errors, "skipped": skipped, "time": f"{total:.3f}"}
    for key, value in counts.items():
        suite.set(key, str(value))
    root = ET.Element("testsuites", name="llmtune reproduce", **{k: str(v) for k, v in counts.items()})
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def reproduce(recipes: list[str], overrides: list[str], junit: str | None, output: str | None) -> int:
    """Run every recipe, check its bands, print the summary, write the JUnit report; the exit code."""
    from llmtune.inference import check_output_file

    check_output_file(junit, "--junit")
    root, items = plan(recipes, overrides, output)
    root.mkdir(parents=True, exist_ok=True)
    print(f"reproducing {len(items)} recipe(s) under {root}", flush=True)
    interrupted = False
    for item in items:
        try:
            _run_one(item, overrides)
        except KeyboardInterrupt:  # the child got the same Ctrl-C and stopped at a step boundary
            item.exit_code = item.exit_code if item.exit_code is not None else 130
            interrupted = True
        if item.exit_code == 130:
            interrupted = True
        if interrupted:
            break
    print("\n" + format_summary(items), flush=True)
    if junit is not None:
        Path(junit).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(junit), junit_xml(items))
        print(f"JUnit report: {junit}", flush=True)
    if interrupted:
        return 130
    return 0 if all(item.ok for item in items) else 1
