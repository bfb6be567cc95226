"""`relation-classification`: the relation between two marked entities of a sentence.

Data: a sentence whose entities are marked inline, `The <e1>child</e1> was wrapped into the <e2>cradle</e2>.`
(the SemEval-2010 Task 8 form; `data.format: semeval2010` reads its release files), or a plain sentence with
`[start, end)` character spans in `data.e1_span_column` / `data.e2_span_column`; and a relation label.
Directional labels (`Cause-Effect(e1,e2)`, `Cause-Effect(e2,e1)`) are distinct classes.

Model: the four markers `<e1> </e1> <e2> </e2>` are added to the tokenizer as special tokens and the embeddings
grow to hold them (both are saved, so `final/` reloads with plain transformers). The relation is predicted
(`relation.pooling`):
- `entity_start` (default; "Matching the Blanks", Baldini Soares et al., 2019): from the concatenated hidden
  states at the `<e1>` and `<e2>` markers, `logits = W [h_e1; h_e2] + b`. It is saved as a standard
  `AutoModelForTokenClassification` with 2L outputs per token (L relations): the first L of the `<e1>` token's
  outputs plus the last L of the `<e2>` token's are exactly a linear layer over the concatenation
  (W = [W_top | W_bottom], b = b_top + b_bottom), dropout included. A plain-transformers user adds the two
  slices the same way (`entity_start_logits`; the README shows it).
- `cls`: the pooled sequence, a standard `AutoModelForSequenceClassification` with the relations as its labels.
The config keeps `relation_classification` = {pooling, labels, negative_label, markers}.

A text longer than `data.max_length` is cut around the two entities (both markers pairs always kept); a row
whose entities alone do not fit is refused with its row named.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError
from llmtune.relation_scoring import relation_metrics
from llmtune.tasks.base import EvalOutputs, column_values
from llmtune.tasks.finetune import FinetuneTask, model_inputs

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from datasets import Dataset

    from llmtune.data import RawData

MARKERS = ("<e1>", "</e1>", "<e2>", "</e2>")
MARKER = re.compile(r"</?e[12]>")
CONFIG_KEY = "relation_classification"
AUTO_CLASSES = {"entity_start": "AutoModelForTokenClassification", "cls": "AutoModelForSequenceClassification"}


def parse_marked(text: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """A sentence with inline markers -> (the text without them, entity 1's and entity 2's [start, end) spans).

    Raises ValueError (the reason) for a missing, repeated, unclosed, nested or overlapping entity.
    """
    found: dict[str, list[int]] = {m: [] for m in MARKERS}
    clean: list[str] = []
    position = 0  # in the clean text
    last = 0
    for match in MARKER.finditer(text):
        clean.append(text[last : match.start()])
        position += match.start() - last
        found[match.group()].append(position)
        last = match.end()
    clean.append(text[last:])
    for entity in ("e1", "e2"):
        opens, closes = found[f"<{entity}>"], found[f"</{entity}>"]
        if not opens and not closes:
            raise ValueError(f"has no <{entity}>..</{entity}> entity; mark both entities")
        if len(opens) != 1 or len(closes) != 1:
            raise ValueError(f"needs exactly one <{entity}> and one </{entity}>, has {len(opens)} and {len(closes)}")
    order = sorted((m.start(), m.group()) for m in MARKER.finditer(text))
    tags = [tag for _, tag in order]
    for entity in ("e1", "e2"):
        if tags.index(f"</{entity}>") < tags.index(f"<{entity}>"):
            raise ValueError(f"closes </{entity}> before opening <{entity}>")
    first = tags[0][1:3]
    if tags[1] != f"</{first}>":  # the other entity starts inside the first one
        raise ValueError("has nested or overlapping entities; <e1>..</e1> and <e2>..</e2> must be disjoint")
    spans = {e: (found[f"<{e}>"][0], found[f"</{e}>"][0]) for e in ("e1", "e2")}
    return "".join(clean), spans["e1"], spans["e2"]


def check_spans(text: str, e1: Any, e2: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validated [start, end) character spans of the two entities of `text` (ValueError with the reason)."""
    spans = []
    for name, span in (("e1", e1), ("e2", e2)):
        if not isinstance(span, (list, tuple)) or len(span) != 2 or not all(isinstance(v, int) for v in span):
            raise ValueError(f"has an {name} span {span!r} that is not [start, end] (two integers)")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise ValueError(f"has an {name} span [{start}, {end}] outside the text (length {len(text)}) or empty")
        spans.append((start, end))
    (s1, t1), (s2, t2) = spans
    if s1 < t2 and s2 < t1:
        raise ValueError(f"has entity spans [{s1}, {t1}] and [{s2}, {t2}] that overlap; they must be disjoint")
    return spans[0], spans[1]


def insert_markers(text: str, e1: tuple[int, int], e2: tuple[int, int]) -> str:
    """The text with `<e1>..</e1>` and `<e2>..</e2>` around the two (disjoint) spans."""
    inserts = sorted([(e1[0], "<e1>"), (e1[1], "</e1>"), (e2[0], "<e2>"), (e2[1], "</e2>")], key=lambda x: x[0])
    pieces, last = [], 0
    for at, tag in inserts:
        pieces += [text[last:at], tag]
        last = at
    return "".join([*pieces, text[last:]])


def window(length: int, prefix: int, suffix: int, first: int, last: int, limit: int) -> int | None:
    """Where a cut of `limit` tokens starts so that tokens `first..last` stay in it (the prefix and suffix special
    tokens are kept apart); None when they do not fit. The kept span is centred on the entities."""
    room = limit - prefix - suffix
    if last - first + 1 > room:
        return None
    start = first - (room - (last - first + 1)) // 2
    return max(prefix, min(start, length - suffix - room))


def entity_start_logits(token_logits: torch.Tensor, starts: torch.Tensor, num_relations: int) -> torch.Tensor:
    """Relation logits from a 2L-output token classifier: the first L outputs at `<e1>` plus the last L at `<e2>`
    (`starts` holds the two marker positions per example), i.e. `W [h_e1; h_e2] + b`."""
    import torch

    rows = torch.arange(token_logits.shape[0], device=token_logits.device)
    return token_logits[rows, starts[:, 0], :num_relations] + token_logits[rows, starts[:, 1], num_relations:]


def pooled_entity_starts(hidden: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The "entity start" representation: the hidden states at the two markers, concatenated (batch, 2H)."""
    import torch

    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return torch.cat([hidden[rows, starts[:, 0]], hidden[rows, starts[:, 1]]], dim=-1)


class RelationClassification(FinetuneTask):
    """Relation classification between two marked entities (cross-entropy; accuracy, micro-F1, SemEval F1)."""

    auto_class = AUTO_CLASSES["entity_start"]  # the default pooling's; `cls` pooling sets its own per instance
    cache_version = "relation-classification/1"

    def __init__(self, recipe: Any, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.pooling: str = self.options.pooling
        self.auto_class = AUTO_CLASSES[self.pooling]
        self.negative: str = self.options.negative_label
        self.relations: list[str] = []
        self.building = False  # set by model_overrides: training builds the model, so the markers may be added
        self.marker_ids: list[int] = []
        self.prefix = self.suffix = 0

    def tokenizer_texts(self, split: Dataset) -> Iterator[str]:
        """The sentences without their entity markers (the markers become special tokens of their own)."""
        for text in super().tokenizer_texts(split):
            yield MARKER.sub("", text)

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """The relation labels (sorted training labels) and the head's shape for the pooling."""
        self.building = True
        values = raw.splits["train"][self.data.label_column]
        relations = sorted({str(v) for v in values})
        if len(relations) < 2:
            raise UserError(
                f"data.label_column: the train split has {len(relations)} distinct relation(s) in "
                f"{self.data.label_column!r}; relation classification needs at least 2"
            )
        info = {"pooling": self.pooling, "labels": relations, "negative_label": self.negative, "markers": MARKERS}
        if self.pooling == "cls":
            id2label = dict(enumerate(relations))
        else:  # outputs 0..L-1 are read at <e1>, L..2L-1 at <e2>
            id2label = {i: f"{r} @e1" for i, r in enumerate(relations)}
            id2label |= {len(relations) + i: f"{r} @e2" for i, r in enumerate(relations)}
        return {
            "num_labels": len(id2label),
            "id2label": id2label,
            "label2id": {v: k for k, v in id2label.items()},
            CONFIG_KEY: info,
            **({"problem_type": "single_label_classification"} if self.pooling == "cls" else {}),
        }

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Read the relations from the config; add the entity markers (training) or require them (a saved model)."""
        super().setup(model, tokenizer)
        info = getattr(model.config, CONFIG_KEY, None)
        if not isinstance(info, dict) or "labels" not in info:
            raise UserError(
                f"MODEL: this {type(model).__name__} was not trained for relation-classification (its config has no "
                f"{CONFIG_KEY}); pass a model a relation-classification run saved"
            )
        if info["pooling"] != self.pooling:
            raise UserError(
                f"relation.pooling: the model was trained with pooling {info['pooling']}, not {self.pooling}; "
                f"set relation.pooling: {info['pooling']}"
            )
        self.relations = list(info["labels"])
        self.negative = self.options.negative_label if self.building else info.get("negative_label", self.negative)
        vocab = tokenizer.get_vocab()
        missing = [m for m in MARKERS if m not in vocab]
        if missing and not self.building:
            raise UserError(
                f"tokenizer: the model's tokenizer has no entity markers ({', '.join(missing)}); use the tokenizer "
                "its relation-classification run saved (the run's final/)"
            )
        if missing:
            tokenizer.add_tokens(list(MARKERS), special_tokens=True)
            model.resize_token_embeddings(len(tokenizer))
        self.marker_ids = tokenizer.convert_tokens_to_ids(list(MARKERS))
        probe_with = tokenizer("x")["input_ids"]
        probe = tokenizer("x", add_special_tokens=False)["input_ids"]
        self.prefix = next(i for i in range(len(probe_with)) if probe_with[i : i + len(probe)] == probe)
        self.suffix = len(probe_with) - self.prefix - len(probe)

    def cache_key(self) -> list[Any]:
        """The relations, pooling and marker ids change the encoded rows."""
        return [*super().cache_key(), self.relations, self.pooling, self.marker_ids]

    def _where(self, role: str, row: int, ids: list[Any] | None) -> str:
        """The file (when the split is one file's rows) and row an error names."""
        files = self.data.files or {}
        split = self.data.train_split if role == "train" else self.data.validation_split
        sentence = f" (sentence id {ids[0]})" if ids else ""
        source = files.get(split)
        if source is None and role == "validation" and files.get(self.data.train_split) is not None:
            return f"row {row}{sentence} of the validation split carved from {files[self.data.train_split]}"
        if source is None:
            return f"the {role} split, row {row}{sentence}"
        return f"{source if isinstance(source, str) else ', '.join(source)}, row {row}{sentence}"

    def _entities(self, rows: dict[str, list[Any]], k: int) -> tuple[str, tuple[int, int], tuple[int, int]]:
        text = rows[self.data.text_column][k]
        if self.data.e1_span_column is None:
            return parse_marked(text)
        e1 = column_values(rows, self.data.e1_span_column)[k]
        e2 = column_values(rows, self.data.e2_span_column)[k]
        if MARKER.search(text):
            raise ValueError("has inline <e1>/<e2> markers and span columns; use one or the other")
        return (text, *check_spans(text, e1, e2))

    def encode(self, rows: dict[str, list[Any]], indices: list[int], role: str) -> dict[str, list[Any]]:
        """Marked text -> tokens (cut around the entities when too long), the two marker positions, the label."""
        tok = self.tokenizer
        marked = []
        for k, row in enumerate(indices):
            try:
                marked.append(insert_markers(*self._entities(rows, k)))
            except ValueError as exc:
                ids = [rows["id"][k]] if "id" in rows else None
                text = str(rows[self.data.text_column][k])[:80]
                raise UserError(f"{self._where(role, row, ids)}: {self.data.text_column!r} {exc}: {text!r}") from None
        encoded = tok(marked, verbose=False)
        out: dict[str, list[Any]] = {key: [] for key in encoded}
        out["entity_starts"], out["index"] = [], list(indices)
        e1_start, e2_start = self.marker_ids[0], self.marker_ids[2]
        room = self.max_length - self.prefix - self.suffix
        for k, row in enumerate(indices):
            ids = encoded["input_ids"][k]
            if any(ids.count(m) != 1 for m in self.marker_ids):
                raise UserError(
                    f"{self._where(role, row, None)}: the text itself contains an entity marker string "
                    f"({', '.join(MARKERS)}); remove it from the text"
                )
            spots = [ids.index(m) for m in self.marker_ids]
            start = None
            if len(ids) > self.max_length:
                start = window(len(ids), self.prefix, self.suffix, min(spots), max(spots), self.max_length)
                if start is None:
                    raise UserError(
                        f"{self._where(role, row, None)}: the two entities span {max(spots) - min(spots) + 1} tokens, "
                        f"more than data.max_length ({self.max_length}) holds; raise data.max_length or drop the row"
                    )
            for key in encoded:
                values = encoded[key][k]
                if start is not None:  # cut around the entities, keeping the special tokens at both ends
                    end = len(values) - self.suffix
                    values = values[: self.prefix] + values[start : start + room] + values[end:]
                out[key].append(values)
            kept = out["input_ids"][-1]
            out["entity_starts"].append([kept.index(e1_start), kept.index(e2_start)])
        if self.labelled:
            label2id = {r: i for i, r in enumerate(self.relations)}
            out["labels"] = []
            for value, row in zip(rows[self.data.label_column], indices, strict=True):
                if str(value) not in label2id:
                    raise UserError(
                        f"data.label_column: relation {value!r} ({self._where(role, row, None)}) is not one the model "
                        f"knows ({', '.join(self.relations)}); evaluate on data with the relations it was trained on"
                    )
                out["labels"].append(label2id[str(value)])
        return out

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One target per example."""
        import torch

        return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def relation_logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, relations) logits: from the two entity-start markers, or the sequence classifier's."""
        logits = model(**model_inputs(batch)).logits
        if self.pooling == "cls":
            return logits
        return entity_start_logits(logits, batch["entity_starts"], len(self.relations))

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy divided by the accumulated step's example count."""
        import torch.nn.functional as F

        logits = self.relation_logits(model, batch).float()
        return F.cross_entropy(logits, batch["labels"], reduction="sum") / num_items

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per example: the predicted relation id and its probability (and the loss and label when labelled)."""
        import torch.nn.functional as F

        logits = self.relation_logits(model, batch).float()
        confidence, prediction = logits.softmax(dim=-1).max(dim=-1)
        values = {"index": batch["index"], "prediction": prediction, "confidence": confidence}
        if "labels" in batch:
            values.update(label=batch["labels"], loss=F.cross_entropy(logits, batch["labels"], reduction="none"))
        return values

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Mean loss, accuracy, TACRED micro P/R/F1 over non-negative relations, the SemEval-2010 official score."""
        names = self.relations
        predictions = [names[int(p)] for p in outputs.flat("prediction")]
        references = [names[int(r)] for r in outputs.flat("label")]
        scores = relation_metrics(predictions, references, self.negative, self.options.per_relation)
        loss = outputs.sum("loss") / max(len(outputs), 1)
        return {
            "eval/loss": loss if math.isfinite(loss) else float("inf"),
            **{f"eval/{k}": v for k, v in scores.items()},
        }

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """Per raw example, in file order: the predicted relation and its probability (and the file's id, if any)."""
        raw = self.validation_raw
        ids = raw["id"] if raw is not None and "id" in raw.column_names else None
        rows = sorted(zip(outputs.flat("index"), outputs.flat("prediction"), outputs.flat("confidence"), strict=True))
        return [
            {"index": i, **({"id": ids[i]} if ids is not None else {}), "relation": self.relations[int(p)], "score": c}
            for i, p, c in rows
        ]
