"""Generation helpers every generating command shares, with one rule for where a generated text ends.

The rule: a generated text ends before the first EOS. `cut_at_eos` sets that EOS, everything after it
and any padding to -100, so the ids that remain are the text (and `gen_len` counts them); decoding drops
the -100s and special tokens. Seq2seq evaluation, instruction-tuned prediction and `llmtune generate`
all follow it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtune.tasks.token_loss import IGNORE

if TYPE_CHECKING:
    import torch


def eos_ids(model: Any) -> list[int]:
    """The ids that end a generation: the generation config's EOS (one or several), else the config's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = model.config.eos_token_id if eos is None else eos
    return [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [int(eos)]


def cut_at_eos(generated: torch.Tensor, eos: list[int], pad_id: int | None = None) -> torch.Tensor:
    """Generated ids with the first EOS, everything after it, and padding set to -100."""
    import torch

    ends = torch.isin(generated, torch.tensor(eos, dtype=generated.dtype, device=generated.device))
    ended = ends.cumsum(dim=1) > 0
    padding = generated == pad_id if pad_id is not None else torch.zeros_like(ended)
    return generated.masked_fill(ended | padding, IGNORE)


def decode(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    """Texts of rows `cut_at_eos` made (-100 dropped, special tokens skipped)."""
    ids = [[t for t in row if t >= 0] for row in rows]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows -> the same rows left-padded (decoder-only generation continues at the right end)."""
    import torch

    width = input_ids.shape[1]
    shift = width - attention_mask.sum(dim=1, keepdim=True)
    source = torch.arange(width, device=input_ids.device)[None, :] - shift
    valid = source >= 0
    ids = torch.where(valid, input_ids.gather(1, source.clamp(min=0)), torch.full_like(input_ids, pad_id))
    return ids, valid.long()
