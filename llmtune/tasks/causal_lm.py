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
from llmtune.modeling import context_length
from llmtune.tasks.base import EvalOutputs, Prepared
from llmtune.tasks.packing import blocks_dataset, cached_splits, pack_blocks, require_tokens, token_stream
from llmtune.tasks.token_loss import IGNORE

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import DataSpec

__all__ = ["CausalLM", "pack_blocks", "sliding_windows"]

_CACHE_VERSION = "causal-lm/1"


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


class CausalLM:
    """Next-token prediction with token-weighted loss and sliding-window perplexity."""

    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    metric_names = ("eval/loss", "eval/perplexity", "eval/tokens")

    def __init__(self, spec: None = None, seed: int = 0) -> None:
        self.seed = seed

    def required_columns(self, data: DataSpec) -> dict[str, str]:
        """The text column."""
        return {"data.text_column": data.text_column}

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """Pretraining builds the model as configured."""
        return {}

    def setup(self, data: DataSpec, model: Any, tokenizer: Any) -> None:
        """Refuse a block size longer than the model's context."""
        limit = context_length(model.config)
        if limit is not None and data.block_size > limit:
            raise UserError(
                f"data.block_size: {data.block_size} is longer than the model's context ({limit}); "
                f"set data.block_size <= {limit}"
            )

    def prepare(self, raw: RawData, tokenizer: Any, data: DataSpec) -> Prepared:
        """Packed training blocks and sliding evaluation windows, from the cache when it has them."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise UserError("tokenizer: causal-lm needs an EOS token to separate documents")
        stride = data.eval_stride or data.block_size

        def build(role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
            stream = token_stream(ds, tokenizer, data.text_column, eos, data.num_proc)
            if role == "train":
                blocks = pack_blocks(stream, data.block_size)
                require_tokens(role, len(stream), data.block_size, "block")
                return blocks_dataset(blocks), {"tokens": int(blocks.size), "stream_tokens": len(stream)}
            require_tokens(role, len(stream), 2, "window")
            ids, labels, mask = sliding_windows(stream, data.block_size, stride, tokenizer.pad_token_id)
            scored = int((labels[:, 1:] != IGNORE).sum())
            return blocks_dataset(ids, labels=labels, attention_mask=mask), {
                "tokens": len(stream),
                "scored_tokens": scored,
            }

        splits, stats = cached_splits(
            [_CACHE_VERSION, data.text_column, data.block_size, stride], raw, tokenizer, data, build
        )
        return Prepared(splits, stats)

    def collator(self, tokenizer: Any) -> None:
        """Blocks and windows are all `block_size` long: default stacking is enough."""
        return None

    def draw(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """Causal LM has no per-draw randomness."""
        return batch

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
        import torch.nn.functional as F

        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
        )
        return {"nll": nll.sum(dim=1), "tokens": (labels[:, 1:] != IGNORE).sum(dim=1).float()}

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Token-weighted loss and its exponential, perplexity."""
        totals = {key: outputs.sum(key) for key in ("nll", "tokens")}
        loss = totals["nll"] / max(totals["tokens"], 1.0)
        return {
            "eval/loss": loss,
            "eval/perplexity": math.exp(min(loss, 700.0)),
            "eval/tokens": totals["tokens"],
        }
