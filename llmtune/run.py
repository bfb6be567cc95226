"""Recipe -> build -> train: what `pretrain` and `finetune` share, and the runtime helpers every command uses."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from llmtune.atomic import write_text_atomic
from llmtune.errors import UserError
from llmtune.expect import check_expectations, format_checks
from llmtune.launch import sharding_warning
from llmtune.recipe import Recipe, dump_recipe, load_recipe
from llmtune.run_dir import FINAL_METRICS, RunDir
from llmtune.run_status import StatusRecord
from llmtune.trackers import check_installed


class _DropKnownNoise(logging.Filter):
    """Drops library messages that are expected and harmless in llmtune's use (the why, per message)."""

    NOISE = (
        "strongly recommend passing in an `attention_mask`",  # packed blocks have no padding to mask
        "You may ignore this warning if your `pad_token_id`",
        "`loss_type=None` was set in the config",  # the default causal-LM loss is the one we want
        "Removed shared tensor",  # tied embeddings are stored once; transformers re-ties them on load
        # A multi-line table of newly initialised weights: a fine-tuning head is fresh by design, and the
        # table would break the one-line error contract of anything that fails after the model is built.
        "LOAD REPORT",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


def quiet_libraries() -> None:
    """Silence per-file progress bars and known-harmless warnings so the run log stays readable."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # peft reads a transformers attribute that transformers 5 deprecated; nothing for the user to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
    if not sys.stdout.isatty():
        datasets.disable_progress_bars()
    noise = _DropKnownNoise()
    for handler in logging.getLogger("transformers").handlers:  # transformers logs through its own handler
        handler.addFilter(noise)
    logging.getLogger("accelerate.utils.other").addFilter(noise)  # accelerate's records reach the root


def say(accelerator: Any, text: str) -> None:
    """Print on the main process only."""
    if accelerator is None or accelerator.is_main_process:
        print(text, flush=True)


def _check_output_dir(run: RunDir, resume: bool, overwrite: bool) -> str:
    """What the command is to do with the run directory: train, resume, finish (final/ written, the rest not)
    or nothing (a complete run); refuse what would lose or mix up a run."""
    from llmtune.checkpoint import list_checkpoints

    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; choose one")
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"output_dir {run.root} is a file, not a directory; choose another output_dir")
    existing = next(p for p in (run.root, *run.root.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"output_dir {run.root}: {existing} is a file, not a directory; choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {run.root}: {existing} is not writable; choose an output_dir you can write to")
    run.refuse_if_in_use()
    if run.holds_run() and not (resume or overwrite):
        raise UserError(
            f"output_dir {run.root} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or --set output_dir=NEW_DIR"
        )
    if not resume:
        return "train"
    if run.is_complete():
        return "complete"
    if run.final.is_dir():
        return "finish"
    if not list_checkpoints(run.checkpoints):
        raise UserError(f"output_dir {run.root} has no checkpoint to resume from; run without --resume")
    return "resume"


def _finished_run(run: RunDir, recipe: Recipe, action: str) -> int:
    """`--resume` of a run whose final/ is written: say it is complete, or write what its end left unwritten."""
    if action == "complete":
        metrics = json.loads(run.final_metrics.read_text(encoding="utf-8"))
        print(f"run {run.root} is complete (final/ and final_metrics.json exist); nothing to resume")
        print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return 0
    saved = run.final / FINAL_METRICS
    if not saved.is_file():
        raise UserError(
            f"output_dir {run.root}: final/ has no {FINAL_METRICS}, so its metrics cannot be recovered; "
            "evaluate it with llmtune eval, or train again with --overwrite"
        )
    metrics = json.loads(saved.read_text(encoding="utf-8"))["metrics"]
    with run.locked():
        status = StatusRecord(run.root, True, resumed=True)
        from llmtune.model_card import write_model_card

        write_model_card(run, recipe, status.wall_seconds())
        write_text_atomic(run.final_metrics, json.dumps(metrics, indent=1))
        status.write("finished")
    print(f"run {run.root}: final/ was written but the run stopped before its end; completed final_metrics.json")
    print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return _report_expectations(None, recipe, metrics)


def has_accelerator() -> bool:
    """Whether torch sees a GPU or other accelerator device."""
    import torch

    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def _accelerator(recipe: Recipe, run: RunDir, resume: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    train = recipe.train
    if train.precision == "fp16" and recipe.task == "span-corruption":
        print(
            'warning: T5 overflows in fp16 (NaN losses); use precision: bf16 on a GPU that has it, or "no"', flush=True
        )
    if train.precision != "no" and not has_accelerator():
        if train.precision == "fp16":
            raise UserError('train.precision: fp16 needs a GPU; use bf16 (slow on most CPUs) or "no" on a CPU')
        print(
            'warning: bf16 on a CPU without native bf16 is ~100x slower than fp32; prefer precision: "no"',
            flush=True,
        )
    kwargs: dict[str, Any] = {}
    if recipe.tracking:
        from llmtune.trackers import make_trackers

        trackers = make_trackers(list(recipe.tracking), run.root / run.tracking, run.root.name, resume)
        kwargs.update(log_with=trackers, project_dir=recipe.output_dir)
    if train.compile:
        kwargs["dynamo_backend"] = "inductor"
    accelerator = Accelerator(
        # accelerate picks gloo data parallelism (MULTI_CPU) for several CPU processes only when told
        # cpu=True; without it each process of `accelerate launch` / torchrun trains alone.
        cpu=not has_accelerator(),
        mixed_precision=train.precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        **kwargs,
    )
    warning = sharding_warning(accelerator.distributed_type)
    if warning is not None:
        say(accelerator, warning)
    return accelerator


def _environment(accelerator: Any, recipe: Recipe, recipe_path: Path) -> dict[str, Any]:
    import torch

    versions = {}
    for pkg in ("llmtune", "torch", "transformers", "datasets", "accelerate", "tokenizers", "peft"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=recipe_path.parent,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    device = str(accelerator.device)
    if accelerator.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(accelerator.device)})"
    t = recipe.train
    return {
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "distributed_type": str(accelerator.distributed_type),
        "world_size": accelerator.num_processes,
        "mixed_precision": t.precision,
        "per_device_batch": t.batch_size,
        "grad_accum": t.grad_accum,
        "global_batch": t.batch_size * t.grad_accum * accelerator.num_processes,
        "max_tokens": t.max_tokens,
    }


def _check_command(recipe: Recipe, command: str) -> None:
    """Refuse a task the command does not train (the registry says which do) and, for pretraining, a
    strategy that freezes part of the model."""
    entry = recipe.entry
    if command not in entry.commands:
        other = "finetune" if command == "pretrain" else "pretrain"
        what = entry.name if entry.name == recipe.task else f"{entry.name} (task {recipe.task} with these data keys)"
        raise UserError(f"task: {what} is a {other} task, not a {command} one; run llmtune {other} RECIPE")
    if command == "pretrain" and recipe.strategy.kind != "full":
        raise UserError(f"strategy.kind: {recipe.strategy.kind} freezes a pretrained body; pretraining trains all")


def _rankings(recipe: Recipe) -> tuple[Any, Any]:
    """How `best_metric` and `early_stopping` compare evaluations, in the directions the task declares."""
    from llmtune.trainer import Ranking

    spec = recipe.train
    declared = recipe.metric(spec.best_metric)
    assert declared is not None and declared.higher_is_better is not None  # the recipe validator checked
    best = Ranking(spec.best_metric, declared.higher_is_better)
    stop = spec.early_stopping
    if stop is None:
        return best, None
    if stop.mode is not None:
        return best, Ranking(stop.metric, stop.mode == "max", stop.min_delta)
    declared = recipe.metric(stop.metric)
    assert declared is not None and declared.higher_is_better is not None
    return best, Ranking(stop.metric, declared.higher_is_better, stop.min_delta)


def train(
    recipe_path: str, overrides: list[str], resume: bool = False, overwrite: bool = False, command: str = "pretrain"
) -> int:
    """`llmtune pretrain` / `finetune`: train the recipe's model; the exit code (1 when `expect:` is missed)."""
    recipe = load_recipe(recipe_path, overrides)
    _check_command(recipe, command)
    check_installed(recipe.tracking)
    run = RunDir(Path(recipe.output_dir))
    action = _check_output_dir(run, resume, overwrite)
    if action in ("complete", "finish"):
        return _finished_run(run, recipe, action)
    resume = action == "resume"

    from accelerate.utils import set_seed

    from llmtune.data import load_raw
    from llmtune.launch import stop_with_launcher
    from llmtune.metrics import load_metric_modules
    from llmtune.modeling import build_model, build_tokenizer, load_pretrained_tokenizer
    from llmtune.strategies import apply_strategy
    from llmtune.tasks import get_task
    from llmtune.trainer import planned_steps

    stop_with_launcher()
    quiet_libraries()
    task = get_task(recipe)
    modules = load_metric_modules(recipe.metrics)
    accelerator = _accelerator(recipe, run, resume)
    started = time.perf_counter()
    with accelerator.main_process_first():
        raw = load_raw(recipe.data, columns=task.required_columns())
        if resume and run.tokenizer.is_dir():
            tokenizer, origin = load_pretrained_tokenizer(str(run.tokenizer)), f"saved {run.tokenizer}"
        else:
            train_split = raw.splits["train"]
            tokenizer, origin = build_tokenizer(
                recipe.tokenizer,
                recipe.model,
                lambda: task.tokenizer_texts(train_split),
                raw.fingerprint,
                recipe.data.cache_dir,
            )
    set_seed(recipe.train.seed)
    model = build_model(recipe.model, tokenizer, task.auto_class, task.name, task.model_overrides(raw), resume)
    task.setup(model, tokenizer)
    with accelerator.main_process_first():
        prepared = task.prepare(raw, tokenizer)
    steps = planned_steps(
        recipe.train, len(prepared.splits["train"]), accelerator.num_processes, prepared.lengths.get("train")
    )
    applied = apply_strategy(model, recipe.strategy, task.auto_class, steps, recipe.model.from_scratch is not None)
    model = applied.model
    prep_seconds = time.perf_counter() - started
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kernels: list[str] = []
    if recipe.train.fast_kernels:
        from llmtune.kernels import apply_fast_kernels

        kernels = apply_fast_kernels(model)
    # Everything the user could have got wrong has been checked: only now is anything written, under the
    # run's lock (held by the main process until it exits).
    with run.locked() if accelerator.is_main_process else contextlib.nullcontext():
        _write_run_files(accelerator, run, recipe, recipe_path, tokenizer, model, overwrite, prepared.stats, kernels)
        status = StatusRecord(run.root, accelerator.is_main_process, resume, began=started)
        with status.recorded(total_steps=steps):
            return _fit(
                accelerator,
                run,
                recipe,
                task,
                model,
                tokenizer,
                prepared,
                applied,
                modules,
                resume,
                origin,
                prep_seconds,
                status,
            )


def _write_run_files(
    accelerator: Any,
    run: RunDir,
    recipe: Recipe,
    recipe_path: str,
    tokenizer: Any,
    model: Any,
    overwrite: bool,
    data_stats: dict[str, Any],
    kernels: list[str] | None = None,
) -> None:
    """The resolved recipe, the environment (with the prepared data's counts and cache) and the tokenizer (after
    clearing an overwritten run)."""
    from llmtune.strategies import count_parameters

    total, trainable = count_parameters(model)
    if accelerator.is_main_process:
        if overwrite:
            run.clear()
        write_text_atomic(run.recipe, dump_recipe(recipe))
        env = _environment(accelerator, recipe, Path(recipe_path).resolve())
        env["parameters"] = {"strategy": recipe.strategy.kind, "total": total, "trainable": trainable}
        env["data"] = data_stats  # tokens and examples per split, skipped blanks, the tokenised-data cache
        env["fast_kernels"] = kernels or []  # what train.fast_kernels substituted (nothing saved changes)
        write_text_atomic(run.environment, json.dumps(env, indent=1))
        if not run.tokenizer.is_dir():
            tokenizer.save_pretrained(str(run.tokenizer))
    accelerator.wait_for_everyone()


def _fit(
    accelerator: Any,
    run: RunDir,
    recipe: Recipe,
    task: Any,
    model: Any,
    tokenizer: Any,
    prepared: Any,
    applied: Any,
    modules: list[Any],
    resume: bool,
    origin: str,
    prep_seconds: float,
    status: StatusRecord,
) -> int:
    """Train, write final/ (with its model card) and the final metrics, check `expect:`; the exit code."""
    from llmtune.checkpoint import list_checkpoints
    from llmtune.strategies import count_parameters, strategy_info
    from llmtune.tracking import MetricsLog, Progress
    from llmtune.trainer import Trainer, prepare_training

    if recipe.tracking:
        from llmtune.trackers import flat_config, remember_ids

        accelerator.init_trackers("llmtune", config=flat_config(recipe.model_dump(mode="json")))
        if accelerator.is_main_process:
            remember_ids(accelerator, run.root / run.tracking)
    best, stop = _rankings(recipe)
    parts = prepare_training(accelerator, recipe.train, task, model, tokenizer, prepared)
    log = MetricsLog(run.metrics, accelerator, accelerator.is_main_process)
    trainer = Trainer(
        accelerator,
        recipe.train,
        task,
        parts,
        tokenizer,
        run,
        log,
        best,
        stop,
        applied,
        recipe.model.pretrained,
        modules,
    )
    if accelerator.is_main_process:  # the FLOP count and peak behind train/tflops and train/mfu
        env = json.loads(run.environment.read_text(encoding="utf-8"))
        env["flops"] = {
            "formula": "6 * N + 12 * L * d * T per token (llmtune/flops.py)",
            "N": trainer.model_flops.matmul_params,
            "L": trainer.model_flops.attention_layers,
            "d": trainer.model_flops.hidden_size,
            "peak": trainer.peak.as_dict(),
        }
        write_text_atomic(run.environment, json.dumps(env, indent=1))
    if resume:
        step, path = list_checkpoints(run.checkpoints)[-1]
        trainer.resume(path)
        say(accelerator, f"resumed from {path} (step {step})")
    total, trainable = count_parameters(model)
    t = recipe.train
    say(
        accelerator,
        "\n".join(
            [
                f"run: {run.root}",
                f"task: {task.name} | model: {model.config.model_type}, {total:,} parameters ({trainable:,} trainable, "
                f"{100 * trainable / max(total, 1):.2f}%) | strategy: {recipe.strategy.kind}",
                f"tokenizer: {origin}, {len(tokenizer)} tokens",
                *_data_lines(prepared.stats),
                f"data preparation: {prep_seconds:.2f}s (loading, tokenizer, tokenising; tokenised data: cache "
                f"{prepared.stats['cache']})",
                f"devices: {accelerator.num_processes} x {accelerator.device} | "
                + (
                    f"per-device batch up to {t.max_tokens} tokens x accum {t.grad_accum} | "
                    if t.max_tokens is not None
                    else f"per-device batch {t.batch_size} x accum {t.grad_accum} = global batch "
                    f"{t.batch_size * t.grad_accum * accelerator.num_processes} | "
                )
                + f"steps {trainer.total_steps}"
                + f" | peak {trainer.peak.flops / 1e12:.3g} TFLOP/s ({trainer.peak.source.split(':')[0]})"
                + (" | length-grouped batches" if t.group_by_length and prepared.lengths and not t.max_tokens else ""),
            ]
        ),
    )
    status.write("running", trainer.state.step, trainer.total_steps)
    progress = Progress(trainer.total_steps, trainer.state.step, accelerator.is_main_process)
    try:
        try:
            result = trainer.fit(progress)
        finally:
            progress.close()
        if result.interrupted:
            status.write("interrupted", result.steps)
            return 130
        metrics = _final_model(accelerator, trainer, result, recipe, run, progress)
        if accelerator.is_main_process:
            from llmtune.model_card import write_model_card

            write_model_card(run, recipe, status.wall_seconds())
            write_text_atomic(run.final_metrics, json.dumps(metrics, indent=1))
            status.write("finished", result.steps)
            if recipe.tracking:
                from llmtune.trackers import log_final

                log_final(accelerator, result.steps, metrics, run.final)
    finally:
        if recipe.tracking:
            accelerator.end_training()
    say(accelerator, "final: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    info = strategy_info(run.final)
    size = f" (adapter and head weights alone: {info['adapter_bytes'] / 1024:,.0f} KiB)" if info else ""
    say(accelerator, f"model saved to {run.final}{size}")
    return _report_expectations(accelerator, recipe, metrics)


def _final_model(accelerator: Any, trainer: Any, result: Any, recipe: Recipe, run: RunDir, progress: Any) -> dict:
    """Write final/: the best evaluated model (`train.load_best_at_end`) or the last; its metrics."""
    from llmtune.checkpoint import promote_best

    later_best = result.best_step is not None and result.best_step != result.steps
    if recipe.train.load_best_at_end and later_best and run.best.exists():
        promote_best(accelerator, run.best, run.final)
        say(accelerator, f"final/ holds the best model, from step {result.best_step}")
        return result.best_metrics
    trainer.save_model(run.final, result.steps, result.metrics)
    return result.metrics


def _data_lines(stats: dict[str, Any]) -> list[str]:
    """The run log's account of the prepared data: tokens per split, then the other counts."""
    tokens = ", ".join(f"{k.removesuffix('_tokens')} {v:,} tokens" for k, v in stats.items() if k.endswith("_tokens"))
    others = [f"{k} {v}" for k, v in stats.items() if not k.endswith(("_tokens", "cache", "_seconds"))]
    return [f"data: {tokens}", *(["sequences: " + ", ".join(others)] if others else [])]


def _report_expectations(accelerator: Any, recipe: Recipe, metrics: dict[str, float]) -> int:
    if not recipe.expect:
        return 0
    checks = check_expectations(metrics, recipe.expect)
    say(accelerator, "expectations:\n" + format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1
