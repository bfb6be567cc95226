"""`llmtune reproduce`: tiny recipes, one meeting its bands and one missing one (exit 1), the summary table, the
JUnit XML read back with xml.etree, and the bad input refused before anything runs (one line, exit 2)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.helpers import (
    classification_recipe,
    run_cli,
    run_cli_in_process,
    sentiment_rows,
    write_recipe,
    write_tsv,
)

pytestmark = pytest.mark.usefixtures("one_thread_cli")


@pytest.fixture(scope="module")
def recipes(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """met.yaml (a band any run meets), missed.yaml (a band no run can meet), bare.yaml (no expect:)."""
    root = tmp_path_factory.mktemp("reproduce-recipes")
    train = write_tsv(root / "train.tsv", sentiment_rows(120, 1))
    valid = write_tsv(root / "dev.tsv", sentiment_rows(24, 2))
    out = {}
    for name, expect in (
        ("met", {"eval/loss": {"max": 100.0}, "eval/accuracy": {"min": 0.0}}),
        ("missed", {"eval/loss": {"max": 100.0}, "eval/accuracy": {"min": 1.01}}),
        ("bare", {}),
    ):
        recipe = classification_recipe(tiny_models["bert"], train, valid, root / "unused" / name, max_steps=4)
        recipe["expect"] = expect
        out[name] = write_recipe(root / f"{name}.yaml", recipe)
    return out


@pytest.mark.slow
def test_one_met_one_missed(recipes: dict[str, Path], tmp_path: Path) -> None:
    junit, out = tmp_path / "reports" / "reproduce.xml", tmp_path / "runs"
    done = run_cli(
        "reproduce", str(recipes["met"]), str(recipes["missed"]), "--junit", str(junit), "--output", str(out)
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for name in ("met", "missed"):  # each in a fresh directory under --output, a complete run with its card
        assert (out / name / "final_metrics.json").is_file() and (out / name / "final" / "README.md").is_file()
    summary = done.stdout[done.stdout.index("\nrecipe ") :].splitlines()[1:]
    rows = {(line.split()[0], line.split()[1]): line.split() for line in summary if line.strip()}
    # recipe, metric, band (two words), value, ok, wall
    assert rows[("met", "eval/accuracy")][2:4] == [">=", "0"] and rows[("met", "eval/accuracy")][5] == "ok"
    assert rows[("missed", "eval/accuracy")][2:4] == [">=", "1.01"] and rows[("missed", "eval/accuracy")][5] == "MISSED"
    assert rows[("missed", "eval/loss")][5] == "ok"

    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "6" and root.get("failures") == "1"
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert set(cases) == {
        ("reproduce.met", "run"),
        ("reproduce.met", "eval/loss <= 100"),
        ("reproduce.met", "eval/accuracy >= 0"),
        ("reproduce.missed", "run"),
        ("reproduce.missed", "eval/loss <= 100"),
        ("reproduce.missed", "eval/accuracy >= 1.01"),
    }
    failed = [key for key, case in cases.items() if case.find("failure") is not None]
    assert failed == [("reproduce.missed", "eval/accuracy >= 1.01")]
    message = cases[failed[0]].find("failure").get("message")  # type: ignore[union-attr]
    assert message.startswith("eval/accuracy = ") and message.endswith("outside the band >= 1.01")
    assert float(cases[("reproduce.met", "run")].get("time")) > 0  # type: ignore[arg-type]
    assert "final:" in (cases[("reproduce.met", "run")].findtext("system-out") or "")


@pytest.mark.slow
def test_all_met_exits_0(recipes: dict[str, Path], tmp_path: Path) -> None:
    done = run_cli("reproduce", str(recipes["met"]), "--set", "train.max_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    made = list(tmp_path.glob("reproduce-*/met/final_metrics.json"))  # the default --output: a new folder here
    assert len(made) == 1


def _bad_cases(recipes: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "taken" / "met").mkdir(parents=True)
    (tmp / "a-file").write_text("x")
    broken = tmp / "broken.yaml"
    broken.write_text(recipes["met"].read_text().replace(str(recipes["met"].parent / "dev.tsv"), "/nope/dev.tsv"))
    return [
        ([str(tmp / "nope.yaml")], "does not exist"),
        ([str(recipes["met"]), "--junit", str(tmp)], f"--junit {tmp}: is a directory"),
        ([str(recipes["bare"])], "no expect: bands to check"),
        ([str(recipes["met"]), "--set", "output_dir=x"], "--set output_dir: reproduce gives each recipe"),
        ([str(recipes["met"]), "--set", "train.max_stpes=3"], "max_stpes"),
        ([str(recipes["met"]), "--output", str(tmp / "a-file")], "is a file"),
        ([str(recipes["met"]), "--output", str(tmp / "taken")], "already exists"),
        ([str(broken)], "data.files.validation: /nope/dev.tsv does not exist"),
        ([], "Missing argument"),
    ]


def test_bad_input(recipes: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in _bad_cases(recipes, tmp_path):
        before = sorted(tmp_path.rglob("*"))
        output = [] if "--output" in args else ["--output", str(tmp_path / "new")]
        code, out, err = run_cli_in_process(capsys, "reproduce", *args, *output)
        assert code == 2, (args, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert sorted(tmp_path.rglob("*")) == before and not (tmp_path / "new").exists(), args


@pytest.mark.slow
def test_a_run_that_fails_is_an_error_and_its_bands_are_skipped(recipes: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "dev.tsv"
    bad.write_text("sentence\tlabel\nThe list returns a value.\t\n", encoding="utf-8")  # an empty label
    recipe = recipes["met"].read_text().replace(str(recipes["met"].parent / "dev.tsv"), str(bad))
    path = tmp_path / "badrow.yaml"
    path.write_text(recipe, encoding="utf-8")
    junit = tmp_path / "junit.xml"
    done = run_cli("reproduce", str(path), "--junit", str(junit), "--output", str(tmp_path / "runs"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED (exit 2)" in done.stdout
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    error = cases["run"].find("error")
    assert error is not None and "exited 2 without final metrics" in error.get("message", "")
    assert "label" in (error.text or "")  # the run's own one-line error, for the CI page
    assert all(cases[name].find("skipped") is not None for name in cases if name != "run")
