"""llmtune vs the stock Hugging Face `transformers.Trainer`: the same GPT-2 pretraining work, in one run.

Both sides train the same from-scratch GPT-2 (`--model-config`, vocabulary from the same trained tokenizer, same
seed so the same initial weights) on exactly the same packed blocks, with the same batch size, number of steps,
AdamW (fused), learning rate, cosine schedule with warmup, weight decay, gradient clipping (1.0), dropout (as in
the config), fp32 and no evaluation while timed. The runs alternate, llmtune first (A B A B ...), `--repeats`
times each, so drift of the machine hits both sides. Every run is its own subprocess (benchmarks/harness.py):

* llmtune: `llmtune pretrain RECIPE --set output_dir=...` through `llmtune.cli.main`; its figures are read from
  its run directory (metrics.jsonl, environment.json, final_metrics.json).
* Trainer: the recipe is read with `llmtune.recipe.load_recipe` and the data is made with llmtune's own task,
  `load_raw`, `build_tokenizer` and `prepare` in the order llmtune's training uses, so it is the very cache
  directory llmtune trains on (checked); model, optimizer, schedule and loop are plain transformers.

Measurements:

* tokens/s, steady state: the first `--window` steps (allocator and cache warm-up, compilation) are left out.
  llmtune: the cumulative `train/tokens` and `train/seconds` of its metrics.jsonl (training time only, logged
  every `train.log_every` = `--window` steps), last record minus the first. Trainer: a callback's
  `perf_counter()` at every `on_step_end` and a counting collator; the tokens of steps window+1..steps over the
  time from the end of step `window` to the end of the last step.
* peak RSS: each child's own `getrusage(RUSAGE_SELF).ru_maxrss` over its whole life (imports, data, training and,
  for llmtune, the final evaluation and save). At train end: llmtune's last training record's
  `train/peak_rss_mib`; the Trainer child's own peak right after `train()`.

Run `python benchmarks/bench_causal_lm.py --help` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import harness
from harness import LLMTUNE, ROOT, TRAINER, BenchError, Column, Run

DATASETS = {"tinyshakespeare": ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"}


# --- children ---------------------------------------------------------------------------------------------


def stock_model(recipe: Any, task: Any, tokenizer: Any, overrides: dict[str, Any]) -> Any:
    """The from-scratch GPT-2 with plain transformers: the config file, the tokenizer's vocabulary and special ids."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    keys = json.loads(Path(str(recipe.model.from_scratch)).read_text(encoding="utf-8"))
    config = AutoConfig.for_model(
        keys.pop("model_type"),
        **keys,
        **overrides,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def trainer_mode(rest: list[str]) -> dict[str, Any]:
    """Child mode [RECIPE OUTPUT_DIR WINDOW]: train the recipe's model with the stock `Trainer`; its figures."""
    import torch
    from transformers import Trainer

    from llmtune.recipe import load_recipe

    recipe_path, output_dir, window = rest[0], rest[1], int(rest[2])
    recipe = load_recipe(recipe_path)
    data = harness.llmtune_data(recipe, stock_model)
    model = data.model

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # What llmtune feeds its model: the block as inputs and as labels (the model shifts them).
        ids = torch.stack([row["input_ids"] for row in rows])
        return {"input_ids": ids, "labels": ids}

    counter = harness.CountingCollator(collate)
    clock = harness.step_clock(sync_steps=[window])
    args = harness.trainer_arguments(recipe, output_dir)
    trainer = Trainer(
        model=model, args=args, train_dataset=data.prepared.splits["train"], data_collator=counter, callbacks=[clock]
    )
    result = trainer.train()
    train_end_rss = harness.max_rss_mib()
    steady, whole = harness.trainer_span(clock, counter, skip=window), harness.trainer_span(clock, counter)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {
        **data.facts(),
        "steps": len(clock.ends),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": steady.rate("tokens"),
        "measured_tokens": steady.tokens,
        "measured_seconds": steady.seconds,
        "total_tokens": whole.tokens,
        "step_seconds": [round(b - a, 4) for a, b in zip(clock.ends, clock.ends[1:], strict=False)],
        "train_seconds": result.metrics["train_runtime"],
        "mean_train_loss": result.training_loss,
        "optimizer": type(optimizer).__name__,
        "fused": bool(optimizer.param_groups[0].get("fused")),
        "device": str(trainer.args.device),
        "train_end_rss_mib": train_end_rss,
    }


# --- parent -----------------------------------------------------------------------------------------------


def data_section(choice: str) -> tuple[dict[str, Any], str]:
    """The recipe's `data:` source keys for `--data`, and a one-line description."""
    if choice == "auto":
        choice = "tinyshakespeare" if DATASETS["tinyshakespeare"].is_file() else "pydoc"
    if choice == "pydoc":
        return {"source": "builtin:pydoc"}, "builtin:pydoc (CPython pydoc_data.topics, PSF License)"
    path = DATASETS.get(choice, Path(choice)).expanduser().resolve()
    if not path.is_file():
        raise BenchError(f"--data {choice}: {path} does not exist (use pydoc, which is on every machine)")
    return {"files": {"train": str(path)}}, f"{path} (read in place)"


def write_recipe(args: argparse.Namespace, path: Path) -> str:
    """Write the benchmark recipe both sides read; return a description of the data."""
    import yaml

    data, described = data_section(args.data)
    model_config = Path(args.model_config).resolve()
    if not model_config.is_file():
        raise BenchError(f"--model-config {args.model_config}: no such file")
    recipe: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"from_scratch": str(model_config)},
        "tokenizer": {"train": {"kind": "byte-level-bpe", "vocab_size": args.vocab_size}},
        "data": {**data, "block_size": args.block_size, "validation_fraction": 0.05},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "grad_accum": 1,
            "lr": args.lr,
            "weight_decay": 0.1,
            "optimizer": {"kind": "adamw", "fused": True},
            "schedule": {"kind": "cosine", "warmup_steps": args.warmup_steps},
            "max_grad_norm": 1.0,
            "precision": "no",
            "compile": args.compile,
            "fast_kernels": not args.no_fast_kernels,  # llmtune's default; the Trainer side ignores it
            "seed": args.seed,
            "log_every": args.window,
            "num_workers": 0,
        },
        "output_dir": str(path.parent / "llmtune-run"),
    }
    if args.cache_dir:
        recipe["data"]["cache_dir"] = str(Path(args.cache_dir).resolve())
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return described


def tokens_per_step(num_blocks: int, batch_size: int, block_size: int, steps: int) -> list[int]:
    """Tokens in each of `steps` optimizer steps over a shuffled loader that keeps the short last batch.

    Both loops iterate a `DataLoader(shuffle=True, drop_last=False)` over `num_blocks` blocks of `block_size`
    tokens (one micro-batch per step), so every epoch ends with a batch of `num_blocks % batch_size` blocks
    when that is not zero.
    """
    per_epoch = [batch_size] * (num_blocks // batch_size)
    if num_blocks % batch_size:
        per_epoch.append(num_blocks % batch_size)
    return [per_epoch[i % len(per_epoch)] * block_size for i in range(steps)]


@dataclass
class Bench:
    """The parent: one recipe, the runs of both sides, and their checks."""

    args: argparse.Namespace
    children: harness.Children

    @property
    def work(self) -> Path:
        """The work directory: recipe, run directories, logs."""
        return self.children.work

    @property
    def recipe(self) -> Path:
        """The recipe both sides read."""
        return self.work / "recipe.yaml"

    def run_llmtune(self, repeat: int) -> Run:
        """One llmtune run; tokens/s from its metrics.jsonl windows after the first."""
        args = self.args
        run_dir = self.work / f"llmtune-{repeat}"
        cli = ["pretrain", str(self.recipe), "--overwrite", "--set", f"output_dir={run_dir}"]
        info = self.children.run("llmtune", cli, f"llmtune-{repeat}")
        run = harness.LlmtuneRun.read(run_dir)
        if run.steps != list(range(args.window, args.steps + 1, args.window)):
            raise BenchError(f"llmtune logged steps {run.steps}; expected every {args.window}")
        steady = run.span(skip=1)
        return Run(
            LLMTUNE,
            repeat,
            rate=steady.rate("tokens"),
            peak_rss_mib=info["max_rss_mib"],
            train_end_rss_mib=run.train_end_rss_mib,
            wall_s=info["wall_s"],
            other_cpu_pct=info["other_cpu_pct"],
            figures={
                "run_dir": str(run_dir),
                "parameters": run.parameters["total"],
                "total_tokens": run.span().tokens,
                "measured_tokens": steady.tokens,
                "measured_seconds": steady.seconds,
                "mean_train_loss": run.mean_loss,
                "window_tokens_per_s": [round(r["train/tokens_per_s"], 1) for r in run.train],
                "device": run.environment.get("device"),
                "flops": run.environment.get("flops"),
                "torch_threads": run.environment.get("torch_threads"),
                "cuda_peak_mib": info["cuda_peak_mib"],
            },
        )

    def run_trainer(self, repeat: int) -> Run:
        """One stock `transformers.Trainer` run."""
        rest = [str(self.recipe), str(self.work / f"trainer-{repeat}"), str(self.args.window)]
        info = self.children.run("trainer", rest, f"trainer-{repeat}")
        return Run(
            TRAINER,
            repeat,
            rate=info["tokens_per_s"],
            peak_rss_mib=info["max_rss_mib"],
            train_end_rss_mib=info["train_end_rss_mib"],
            wall_s=info["wall_s"],
            other_cpu_pct=info["other_cpu_pct"],
            figures={k: v for k, v in info.items() if k not in ("tokens_per_s", "max_rss_mib", "train_end_rss_mib")},
        )

    def check(self, runs: list[Run], prepared: dict[str, Any]) -> None:
        """Refuse to report a ratio unless both sides trained on the same blocks with the same model size."""
        args = self.args
        self.children.check_llmtune_runs(runs)
        harness.require_same(runs, "cache_dir", "the tokenised-data caches", prepared["cache_dir"])
        harness.require_same(runs, "data_counts", "the prepared data's counts", prepared["data_counts"])
        harness.require_same(runs, "parameters", "the models' parameter counts")
        expected = sum(tokens_per_step(prepared["train_rows"], args.batch_size, args.block_size, args.steps))
        harness.require_same(runs, "total_tokens", "the tokens trained on", expected)
        harness.require_same([r for r in runs if r.side == TRAINER], "steps", "the Trainer's steps", args.steps)


def mfu(run: Run, flops: dict[str, Any], block_size: int) -> float:
    """The run's model FLOPs utilisation: tokens/s x (6N + 12 L d T) / peak, with llmtune's N, L, d and peak
    (environment.json `flops`; llmtune/flops.py), the same for both sides since the model is the same."""
    per_token = 6 * flops["N"] + 12 * flops["L"] * flops["d"] * block_size
    return run.rate * per_token / (flops["peak"]["tflops"] * 1e12)


def report(runs: list[Run], header: list[str], block_size: int) -> str:
    """The printed table: each run, each side's median, and the llmtune / Trainer ratios."""
    flops = next(r.figures["flops"] for r in runs if r.side == LLMTUNE)
    for run in runs:
        run.figures["mfu"] = mfu(run, flops, block_size)
    columns = [
        Column("run", 12, left=True),
        Column("tokens/s", 10, ".1f"),
        Column("MFU %", 7, ".2f"),
        Column("peak RSS MiB", 13, ".1f"),
        Column("at train end", 13, ".1f"),
        Column("wall s", 8, ".1f"),
        Column("mean loss", 10, ".4f"),
        Column("other CPU %", 12, ".1f"),
    ]
    rows = [
        [
            r.name,
            r.rate,
            100 * r.figures["mfu"],
            r.peak_rss_mib,
            r.train_end_rss_mib,
            r.wall_s,
            r.figures["mean_train_loss"],
        ]
        for r in runs
    ]
    rows = [[*row, run.other_cpu_pct] for row, run in zip(rows, runs, strict=True)]
    lines = [*header, "", *harness.table(columns, rows), ""]
    sides = {side: [r for r in runs if r.side == side] for side in (LLMTUNE, TRAINER)}
    for side, mine in sides.items():
        tps, rss = [r.rate for r in mine], [r.peak_rss_mib for r in mine]
        side_mfu = 100 * (harness.median(mine, lambda r: r.figures["mfu"]) or 0.0)
        side_rss = harness.median(mine, lambda r: r.peak_rss_mib) or 0.0
        lines.append(
            f"median {side:<8} tokens/s {harness.median(mine, lambda r: r.rate):>8.1f} (min {min(tps):.1f}, "
            f"max {max(tps):.1f}) | MFU {side_mfu:.2f}% | peak RSS {side_rss:>7.1f} MiB "
            f"(min {min(rss):.1f}, max {max(rss):.1f})"
        )
    a, b = sides[LLMTUNE], sides[TRAINER]
    tps_ratio = harness.ratio(harness.median(a, lambda r: r.rate), harness.median(b, lambda r: r.rate))
    rss_ratio = harness.ratio(harness.median(a, lambda r: r.peak_rss_mib), harness.median(b, lambda r: r.peak_rss_mib))
    line = f"ratio llmtune / Trainer: tokens/s {tps_ratio:.3f} | peak RSS {rss_ratio:.3f}"
    mine, theirs = (harness.median(s, lambda r: r.train_end_rss_mib) for s in (a, b))
    if mine is not None and theirs is not None:
        line += f" | peak RSS at train end {mine / theirs:.3f} ({mine:.1f} / {theirs:.1f} MiB)"
    lines.append(line)
    lines.append(
        f"MFU = tokens/s x (6N + 12 L d T) / peak: N {flops['N']:,}, L {flops['L']}, d {flops['d']}, T {block_size}; "
        f"peak {flops['peak']['tflops']:g} TFLOP/s ({flops['peak']['source']})"
    )
    mine, theirs = (harness.median(s, lambda r: r.figures.get("cuda_peak_mib")) for s in (a, b))
    if mine is not None and theirs is not None:
        lines.append(f"median CUDA peak allocated: llmtune {mine:.1f} / Trainer {theirs:.1f} MiB = {mine / theirs:.3f}")
    warning = harness.contention_warning(runs)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(
        description="llmtune vs transformers.Trainer on the same GPT-2 pretraining work (alternating runs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=60, help="Optimizer steps per run.")
    parser.add_argument("--batch-size", type=int, default=16, help="Blocks per step.")
    parser.add_argument("--block-size", type=int, default=128, help="Tokens per block.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each side, alternating llmtune first.")
    parser.add_argument(
        "--window", type=int, default=10, help="llmtune's log_every; the first window is warm-up, not measured."
    )
    parser.add_argument("--compile", action="store_true", help="train.compile=true / torch_compile=True.")
    parser.add_argument(
        "--no-fast-kernels",
        action="store_true",
        help="llmtune with train.fast_kernels=false (the model's own kernels, as the Trainer runs it).",
    )
    parser.add_argument(
        "--data",
        default="auto",
        help="auto (tinyshakespeare from ../shared/data if present, else pydoc), pydoc, tinyshakespeare, or a "
        ".txt/.jsonl/.csv/.parquet file (read in place).",
    )
    parser.add_argument("--vocab-size", type=int, default=4096, help="Byte-level BPE vocabulary trained on the data.")
    parser.add_argument(
        "--model-config", default=str(ROOT / "configs" / "models" / "gpt2-tiny.json"), help="From-scratch config."
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate.")
    parser.add_argument("--warmup-steps", type=int, default=10, help="Linear warmup steps of the cosine schedule.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of both sides (initial weights, dropout).")
    parser.add_argument("--cache-dir", default=None, help="llmtune data cache (default $LLMTUNE_CACHE or ~/.cache).")
    harness.add_parent_options(
        parser,
        ROOT / "runs" / "bench-causal-lm",
        timeout=600,
        quiet_wait=60,
        quiet_help="Before each run, wait up to this many seconds for other processes to leave the CPUs idle (0: no).",
    )
    args = parser.parse_args(argv)
    if args.window < 1 or args.steps % args.window or args.steps < 2 * args.window:
        parser.error("--steps must be a multiple of --window and at least two windows")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the parent benchmark, or one of the child modes this file re-invokes itself in."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [harness.CHILD]:
        modes = harness.child_modes(trainer=trainer_mode, prepare=harness.prepare_mode(stock_model))
        return harness.child_main(argv, modes)

    args = parse_args(argv)
    started = time.perf_counter()
    children = harness.Children(__file__, args)
    bench, work, source = Bench(args, children), children.work, children.source
    done: list[Run] = []

    def progress(run: Run) -> None:
        done.append(run)
        other = "" if run.other_cpu_pct is None else f", other processes {run.other_cpu_pct:.0f}% CPU"
        print(
            f"[{len(done)}/{2 * args.repeats}] {run.name}: {run.rate:.1f} tokens/s, "
            f"peak RSS {run.peak_rss_mib:.1f} MiB, {run.wall_s:.1f}s{other}",
            file=sys.stderr,
            flush=True,
        )

    try:
        described = write_recipe(args, bench.recipe)
        print(f"preparing data and tokenizer (untimed) for {described} ...", file=sys.stderr, flush=True)
        prepared = bench.children.run("prepare", [str(bench.recipe)], "prepare")
        sides = [(LLMTUNE, bench.run_llmtune), (TRAINER, bench.run_trainer)]
        runs = harness.alternate(args.repeats, sides, args.quiet_wait, progress)
        bench.check(runs, prepared)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    import torch  # only for the header's versions

    first = runs[0].figures
    measured = args.steps - args.window
    header = [
        f"llmtune vs transformers.Trainer: causal-LM pretraining, {args.repeats} alternating runs each",
        f"llmtune {source.version}, imported from {source.path}",
        f"data: {described}; {prepared['train_rows']:,} train blocks of {args.block_size} tokens "
        f"(cache {prepared['cache_dir']})",
        f"model: {Path(args.model_config).name}, vocab {prepared['vocab']}, {first['parameters']:,} parameters",
        f"batch {args.batch_size} x {args.block_size} tokens, {args.steps} steps, tokens/s over steps "
        f"{args.window + 1}-{args.steps} ({measured} steps), AdamW fused lr {args.lr:g} cosine warmup "
        f"{args.warmup_steps}, clip 1.0, fp32, compile {'on' if args.compile else 'off'}, llmtune fast_kernels "
        f"{'off' if args.no_fast_kernels else 'on'}",
        f"device {first['device']}, torch {torch.__version__} threads {first['torch_threads']}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs",
        "peak RSS = the child process's own ru_maxrss over its life (imports + data + training"
        " [+ llmtune's final eval and save]); at train end: llmtune's last train/peak_rss_mib, the Trainer's"
        " after train()",
    ]
    print(report(runs, header, args.block_size))
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f}s; logs and runs in {work}")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        harness.write_json(
            args.json,
            {"args": settings, "llmtune": source.version, "prepared": prepared, "runs": [asdict(r) for r in runs]},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
