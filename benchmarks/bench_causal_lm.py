"""llmtune vs the stock Hugging Face `transformers.Trainer`: the same GPT-2 pretraining work, in one run.

Both sides train the same from-scratch GPT-2 (`--model-config`, vocabulary from the same trained
tokenizer, same seed so the same initial weights) on exactly the same packed blocks, with the same
batch size, number of steps, AdamW (fused), learning rate, cosine schedule with warmup, weight decay,
gradient clipping (1.0), dropout (as in the config), fp32 and no evaluation while timed. The runs
alternate, llmtune first (A B A B ...), `--repeats` times each, so drift of the machine hits both sides.

Every measured run is its own subprocess (this file re-invoked in a child mode):

* llmtune: `llmtune.cli.main` with `sys.argv` set to `llmtune pretrain RECIPE --set output_dir=...`,
  exactly what the console script runs.
* Trainer: the recipe is read with `llmtune.recipe.load_recipe` and the data is made with llmtune's own
  `load_raw` / `build_tokenizer` / `CausalLM().prepare`, so it is the very cache directory llmtune
  trains on (the script checks that both name the same one); the model, optimizer, schedule and loop are
  plain transformers (`AutoModelForCausalLM.from_config`, `TrainingArguments`, `Trainer`).

Measurements:

* tokens/s, steady state: the first `--window` steps (compilation, allocator and cache warm-up) are
  left out. llmtune logs `train/tokens_per_s` every `train.log_every` (= `--window`) steps in
  metrics.jsonl; the windows after the first are combined as total tokens / total time. The Trainer
  side timestamps `on_step_end` with a `TrainerCallback` and divides the tokens of the same steps by the
  time between the end of step `--window` and the end of the last step. llmtune's final evaluation and
  model save come after the last window and so are not in its figure.
* peak memory: each child writes its own `resource.getrusage(RUSAGE_SELF).ru_maxrss` when it exits
  (`RUSAGE_CHILDREN` in the parent would be the maximum over all children so far, not per run). It is
  the peak resident set of the training process over its whole life: imports, data, training and, for
  llmtune, the final evaluation and save. Processes the child starts (torch.compile workers) are not in it.

Run `python benchmarks/bench_causal_lm.py --help` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DATASETS = {"tinyshakespeare": SHARED_DATA / "tinyshakespeare" / "input.txt"}
LLMTUNE, TRAINER = "llmtune", "Trainer"
OTHER_CPU_WARN = 10.0  # % of all cores used by other processes during a run before the table warns

_PREP_LINE = re.compile(r"data preparation: .*cache (?:hit|miss, saved) (?P<dir>[^\s)]+)")
_PARAMS_LINE = re.compile(r"model: \S+, (?P<n>[\d,]+) parameters")


# --- shared by parent and children -----------------------------------------------------------------------


def max_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cuda_peak_mib() -> float | None:
    """Peak CUDA memory allocated by this process's tensors, in MiB; None without a GPU (or torch not imported)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / (1024 * 1024)


def tokens_per_step(num_blocks: int, batch_size: int, block_size: int, steps: int) -> list[int]:
    """Tokens in each of `steps` optimizer steps over a shuffled loader that keeps the short last batch.

    Both loops iterate a `DataLoader(shuffle=True, drop_last=False)` over `num_blocks` blocks of
    `block_size` tokens (one micro-batch per step), so every epoch ends with a batch of
    `num_blocks % batch_size` blocks when that is not zero.
    """
    per_epoch = [batch_size] * (num_blocks // batch_size)
    if num_blocks % batch_size:
        per_epoch.append(num_blocks % batch_size)
    return [per_epoch[i % len(per_epoch)] * block_size for i in range(steps)]


def _write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=1), encoding="utf-8")


# --- child: llmtune ---------------------------------------------------------------------------------------


def child_llmtune(result_path: str, cli_args: list[str]) -> None:
    """Run `llmtune <cli_args>` in this process and write its exit code and peak RSS to `result_path`.

    The result is written in a `finally`, so it is there however the CLI ends (it always ends with
    `SystemExit`, raised by typer/click).
    """
    code: Any = 0
    started = time.perf_counter()
    train_peak: list[float] = []
    try:
        import llmtune.trainer
        from llmtune.cli import main

        # Instrumentation only (llmtune is not changed): the peak RSS when the final evaluation starts
        # is the peak of imports + data + training, comparable to the Trainer side, which never evaluates.
        original = getattr(llmtune.trainer, "evaluate", None)
        if callable(original):

            def evaluate(*args: Any, **kwargs: Any) -> Any:
                if not train_peak:
                    train_peak.append(max_rss_mib())
                return original(*args, **kwargs)

            llmtune.trainer.evaluate = evaluate

        sys.argv = ["llmtune", *cli_args]
        main()
    except SystemExit as exc:
        code = exc.code if exc.code is not None else 0
        raise
    except BaseException:
        code = "exception"
        raise
    finally:
        import torch

        import llmtune

        _write_json(
            result_path,
            {
                "llmtune_file": llmtune.__file__,
                "returncode": code,
                "max_rss_mib": max_rss_mib(),
                "train_max_rss_mib": train_peak[0] if train_peak else None,
                "cuda_peak_mib": cuda_peak_mib(),
                "seconds": time.perf_counter() - started,
                "torch_threads": torch.get_num_threads(),
            },
        )


# --- child: transformers.Trainer --------------------------------------------------------------------------


def _llmtune_data(recipe: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The tokenizer and prepared splits llmtune makes for `recipe`, through llmtune's own functions."""
    from llmtune.data import load_raw
    from llmtune.modeling import build_tokenizer
    from llmtune.tasks.causal_lm import CausalLM

    raw = load_raw(recipe.data)
    texts = raw.splits["train"][recipe.data.text_column]
    tokenizer, origin = build_tokenizer(
        recipe.tokenizer, recipe.model, lambda: iter(texts), raw.fingerprint, recipe.data.cache_dir
    )
    prepared = CausalLM().prepare(raw, tokenizer, recipe.data)
    match = re.match(r"(?:hit|miss, saved) (?P<dir>.+)", prepared.stats["cache"])
    import llmtune

    info = {
        "llmtune_file": llmtune.__file__,
        "cache_dir": match.group("dir") if match else prepared.stats["cache"],
        "tokenizer": origin,
        "vocab": len(tokenizer),
        "train_blocks": len(prepared.splits["train"]),
        "train_tokens": prepared.stats.get("train_tokens"),
        "validation_tokens": prepared.stats.get("validation_tokens"),
    }
    return tokenizer, prepared, info


def child_prepare(result_path: str, recipe_path: str) -> None:
    """Train/cache the tokenizer and tokenise the data once, untimed, so every measured run is a cache hit."""
    from llmtune.recipe import load_recipe

    _, _, info = _llmtune_data(load_recipe(recipe_path))
    _write_json(result_path, info)


def child_trainer(result_path: str, recipe_path: str, output_dir: str, window: int) -> None:
    """Train the recipe's model with the stock `transformers.Trainer` and write timings and peak RSS."""
    started = time.perf_counter()
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from llmtune.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    spec = recipe.train
    tokenizer, prepared, info = _llmtune_data(recipe)
    train_set = prepared.splits["train"]

    keys = json.loads(Path(str(recipe.model.from_scratch)).read_text(encoding="utf-8"))
    config = AutoConfig.for_model(
        keys.pop("model_type"),
        **keys,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    set_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # What llmtune feeds its model: the block as inputs and as labels (the model shifts them).
        ids = torch.stack([row["input_ids"] for row in rows])
        return {"input_ids": ids, "labels": ids}

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        """perf_counter() at the end of every optimizer step (the device is synchronised at the two ends)."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (window, args.max_steps):
                synchronize()
            self.ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.lr,
        weight_decay=spec.weight_decay,
        adam_beta1=spec.optimizer.betas[0],
        adam_beta2=spec.optimizer.betas[1],
        adam_epsilon=spec.optimizer.eps,
        optim="adamw_torch_fused",
        lr_scheduler_type=spec.schedule.kind,
        warmup_steps=spec.schedule.warmup_steps,
        max_grad_norm=spec.max_grad_norm or 0.0,
        seed=spec.seed,
        bf16=False,
        fp16=False,
        torch_compile=spec.compile,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=spec.max_steps,
        report_to=[],
        dataloader_num_workers=spec.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning means nothing without a GPU (and warns)
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate, callbacks=[clock])
    result = trainer.train()
    train_peak = max_rss_mib()

    steps = spec.max_steps
    per_step = tokens_per_step(len(train_set), spec.batch_size, recipe.data.block_size, steps)
    elapsed = clock.ends[steps - 1] - clock.ends[window - 1]
    _write_json(
        result_path,
        {
            **info,
            "returncode": 0,
            "steps": len(clock.ends),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": sum(per_step[window:]) / elapsed,
            "measured_tokens": sum(per_step[window:]),
            "measured_seconds": elapsed,
            "step_seconds": [round(b - a, 4) for a, b in zip(clock.ends, clock.ends[1:], strict=False)],
            "train_seconds": result.metrics["train_runtime"],
            "mean_train_loss": result.training_loss,
            "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
            "fused": bool(trainer.optimizer.param_groups[0].get("fused")),
            "device": str(trainer.args.device),
            "torch_threads": torch.get_num_threads(),
            "max_rss_mib": max_rss_mib(),
            "train_max_rss_mib": train_peak,
            "cuda_peak_mib": cuda_peak_mib(),
            "seconds": time.perf_counter() - started,
        },
    )


# --- parent -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured run of one side."""

    side: str
    repeat: int
    tokens_per_s: float
    max_rss_mib: float
    train_max_rss_mib: float | None  # peak RSS when training ended (before llmtune's final eval and save)
    wall_s: float
    mean_train_loss: float
    other_cpu_pct: float | None = None  # CPU other processes used during the run, % of all cores (Linux)
    extra: dict[str, Any] = field(default_factory=dict)


class BenchError(RuntimeError):
    """A child run failed or the two sides turned out not to do the same work."""


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
    recipe = {
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


def _busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(limit_s: float, sample_s: float = 2.0) -> float | None:
    """Wait (up to `limit_s`) until other processes use under OTHER_CPU_WARN % of the CPUs; return the last share.

    Only a start condition: work that starts during a run still shows in that run's `other CPU %`.
    """
    deadline, said = time.monotonic() + limit_s, False
    while True:
        before = _busy_seconds()
        if before is None:
            return None
        time.sleep(sample_s)
        after = _busy_seconds()
        share = ((after or before) - before) / (sample_s * (os.cpu_count() or 1)) * 100
        if share < OTHER_CPU_WARN or time.monotonic() >= deadline:
            return share
        if not said:
            print(f"  machine busy ({share:.0f}% CPU); waiting up to {limit_s:.0f}s", file=sys.stderr, flush=True)
            said = True


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative: only differences are used
    return usage.ru_utime + usage.ru_stime


def snapshot_llmtune(work: Path) -> tuple[Path, str]:
    """Copy the llmtune package into `work` so every run imports the same code; return its path and version.

    Without it, an edit to the working tree between runs would compare two different llmtunes
    (and, if the data cache key changed, train them on different caches).
    """
    target = work / "llmtune-src"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ROOT / "llmtune", target / "llmtune", ignore=shutil.ignore_patterns("__pycache__"))
    return target, _git_version()


def _git_version() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "llmtune"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return f"{head} + uncommitted changes in llmtune/" if dirty else head


def _child(mode: str, result: Path, rest: list[str], log: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run this file in a child mode; its stdout/stderr go to `log`; return its result JSON.

    The result also gets `other_cpu_pct`: the CPU time other processes on the machine used while the
    child ran (all busy CPU time from /proc/stat minus the child's own), as a share of all cores.
    """
    timeout = args.timeout
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.llmtune_path), env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(Path(__file__).resolve()), mode, str(result), *rest]
    busy, own, wall = _busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        try:
            done = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"{mode} child ran past --timeout {timeout:.0f}s; see {log}") from None
    wall = time.perf_counter() - wall
    busy_after = _busy_seconds()
    if done.returncode != 0 or not result.is_file():
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise BenchError(f"{mode} child exited with {done.returncode}; last lines of {log}:\n{tail}")
    info = json.loads(result.read_text(encoding="utf-8"))
    if busy is not None and busy_after is not None:
        others = (busy_after - busy) - (_children_cpu_seconds() - own)
        info["other_cpu_pct"] = max(others, 0.0) / (wall * (os.cpu_count() or 1)) * 100
    return info


def run_llmtune(args: argparse.Namespace, recipe: Path, work: Path, repeat: int) -> Run:
    """One llmtune run; tokens/s from metrics.jsonl windows after the first."""
    run_dir = work / f"llmtune-{repeat}"
    log = work / f"llmtune-{repeat}.log"
    cli = ["pretrain", str(recipe), "--overwrite", "--set", f"output_dir={run_dir}"]
    info = _child("_llmtune", work / f"llmtune-{repeat}.json", cli, log, args)
    text = log.read_text(encoding="utf-8")
    prep, params = _PREP_LINE.search(text), _PARAMS_LINE.search(text)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "train/tokens_per_s" in r]
    if [r["step"] for r in windows] != list(range(args.window, args.steps + 1, args.window)):
        raise BenchError(f"llmtune logged steps {[r['step'] for r in windows]}; expected every {args.window}")
    previous = {r["step"]: r["train/tokens"] for r in windows}
    measured = windows[1:]
    tokens = [r["train/tokens"] - previous[r["step"] - args.window] for r in measured]
    seconds = sum(t / r["train/tokens_per_s"] for t, r in zip(tokens, measured, strict=True))
    env = json.loads((run_dir / "environment.json").read_text())
    return Run(
        LLMTUNE,
        repeat,
        tokens_per_s=sum(tokens) / seconds,
        max_rss_mib=info["max_rss_mib"],
        train_max_rss_mib=info.get("train_max_rss_mib"),
        wall_s=info["seconds"],
        mean_train_loss=statistics.fmean(r["train/loss"] for r in windows),
        other_cpu_pct=info.get("other_cpu_pct"),
        extra={
            "cache_dir": prep.group("dir") if prep else None,
            "parameters": int(params.group("n").replace(",", "")) if params else None,
            "total_tokens": windows[-1]["train/tokens"],
            "measured_tokens": sum(tokens),
            "measured_seconds": seconds,
            "window_tokens_per_s": [round(r["train/tokens_per_s"], 1) for r in windows],
            "device": env.get("device"),
            "torch_threads": info["torch_threads"],
            "llmtune_file": info["llmtune_file"],
            "cuda_peak_mib": info.get("cuda_peak_mib"),
        },
    )


def run_trainer(args: argparse.Namespace, recipe: Path, work: Path, repeat: int) -> Run:
    """One stock `transformers.Trainer` run."""
    info = _child(
        "_trainer",
        work / f"trainer-{repeat}.json",
        [str(recipe), str(work / f"trainer-{repeat}"), str(args.window)],
        work / f"trainer-{repeat}.log",
        args,
    )
    keep = ("tokens_per_s", "max_rss_mib", "train_max_rss_mib", "seconds", "mean_train_loss", "other_cpu_pct")
    return Run(
        TRAINER,
        repeat,
        tokens_per_s=info["tokens_per_s"],
        max_rss_mib=info["max_rss_mib"],
        train_max_rss_mib=info.get("train_max_rss_mib"),
        wall_s=info["seconds"],
        mean_train_loss=info["mean_train_loss"],
        other_cpu_pct=info.get("other_cpu_pct"),
        extra={k: v for k, v in info.items() if k not in keep},
    )


def check_same_work(runs: list[Run], prepared: dict[str, Any], args: argparse.Namespace) -> None:
    """Refuse to report a ratio unless both sides trained on the same blocks with the same model size."""
    expected_tokens = sum(tokens_per_step(prepared["train_blocks"], args.batch_size, args.block_size, args.steps))
    for run in runs:
        if run.extra.get("cache_dir") != prepared["cache_dir"]:
            where = run.extra.get("cache_dir")
            raise BenchError(
                f"{run.side} #{run.repeat} trained on {where}, not {prepared['cache_dir']} (did llmtune's "
                "code change during the benchmark? run without --no-snapshot)"
            )
    for run in [*runs, prepared]:
        where = Path(run.extra["llmtune_file"] if isinstance(run, Run) else run["llmtune_file"]).resolve()
        if not where.is_relative_to(Path(args.llmtune_path).resolve()):
            raise BenchError(f"a run imported llmtune from {where}, not from {args.llmtune_path}")
    params = {run.extra.get("parameters") for run in runs}
    if len(params) != 1:
        raise BenchError(f"the two sides built models of different sizes: {sorted(map(str, params))}")
    for run in runs:
        if run.side == LLMTUNE and run.extra["total_tokens"] != expected_tokens:
            raise BenchError(f"llmtune counted {run.extra['total_tokens']} tokens, expected {expected_tokens}")
        if run.side == TRAINER and run.extra["steps"] != args.steps:
            raise BenchError(f"the Trainer ran {run.extra['steps']} steps, not {args.steps}")


def report(runs: list[Run], header: list[str]) -> str:
    """The printed table: each run, each side's median, and the llmtune / Trainer ratios."""
    lines = [*header, ""]
    lines.append(
        f"{'run':<12} {'tokens/s':>10} {'peak RSS MiB':>13} {'at train end':>13} {'wall s':>8} {'mean loss':>10} "
        f"{'other CPU %':>12}"
    )
    for run in runs:
        other = "n/a" if run.other_cpu_pct is None else f"{run.other_cpu_pct:.1f}"
        train = "n/a" if run.train_max_rss_mib is None else f"{run.train_max_rss_mib:.1f}"
        lines.append(
            f"{run.side + ' #' + str(run.repeat):<12} {run.tokens_per_s:>10.1f} {run.max_rss_mib:>13.1f} "
            f"{train:>13} {run.wall_s:>8.1f} {run.mean_train_loss:>10.4f} {other:>12}"
        )
    medians: dict[str, tuple[float, float]] = {}
    lines.append("")
    for side in (LLMTUNE, TRAINER):
        mine = [r for r in runs if r.side == side]
        tps = [r.tokens_per_s for r in mine]
        rss = [r.max_rss_mib for r in mine]
        medians[side] = (statistics.median(tps), statistics.median(rss))
        lines.append(
            f"median {side:<8} tokens/s {medians[side][0]:>8.1f} (min {min(tps):.1f}, max {max(tps):.1f})"
            f" | peak RSS {medians[side][1]:>7.1f} MiB (min {min(rss):.1f}, max {max(rss):.1f})"
        )
    ratio = (
        f"ratio llmtune / Trainer: tokens/s {medians[LLMTUNE][0] / medians[TRAINER][0]:.3f}"
        f" | peak RSS {medians[LLMTUNE][1] / medians[TRAINER][1]:.3f}"
    )
    at_end = {side: [r.train_max_rss_mib for r in runs if r.side == side] for side in (LLMTUNE, TRAINER)}
    if all(v is not None for values in at_end.values() for v in values):
        mine, theirs = (statistics.median(at_end[side]) for side in (LLMTUNE, TRAINER))  # type: ignore[type-var]
        ratio += f" | peak RSS at train end {mine / theirs:.3f} ({mine:.1f} / {theirs:.1f} MiB)"
    lines.append(ratio)
    cuda = {side: [r.extra.get("cuda_peak_mib") for r in runs if r.side == side] for side in (LLMTUNE, TRAINER)}
    if all(v is not None for values in cuda.values() for v in values):
        mine, theirs = (statistics.median(cuda[side]) for side in (LLMTUNE, TRAINER))  # type: ignore[type-var]
        lines.append(f"median CUDA peak allocated: llmtune {mine:.1f} / Trainer {theirs:.1f} MiB = {mine / theirs:.3f}")
    busy = [r for r in runs if (r.other_cpu_pct or 0.0) > OTHER_CPU_WARN]
    if busy:
        names = ", ".join(f"{r.side} #{r.repeat}" for r in busy)
        lines.append(
            f"warning: other processes used more than {OTHER_CPU_WARN:.0f}% of the CPUs during {names}; "
            "their figures are contended (rerun on a quiet machine, or rely on the medians)"
        )
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
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-causal-lm"), help="Recipe, runs and logs.")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds one child run may take.")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="Before each run, wait up to this many seconds for other processes to leave the CPUs idle (0: no).",
    )
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="Import llmtune from the working tree in every run instead of from a copy taken at the start.",
    )
    parser.add_argument("--json", default=None, help="Also write every run's figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.window < 1 or args.steps % args.window or args.steps < 2 * args.window:
        parser.error("--steps must be a multiple of --window and at least two windows")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the parent benchmark, or one of the child modes this file re-invokes itself in."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv and argv[0] == "_llmtune":
        child_llmtune(argv[1], argv[2:])
        return 0
    if argv and argv[0] == "_trainer":
        child_trainer(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    if argv and argv[0] == "_prepare":
        child_prepare(argv[1], argv[2])
        return 0

    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    started = time.perf_counter()
    if args.no_snapshot:
        args.llmtune_path, version = ROOT, _git_version() + " (live working tree)"
    else:
        args.llmtune_path, version = snapshot_llmtune(work)
    try:
        described = write_recipe(args, recipe)
        print(f"preparing data and tokenizer (untimed) for {described} ...", file=sys.stderr, flush=True)
        prepared = _child("_prepare", work / "prepare.json", [str(recipe)], work / "prepare.log", args)
        runs: list[Run] = []
        for repeat in range(1, args.repeats + 1):
            for side, fn in ((LLMTUNE, run_llmtune), (TRAINER, run_trainer)):
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                run = fn(args, recipe, work, repeat)
                runs.append(run)
                other = "" if run.other_cpu_pct is None else f", other processes {run.other_cpu_pct:.0f}% CPU"
                print(
                    f"[{len(runs)}/{2 * args.repeats}] {side} #{repeat}: {run.tokens_per_s:.1f} tokens/s, "
                    f"peak RSS {run.max_rss_mib:.1f} MiB, {run.wall_s:.1f}s{other}",
                    file=sys.stderr,
                    flush=True,
                )
        check_same_work(runs, prepared, args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    import torch  # only for the header's versions

    first = runs[0].extra
    measured = args.steps - args.window
    header = [
        f"llmtune vs transformers.Trainer: causal-LM pretraining, {args.repeats} alternating runs each",
        f"llmtune {version}, imported from {args.llmtune_path}",
        f"data: {described}; {prepared['train_blocks']:,} train blocks of {args.block_size} tokens "
        f"(cache {prepared['cache_dir']})",
        f"model: {Path(args.model_config).name}, vocab {prepared['vocab']}, {first['parameters']:,} parameters",
        f"batch {args.batch_size} x {args.block_size} tokens, {args.steps} steps, tokens/s over steps "
        f"{args.window + 1}-{args.steps} ({measured} steps), AdamW fused lr {args.lr:g} cosine warmup "
        f"{args.warmup_steps}, clip 1.0, fp32, compile {'on' if args.compile else 'off'}",
        f"device {first['device']}, torch {torch.__version__} threads {first['torch_threads']}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs",
        "peak RSS = the child process's own ru_maxrss over its life (imports + data + training"
        " [+ llmtune's final eval and save])",
    ]
    table = report(runs, header)
    print(table)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f}s; logs and runs in {work}")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        _write_json(
            args.json, {"args": settings, "llmtune": version, "prepared": prepared, "runs": [asdict(r) for r in runs]}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
