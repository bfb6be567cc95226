"""Packing for causal SFT: chat tuning with `instruction.pack` on and off, tokens/s of each.

The data: `--conversations` two-turn chats (a user utterance and the reply that follows it, consecutive pairs of
utterances of each dialogue) from DailyDialog's train split in `../shared/data/dailydialog`, and 200 from its
validation split, written as JSON lines `{"messages": [...]}` under the work directory. The model: a from-scratch
GPT-2 (`--model-config`, default configs/models/gpt2-tiny.json, 4 x 256) with a byte-level BPE tokenizer trained
on the chats. Both sides run the same recipe for one epoch with the same rows per batch; one packs the training
examples into rows of up to `--max-length` tokens (`instruction.pack: true`), the other pads each batch of
length-grouped examples to its longest. Each run is its own process (benchmarks/harness.py), alternating.

Measured per run: **example tokens/s**, the tokens of the training examples (the prepared data's `train_tokens`,
the same for both sides; padding not counted) over llmtune's training seconds (`train/seconds` of the last
record: training steps only); **fed tokens/s**, what the model was fed, padding included (`train/tokens`); the
optimizer steps; the validation loss at the end (evaluation is never packed, so it is comparable).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import harness
from harness import ROOT, BenchError, Column, Run

DAILYDIALOG = ROOT.parent / "shared" / "data" / "dailydialog"
SIDES = ("packed", "unpacked")


def chats(path: Path, limit: int) -> list[dict[str, Any]]:
    """Two-turn chats from a DailyDialog file (utterances separated by `__eou__`): consecutive pairs."""
    out: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        turns = [t.strip() for t in line.split("__eou__") if t.strip()]
        for first, second in zip(turns[::2], turns[1::2], strict=False):
            out.append({"messages": [{"role": "user", "content": first}, {"role": "assistant", "content": second}]})
            if len(out) == limit:
                return out
    return out


def write_data(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """train.jsonl and valid.jsonl under `work`."""
    files = {}
    for role, name, limit in (
        ("train", "dialogues_train.txt", args.conversations),
        ("validation", "dialogues_validation.txt", 200),
    ):
        rows = chats(args.dailydialog / name, limit)
        path = work / f"{role}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files[role] = path
    return files


def write_recipe(args: argparse.Namespace, work: Path, files: dict[str, Path], pack: bool) -> Path:
    """The recipe of one side (they differ in `instruction.pack` only)."""
    import yaml

    recipe = {
        "task": "causal-lm",
        "model": {"from_scratch": str(Path(args.model_config).resolve())},
        "tokenizer": {"train": {"kind": "byte-level-bpe", "vocab_size": args.vocab_size}},
        "data": {
            "files": {role: str(path) for role, path in files.items()},
            "messages_column": "messages",
            "max_length": args.max_length,
            "cache_dir": str(work / "cache"),
        },
        "instruction": {"pack": pack},
        "train": {
            "epochs": 1,
            "batch_size": args.batch_size,
            "lr": 1e-3,
            "schedule": {"kind": "cosine", "warmup_steps": 5},
            "seed": args.seed,
            "log_every": 5,
        },
        "output_dir": str(work / "unused"),
    }
    path = work / f"recipe-{'packed' if pack else 'unpacked'}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_side(children: harness.Children, side: str, recipe: Path, repeat: int) -> Run:
    """One llmtune run through its CLI; figures from its run directory."""
    run_dir = children.work / f"{side}-{repeat}"
    info = children.run(
        "llmtune", ["finetune", str(recipe), "--overwrite", "--set", f"output_dir={run_dir}"], run_dir.name
    )
    if info.get("exit_code"):
        raise BenchError(f"{run_dir.name} failed; see {children.work / (run_dir.name + '.log')}")
    run = harness.LlmtuneRun.read(run_dir)
    last = run.train[-1]
    example_tokens = int(run.data["train_tokens"])
    seconds = float(last["train/seconds"])
    return Run(
        side,
        repeat,
        rate=example_tokens / seconds,
        peak_rss_mib=info["max_rss_mib"],
        train_end_rss_mib=run.train_end_rss_mib,
        wall_s=info["wall_s"],
        other_cpu_pct=info["other_cpu_pct"],
        figures={
            "fed_tokens_per_s": float(last["train/tokens"]) / seconds,
            "example_tokens": example_tokens,
            "fed_tokens": int(last["train/tokens"]),
            "examples": int(run.data["train_examples"]),
            "rows": int(run.data.get("train_packed_rows", run.data["train_examples"])),
            "steps": int(last["step"]),
            "train_seconds": seconds,
            "eval_loss": float(run.final_metrics["eval/loss"]),
        },
    )


def report(args: argparse.Namespace, runs: list[Run]) -> str:
    """Per side medians, then packed / unpacked."""
    columns = [
        Column("side", 9, left=True),
        Column("rows", 6, ","),
        Column("steps", 6, ","),
        Column("ex tok/s", 9, ".0f"),
        Column("fed tok/s", 10, ".0f"),
        Column("train s", 8, ".1f"),
        Column("eval loss", 10, ".4f"),
    ]
    medians: dict[str, dict[str, float]] = {}
    for side in SIDES:
        mine = [r for r in runs if r.side == side]
        medians[side] = {
            "rate": harness.median(mine, lambda r: r.rate) or 0.0,
            **{
                k: harness.median(mine, lambda r, k=k: r.figures[k]) or 0.0
                for k in ("rows", "steps", "fed_tokens_per_s", "train_seconds", "eval_loss")
            },
        }
    rows = [
        [s, int(m["rows"]), int(m["steps"]), m["rate"], m["fed_tokens_per_s"], m["train_seconds"], m["eval_loss"]]
        for s, m in medians.items()
    ]
    first = runs[0].figures
    lines = [
        f"\nchat SFT on DailyDialog: {first['examples']:,} two-turn chats ({first['example_tokens']:,} tokens), "
        f"{Path(args.model_config).name}, max_length {args.max_length}, batch {args.batch_size} rows, 1 epoch; "
        f"medians over {args.repeats} run(s)",
        *harness.table(columns, rows),
        "",
        f"packed / unpacked example tokens/s: {medians['packed']['rate'] / medians['unpacked']['rate']:.2f}x; "
        f"eval loss {medians['packed']['eval_loss']:.4f} vs {medians['unpacked']['eval_loss']:.4f}",
    ]
    warning = harness.contention_warning(runs)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--conversations", type=int, default=3000, help="Two-turn training chats (DailyDialog train).")
    parser.add_argument(
        "--max-length", type=int, default=256, help="data.max_length: truncation and packed row length."
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per batch, both sides.")
    parser.add_argument("--model-config", default=str(ROOT / "configs" / "models" / "gpt2-tiny.json"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dailydialog", type=Path, default=DAILYDIALOG, help="Folder with dialogues_train.txt.")
    harness.add_parent_options(
        parser,
        ROOT / "runs" / "bench-sft-packing",
        timeout=3600,
        quiet_wait=0,
        quiet_help="Wait up to this many seconds for an idle machine before each run.",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.conversations < 1:
        parser.error("--repeats and --conversations must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """As the parent: write data and recipes, alternate packed / unpacked runs, print the comparison."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [harness.CHILD]:
        return harness.child_main(argv, harness.child_modes())
    args = parse_args(argv)
    if not (args.dailydialog / "dialogues_train.txt").is_file():
        print(f"error: {args.dailydialog}: dialogues_train.txt not found; pass --dailydialog DIR", file=sys.stderr)
        return 1
    children = harness.Children(__file__, args)
    files = write_data(args, children.work)
    recipes = {side: write_recipe(args, children.work, files, side == "packed") for side in SIDES}

    def progress(run: Run) -> None:
        print(
            f"{run.side:8} run {run.repeat}: {run.rate:.0f} example tokens/s, {run.figures['steps']} steps, "
            f"eval loss {run.figures['eval_loss']:.4f}",
            flush=True,
        )

    try:
        sides = [(side, lambda repeat, s=side: run_side(children, s, recipes[s], repeat)) for side in SIDES]
        runs = harness.alternate(args.repeats, sides, args.quiet_wait, progress)
        harness.require_imported_from(children.infos, children.source)
        harness.require_same(runs, "example_tokens", "the training examples' tokens")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report(args, runs))
    if args.json:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        harness.write_json(args.json, {"options": options, "runs": [asdict(r) for r in runs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
