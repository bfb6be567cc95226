"""`token-classification` (NER): one tag per word, scored by entities (seqeval).

Words come pre-split (a CoNLL file, or json / hub rows with a list of words and a list of tags) and
are tokenised with `is_split_into_words=True`, so each sub-token knows its word (`word_ids`, which
needs a fast tokenizer). A word's tag trains its first sub-token; the others are ignored (-100), or,
with `token_classification.label_all_tokens`, get the tag too (a B-X continuing as I-X).

The tag <-> id map is built from the training tags (a hub dataset's `Sequence(ClassLabel)` names in
their order, else the sorted tag strings), stored in the model config (`id2label` / `label2id`) and
read back from it when a saved model is evaluated. Evaluation keeps no logits: each batch is reduced
on the device to the predicted id of every word's first sub-token. Words cut off by truncation to
`data.max_length` (and words that tokenise to nothing) are predicted "O", so they count as missed
entities, never silently dropped from the score.

GPT-2's byte-level BPE marks a word start with a leading space; words passed one by one have none, so
the tokenizer is switched to `add_prefix_space` (as transformers' docs ask for pre-split input) and
saved that way with the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError
from llmtune.metrics import entity_metrics
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.finetune import FinetuneTask, LabelMap, model_inputs, require_fast_tokenizer

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData

# The prefixes each scheme's tags may carry ("O" stands alone).
SCHEME_PREFIXES = {
    "IOB1": "BI",
    "IOB2": "BI",
    "IOE1": "IE",
    "IOE2": "IE",
    "IOBES": "BIES",
    "BILOU": "BILU",
}
OUTSIDE = "O"


def class_label_names(ds: Dataset, column: str) -> list[str] | None:
    """The tag names of a `Sequence(ClassLabel)` column (hub datasets store tags as ints), else None."""
    from datasets import ClassLabel

    inner = getattr(ds.features.get(column), "feature", None)
    return list(inner.names) if isinstance(inner, ClassLabel) else None


def check_tags(tags: Iterable[str], scheme: str) -> None:
    """Refuse a tag that is neither O nor PREFIX-TYPE with a prefix of `scheme`."""
    prefixes = SCHEME_PREFIXES[scheme]
    for tag in tags:
        prefix, dash, kind = tag.partition("-")
        if tag != OUTSIDE and not (dash and kind and prefix in prefixes):
            raise UserError(
                f"data.tags_column: tag {tag!r} does not fit token_classification.scheme {scheme} "
                f"(O or {'/'.join(prefixes)}-TYPE); set the scheme the data uses"
            )


def tag_map(train_tags: list[list[Any]], names: list[str] | None) -> dict[str, int]:
    """tag -> id: a ClassLabel's names in their order, else the distinct training tags sorted."""
    if names is not None:
        return {name: i for i, name in enumerate(names)}
    unique = {tag for row in train_tags for tag in row}
    numbers = sorted(t for t in unique if not isinstance(t, str))
    if numbers:
        raise UserError(
            f"data.tags_column: the train split has integer tags ({numbers[0]!r}, ...) without names, which entity "
            "scoring needs; write the tags as strings (B-PER, I-PER, O) or use a hub dataset whose tags are a "
            "Sequence(ClassLabel)"
        )
    return {tag: i for i, tag in enumerate(sorted(unique))}


def continuation_ids(label2id: dict[str, int]) -> dict[int, int]:
    """B-X id -> I-X id, for the later sub-tokens of a word under `label_all_tokens` (where I-X exists)."""
    return {
        i: label2id["I-" + tag[2:]]
        for tag, i in label2id.items()
        if tag.startswith("B-") and "I-" + tag[2:] in label2id
    }


def align_labels(
    word_ids: list[int | None],
    word_labels: list[int],
    all_tokens: bool = False,
    continuation: dict[int, int] | None = None,
) -> list[int]:
    """Token labels from word labels: a word's first sub-token gets its label, special tokens -100, and the
    later sub-tokens -100 or (`all_tokens`) the label again, with B-X turned into its I-X."""
    labels = []
    previous = None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous:
            labels.append(word_labels[word])
        elif all_tokens:
            label = word_labels[word]
            labels.append((continuation or {}).get(label, label))
        else:
            labels.append(-100)
        previous = word
    return labels


def word_starts(word_ids: list[int | None]) -> list[int]:
    """Token position of each word's first sub-token, up to the last word truncation kept (-1 for a word
    that tokenises to nothing)."""
    kept = [w for w in word_ids if w is not None]
    starts = [-1] * (max(kept) + 1 if kept else 0)
    for position, word in enumerate(word_ids):
        if word is not None and starts[word] == -1:
            starts[word] = position
    return starts


def word_level(token_predictions: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) predicted ids -> (batch, words): the id at each word's first sub-token; -100 where
    a word has no token (a negative start: none, or batch padding)."""
    words = token_predictions.gather(1, starts.clamp(min=0))
    return words.masked_fill(starts < 0, -100)


def word_tags(predicted: list[int], n_words: int, id2label: dict[int, str]) -> list[str]:
    """One example's predicted tags for all its `n_words` words: words without a prediction (cut off by
    truncation or without a token) are "O"."""
    row = list(predicted[:n_words]) + [-100] * max(0, n_words - len(predicted))
    return [id2label[p] if p >= 0 else OUTSIDE for p in row]


def entity_spans(tags: list[str], scheme: str) -> list[tuple[str, int, int]]:
    """(type, first word, end word exclusive) of each entity, read as the metric reads them."""
    if scheme in ("IOB1", "IOB2"):
        from seqeval.metrics.sequence_labeling import get_entities

        return [(kind, start, end + 1) for kind, start, end in get_entities(tags)]
    from seqeval import scheme as schemes

    found = schemes.Entities([tags], getattr(schemes, scheme)).entities[0]
    return [(e.tag, e.start, e.end) for e in found]


def use_prefix_space(tokenizer: Any) -> bool:
    """Make a byte-level BPE tokenizer (GPT-2, RoBERTa) mark every pre-split word as a word start.

    Without it each word after the first is tokenised as if glued to the one before ("Ġparser" becomes
    "par", "s", "er"), unlike anything the model saw in pretraining. Returns whether it changed.
    """
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    members = list(pre) if isinstance(pre, pre_tokenizers.Sequence) else [pre]
    changed = False
    for member in members:
        if isinstance(member, pre_tokenizers.ByteLevel) and not member.add_prefix_space:
            member.add_prefix_space = True
            changed = True
    if changed:
        backend.pre_tokenizer = pre  # the getter may hand out a copy
        tokenizer.add_prefix_space = True
        tokenizer.init_kwargs["add_prefix_space"] = True  # saved in tokenizer_config.json
    return changed


class TokenClassification(FinetuneTask):
    """NER and other word tagging: cross-entropy per labelled sub-token; entity P/R/F1, word accuracy."""

    auto_class = "AutoModelForTokenClassification"
    cache_version = "token-classification/1"

    def __init__(self, recipe: Any, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.labels = LabelMap({}, {}, 0)
        self.continuation: dict[int, int] = {}
        self.tag_names: list[str] | None = None  # the ClassLabel names of the split being encoded, if any

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """num_labels and the tag maps from the training tags."""
        train = raw.splits["train"]
        mapping = tag_map(train[self.data.tags_column], class_label_names(train, self.data.tags_column))
        if len(mapping) < 2:
            raise UserError(
                f"data.tags_column: the train split has {len(mapping)} distinct tag(s) in {self.data.tags_column!r} "
                f"({', '.join(mapping)}); tagging needs at least 2"
            )
        check_tags(mapping, self.options.scheme)
        return {"num_labels": len(mapping), "id2label": {i: t for t, i in mapping.items()}, "label2id": mapping}

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Refuse a slow tokenizer (no word ids); read the tag maps from the config; prefix spaces for BPE."""
        super().setup(model, tokenizer)
        require_fast_tokenizer(tokenizer, self.name, "maps sub-tokens to words")
        use_prefix_space(tokenizer)
        self.labels = LabelMap.from_config(model.config)
        self.continuation = continuation_ids(self.labels.label2id)

    def cache_key(self) -> list[Any]:
        """The tag map and label alignment also change the tokenised rows."""
        return [*super().cache_key(), sorted(self.labels.label2id.items()), self.options.model_dump(mode="json")]

    def build_split(self, role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
        """Encode with the split's own ClassLabel tag names (hub datasets store tags as their indices)."""
        self.tag_names = class_label_names(ds, self.data.tags_column) if self.labelled else None
        return super().build_split(role, ds)

    def split_stats(self, role: str, raw: Dataset, encoded: Dataset) -> dict[str, Any]:
        """Words in all, and words truncation (or an empty tokenisation) left without a token."""
        total = sum(len(words) for words in raw[self.data.tokens_column])
        kept = sum(sum(1 for s in starts if s >= 0) for starts in encoded["word_starts"])
        return {"words": total, "words_without_token": total - kept}

    def _check_words(self, words: Any, role: str, row: int) -> None:
        if not isinstance(words, list):
            raise UserError(
                f"data.tokens_column: row {row} of the {role} split holds {type(words).__name__}, not a "
                "list of words; point data.tokens_column at the word lists"
            )
        bad = next((i for i, word in enumerate(words) if not isinstance(word, str)), None)
        if bad is not None:
            raise UserError(
                f"data.tokens_column: word {bad} of row {row} of the {role} split is {words[bad]!r}, not text; "
                "write every word as a string"
            )
        if not words:
            raise UserError(f"data.tokens_column: row {row} of the {role} split has no words; remove it")

    def _word_labels(self, words: list[str], tags: Any, role: str, row: int) -> list[int]:
        if not isinstance(tags, list) or len(tags) != len(words):
            have = len(tags) if isinstance(tags, list) else type(tags).__name__
            raise UserError(
                f"data.tags_column: row {row} of the {role} split has {len(words)} words but {have} "
                "tags; give one tag per word"
            )
        return [self.labels.id_of(t, "data.tags_column", role, row, self.tag_names, "tag") for t in tags]

    def encode(self, rows: dict[str, list[Any]], indices: list[int], role: str) -> dict[str, list[Any]]:
        """Tokenised words (truncated), first-sub-token positions, token labels, word labels and row indices."""
        batch_words = rows[self.data.tokens_column]
        for words, row in zip(batch_words, indices, strict=True):
            self._check_words(words, role, row)
        enc = self.tokenizer(
            batch_words, is_split_into_words=True, truncation=True, max_length=self.max_length, verbose=False
        )
        out: dict[str, list[Any]] = dict(enc)
        out["index"] = indices
        word_ids = [enc.word_ids(i) for i in range(len(batch_words))]
        out["word_starts"] = [word_starts(w) for w in word_ids]
        if self.labelled:
            tags = rows[self.data.tags_column]
            out["word_labels"] = [
                self._word_labels(w, t, role, row) for w, t, row in zip(batch_words, tags, indices, strict=True)
            ]
            out["labels"] = [
                align_labels(ids, labels, self.options.label_all_tokens, self.continuation)
                for ids, labels in zip(word_ids, out["word_labels"], strict=True)
            ]
        return out

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over the labelled sub-tokens, divided by the accumulated step's count."""
        import torch.nn.functional as F

        logits = model(**model_inputs(batch)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
        return loss / num_items

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per example: each word's predicted id (its first sub-token's argmax), and with labels the summed
        loss, the labelled-token count and the word labels."""
        import torch.nn.functional as F

        logits = model(**model_inputs(batch)).logits
        values = {"index": batch["index"], "word_predictions": word_level(logits.argmax(-1), batch["word_starts"])}
        if "labels" in batch:
            labels = batch["labels"]
            losses = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
            values.update(loss=losses.sum(1), tokens=(labels != -100).sum(1), word_labels=batch["word_labels"])
        return values

    def _tag_rows(self, outputs: EvalOutputs) -> tuple[list[list[str]], list[list[str]]]:
        references, predictions = [], []
        for gold, predicted in zip(outputs.flat("word_labels"), outputs.flat("word_predictions"), strict=True):
            ids = [g for g in gold if g != -100]
            references.append([self.labels.id2label[g] for g in ids])
            predictions.append(word_tags(predicted, len(ids), self.labels.id2label))
        return references, predictions

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Token-mean loss, entity-level micro precision / recall / F1 and F1 per type (percent), and accuracy
        over words (CoNLL's tokens, one tag each; not sub-tokens)."""
        from seqeval.metrics import accuracy_score

        references, predictions = self._tag_rows(outputs)
        scores = entity_metrics(references, predictions, self.options.scheme)
        return {
            "eval/loss": outputs.sum("loss") / max(outputs.sum("tokens"), 1.0),
            **{f"eval/{k}": v for k, v in scores.items()},
            "eval/accuracy": float(accuracy_score(references, predictions)) if references else 0.0,
        }

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """Per raw example, in file order: its words, the predicted tag of each, and the entities they form
        (`start`/`end` are word positions, end exclusive)."""
        assert self.validation_raw is not None  # set by prepare
        all_words = self.validation_raw[self.data.tokens_column]
        records = []
        for index, predicted in sorted(zip(outputs.flat("index"), outputs.flat("word_predictions"), strict=True)):
            words = all_words[index]
            tags = word_tags(predicted, len(words), self.labels.id2label)
            entities = [
                {"type": kind, "start": start, "end": end, "text": " ".join(words[start:end])}
                for kind, start, end in entity_spans(tags, self.options.scheme)
            ]
            records.append({"index": index, "words": words, "tags": tags, "entities": entities})
        return records

    def scored_pairs(self, outputs: EvalOutputs) -> tuple[list[Any], list[Any]]:
        """Predicted and reference tag lists per example, as `evaluate`'s seqeval takes them."""
        references, predictions = self._tag_rows(outputs)
        return predictions, references
