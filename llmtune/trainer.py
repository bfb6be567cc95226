"""The one training loop: every task, every device count, through accelerate.

Per optimizer step the loop draws `grad_accum` micro-batches, counts the targets of all of them
(across ranks too), and divides each micro-batch's summed loss by that total, so accumulation gives
the gradients of one large batch however unequal the micro-batches are. The hot loop does not read
values back to the host except at log steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmtune.atomic import atomic_dir
from llmtune.batching import LengthGroupedSampler, longest_first
from llmtune.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from llmtune.evaluation import evaluate
from llmtune.optim import build_optimizer, build_schedule
from llmtune.recipe import TrainSpec
from llmtune.strategies import Applied, save_model
from llmtune.tasks.base import Prepared, Task
from llmtune.tracking import MetricsLog, Progress


def planned_steps(train: TrainSpec, examples: int, world_size: int) -> int:
    """Optimizer steps of a run: train.max_steps, or its epochs over `examples` split across the ranks."""
    if train.max_steps is not None:
        return train.max_steps
    assert train.epochs is not None  # the recipe defaults it to 1
    batches_per_epoch = math.ceil(examples / (train.batch_size * world_size))
    return max(1, math.ceil(train.epochs * batches_per_epoch / train.grad_accum))


def lower_is_better(metric: str) -> bool:
    """Loss-like metrics improve downwards; everything else (accuracy, F1, BLEU) upwards."""
    return any(word in metric for word in ("loss", "perplexity", "error"))


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per rank)
    tokens_seen: int = 0
    examples_seen: int = 0
    train_seconds: float = 0.0  # time in training steps, evaluation and checkpoints left out
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    stop_value: float | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FitResult:
    """How a `fit` ended."""

    metrics: dict[str, float]
    steps: int
    stopped_early: bool = False
    interrupted: bool = False


class Trainer:
    """Fits a model for a task with the recipe's training settings, writing into `run_dir`."""

    def __init__(
        self,
        accelerator: Any,
        train: TrainSpec,
        task: Task,
        model: Any,
        tokenizer: Any,
        prepared: Prepared,
        run_dir: Path,
        log: MetricsLog,
        strategy: Applied | None = None,
        base_model: str | None = None,
    ) -> None:
        import torch
        from torch.utils.data import DataLoader

        self.accelerator, self.spec, self.task, self.tokenizer = accelerator, train, task, tokenizer
        self.run_dir, self.log = run_dir, log
        self.strategy = strategy or Applied(model, "full")
        self.base_model = base_model  # what adapter-only saves name as the model to load them on
        collate = task.collator(tokenizer)
        # An explicit generator keeps the loaders from drawing the global RNG when an iterator starts;
        # the order itself comes from accelerate's seedable sampler (seed + epoch), or for variable-length
        # tasks from the length-grouped sampler (seed + epoch). With this, restoring the RNG states on
        # resume makes dropout continue exactly.
        kwargs: dict[str, Any] = {"generator": torch.Generator(), "num_workers": train.num_workers}
        if collate is not None:
            kwargs["collate_fn"] = collate
        lengths = prepared.lengths if train.group_by_length else {}
        order: dict[str, Any] = {"shuffle": True}
        if "train" in lengths:
            order = {"sampler": LengthGroupedSampler(lengths["train"], train.batch_size, train.seed)}
        train_dl = DataLoader(prepared.splits["train"], batch_size=train.batch_size, **order, **kwargs)
        order = {"sampler": longest_first(lengths["validation"])} if "validation" in lengths else {}
        eval_dl = DataLoader(
            prepared.splits["validation"], batch_size=train.eval_batch_size or train.batch_size, **order, **kwargs
        )
        optimizer = build_optimizer(model, train)
        self.model, self.optimizer, self.train_dl, self.eval_dl = accelerator.prepare(
            model, optimizer, train_dl, eval_dl
        )
        self.total_steps = planned_steps(train, len(prepared.splits["train"]), accelerator.num_processes)
        # Not prepared: accelerate's scheduler wrapper steps num_processes times per step when batches
        # are not split, which would make the schedule depend on the world size.
        self.scheduler = build_schedule(self.optimizer.optimizer, train, self.total_steps)
        self.state = TrainState()
        self._signal: int | None = None

    # --- data order -------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, batches consumed in that epoch, batch), continuing from the state's position."""
        epoch, skip = self.state.epoch, self.state.batch_in_epoch
        while True:
            self.train_dl.set_epoch(epoch)
            loader = self.accelerator.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
            for index, batch in enumerate(loader, start=skip + 1):
                yield epoch, index, batch
            epoch, skip = epoch + 1, 0

    # --- checkpoints --------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        """Where step checkpoints and the best model live."""
        return self.run_dir / "checkpoints"

    def save(self) -> None:
        """A resumable checkpoint of the current step."""
        save_checkpoint(
            self.accelerator,
            self.checkpoints,
            self.state.step,
            self.scheduler,
            asdict(self.state),
            self.spec.keep_last,
        )

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path`: tensors, schedule, data position and RNG, in that order."""
        import json

        state, rng = load_checkpoint(self.accelerator, path, self.scheduler)
        self.state = TrainState(**state)
        # The data loaders draw no global random numbers (their samplers are seeded by accelerate),
        # so the RNG states can be applied now and the next forward sees exactly what it would have.
        set_rng_state(rng)
        best = self.checkpoints / "best" / "best.json"
        if self.accelerator.is_main_process:
            written_later = best.exists() and json.loads(best.read_text())["step"] > self.state.step
            if written_later:
                shutil.rmtree(best.parent)  # written after this checkpoint; it will be written again
        self.log.truncate_after(self.state.step)
        self.accelerator.wait_for_everyone()

    def _save_model(self, target: Path, extra: dict[str, Any] | None = None) -> None:
        """A standard Hugging Face model directory (safetensors, config, generation config, tokenizer)."""
        import json

        state_dict = self.accelerator.get_state_dict(self.model)  # collective under FSDP / DeepSpeed
        if self.accelerator.is_main_process:
            with atomic_dir(target) as tmp:
                model = self.accelerator.unwrap_model(self.model)
                save_model(model, tmp, state_dict, self.strategy.kind, self.base_model, self.strategy.settings)
                self.tokenizer.save_pretrained(str(tmp))
                if extra is not None:
                    (tmp / "best.json").write_text(json.dumps(extra, indent=1))
        self.accelerator.wait_for_everyone()

    # --- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, max_batches: int | None) -> dict[str, float]:
        metrics = evaluate(self.accelerator, self.model, self.eval_dl, self.task, max_batches)
        st = self.state
        st.last_eval_step, st.last_metrics = st.step, metrics
        self.log.write(st.step, {"epoch": st.epoch, **metrics})
        value = metrics[self.spec.best_metric]
        sign = 1.0 if lower_is_better(self.spec.best_metric) else -1.0
        if st.best_value is None or sign * value < sign * st.best_value:
            st.best_value, st.best_step, st.best_metrics = value, st.step, metrics
            self._save_model(self.checkpoints / "best", {"step": st.step, "metrics": metrics})
        stop = self.spec.early_stopping
        if stop is not None:
            value = metrics[stop.metric]
            lower = stop.mode == "min" if stop.mode else lower_is_better(stop.metric)
            sign = 1.0 if lower else -1.0
            if st.stop_value is None or sign * value < sign * st.stop_value - stop.min_delta:
                st.stop_value, st.bad_evals = value, 0
            else:
                st.bad_evals += 1
        return metrics

    # --- the loop -----------------------------------------------------------------------------------
    def _draw_seed(self, micro_index: int) -> int:
        """A seed for the per-draw randomness of one micro-batch: a pure function of where it is."""
        key = f"{self.spec.seed}/{self.accelerator.process_index}/{self.state.step}/{micro_index}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum

    def _stop_requested(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self._signal is not None
        import torch

        flag = torch.tensor([1.0 if self._signal is not None else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def fit(self, progress: Progress) -> FitResult:
        """Train to `total_steps` (or an early stop / a signal), evaluating and checkpointing on schedule."""
        import torch

        acc, spec, task, st = self.accelerator, self.spec, self.task, self.state
        model, optimizer = self.model, self.optimizer
        world = acc.num_processes
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        batches = self._micro_batches()
        model.train()
        running_loss = torch.zeros((), device=acc.device)
        grad_norm: Any = None
        window_steps, window_tokens, window_examples, window_start = 0, 0, 0, time.perf_counter()
        stopped_early = interrupted = False
        try:
            while st.step < self.total_steps:
                micro = [
                    (epoch, consumed, task.draw(batch, self._draw_seed(index)))
                    for index, (epoch, consumed, batch) in enumerate(next(batches) for _ in range(spec.grad_accum))
                ]
                num_items = sum(task.count_items(b) for _, _, b in micro)
                if world > 1:
                    num_items = acc.reduce(num_items, "sum")
                for index, (_, _, batch) in enumerate(micro):
                    sync = index == len(micro) - 1
                    with contextlib.ExitStack() as stack:
                        if not sync:
                            stack.enter_context(acc.no_sync(model))
                        stack.enter_context(acc.autocast())
                        loss = task.loss(model, batch, num_items)
                        # DDP averages gradients over ranks; the loss is already over the global count.
                        acc.backward(loss * world if world > 1 else loss)
                    running_loss += loss.detach()
                    window_tokens += batch["input_ids"].numel() * world  # padding included
                    window_examples += batch["input_ids"].shape[0] * world
                if spec.max_grad_norm is not None:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
                optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
                if self.strategy.on_step is not None:  # e.g. AdaLoRA's rank budget, which reads the gradients
                    self.strategy.on_step(st.step + 1)
                optimizer.zero_grad(set_to_none=True)
                epoch, consumed, _ = micro[-1]
                st.step += 1
                st.epoch, st.batch_in_epoch = (epoch + 1, 0) if consumed == len(self.train_dl) else (epoch, consumed)
                window_steps += 1
                progress.step()

                if st.step % spec.log_every == 0 or st.step == self.total_steps:
                    mean_loss = acc.reduce(running_loss, "sum") if world > 1 else running_loss
                    elapsed = time.perf_counter() - window_start
                    st.tokens_seen += window_tokens
                    st.examples_seen += window_examples
                    st.train_seconds += elapsed
                    values = {
                        "epoch": st.epoch,
                        "train/loss": float(mean_loss) / window_steps,
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        "train/tokens": st.tokens_seen,
                        "train/examples_per_s": window_examples / max(elapsed, 1e-9),
                        "train/examples": st.examples_seen,
                        "train/seconds": st.train_seconds,
                    }
                    if grad_norm is not None:
                        values["train/grad_norm"] = float(grad_norm)
                    self.log.write(st.step, values)
                    progress.log(st.step, values["train/loss"], values["train/lr"], values["train/tokens_per_s"])
                    running_loss.zero_()
                    window_steps, window_tokens, window_examples, window_start = 0, 0, 0, time.perf_counter()

                paused = time.perf_counter()  # evaluation and checkpoints do not count as training time
                if spec.eval_every and st.step % spec.eval_every == 0 and st.step < self.total_steps:
                    metrics = self._evaluate(spec.eval_max_batches)
                    progress.message(f"eval step {st.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    stop = spec.early_stopping
                    if stop is not None and st.bad_evals >= stop.patience:
                        progress.message(f"early stop: {stop.metric} has not improved for {stop.patience} evaluations")
                        stopped_early = True
                if spec.save_every and st.step % spec.save_every == 0:
                    self.save()
                window_start += time.perf_counter() - paused
                if stopped_early:
                    break
                if self._stop_requested():
                    self.save()
                    interrupted = True
                    name = signal.Signals(self._signal).name if self._signal else "a signal"
                    progress.message(f"stopped by {name} at step {st.step}; checkpoint saved, continue with --resume")
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if interrupted:
            return FitResult(st.last_metrics, st.step, interrupted=True)
        if st.last_eval_step != st.step:
            self._evaluate(None)
        final = self.run_dir / "final"
        best = self.checkpoints / "best"
        metrics = st.last_metrics
        if spec.load_best_at_end and st.best_step is not None and st.best_step != st.step and best.exists():
            if acc.is_main_process:
                with atomic_dir(final) as tmp:
                    shutil.copytree(best, tmp, dirs_exist_ok=True)
                    (tmp / "best.json").unlink()
            acc.wait_for_everyone()
            metrics = st.best_metrics
            progress.message(f"final/ holds the best model, from step {st.best_step}")
        else:
            self._save_model(final)
        return FitResult(metrics, st.step, stopped_early=stopped_early)
