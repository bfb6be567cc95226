"""Gradient accumulation normalises the loss over the tokens of the whole accumulated batch.

Rows with very unequal numbers of labelled tokens make the difference visible: averaging per
micro-batch means would weight the tokens of sparsely labelled micro-batches more.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.recipe import TrainSpec
from llmtune.tasks.base import Prepared
from llmtune.tasks.causal_lm import IGNORE
from tests.helpers import make_task

SEQ, VOCAB, ROWS = 16, 50, 8
# Labelled positions per row (the rest of each row's labels are -100, as in an eval window that
# overlaps the previous one). One row dominates: no split into micro-batches of 2 has equal counts.
LABELLED = [2, 2, 3, 2, 16, 2, 3, 2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    labels = torch.full_like(input_ids, IGNORE)
    for r, n in enumerate(LABELLED):
        labels[r, SEQ - n :] = input_ids[r, SEQ - n :]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture(scope="module")
def dataset(rows: dict[str, Any]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({k: v.tolist() for k, v in rows.items()}).with_format("torch")


@pytest.fixture(scope="module")
def initial_model() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_positions=SEQ,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmtune.tokenizer_training import train_byte_level_bpe

    return train_byte_level_bpe(["a tiny corpus for a tokenizer", "that only gets saved"], vocab_size=300)


def make_trainer(model: Any, dataset: Any, tokenizer: Any, run_dir: Path, batch_size: int, grad_accum: int) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from llmtune.run_dir import RunDir
    from llmtune.tracking import MetricsLog
    from llmtune.trainer import Ranking, Trainer, prepare_training

    spec = TrainSpec(
        max_steps=1,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=1.0,
        weight_decay=0.0,
        max_grad_norm=None,
        optimizer={"kind": "sgd", "momentum": 0.0},
        schedule={"kind": "constant", "warmup_steps": 0},
        log_every=1,
        seed=0,
    )
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0)
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl", accelerator, enabled=True)
    prepared = Prepared({"train": dataset, "validation": dataset})
    task = make_task("causal-lm")
    parts = prepare_training(accelerator, spec, task, model, tokenizer, prepared)
    return Trainer(accelerator, spec, task, parts, tokenizer, RunDir(run_dir), log, Ranking("eval/loss", False))


def trained_params(trainer: Any) -> dict[str, Any]:
    from llmtune.tracking import Progress

    result = trainer.fit(Progress(1, 0, enabled=False))
    assert result.steps == 1
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


def hand_gradients(model: Any, micro_batches: list[dict[str, Any]], naive: bool) -> dict[str, Any]:
    """Gradients of the token-weighted loss over all micro-batches, or of the mean of per-batch means."""
    import torch.nn.functional as F

    model = copy.deepcopy(model).train()
    model.zero_grad()
    total_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    for batch in micro_batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
        loss = nll / tokens / len(micro_batches) if naive else nll / total_tokens
        loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_accumulated_step_equals_one_large_batch(
    initial_model: Any, dataset: Any, tokenizer: Any, rows: dict[str, Any], tmp_path: Path
) -> None:
    before = {k: v.detach().clone() for k, v in initial_model.named_parameters()}

    large = make_trainer(copy.deepcopy(initial_model), dataset, tokenizer, tmp_path / "large", 8, 1)
    after_large = trained_params(large)

    accum = make_trainer(copy.deepcopy(initial_model), dataset, tokenizer, tmp_path / "accum", 2, 4)
    after_accum = trained_params(accum)
    # The micro-batches that step consumed (the seedable sampler draws the same order per epoch).
    accum.train_dl.set_epoch(0)
    micro = [dict(b) for b in accum.train_dl]
    assert len(micro) == 4
    assert all(len(b["input_ids"]) == 2 for b in micro)
    counts = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro]
    assert len(set(counts)) > 1, counts  # unequal micro-batches, or the test proves nothing

    # A real step happened.
    assert max_diff(after_large, before) > 1e-3
    # Accumulating 4 x 2 rows gives the parameters of one batch of 8.
    for name in after_large:
        torch.testing.assert_close(after_accum[name], after_large[name], atol=1e-6, rtol=0)

    # With SGD, lr 1, no momentum/decay/clipping: the update is minus the token-weighted gradient.
    correct = hand_gradients(initial_model, micro, naive=False)
    update = {k: before[k] - after_accum[k] for k in before}
    for name in update:
        torch.testing.assert_close(update[name], correct[name], atol=1e-6, rtol=1e-4)

    # The naive per-micro-batch mean gives clearly different gradients on this data.
    naive = hand_gradients(initial_model, micro, naive=True)
    assert max_diff(naive, correct) > 100 * 1e-6
    assert max_diff(naive, update) > 100 * 1e-6


def test_whole_batch_loss_is_token_weighted(initial_model: Any, rows: dict[str, Any]) -> None:
    """CausalLM.loss / count_items: summed NLL over the batch divided by the given token count."""
    import torch.nn.functional as F

    task = make_task("causal-lm")
    batch = {k: v[:4] for k, v in rows.items()}
    count = task.count_items(batch)
    assert int(count) == sum(n if n < SEQ else n - 1 for n in LABELLED[:4])
    model = copy.deepcopy(initial_model).eval()
    with torch.no_grad():
        loss = task.loss(model, batch, count * 3)
        logits = model(input_ids=batch["input_ids"]).logits
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    torch.testing.assert_close(loss, nll / (int(count) * 3), atol=1e-6, rtol=1e-5)
