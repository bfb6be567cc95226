"""The one training loop: every task, every device count, through accelerate.

Per optimizer step the loop draws `grad_accum` micro-batches, counts the targets of all of them
(across ranks too), and divides each micro-batch's summed loss by that total, so accumulation gives
the gradients of one large batch however unequal the micro-batches are. The hot loop does not read
values back to the host except at log steps.

`prepare_training` builds what the loop runs on (loaders, optimizer, schedule); `Trainer.fit` is the
loop; which model ends up in `final/` is decided by the caller (`run.py`), not here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import resource
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmtune.atomic import atomic_dir, cache_root
from llmtune.batching import LengthGroupedSampler, TokenBudgetBatchSampler, longest_first, token_budget_problem
from llmtune.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from llmtune.errors import UserError
from llmtune.evaluation import evaluate
from llmtune.flops import ModelFlops, Peak, device_peak, model_flops
from llmtune.launch import signals_caught
from llmtune.optim import build_optimizer, build_schedule
from llmtune.recipe import TrainSpec
from llmtune.run_dir import FINAL_METRICS, RunDir
from llmtune.strategies import Applied, save_model
from llmtune.tasks.base import Prepared, Task
from llmtune.tracking import MetricsLog, Progress


def token_budget_sampler(train: TrainSpec, lengths: list[int] | None, world_size: int) -> TokenBudgetBatchSampler:
    """The training batch sampler of `train.max_tokens`; a `UserError` when the task's rows have no lengths
    (fixed-size pretraining blocks) or one is longer than the budget."""
    assert train.max_tokens is not None
    if lengths is None:
        raise UserError(
            "train.max_tokens: this task's training rows all have one length (data.block_size); "
            "set train.batch_size instead"
        )
    problem = token_budget_problem(lengths, train.max_tokens)
    if problem is not None:
        raise UserError(problem)
    return TokenBudgetBatchSampler(lengths, train.max_tokens, train.seed, world_size)


def planned_steps(train: TrainSpec, examples: int, world_size: int, lengths: list[int] | None = None) -> int:
    """Optimizer steps of a run: train.max_steps, or its epochs over `examples` split across the ranks
    (with `train.max_tokens`, over the token-budget batches of the rows' `lengths`)."""
    budget = token_budget_sampler(train, lengths, world_size) if train.max_tokens is not None else None
    if train.max_steps is not None:
        return train.max_steps
    assert train.epochs is not None  # the recipe defaults it to 1
    if budget is not None:
        batches_per_epoch = len(budget) // world_size
    else:
        batches_per_epoch = math.ceil(examples / (train.batch_size * world_size))
    return max(1, math.ceil(train.epochs * batches_per_epoch / train.grad_accum))


@dataclass(frozen=True)
class Ranking:
    """How evaluations are compared on one metric (its direction comes from the task's declaration)."""

    metric: str
    higher_is_better: bool
    min_delta: float = 0.0

    def improves(self, value: float, best: float | None) -> bool:
        """Whether `value` beats `best` by more than `min_delta` (anything beats no value yet)."""
        if best is None:
            return True
        return value > best + self.min_delta if self.higher_is_better else value < best - self.min_delta


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
    """How a `fit` ended: the last evaluation, and the best one."""

    metrics: dict[str, float]
    steps: int
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    interrupted: bool = False


@dataclass
class TrainingParts:
    """What the loop runs on, prepared by accelerate."""

    model: Any
    optimizer: Any
    scheduler: Any
    train_dl: Any
    eval_dl: Any
    total_steps: int


def prepare_training(
    accelerator: Any, spec: TrainSpec, task: Task, model: Any, tokenizer: Any, prepared: Prepared
) -> TrainingParts:
    """Loaders (length-grouped where the task has lengths), optimizer and schedule, prepared by accelerate."""
    import torch
    from torch.utils.data import DataLoader

    collate = task.collator(tokenizer)
    # An explicit generator keeps the loaders from drawing the global RNG when an iterator starts;
    # the order itself comes from accelerate's seedable sampler (seed + epoch), or for variable-length
    # tasks from the length-grouped sampler (seed + epoch). With this, restoring the RNG states on
    # resume makes dropout continue exactly.
    kwargs: dict[str, Any] = {"generator": torch.Generator(), "num_workers": spec.num_workers}
    if collate is not None:
        kwargs["collate_fn"] = collate
    lengths = prepared.lengths if spec.group_by_length else {}
    order: dict[str, Any] = {"batch_size": spec.batch_size, "shuffle": True}
    if spec.max_tokens is not None:
        world = accelerator.num_processes
        order = {"batch_sampler": token_budget_sampler(spec, prepared.lengths.get("train"), world)}
    elif "train" in lengths:
        order = {
            "batch_size": spec.batch_size,
            "sampler": LengthGroupedSampler(lengths["train"], spec.batch_size, spec.seed),
        }
    train_dl = DataLoader(prepared.splits["train"], **order, **kwargs)
    order = {"sampler": longest_first(lengths["validation"])} if "validation" in lengths else {}
    eval_dl = DataLoader(
        prepared.splits["validation"], batch_size=spec.eval_batch_size or spec.batch_size, **order, **kwargs
    )
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, build_optimizer(model, spec), train_dl, eval_dl)
    total_steps = planned_steps(
        spec, len(prepared.splits["train"]), accelerator.num_processes, prepared.lengths.get("train")
    )
    # Not prepared: accelerate's scheduler wrapper steps num_processes times per step when batches
    # are not split, which would make the schedule depend on the world size.
    scheduler = build_schedule(optimizer.optimizer, spec, total_steps)
    return TrainingParts(model, optimizer, scheduler, train_dl, eval_dl, total_steps)


class Window:
    """What accumulates between two log steps: loss (on the device), steps, tokens, examples, time."""

    def __init__(self, device: Any, flops: ModelFlops | None = None) -> None:
        import torch

        self.loss = torch.zeros((), device=device)
        self.steps = self.tokens = self.examples = 0
        self.model_flops, self.flops = flops, 0.0
        self.start = time.perf_counter()

    def add(self, loss: Any, batch: dict[str, Any]) -> None:
        """One micro-batch of this rank (its tokens, padding included, and examples; summed over ranks at log time,
        as token-budget batches differ between ranks)."""
        self.loss += loss.detach()
        self.tokens += batch["input_ids"].numel()
        self.examples += batch["input_ids"].shape[0]
        if self.model_flops is not None:
            self.flops += batch["input_ids"].numel() * self.model_flops.per_token(batch["input_ids"].shape[-1])

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation and checkpoints inside this block do not count as training time."""
        paused = time.perf_counter()
        yield
        self.start += time.perf_counter() - paused

    def reset(self) -> None:
        """Start the next window."""
        self.loss.zero_()
        self.steps = self.tokens = self.examples = 0
        self.flops = 0.0
        self.start = time.perf_counter()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """Fits a model for a task with the recipe's training settings, writing into the run directory."""

    def __init__(
        self,
        accelerator: Any,
        spec: TrainSpec,
        task: Task,
        parts: TrainingParts,
        tokenizer: Any,
        run: RunDir,
        log: MetricsLog,
        best: Ranking,
        stop: Ranking | None = None,
        strategy: Applied | None = None,
        base_model: str | None = None,
        modules: list[tuple[str, Any, dict[str, Any]]] | None = None,
    ) -> None:
        self.accelerator, self.spec, self.task, self.tokenizer = accelerator, spec, task, tokenizer
        self.model, self.optimizer, self.scheduler = parts.model, parts.optimizer, parts.scheduler
        self.train_dl, self.eval_dl, self.total_steps = parts.train_dl, parts.eval_dl, parts.total_steps
        self.run, self.log, self.best, self.stop = run, log, best, stop
        self.strategy = strategy or Applied(parts.model, "full")
        self.base_model = base_model  # what adapter-only saves name as the model to load them on
        self.modules = modules or []
        self.state = TrainState()
        self._signal: int | None = None
        # For train/tflops and train/mfu (llmtune/flops.py): the model's FLOPs per token and the device's peak.
        self.model_flops: ModelFlops = model_flops(accelerator.unwrap_model(parts.model))
        cache_dir = getattr(getattr(task, "data", None), "cache_dir", None)
        self.peak: Peak = device_peak(accelerator.device, spec.precision, cache_root(cache_dir))

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

    def _draw_seed(self, micro_index: int) -> int:
        """A seed for the per-draw randomness of one micro-batch: a pure function of where it is."""
        key = f"{self.spec.seed}/{self.accelerator.process_index}/{self.state.step}/{micro_index}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1

    # --- checkpoints and saved models ---------------------------------------------------------------
    def save(self) -> None:
        """A resumable checkpoint of the current step."""
        save_checkpoint(
            self.accelerator,
            self.run.checkpoints,
            self.state.step,
            self.scheduler,
            asdict(self.state),
            self.spec.keep_last,
        )

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path`: tensors, schedule, data position and RNG, in that order."""
        state, rng = load_checkpoint(self.accelerator, path, self.scheduler)
        self.state = TrainState(**state)
        # The data loaders draw no global random numbers (their samplers are seeded by accelerate),
        # so the RNG states can be applied now and the next forward sees exactly what it would have.
        set_rng_state(rng)
        best = self.run.best / FINAL_METRICS
        if self.accelerator.is_main_process:
            written_later = best.exists() and json.loads(best.read_text())["step"] > self.state.step
            if written_later:
                shutil.rmtree(best.parent)  # written after this checkpoint; it will be written again
        self.log.truncate_after(self.state.step)
        self.accelerator.wait_for_everyone()

    def save_model(self, target: Path, step: int, metrics: dict[str, float]) -> None:
        """A standard Hugging Face model directory (safetensors, config, generation config, tokenizer) with
        the step and metrics it was evaluated at (`llmtune_metrics.json`), written atomically."""
        state_dict = self.accelerator.get_state_dict(self.model)  # collective under FSDP / DeepSpeed
        if self.accelerator.is_main_process:
            with atomic_dir(target) as tmp:
                model = self.accelerator.unwrap_model(self.model)
                save_model(model, tmp, state_dict, self.strategy.kind, self.base_model, self.strategy.settings)
                self.tokenizer.save_pretrained(str(tmp))
                (tmp / FINAL_METRICS).write_text(json.dumps({"step": step, "metrics": metrics}, indent=1))
        self.accelerator.wait_for_everyone()

    # --- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, max_batches: int | None) -> dict[str, float]:
        """Evaluate, log, keep the best model, and count evaluations without improvement."""
        metrics = evaluate(self.accelerator, self.model, self.eval_dl, self.task, max_batches, self.modules)
        st = self.state
        st.last_eval_step, st.last_metrics = st.step, metrics
        self.log.write(st.step, {"epoch": st.epoch, **metrics})
        if self.best.improves(metrics[self.best.metric], st.best_value):
            st.best_value, st.best_step, st.best_metrics = metrics[self.best.metric], st.step, metrics
            self.save_model(self.run.best, st.step, metrics)
        if self.stop is not None:
            if self.stop.improves(metrics[self.stop.metric], st.stop_value):
                st.stop_value, st.bad_evals = metrics[self.stop.metric], 0
            else:
                st.bad_evals += 1
        return metrics

    # --- signals ------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum

    def _stop_requested(self) -> bool:
        """Whether any rank got a signal (all ranks agree, so they stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return self._signal is not None
        import torch

        flag = torch.tensor([1.0 if self._signal is not None else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    # --- the loop -----------------------------------------------------------------------------------
    def _draw(self, batches: Iterator[tuple[int, int, dict[str, Any]]]) -> list[tuple[int, int, dict[str, Any]]]:
        """The micro-batches of one optimizer step, as the task draws them (e.g. fresh masks)."""
        drawn = []
        for index in range(self.spec.grad_accum):
            epoch, consumed, batch = next(batches)
            drawn.append((epoch, consumed, self.task.draw(batch, self._draw_seed(index))))
        return drawn

    def _accumulate(self, micro: list[tuple[int, int, dict[str, Any]]], window: Window) -> None:
        """Forward and backward of every micro-batch, the loss over the whole step's target count."""
        acc, world = self.accelerator, self.accelerator.num_processes
        num_items = sum(self.task.count_items(b) for _, _, b in micro)
        if world > 1:
            num_items = acc.reduce(num_items, "sum")
        for index, (_, _, batch) in enumerate(micro):
            with contextlib.ExitStack() as stack:
                if index < len(micro) - 1:  # gradients are synchronised on the last micro-batch only
                    stack.enter_context(acc.no_sync(self.model))
                stack.enter_context(acc.autocast())
                loss = self.task.loss(self.model, batch, num_items)
                # DDP averages gradients over ranks; the loss is already over the global count.
                acc.backward(loss * world if world > 1 else loss)
            window.add(loss, batch)

    def _optimizer_step(self) -> Any:
        """Clip, step, schedule, strategy hook, zero; returns the gradient norm (a tensor) if clipped."""
        acc, spec = self.accelerator, self.spec
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), spec.max_grad_norm) if spec.max_grad_norm else None
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        if self.strategy.on_step is not None:  # e.g. AdaLoRA's rank budget, which reads the gradients
            self.strategy.on_step(self.state.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _advance(self, micro: list[tuple[int, int, dict[str, Any]]], window: Window) -> None:
        """Count the step and move the data position past its micro-batches."""
        st = self.state
        epoch, consumed, _ = micro[-1]
        st.step += 1
        st.epoch, st.batch_in_epoch = (epoch + 1, 0) if consumed == len(self.train_dl) else (epoch, consumed)
        window.steps += 1

    def _log_window(self, window: Window, grad_norm: Any, progress: Progress) -> None:
        """Write the window's mean loss, learning rate, throughput and memory; start the next window."""
        acc, st = self.accelerator, self.state
        loss = acc.reduce(window.loss, "sum") if acc.num_processes > 1 else window.loss
        if acc.num_processes > 1:
            import torch

            counts = acc.reduce(
                torch.tensor([window.tokens, window.examples, window.flops], dtype=torch.float64, device=acc.device),
                "sum",
            )
            tokens, examples, window.flops = counts.tolist()
            window.tokens, window.examples = int(tokens), int(examples)
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        st.tokens_seen += window.tokens
        st.examples_seen += window.examples
        st.train_seconds += elapsed
        self.peak = self.peak.at_least(window.flops / elapsed / acc.num_processes)
        values = {
            "epoch": st.epoch,
            "train/loss": float(loss) / window.steps,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/tokens_per_s": window.tokens / elapsed,
            "train/tokens": st.tokens_seen,
            "train/examples_per_s": window.examples / elapsed,
            "train/examples": st.examples_seen,
            "train/seconds": st.train_seconds,
            "train/peak_rss_mib": round(peak_rss_mib(), 1),
            # Achieved model FLOP/s over all ranks, and its share of their summed peak (llmtune/flops.py).
            "train/tflops": window.flops / elapsed / 1e12,
            "train/mfu": window.flops / elapsed / (self.peak.flops * acc.num_processes),
        }
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        self.log.write(st.step, values)
        progress.log(
            st.step, values["train/loss"], values["train/lr"], values["train/tokens_per_s"], values["train/mfu"]
        )
        window.reset()

    def _evaluate_and_save_if_due(self, progress: Progress) -> bool:
        """Mid-run evaluation and checkpoint on their schedules; True when early stopping says to stop."""
        spec, st = self.spec, self.state
        stop_now = False
        if spec.eval_every and st.step % spec.eval_every == 0 and st.step < self.total_steps:
            metrics = self._evaluate(spec.eval_max_batches)
            progress.message(f"eval step {st.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            patience = spec.early_stopping.patience if spec.early_stopping is not None else None
            if self.stop is not None and patience is not None and st.bad_evals >= patience:
                progress.message(f"early stop: {self.stop.metric} has not improved for {patience} evaluations")
                stop_now = True
        if spec.save_every and st.step % spec.save_every == 0:
            self.save()
        return stop_now

    def fit(self, progress: Progress) -> FitResult:
        """Train to `total_steps` (or an early stop / a signal), evaluating and checkpointing on schedule."""
        st = self.state
        batches = self._micro_batches()
        window = Window(self.accelerator.device, self.model_flops)
        stopped_early = False
        self.model.train()
        with signals_caught(self._on_signal):
            while st.step < self.total_steps:
                micro = self._draw(batches)
                self._accumulate(micro, window)
                grad_norm = self._optimizer_step()
                self._advance(micro, window)
                progress.step()
                if st.step % self.spec.log_every == 0 or st.step == self.total_steps:
                    self._log_window(window, grad_norm, progress)
                with window.paused():
                    stopped_early = self._evaluate_and_save_if_due(progress)
                if stopped_early:
                    break
                if self._stop_requested():
                    self.save()
                    name = signal.Signals(self._signal).name if self._signal else "a signal"
                    progress.message(f"stopped by {name} at step {st.step}; checkpoint saved, continue with --resume")
                    return FitResult(st.last_metrics, st.step, interrupted=True)
        if st.last_eval_step != st.step:
            self._evaluate(None)
        return FitResult(st.last_metrics, st.step, st.best_step, st.best_metrics, stopped_early=stopped_early)
