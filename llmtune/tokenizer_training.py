"""Training tokenizers from a corpus with the `tokenizers` library, wrapped for transformers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

GPT2_EOS = "<|endoftext|>"


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, special_tokens: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer; `<|endoftext|>` is BOS, EOS, UNK and (GPT-2 has none) PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [GPT2_EOS, *[t for t in special_tokens or [] if t != GPT2_EOS]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS, pad_token=GPT2_EOS
    )
    if len(specials) > 1:
        wrapped.add_special_tokens({"additional_special_tokens": specials[1:]})
    return wrapped


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
