"""Recipe -> build -> train: what `pretrain` and `finetune` share, and the runtime helpers every command uses."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from llmtune.errors import UserError
from llmtune.expect import check_expectations, format_checks
from llmtune.recipe import Recipe, dump_recipe, load_recipe

RUN_MARKERS = ("recipe.resolved.yaml", "checkpoints", "final")


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


def _check_output_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    holds_run = any((run_dir / m).exists() for m in RUN_MARKERS)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; choose one")
    if holds_run and not (resume or overwrite):
        raise UserError(
            f"output_dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or --set output_dir=NEW_DIR"
        )
    if resume:
        from llmtune.checkpoint import list_checkpoints

        if (run_dir / "final").exists():
            raise UserError(f"output_dir {run_dir} holds a finished run (final/ exists); nothing to resume")
        if not list_checkpoints(run_dir / "checkpoints"):
            raise UserError(f"output_dir {run_dir} has no checkpoint to resume from; run without --resume")


def has_accelerator() -> bool:
    """Whether torch sees a GPU or other accelerator device."""
    import torch

    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def _accelerator(recipe: Recipe) -> Any:
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
        kwargs.update(log_with=list(recipe.tracking), project_dir=recipe.output_dir)
    if train.compile:
        kwargs["dynamo_backend"] = "inductor"
    return Accelerator(
        # accelerate picks gloo data parallelism (MULTI_CPU) for several CPU processes only when told
        # cpu=True; without it each process of `accelerate launch` / torchrun trains alone.
        cpu=not has_accelerator(),
        mixed_precision=train.precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        **kwargs,
    )


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
    }


def _check_command(recipe: Recipe, command: str) -> None:
    from llmtune.recipe import FINETUNE_TASKS, PRETRAIN_TASKS

    allowed = PRETRAIN_TASKS if command == "pretrain" else FINETUNE_TASKS
    if recipe.task not in allowed or (command == "pretrain" and recipe.data.instruction):
        other = "finetune" if command == "pretrain" else "pretrain"
        what = "instruction tuning (data.prompt_column / messages_column)" if recipe.data.instruction else recipe.task
        raise UserError(f"task: {what} is a {other} task, not a {command} one; run llmtune {other} RECIPE")
    if command == "pretrain" and recipe.strategy.kind != "full":
        raise UserError(f"strategy.kind: {recipe.strategy.kind} freezes a pretrained body; pretraining trains all")


def train(
    recipe_path: str, overrides: list[str], resume: bool = False, overwrite: bool = False, command: str = "pretrain"
) -> int:
    """`llmtune pretrain` / `finetune`: train the recipe's model; the exit code (1 when `expect:` is missed)."""
    recipe = load_recipe(recipe_path, overrides)
    _check_command(recipe, command)
    run_dir = Path(recipe.output_dir)
    _check_output_dir(run_dir, resume, overwrite)

    from accelerate.utils import set_seed

    from llmtune.checkpoint import list_checkpoints
    from llmtune.data import load_raw
    from llmtune.modeling import build_model, build_tokenizer, load_pretrained_tokenizer
    from llmtune.strategies import apply_strategy, count_parameters
    from llmtune.tasks import get_task
    from llmtune.tracking import MetricsLog, Progress
    from llmtune.trainer import Trainer, planned_steps

    quiet_libraries()
    task = get_task(recipe.task, recipe)
    _check_metric_names(recipe, task)
    accelerator = _accelerator(recipe)
    started = time.perf_counter()
    columns = task.required_columns(recipe.data)
    if recipe.tokenizer.train is not None and "data.text_column" not in columns:
        raise UserError(f"tokenizer.train reads data.text_column, which {task.name} does not use; use a pretrained one")
    with accelerator.main_process_first():
        raw = load_raw(recipe.data, columns=columns)
        saved_tokenizer = run_dir / "tokenizer"
        if resume and saved_tokenizer.is_dir():
            tokenizer, origin = load_pretrained_tokenizer(str(saved_tokenizer)), f"saved {saved_tokenizer}"
        else:
            texts = raw.splits["train"][recipe.data.text_column] if recipe.tokenizer.train else []
            tokenizer, origin = build_tokenizer(
                recipe.tokenizer, recipe.model, lambda: iter(texts), raw.fingerprint, recipe.data.cache_dir
            )
    set_seed(recipe.train.seed)
    model = build_model(recipe.model, tokenizer, task.auto_class, task.name, task.model_overrides(raw))
    task.setup(recipe.data, model, tokenizer)
    with accelerator.main_process_first():
        prepared = task.prepare(raw, tokenizer, recipe.data)
    steps = planned_steps(recipe.train, len(prepared.splits["train"]), accelerator.num_processes)
    applied = apply_strategy(model, recipe.strategy, task.auto_class, steps, recipe.model.from_scratch is not None)
    model = applied.model
    prep_seconds = time.perf_counter() - started
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    total, trainable = count_parameters(model)
    # Everything the user could have got wrong has been checked: only now is anything written.
    if accelerator.is_main_process:
        if overwrite and run_dir.exists():
            for marker in (
                *RUN_MARKERS,
                "metrics.jsonl",
                "environment.json",
                "tokenizer",
                "final_metrics.json",
                "eval",
            ):
                path = run_dir / marker
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.resolved.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
        env = _environment(accelerator, recipe, Path(recipe_path).resolve())
        env["parameters"] = {"strategy": recipe.strategy.kind, "total": total, "trainable": trainable}
        (run_dir / "environment.json").write_text(json.dumps(env, indent=1), encoding="utf-8")
        if not saved_tokenizer.is_dir():
            tokenizer.save_pretrained(str(saved_tokenizer))
    accelerator.wait_for_everyone()
    if recipe.tracking:
        accelerator.init_trackers("tracking")

    log = MetricsLog(run_dir / "metrics.jsonl", accelerator, accelerator.is_main_process)
    trainer = Trainer(
        accelerator, recipe.train, task, model, tokenizer, prepared, run_dir, log, applied, recipe.model.pretrained
    )
    if resume:
        step, path = list_checkpoints(run_dir / "checkpoints")[-1]
        trainer.resume(path)
        say(accelerator, f"resumed from {path} (step {step})")
    t = recipe.train
    say(
        accelerator,
        "\n".join(
            [
                f"run: {run_dir}",
                f"task: {task.name} | model: {model.config.model_type}, {total:,} parameters ({trainable:,} trainable, "
                f"{100 * trainable / max(total, 1):.2f}%) | strategy: {recipe.strategy.kind}",
                f"tokenizer: {origin}, {len(tokenizer)} tokens",
                *_data_lines(prepared.stats),
                f"data preparation: {prep_seconds:.2f}s (loading, tokenizer, tokenising; tokenised data: cache "
                f"{prepared.stats['cache']})",
                f"devices: {accelerator.num_processes} x {accelerator.device} | per-device batch {t.batch_size} x "
                f"accum {t.grad_accum} = global batch {t.batch_size * t.grad_accum * accelerator.num_processes} | "
                f"steps {trainer.total_steps}"
                + (" | length-grouped batches" if t.group_by_length and prepared.lengths else ""),
            ]
        ),
    )
    progress = Progress(trainer.total_steps, trainer.state.step, accelerator.is_main_process)
    try:
        result = trainer.fit(progress)
    finally:
        progress.close()
        if recipe.tracking:
            accelerator.end_training()
    if result.interrupted:
        return 130
    if accelerator.is_main_process:
        (run_dir / "final_metrics.json").write_text(json.dumps(result.metrics, indent=1), encoding="utf-8")
    say(accelerator, "final: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    from llmtune.strategies import strategy_info

    info = strategy_info(run_dir / "final")
    size = f" (adapter and head weights alone: {info['adapter_bytes'] / 1024:,.0f} KiB)" if info else ""
    say(accelerator, f"model saved to {run_dir / 'final'}{size}")
    return _report_expectations(accelerator, recipe, result.metrics)


def _data_lines(stats: dict[str, Any]) -> list[str]:
    """The run log's account of the prepared data: tokens per split, then the other counts."""
    tokens = ", ".join(f"{k.removesuffix('_tokens')} {v:,} tokens" for k, v in stats.items() if k.endswith("_tokens"))
    others = [f"{k} {v}" for k, v in stats.items() if not k.endswith(("_tokens", "cache", "_seconds"))]
    return [f"data: {tokens}", *(["sequences: " + ", ".join(others)] if others else [])]


def _check_metric_names(recipe: Recipe, task: Any) -> None:
    names = set(task.metric_names)
    wanted = [("expect." + m, m) for m in recipe.expect] + [("train.best_metric", recipe.train.best_metric)]
    if recipe.train.early_stopping is not None:
        wanted.append(("train.early_stopping.metric", recipe.train.early_stopping.metric))
    for key, metric in wanted:
        if metric not in names:
            raise UserError(f"{key}: {task.name} reports no metric {metric!r}; it reports {', '.join(sorted(names))}")


def _report_expectations(accelerator: Any, recipe: Recipe, metrics: dict[str, float]) -> int:
    if not recipe.expect:
        return 0
    checks = check_expectations(metrics, recipe.expect)
    say(accelerator, "expectations:\n" + format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1
