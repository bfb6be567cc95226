"""The GPU check: everything llmtune does only on a GPU, in a few minutes on one GPU, as one table (and JSON).

    python benchmarks/gpu_check.py [--json runs/gpu-check/gpu_check.json] [--steps 40] [--skip-bench]

Each row is one `llmtune pretrain` of the same small GPT-2 recipe (configs/models/gpt2-tiny.json, block 256,
batch 32, tinyshakespeare from ../shared/data if present, else the built-in pydoc corpus), its own process:

* bf16, fp16 (accelerate's loss scaler) and fp32, torch.compile off; bf16 with torch.compile on;
* FSDP (configs/accelerate/fsdp.yaml), DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/deepspeed-zero{2,3}.yaml)
  through `accelerate launch --config_file ... --num_processes 1`: world size 1 is enough to exercise the sharded
  checkpoint save, its load and the exact resume. Each of these trains 2N steps with a checkpoint at N and 2N;
  then a copy of the run with its last checkpoint and final model removed is resumed (`--resume`, from step N)
  and must end with the same final metrics and the same training losses after step N as the uninterrupted run;
* the Trainer comparison, benchmarks/bench_causal_lm.py (one run per side; its ratio and MFU).

Columns: tokens/s (llmtune's metrics.jsonl, windows after the first), MFU (its last `train/mfu`, against the
table peak of the card for the precision; llmtune/flops.py), final eval loss, resume (the largest relative
difference between the resumed and the uninterrupted run, for the sharded rows), seconds, and the status.
A row that fails keeps the tail of its log in the JSON and the table says FAIL; the exit code is then 1.
Without a GPU it stops at once with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINYSHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def require_gpu() -> str:
    """The GPU's name, or exit 2 with one line saying why nothing can run."""
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run this on a machine with "
            "an NVIDIA GPU and a CUDA build of torch",
            file=sys.stderr,
        )
        sys.exit(2)
    return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}"


def write_recipe(path: Path, steps: int) -> None:
    """The recipe every row trains (rows differ by --set overrides and the launcher)."""
    import yaml

    data: dict[str, Any] = (
        {"files": {"train": str(TINYSHAKESPEARE)}} if TINYSHAKESPEARE.is_file() else {"source": "builtin:pydoc"}
    )
    recipe = {
        "task": "causal-lm",
        "model": {"from_scratch": str(ROOT / "configs" / "models" / "gpt2-tiny.json")},
        "tokenizer": {"train": {"kind": "byte-level-bpe", "vocab_size": 4096}},
        "data": {**data, "block_size": 256, "validation_fraction": 0.05, "cache_dir": str(path.parent / "cache")},
        "train": {
            "max_steps": steps,
            "batch_size": 32,
            "lr": 1e-3,
            "weight_decay": 0.1,
            "schedule": {"kind": "cosine", "warmup_steps": 5},
            "max_grad_norm": 1.0,
            "log_every": 5,
            "eval_max_batches": 10,
            "seed": 42,
        },
        "output_dir": str(path.parent / "unused"),
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def run(command: list[str], log: Path, timeout: float) -> tuple[bool, float, str]:
    """Run `command` with its output in `log`: (succeeded, seconds, the log's tail)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as fh:
        try:
            done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
            ok = done.returncode == 0
        except subprocess.TimeoutExpired:
            fh.write(f"\ngpu_check: timed out after {timeout:.0f}s\n")
            ok = False
    tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    return ok, time.perf_counter() - started, tail


def figures(run_dir: Path) -> dict[str, Any]:
    """tokens/s after the first window, the last MFU, and the final metrics of a finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/seconds" in r]
    first, last = train[0], train[-1]
    seconds = last["train/seconds"] - first["train/seconds"]
    return {
        "tokens_per_s": (last["train/tokens"] - first["train/tokens"]) / seconds if seconds > 0 else None,
        "mfu": last.get("train/mfu"),
        "tflops": last.get("train/tflops"),
        "final": json.loads((run_dir / "final_metrics.json").read_text()),
        "losses": {r["step"]: r["train/loss"] for r in train},
        "peak": json.loads((run_dir / "environment.json").read_text()).get("flops", {}).get("peak"),
    }


def relative_difference(a: dict[Any, float], b: dict[Any, float]) -> float:
    """The largest relative difference between two records' shared values (inf when they share none)."""
    keys = [k for k in a if k in b and isinstance(a[k], int | float)]
    if not keys:
        return float("inf")
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in keys)


def resume_check(run_dir: Path, pretrain: list[str], steps: int, work: Path, timeout: float) -> dict[str, Any]:
    """Copy the finished run, drop what came after the checkpoint at steps/2, resume it; compare with the original."""
    copy = work / f"{run_dir.name}-resumed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy)
    sys.path.insert(0, str(ROOT))
    from llmtune.checkpoint import list_checkpoints

    half = steps // 2
    later = [path for step, path in list_checkpoints(copy / "checkpoints") if step > half]
    for target in [copy / "final", copy / "checkpoints" / "best", *later]:
        shutil.rmtree(target, ignore_errors=True)
    (copy / "final_metrics.json").unlink(missing_ok=True)
    ok, seconds, tail = run([*pretrain, "--resume", "--set", f"output_dir={copy}"], work / f"{copy.name}.log", timeout)
    if not ok:
        return {"ok": False, "seconds": seconds, "log_tail": tail}
    if f"(step {half})" not in (work / f"{copy.name}.log").read_text(encoding="utf-8"):  # "resumed from DIR (step N)"
        return {"ok": False, "seconds": seconds, "log_tail": tail, "note": f"did not resume from step {half}"}
    original, resumed = figures(run_dir), figures(copy)
    later = {k: v for k, v in original["losses"].items() if k > half}
    diff = max(relative_difference(original["final"], resumed["final"]), relative_difference(later, resumed["losses"]))
    return {"ok": diff <= 1e-4, "seconds": seconds, "max_relative_difference": diff}


def main(argv: list[str] | None = None) -> int:
    """Run every row, print the table, write the JSON; 1 when a row failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run (even).")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "gpu-check"), help="Runs, logs, recipe.")
    parser.add_argument("--json", default=None, help="Write the rows here (default WORKDIR/gpu_check.json).")
    parser.add_argument("--timeout", type=float, default=300, help="Seconds per child process.")
    parser.add_argument("--skip-bench", action="store_true", help="Leave out the Trainer comparison.")
    args = parser.parse_args(argv)
    device = require_gpu()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    steps = args.steps + args.steps % 2
    write_recipe(recipe, steps)
    pretrain = [sys.executable, "-m", "llmtune", "pretrain", str(recipe)]

    def launch(config: str) -> list[str]:
        accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        cfg = str(ROOT / "configs" / "accelerate" / config)
        return [*accelerate, cfg, "--num_processes", "1", "-m", "llmtune", "pretrain", str(recipe)]

    half = f"train.save_every={steps // 2}"
    plans: list[tuple[str, list[str], list[str], bool]] = [
        ("fp32", pretrain, ["train.precision=no"], False),
        ("bf16", pretrain, ["train.precision=bf16"], False),
        ("fp16 + scaler", pretrain, ["train.precision=fp16"], False),
        ("bf16 + compile", pretrain, ["train.precision=bf16", "train.compile=true"], False),
        ("fsdp bf16", launch("fsdp.yaml"), ["train.precision=bf16", half], True),
        ("deepspeed zero2 bf16", launch("deepspeed-zero2.yaml"), ["train.precision=bf16", half], True),
        ("deepspeed zero3 bf16", launch("deepspeed-zero3.yaml"), ["train.precision=bf16", half], True),
    ]
    try:
        import deepspeed  # noqa: F401

        has_deepspeed = True
    except ImportError:
        has_deepspeed = False
    rows: list[dict[str, Any]] = []
    for name, command, sets, resumable in plans:
        slug = name.replace(" + ", "-").replace(" ", "-")
        row: dict[str, Any] = {"name": name}
        rows.append(row)
        if name.startswith("deepspeed") and not has_deepspeed:
            row.update(status="skipped", note="deepspeed not installed: pip install deepspeed")
            print(f"{name}: deepspeed not installed: pip install deepspeed", flush=True)
            continue
        run_dir = work / slug
        overrides = [x for s in sets for x in ("--set", s)]
        where = ["--set", f"output_dir={run_dir}", "--overwrite"]
        ok, seconds, tail = run([*command, *overrides, *where], work / f"{slug}.log", args.timeout)
        row["seconds"] = seconds
        if not ok:
            row.update(status="FAIL", log_tail=tail)
            print(f"{name}: FAIL after {seconds:.0f}s (log {work / f'{slug}.log'})", flush=True)
            continue
        found = figures(run_dir)
        row.update(status="ok", **{k: v for k, v in found.items() if k != "losses"})
        if resumable:
            check = resume_check(run_dir, [*command, *overrides], steps, work, args.timeout)
            row["resume"] = check
            row["status"] = "ok" if check["ok"] else "FAIL (resume)"
        print(f"{name}: {row['status']} in {seconds:.0f}s", flush=True)
    if not args.skip_bench:
        rows.append(bench_row(work, args.timeout))
    print_table(device, rows)
    out = Path(args.json) if args.json else work / "gpu_check.json"
    out.write_text(json.dumps({"device": device, "steps": steps, "rows": rows}, indent=1), encoding="utf-8")
    print(f"\nrows written to {out}")
    return 1 if any(r["status"].startswith("FAIL") for r in rows) else 0


def bench_row(work: Path, timeout: float) -> dict[str, Any]:
    """benchmarks/bench_causal_lm.py with one run per side: its ratio and the MFU of each side."""
    out = work / "bench_causal_lm.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_causal_lm.py"), "--repeats", "1", "--quiet-wait", "0"]
    command += ["--workdir", str(work / "bench-causal-lm"), "--json", str(out)]
    ok, seconds, tail = run(command, work / "bench_causal_lm.log", 4 * timeout)
    row: dict[str, Any] = {"name": "bench_causal_lm (fp32)", "seconds": seconds}
    if not ok:
        row.update(status="FAIL", log_tail=tail)
        return row
    runs = json.loads(out.read_text())["runs"]
    rate = {r["side"]: r["rate"] for r in runs}
    mfu = {r["side"]: r["figures"].get("mfu") for r in runs}
    sides = sorted(rate)
    row.update(
        status="ok",
        tokens_per_s=rate.get(sides[0]),
        mfu=mfu.get(sides[0]),
        note=" | ".join(f"{s} {rate[s]:.0f} tok/s MFU {100 * (mfu[s] or 0):.2f}%" for s in sides)
        + (f" | ratio {rate[sides[0]] / rate[sides[1]]:.3f}" if len(sides) == 2 else ""),
    )
    return row


def print_table(device: str, rows: list[dict[str, Any]]) -> None:
    """One line per row."""
    print(f"\nGPU check on {device}")
    print(f"{'row':<24}{'status':<16}{'tokens/s':>10}{'MFU %':>8}{'eval loss':>11}{'resume':>10}{'s':>7}  note")
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        mfu = f"{100 * r['mfu']:.2f}" if r.get("mfu") is not None else "-"
        loss = f"{r['final']['eval/loss']:.4f}" if "final" in r else "-"
        resume = r.get("resume", {})
        diff = f"{resume['max_relative_difference']:.1e}" if "max_relative_difference" in resume else "-"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        print(f"{r['name']:<24}{r['status']:<16}{tps:>10}{mfu:>8}{loss:>11}{diff:>10}{secs:>7}  {r.get('note', '')}")


if __name__ == "__main__":
    sys.exit(main())
