"""`masked-lm`: BERT-style masked language modelling (any `AutoModelForMaskedLM`).

Documents are tokenised, each followed by [SEP], joined, and cut into pieces of `block_size - 2`
tokens, each wrapped as `[CLS] piece [SEP]`. Masking is dynamic: it is drawn again every time a batch
is drawn (`draw`, seeded by the trainer per step, so a resumed run masks exactly as an uninterrupted
one). Evaluation masks each validation example with its own seed, so the figure does not depend on
batch size or world size. The reported perplexity is the exponential of the masked-token loss,
`eval/mlm_perplexity` — not comparable with a causal perplexity.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtune.errors import UserError
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.packing import PackedTextTask, blocks_dataset, pack_blocks, require_tokens
from llmtune.tasks.token_loss import IGNORE, per_example_token_stats, token_loss_sum

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.tasks.registry import MaskingSpec


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    spec: MaskingSpec,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    word_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `mlm_probability` of the maskable tokens; of those `mask_fraction` become
    `mask_id`, `random_fraction` a random token, the rest stay. Returns (inputs, labels), labels -100
    where nothing was chosen.

    With `word_start` (whole-word masking) every piece of a word takes its first piece's draw, so a
    word is masked whole or not at all.
    """
    import torch

    device = input_ids.device
    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    if word_start is not None:
        positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
        first_piece = torch.where(word_start, positions, torch.zeros_like(positions)).cummax(dim=1).values
        draw = draw.gather(1, first_piece)
    chosen = (draw < spec.mlm_probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    how = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = chosen & (how < spec.mask_fraction)
    to_random = chosen & (how >= spec.mask_fraction) & (how < spec.mask_fraction + spec.random_fraction)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    return torch.where(to_random, random_ids, inputs), labels


def continuation_table(tokenizer: Any) -> np.ndarray:
    """For each token id, whether it continues the previous piece's word (WordPiece `##x`; for
    Metaspace/byte-level vocabularies, a piece without the word-start marker `▁` / `Ġ`)."""
    vocab = tokenizer.get_vocab()
    table = np.zeros(len(tokenizer), dtype=bool)
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None)
    specials = set(tokenizer.all_special_tokens)
    for token, index in vocab.items():
        if index >= len(table) or token in specials:
            continue
        table[index] = token.startswith(prefix) if prefix else not token.startswith(("▁", "Ġ"))
    return table


def framing_tokens(tokenizer: Any) -> tuple[int, int]:
    """The ids that open and close each sequence: [CLS] / [SEP], else BOS / EOS."""
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls is None or sep is None:
        raise UserError("tokenizer: masked-lm needs [CLS]/[SEP] (or BOS/EOS) tokens to frame each sequence")
    return cls, sep


class MaskedLM(PackedTextTask):
    """Masked-token prediction with dynamic masking."""

    auto_class = "AutoModelForMaskedLM"
    cache_version = "masked-lm/1"

    def __init__(self, recipe: Any, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.spec: MaskingSpec = self.options
        self._tables: dict[str, Any] = {}

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Need a mask token, framing tokens and a sequence the model holds; build the special-token and word
        tables."""
        import torch

        super().setup(model, tokenizer)
        if tokenizer.mask_token_id is None:
            raise UserError(
                "tokenizer: masked-lm needs a mask token; train one with tokenizer.train.kind: wordpiece "
                "or use a BERT-style tokenizer"
            )
        if self.data.block_size < 3:
            raise UserError("data.block_size: masked-lm needs at least 3 (for [CLS] x [SEP])")
        framing_tokens(tokenizer)
        special = np.zeros(len(tokenizer), dtype=bool)
        special[[i for i in tokenizer.all_special_ids if i < len(special)]] = True
        self._tables = {
            "special": torch.from_numpy(special),
            "continues": torch.from_numpy(continuation_table(tokenizer)),
            "mask_id": tokenizer.mask_token_id,
            "vocab": len(tokenizer),
        }

    def _frame(self, pieces: np.ndarray) -> np.ndarray:
        cls, sep = framing_tokens(self.tokenizer)
        n = len(pieces)
        return np.concatenate([np.full((n, 1), cls), pieces, np.full((n, 1), sep)], axis=1)

    def build_split(self, role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
        """`[CLS] … [SEP]` pieces of `block_size`; the validation tail is kept, padded."""
        block_size = self.data.block_size
        inner = block_size - 2
        cls, sep = framing_tokens(self.tokenizer)
        stream = self.stream(ds, sep)
        blocks = pack_blocks(stream, inner)
        if role == "train":
            require_tokens(role, len(stream), inner, "sequence")
            framed = self._frame(blocks)
            return blocks_dataset(framed, attention_mask=np.ones_like(framed)), {"tokens": len(stream)}
        require_tokens(role, len(stream), 1, "sequence")
        tail = stream[blocks.size :]
        framed = self._frame(blocks)
        mask = np.ones_like(framed)
        if len(tail):
            row = np.full((1, block_size), self.tokenizer.pad_token_id)
            row[0, : len(tail) + 2] = [cls, *tail, sep]
            framed = np.concatenate([framed, row])
            mask = np.concatenate([mask, (np.arange(block_size) < len(tail) + 2)[None].astype(np.int64)])
        ids = np.arange(len(framed), dtype=np.int64)
        return blocks_dataset(framed, attention_mask=mask, example_id=ids), {"tokens": len(stream)}

    def _mask(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        t = self._tables
        ids = batch["input_ids"]
        special = t["special"].to(ids.device)[ids]
        maskable = ~special & (batch["attention_mask"] == 1)
        word_start = ~t["continues"].to(ids.device)[ids] if self.spec.whole_word_masking else None
        inputs, labels = mask_tokens(ids, maskable, self.spec, t["mask_id"], t["vocab"], generator, word_start)
        return {"input_ids": inputs, "attention_mask": batch["attention_mask"], "labels": labels}

    def draw(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """Fresh masks for this draw of the batch."""
        import torch

        return self._mask(batch, torch.Generator(device=batch["input_ids"].device).manual_seed(seed))

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked tokens in the batch."""
        return (batch["labels"] != IGNORE).sum()

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Summed masked-token cross-entropy divided by the accumulated step's masked-token count."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_loss_sum(logits, batch["labels"]) / num_items

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mask each example with its own seed (seed, example_id), then per-example sums."""
        import torch

        rows = []
        device = batch["input_ids"].device
        for i, example in enumerate(batch["example_id"].tolist()):
            generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + example)
            rows.append(self._mask({k: batch[k][i : i + 1] for k in ("input_ids", "attention_mask")}, generator))
        masked = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        logits = model(input_ids=masked["input_ids"], attention_mask=masked["attention_mask"]).logits
        return per_example_token_stats(logits, masked["labels"])

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Masked-token loss, its exponential (MLM perplexity) and masked-token accuracy."""
        totals = {key: outputs.sum(key) for key in ("nll", "correct", "tokens")}
        tokens = max(totals["tokens"], 1.0)
        loss = totals["nll"] / tokens
        return {
            "eval/loss": loss,
            "eval/mlm_perplexity": math.exp(min(loss, 700.0)),
            "eval/masked_accuracy": totals["correct"] / tokens,
            "eval/masked_tokens": totals["tokens"],
        }
