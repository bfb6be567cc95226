"""`causal-lm`: next-token prediction (GPT-2 and any `AutoModelForCausalLM`).

Training: documents are tokenised, each followed by EOS, joined into one stream and cut into
`block_size` blocks (the stream's tail shorter than a block is dropped). Evaluation: the stream is
scored with a sliding window (`eval_stride`), as in the Hugging Face perplexity guide, so every
token is predicted once with up to `block_size - stride` tokens of context; perplexity is
token-weighted over the whole split.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtune.errors import UserError
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.packing import PackedTextTask, blocks_dataset, pack_blocks, require_tokens
from llmtune.tasks.token_loss import IGNORE, per_example_token_stats

if TYPE_CHECKING:
    import torch
    from datasets import Dataset


__all__ = ["CausalLM", "pack_blocks", "perplexity_metrics", "sliding_windows"]


def sliding_windows(
    stream: np.ndarray, block_size: int, stride: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows over a stream for perplexity: (input_ids, labels, attention_mask), each (n, block_size).

    Window i starts at i*stride; its labels keep only the tokens no earlier window scored (the rest
    are -100), so each token after the first is predicted exactly once when stride < block_size.
    """
    starts, prev_end = [], 0
    for begin in range(0, len(stream), stride):
        end = min(begin + block_size, len(stream))
        starts.append((begin, end, end - prev_end))
        prev_end = end
        if end == len(stream):
            break
    ids = np.full((len(starts), block_size), pad_id, dtype=np.int64)
    labels = np.full((len(starts), block_size), IGNORE, dtype=np.int64)
    mask = np.zeros((len(starts), block_size), dtype=np.int64)
    for row, (begin, end, target) in enumerate(starts):
        length = end - begin
        ids[row, :length] = stream[begin:end]
        labels[row, length - target : length] = stream[end - target : end]
        mask[row, :length] = 1
    return ids, labels, mask


class CausalLM(PackedTextTask):
    """Next-token prediction with token-weighted loss and sliding-window perplexity."""

    auto_class = "AutoModelForCausalLM"
    cache_version = "causal-lm/1"

    @property
    def stride(self) -> int:
        """The evaluation windows' stride: data.eval_stride, else block_size (no overlap)."""
        return self.data.eval_stride or self.data.block_size

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Refuse a block longer than the context, and a tokenizer without EOS to separate documents."""
        super().setup(model, tokenizer)
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer: causal-lm needs an EOS token to separate documents")

    def cache_key(self) -> list[Any]:
        """The evaluation stride also changes the rows."""
        return [*super().cache_key(), self.stride]

    def build_split(self, role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
        """Training: packed blocks. Evaluation: sliding windows whose labels score each token once."""
        block_size = self.data.block_size
        stream = self.stream(ds, self.tokenizer.eos_token_id)
        if role == "train":
            blocks = pack_blocks(stream, block_size)
            require_tokens(role, len(stream), block_size, "block")
            return blocks_dataset(blocks), {"tokens": int(blocks.size), "stream_tokens": len(stream)}
        require_tokens(role, len(stream), 2, "window")
        ids, labels, mask = sliding_windows(stream, block_size, self.stride, self.tokenizer.pad_token_id)
        scored = int((labels[:, 1:] != IGNORE).sum())
        return blocks_dataset(ids, labels=labels, attention_mask=mask), {"tokens": len(stream), "scored_tokens": scored}

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens predicted in the batch: every position after the first of each row that has a label."""
        labels = batch.get("labels", batch["input_ids"])
        return (labels[:, 1:] != IGNORE).sum()

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy over the batch, divided by the accumulated step's token count."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch.get("labels", batch["input_ids"])
        return model(**inputs, labels=labels, num_items_in_batch=num_items, use_cache=False).loss

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-window summed negative log-likelihood and scored-token count."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        stats = per_example_token_stats(logits[:, :-1], batch["labels"][:, 1:])
        return {"nll": stats["nll"], "tokens": stats["tokens"]}

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Token-weighted loss and its exponential, perplexity."""
        return perplexity_metrics(outputs)


def perplexity_metrics(outputs: EvalOutputs) -> dict[str, float]:
    """Token-weighted loss over the scored tokens, its exponential (perplexity), and their number."""
    nll, tokens = outputs.sum("nll"), outputs.sum("tokens")
    loss = nll / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)), "eval/tokens": tokens}
