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


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    lowercase: bool = True,
    special_tokens: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer with `[CLS] … [SEP]` added around every encoded text.

    The `tokenizers` WordPiece trainer leaves no post-processor, so the template is set here.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    specials = base + [t for t in special_tokens or [] if t not in base]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    if len(specials) > len(base):
        wrapped.add_special_tokens({"additional_special_tokens": specials[len(base) :]})
    return wrapped


def sentinel_name(index: int) -> str:
    """The T5 sentinel token for the index-th corrupted span."""
    return f"<extra_id_{index}>"


def train_unigram(
    texts: Iterable[str], vocab_size: int, num_sentinels: int = 100, special_tokens: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A T5-style Unigram (SentencePiece) tokenizer: `<pad>`=0, `</s>`=1, `<unk>`=2, EOS appended to every
    encoded text, and `<extra_id_0>` … `<extra_id_{N-1}>` sentinels as special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "</s>", "<unk>"]
    sentinels = [sentinel_name(i) for i in range(num_sentinels)]
    extra = [t for t in special_tokens or [] if t not in base and t not in sentinels]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=max(vocab_size - num_sentinels - len(extra), len(base) + 1),
        special_tokens=base,
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.add_special_tokens({"additional_special_tokens": sentinels + extra})
    return wrapped
