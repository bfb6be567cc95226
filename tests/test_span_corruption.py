"""T5 span corruption: the published length arithmetic, the noise-mask statistics, lossless corruption
with ordered sentinels, and the task end to end on a tiny T5 (shapes, per-example eval, refusals)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from llmtune.data import RawData
from llmtune.errors import UserError
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.span_corruption import (
    SpanCorruption,
    corrupt,
    input_and_target_lengths,
    random_spans_noise_mask,
)
from llmtune.tokenizer_training import sentinel_name, train_byte_level_bpe, train_unigram, train_wordpiece
from tests.helpers import make_task, synthetic_documents

BLOCK = 64
EOS = 1
SENTINEL_BASE = 10_000


pytestmark = pytest.mark.usefixtures("one_thread")


def runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a boolean mask."""
    lengths, current = [], 0
    for value in mask.tolist():
        if value:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    if current:
        lengths.append(current)
    return lengths


def reconstruct(inputs: list[int], targets: list[int], sentinels: set[int], eos: int) -> list[int]:
    """Undo a corruption: each sentinel in the inputs becomes what follows it in the targets."""
    assert inputs[-1] == eos and targets[-1] == eos
    filling: dict[int, list[int]] = {}
    current: int | None = None
    for token in targets[:-1]:
        if token in sentinels:
            assert token not in filling, "a sentinel appears twice in the targets"
            current = token
            filling[token] = []
        else:
            assert current is not None, "targets must start with a sentinel"
            filling[current].append(token)
    out: list[int] = []
    for token in inputs[:-1]:
        out.extend(filling.pop(token) if token in sentinels else [token])
    assert not filling, "a target span has no sentinel in the inputs"
    return out


# --- lengths -----------------------------------------------------------------------------------------


def test_published_t5_lengths() -> None:
    assert input_and_target_lengths(512, 0.15, 3.0) == (568, 114)


COMBOS = [
    (512, 0.15, 3.0),
    (128, 0.15, 3.0),
    (64, 0.15, 3.0),
    (256, 0.3, 3.0),
    (100, 0.15, 2.0),
    (512, 0.5, 3.0),
    (128, 0.5, 1.0),
    (300, 0.25, 5.0),
    (32, 0.1, 1.0),
]


@pytest.mark.parametrize(("block", "density", "span"), COMBOS)
def test_corrupted_lengths(block: int, density: float, span: float) -> None:
    raw, target = input_and_target_lengths(block, density, span)
    assert raw > block * (1 - density)  # the raw chunk is longer than what it corrupts to
    sentinels = np.arange(SENTINEL_BASE, SENTINEL_BASE + raw)
    tokens = np.arange(100, 100 + raw)
    for seed in range(5):
        noise = random_spans_noise_mask(raw, density, span, np.random.default_rng(seed))
        inputs, targets = corrupt(tokens, noise, sentinels, EOS)
        assert len(inputs) <= block
        assert len(targets) == target, "the decoder length differs from input_and_target_lengths' target"


@pytest.mark.parametrize(("block", "density", "span"), [(512, 0.15, 3.0), (128, 0.15, 3.0), (64, 0.15, 3.0)])
def test_corrupted_input_fills_the_block(block: int, density: float, span: float) -> None:
    raw, _ = input_and_target_lengths(block, density, span)
    noise = random_spans_noise_mask(raw, density, span, np.random.default_rng(0))
    inputs, _ = corrupt(np.arange(raw) + 100, noise, np.arange(SENTINEL_BASE, SENTINEL_BASE + raw), EOS)
    assert len(inputs) == block


# --- the noise mask ----------------------------------------------------------------------------------


def test_noise_mask_statistics() -> None:
    length, density, span = 141, 0.15, 3.0
    noise_total = spans_total = 0
    span_lengths: list[int] = []
    for i in range(2000):
        mask = random_spans_noise_mask(length, density, span, np.random.default_rng(i))
        assert mask.shape == (length,) and mask.dtype == bool
        assert not mask[0], "the mask must start with non-noise"
        spans = runs(mask)
        assert len(spans) == round(mask.sum() / span)
        noise_total += int(mask.sum())
        spans_total += len(spans)
        span_lengths.extend(spans)
    assert abs(noise_total / (2000 * length) - density) < 0.01
    assert abs(noise_total / spans_total - span) < 0.15
    assert len(set(span_lengths)) > 3  # spans really vary in length (random segmentation)


@pytest.mark.parametrize(
    ("length", "density", "span"),
    [(141, 0.15, 3.0), (70, 0.3, 2.0), (63, 0.5, 1.0), (106, 0.8, 2.0), (63, 0.6, 1.0), (158, 0.9, 3.0)],
)
def test_noise_mask_has_exactly_the_noise_count(length: int, density: float, span: float) -> None:
    """T5's mask always holds round(length * density) noise tokens, whatever the random segmentation
    (also when there are more noise spans than non-noise tokens, so some non-noise segments are empty)."""
    for i in range(50):
        mask = random_spans_noise_mask(length, density, span, np.random.default_rng(i))
        assert int(mask.sum()) == round(length * density)
        assert not mask[0]


def test_noise_mask_varies_with_rng_and_repeats_with_seed() -> None:
    a = random_spans_noise_mask(141, 0.15, 3.0, np.random.default_rng(3))
    b = random_spans_noise_mask(141, 0.15, 3.0, np.random.default_rng(3))
    c = random_spans_noise_mask(141, 0.15, 3.0, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# --- corrupt -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "density", "span"), [(141, 0.15, 3.0), (70, 0.3, 2.0), (50, 0.5, 1.0), (9, 0.15, 3)]
)
def test_corrupt_is_lossless_with_ordered_sentinels(length: int, density: float, span: float) -> None:
    sentinels = np.arange(SENTINEL_BASE, SENTINEL_BASE + length)
    sentinel_set = set(sentinels.tolist())
    for seed in range(50):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(2, 50, size=length)  # repeated ids: reconstruction must not rely on uniqueness
        noise = random_spans_noise_mask(length, density, span, rng)
        inputs, targets = corrupt(tokens, noise, sentinels, EOS)
        assert inputs[-1] == EOS and targets[-1] == EOS
        for seq in (inputs, targets):
            used = [t - SENTINEL_BASE for t in seq.tolist() if t in sentinel_set]
            assert used == list(range(len(runs(noise)))), "sentinels must appear once each, in order 0, 1, 2, ..."
        assert targets[0] == sentinels[0]
        assert reconstruct(inputs.tolist(), targets.tolist(), sentinel_set, EOS) == tokens.tolist()


# --- the task ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_unigram(synthetic_documents(300), vocab_size=400, num_sentinels=20)


@pytest.fixture(scope="module")
def t5(tok: Any) -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        num_layers=1,
        num_decoder_layers=1,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=2,
        vocab_size=len(tok),
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # An explicit cache dir: module fixtures run before the autouse LLMTUNE_CACHE fixture.
    return {"block_size": BLOCK, "cache_dir": str(tmp_path_factory.mktemp("t5-cache"))}


def span_task(data: dict[str, Any], **span_corruption: Any) -> SpanCorruption:
    """A span-corruption task with these data and noise settings."""
    return make_task("span-corruption", data=data, span_corruption=span_corruption)


@pytest.fixture(scope="module")
def task(tok: Any, t5: Any, data_spec: dict[str, Any]) -> SpanCorruption:
    task = span_task(data_spec)
    task.setup(t5, tok)
    return task


@pytest.fixture(scope="module")
def prepared(task: SpanCorruption, tok: Any, data_spec: dict[str, Any]) -> Any:
    from datasets import Dataset

    raw = RawData(
        splits={
            "train": Dataset.from_dict({"text": synthetic_documents(300, seed=1)}),
            "validation": Dataset.from_dict({"text": synthetic_documents(30, seed=2)}),
        },
        fingerprint="test-span-corruption",
    )
    return task.prepare(raw, tok)


def test_task_draw_shapes(task: SpanCorruption, tok: Any, prepared: Any) -> None:
    raw_length, target_length = input_and_target_lengths(BLOCK, 0.15, 3.0)
    assert prepared.stats["raw_chunk"] == raw_length
    assert prepared.stats["encoder_length"] == BLOCK
    assert prepared.stats["decoder_length"] == target_length
    train = prepared.splits["train"]
    assert len(train) >= 16
    rows = train[:8]["input_ids"]
    assert rows.shape == (8, raw_length)
    sentinel_ids = {tok.convert_tokens_to_ids(sentinel_name(i)) for i in range(20)}
    for seed in range(20):
        out = task.draw({"input_ids": rows}, seed)
        assert out["input_ids"].shape == (8, BLOCK)
        assert out["attention_mask"].shape == (8, BLOCK)
        assert out["labels"].shape == (8, target_length)
        assert (out["input_ids"][:, -1] == tok.eos_token_id).all()
        assert (out["labels"][:, -1] == tok.eos_token_id).all()
        assert (out["labels"][:, 0] == tok.convert_tokens_to_ids(sentinel_name(0))).all()
        for r in range(len(rows)):
            back = reconstruct(out["input_ids"][r].tolist(), out["labels"][r].tolist(), sentinel_ids, tok.eos_token_id)
            assert back == rows[r].tolist()
    a, b, c = task.draw({"input_ids": rows}, 5), task.draw({"input_ids": rows}, 5), task.draw({"input_ids": rows}, 6)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert not torch.equal(a["input_ids"][0], a["input_ids"][1])  # rows are not all corrupted alike


def test_task_loss_runs(task: SpanCorruption, t5: Any, prepared: Any) -> None:
    out = task.draw({"input_ids": prepared.splits["train"][:4]["input_ids"]}, 0)
    n = task.count_items(out)
    assert int(n) == out["labels"].numel()
    with torch.no_grad():
        loss = task.loss(t5, out, n)
    assert torch.isfinite(loss) and loss > 0


def test_task_eval_is_per_example(task: SpanCorruption, t5: Any, prepared: Any) -> None:
    val = prepared.splits["validation"]
    assert len(val) >= 4
    rows = val[:4]
    batch = {"input_ids": rows["input_ids"], "example_id": rows["example_id"]}
    with torch.no_grad():
        together = task.eval_batch(t5, batch)
        again = task.eval_batch(t5, batch)
        alone = [task.eval_batch(t5, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(4)]
        swapped = task.eval_batch(t5, {k: v.flip(0) for k, v in batch.items()})
    _, target_length = input_and_target_lengths(BLOCK, 0.15, 3.0)
    assert (together["tokens"] == target_length).all()
    assert torch.equal(together["nll"], again["nll"])
    for i in range(4):
        assert together["tokens"][i] == alone[i]["tokens"][0]
        assert together["correct"][i] == alone[i]["correct"][0]
        torch.testing.assert_close(together["nll"][i], alone[i]["nll"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(swapped["nll"].flip(0), together["nll"], rtol=1e-4, atol=1e-4)
    outputs = EvalOutputs()
    outputs.add(together)
    metrics = task.metrics(outputs)
    assert metrics["eval/target_tokens"] == 4 * target_length
    assert metrics["eval/loss"] > 0


# --- setup refusals ----------------------------------------------------------------------------------


def test_setup_refuses_tokenizer_without_sentinels(t5: Any, data_spec: dict[str, Any]) -> None:
    with pytest.raises(UserError):
        span_task(data_spec).setup(t5, train_wordpiece(synthetic_documents(50), vocab_size=300))
    bpe = train_byte_level_bpe(synthetic_documents(50), vocab_size=300)  # has an EOS, but no sentinels
    with pytest.raises(UserError, match="extra_id_0"):
        span_task(data_spec).setup(t5, bpe)


def test_setup_refuses_too_few_sentinels(t5: Any, data_spec: dict[str, Any]) -> None:
    few = train_unigram(synthetic_documents(100), vocab_size=400, num_sentinels=2)
    spec = {**data_spec, "block_size": 128}
    with pytest.raises(UserError, match="extra_id_2"):
        span_task(spec).setup(t5, few)
    span_task({**data_spec, "block_size": 16}).setup(t5, few)  # 2 spans: enough


@pytest.mark.parametrize(("density", "span"), [(0.5, 1.0), (0.6, 1.0), (0.8, 2.0), (0.9, 3.0)])
def test_task_dense_noise_is_refused_or_has_fixed_shapes(
    t5: Any, data_spec: dict[str, Any], density: float, span: float
) -> None:
    """Settings the recipe accepts either fail setup with a UserError or draw (B, block) / (B, target) rows."""
    many = train_unigram(synthetic_documents(100), vocab_size=400, num_sentinels=100)
    task = span_task(data_spec, noise_density=density, mean_noise_span_length=span)
    try:
        task.setup(t5, many)
    except UserError:
        return
    rows = torch.from_numpy(np.random.default_rng(0).integers(3, 40, size=(4, task.raw_length)))
    for seed in range(5):
        out = task.draw({"input_ids": rows}, seed)
        assert out["input_ids"].shape == (4, BLOCK)
        assert out["labels"].shape == (4, task.target_length)
