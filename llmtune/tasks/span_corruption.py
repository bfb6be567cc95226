"""`span-corruption`: the T5 pretraining objective (any `AutoModelForSeq2SeqLM` encoder-decoder).

Ported from the published T5 code (google-research/text-to-text-transfer-transformer,
`t5/data/preprocessors.py`: `random_spans_helper`, `random_spans_noise_mask`, `noise_span_to_unique_sentinel`,
`nonnoise_span_to_unique_sentinel`), with numpy in place of TensorFlow; transformers has no PyTorch
version. Raw text is packed into chunks of the length that corrupts to exactly `block_size` encoder
tokens; each draw picks new random spans (seeded per step by the trainer, per example in evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from llmtune.errors import UserError
from llmtune.tasks.base import EvalOutputs, Prepared
from llmtune.tasks.packing import PackedTextTask, blocks_dataset, pack_blocks, require_tokens
from llmtune.tasks.token_loss import per_example_token_stats, token_loss_sum
from llmtune.tokenizer_training import sentinel_name

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.tasks.registry import SpanCorruptionSpec


def _noise_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a raw length, with T5's guards against degenerate cases."""
    length = max(length, 2)
    noise = min(max(round(length * noise_density), 1), length - 1)
    # At most one span per non-noise token: every noise span needs a non-noise span before it. (T5's
    # code has no such cap and draws empty non-noise spans for very dense noise; we keep spans real.)
    return noise, min(max(round(noise / mean_span), 1), length - noise)


def input_and_target_lengths(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """T5's `random_spans_helper`: the raw token count whose corruption fills `inputs_length` encoder
    tokens (non-noise tokens + one sentinel per span + EOS), and the resulting target length."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise, spans = _noise_counts(tokens, noise_density, mean_span)
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    _, targets = lengths(tokens)
    if noise_density == 0.5 and targets > inputs_length:  # T5's own adjustment, kept as published
        tokens -= 1
        _, targets = lengths(tokens)
    return tokens, targets


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's `random_spans_noise_mask`: a boolean mask of `length` with about `noise_density` noise in
    spans of mean length `mean_span`, drawn as random segmentations; it starts with non-noise."""
    noise, spans = _noise_counts(length, noise_density, mean_span)
    total = max(length, 2)

    def segmentation(items: int, segments: int) -> np.ndarray:
        first = np.zeros(items, dtype=bool)
        first[1:] = rng.permutation(np.arange(items - 1) < segments - 1)
        return np.bincount(np.cumsum(first), minlength=segments)

    lengths = np.stack([segmentation(total - noise, spans), segmentation(noise, spans)], axis=1).reshape(-1)
    starts = np.cumsum(lengths)[:-1]
    indicator = np.zeros(total, dtype=np.int64)
    np.add.at(indicator, starts, 1)
    return (np.cumsum(indicator) % 2 == 1)[:length]


def _spans_to_sentinels(tokens: np.ndarray, spans: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """T5's `noise_span_to_unique_sentinel`: each run of `spans` becomes the next sentinel."""
    first = spans & ~np.concatenate([[False], spans[:-1]])
    later = spans & ~first
    return np.where(first, sentinels[np.cumsum(first) - 1], tokens)[~later]


def corrupt(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), both ended with EOS: in the inputs each noise span becomes one sentinel; the
    targets are the sentinels each followed by the span they replaced, in order (T5's inputs and
    `nonnoise_span_to_unique_sentinel` targets)."""
    inputs = _spans_to_sentinels(tokens, noise, sentinels)
    targets = _spans_to_sentinels(tokens, ~noise, sentinels)
    return np.append(inputs, eos), np.append(targets, eos)


class SpanCorruption(PackedTextTask):
    """T5 span corruption with sentinel tokens; metrics: loss and target-token accuracy."""

    auto_class = "AutoModelForSeq2SeqLM"
    cache_version = "span-corruption/1"

    def __init__(self, recipe: Any, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.spec: SpanCorruptionSpec = self.options
        self.sentinels = np.zeros(0, dtype=np.int64)
        self.eos = self.pad = -1
        self.input_length = self.data.block_size
        self.raw_length, self.target_length = input_and_target_lengths(
            self.input_length, self.spec.noise_density, self.spec.mean_noise_span_length
        )

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Need EOS and enough `<extra_id_N>` sentinels for the spans of one sequence."""
        super().setup(model, tokenizer)
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer: span-corruption needs an EOS token (</s>)")
        _, spans = _noise_counts(self.raw_length, self.spec.noise_density, self.spec.mean_noise_span_length)
        ids = []
        for i in range(spans):
            token_id = tokenizer.convert_tokens_to_ids(sentinel_name(i))
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise UserError(
                    f"tokenizer: span-corruption needs sentinels <extra_id_0> … <extra_id_{spans - 1}> "
                    f"for {spans} spans per sequence, but has no {sentinel_name(i)}; train one with "
                    "tokenizer.train.kind: unigram or use a T5 tokenizer"
                )
            ids.append(token_id)
        self.sentinels, self.eos = np.array(ids, dtype=np.int64), tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def cache_key(self) -> list[Any]:
        """Rows are raw chunks of the length that corrupts to block_size."""
        return [self.cache_version, self.data.text_column, self.raw_length]

    def build_split(self, role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
        """Raw chunks of the length that corrupts to `block_size` encoder tokens (tails dropped)."""
        stream = self.stream(ds, self.tokenizer.eos_token_id)
        require_tokens(role, len(stream), self.raw_length, "raw chunk")
        blocks = pack_blocks(stream, self.raw_length)
        extra = {} if role == "train" else {"example_id": np.arange(len(blocks), dtype=np.int64)}
        return blocks_dataset(blocks, **extra), {"tokens": int(blocks.size)}

    def prepare(self, raw: RawData, tokenizer: Any) -> Prepared:
        """The raw chunks, and the lengths and noise settings for the run log."""
        prepared = super().prepare(raw, tokenizer)
        prepared.stats.update(
            raw_chunk=self.raw_length,
            encoder_length=self.input_length,
            decoder_length=self.target_length,
            noise_density=self.spec.noise_density,
            mean_noise_span_length=self.spec.mean_noise_span_length,
        )
        return prepared

    def _corrupt_rows(self, raw: torch.Tensor, rngs: list[np.random.Generator]) -> dict[str, torch.Tensor]:
        import torch

        s = self.spec
        inputs, targets = [], []
        for row, rng in zip(raw.cpu().numpy(), rngs, strict=True):
            noise = random_spans_noise_mask(len(row), s.noise_density, s.mean_noise_span_length, rng)
            i, t = corrupt(row, noise, self.sentinels, self.eos)
            inputs.append(i)
            targets.append(t)
        enc = torch.from_numpy(np.stack(inputs)).to(raw.device)
        mask = torch.ones_like(enc)
        if enc.shape[1] < self.input_length:  # the published length search can land one short: pad
            pad = self.input_length - enc.shape[1]
            enc = torch.nn.functional.pad(enc, (0, pad), value=self.pad)
            mask = torch.nn.functional.pad(mask, (0, pad), value=0)
        return {"input_ids": enc, "attention_mask": mask, "labels": torch.from_numpy(np.stack(targets)).to(raw.device)}

    def draw(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """New random spans for this draw (the spans are drawn on the host, as in T5's data pipeline)."""
        rng = np.random.default_rng(seed)
        return self._corrupt_rows(batch["input_ids"], [rng] * len(batch["input_ids"]))

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Target tokens in the batch (every target position is real: lengths are fixed)."""
        return (batch["labels"] != -100).sum()

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Summed target-token cross-entropy over the accumulated step's target-token count; the model
        builds decoder inputs from its own start token by shifting the labels right."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return token_loss_sum(out.logits, batch["labels"]) / num_items

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Corrupt each example with its own seed (seed, example_id), then per-example sums."""
        rngs = [np.random.default_rng([self.seed, e]) for e in batch["example_id"].tolist()]
        corrupted = self._corrupt_rows(batch["input_ids"], rngs)
        out = model(**corrupted)
        return per_example_token_stats(out.logits, corrupted["labels"])

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Target-token loss and accuracy."""
        totals = {key: outputs.sum(key) for key in ("nll", "correct", "tokens")}
        tokens = max(totals["tokens"], 1.0)
        return {
            "eval/loss": totals["nll"] / tokens,
            "eval/token_accuracy": totals["correct"] / tokens,
            "eval/target_tokens": totals["tokens"],
        }
