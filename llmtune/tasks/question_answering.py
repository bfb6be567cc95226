"""`question-answering`: extractive QA (SQuAD): the answer is a span of the context.

Each question is paired with its context, question first; a context longer than `data.max_length`
is cut into overlapping windows sharing `question_answering.doc_stride` tokens (the tokenizer's
`return_overflowing_tokens` + `stride`, as Hugging Face's run_qa example does). A window is labelled
with the answer's first and last token, or with the CLS (first) token when it does not hold the whole
answer. Evaluation keeps per window only the n-best start and end candidates inside the context (and
the null score); post-processing picks each question's best span over all its windows and returns the
context's text between the span's character offsets. SQuAD v2 questions without an answer are allowed
with `question_answering.allow_no_answer`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError
from llmtune.metrics import squad_metrics
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.finetune import FinetuneTask, model_inputs, require_fast_tokenizer
from llmtune.tasks.qa_postprocess import NOT_CONTEXT, Answer, WindowCandidates, best_answer

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import Recipe

CANDIDATE_KEYS = ("start_tokens", "start_scores", "start_chars", "end_tokens", "end_scores", "end_chars")


def label_window(
    offsets: list[tuple[int, int]], sequence_ids: list[int | None], start_char: int, end_char: int, cls_index: int
) -> tuple[int, int]:
    """(start, end) token positions of the answer chars [start_char, end_char) in one window.

    Both are context tokens: the last one starting at or before `start_char` and the first one ending
    at or after `end_char`. A window whose context does not hold the whole answer gets (cls, cls).
    """
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not context:
        return cls_index, cls_index
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls_index, cls_index
    start = max(i for i in range(first, last + 1) if offsets[i][0] <= start_char)
    end = min(i for i in range(first, last + 1) if offsets[i][1] >= end_char)
    return start, end


def values(ds: Dataset, column: str) -> list[Any]:
    """A whole column as a Python list (sliced in one go: indexing a datasets `Column` row by row is slow)."""
    return ds[column][:]


def example_ids(ds: Dataset, column: str) -> list[str]:
    """The examples' ids, or their row numbers when the data has no id column."""
    return [str(v) for v in values(ds, column)] if column in ds.column_names else [str(i) for i in range(len(ds))]


class QuestionAnswering(FinetuneTask):
    """Start/end span prediction over context windows; SQuAD exact match and F1."""

    auto_class = "AutoModelForQuestionAnswering"
    cache_version = "question-answering/1"

    def __init__(self, recipe: Recipe, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.cls_token_id: int | None = None
        self.specials = 0  # special tokens the tokenizer adds to a (question, context) pair

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """No config changes (a start and an end logit per token is the default head); but check every answer
        against its context here, before the model is built, so a data error is all the run prints."""
        if self.labelled:
            for role, ds in raw.splits.items():
                ids = example_ids(ds, self.data.id_column)
                rows = zip(values(ds, self.data.answers_column), values(ds, self.data.context_column), ids, strict=True)
                for answers, context, example in rows:
                    self._answer_chars(answers, example, str(context), role)
        return {}

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Refuse a slow tokenizer (no offset mappings) and a stride that leaves no room for new context."""
        super().setup(model, tokenizer)
        require_fast_tokenizer(tokenizer, self.name, "maps answers to characters of the context")
        if self.options.doc_stride >= self.max_length:
            raise UserError(
                f"question_answering.doc_stride: {self.options.doc_stride} must be smaller than the window "
                f"length data.max_length ({self.max_length}); e.g. doc_stride {self.max_length // 3}"
            )
        self.cls_token_id = tokenizer.cls_token_id
        self.specials = tokenizer.num_special_tokens_to_add(pair=True)

    def cache_key(self) -> list[Any]:
        """The windowing and no-answer options change the rows too."""
        return [*super().cache_key(), self.options.model_dump(mode="json")]

    def _answer_chars(self, answers: Any, example: str, context: str, role: str) -> tuple[int, int] | None:
        """The first answer's [start, end) characters, after checking every answer against the context."""
        key = self.data.answers_column
        if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
            raise UserError(
                f"data.answers_column: example {example!r} ({role} split): {key!r} must be "
                f"{{text: [...], answer_start: [...]}}, got {answers!r}"
            )
        texts, starts = ([] if answers[k] is None else answers[k] for k in ("text", "answer_start"))
        if not isinstance(texts, (list, tuple)) or not isinstance(starts, (list, tuple)):  # e.g. one answer unlisted
            raise UserError(
                f"data.answers_column: example {example!r} ({role} split): {key!r} must be "
                f"{{text: [...], answer_start: [...]}} (lists, one item per answer), got {answers!r}"
            )
        if len(texts) != len(starts):
            raise UserError(
                f"data.answers_column: example {example!r} ({role} split) has {len(texts)} answer texts but "
                f"{len(starts)} answer_start values; give one start per text"
            )
        if not texts:
            if not self.options.allow_no_answer:
                raise UserError(
                    f"data.answers_column: example {example!r} ({role} split) has no answer; for SQuAD v2 data "
                    "set question_answering.allow_no_answer: true, else fix or drop the example"
                )
            return None
        for text, start in zip(texts, starts, strict=True):
            if not text or not isinstance(start, int) or context[start : start + len(text)] != text:
                raise UserError(
                    f"data.answers_column: example {example!r} ({role} split): answer {text!r} with answer_start "
                    f"{start!r} is not in its context (the context there reads "
                    f"{context[start : start + len(text)] if isinstance(start, int) else ''!r}); fix answer_start"
                )
        return starts[0], starts[0] + len(texts[0])

    def split_stats(self, role: str, raw: Dataset, encoded: Dataset) -> dict[str, Any]:
        """Questions, and training windows that hold no answer (labelled with CLS)."""
        stats: dict[str, Any] = {"questions": len(raw)}
        if self.labelled:
            starts, cls = values(encoded, "start_positions"), values(encoded, "cls_index")
            stats["windows_without_answer"] = sum(int(s == c) for s, c in zip(starts, cls, strict=True))
        return stats

    def _check_questions(self, questions: list[str], ids: list[str], role: str) -> None:
        """The tokenizer panics (not a Python error) when a question leaves <= stride context tokens."""
        stride, limit = self.options.doc_stride, self.max_length
        lengths = self.tokenizer(questions, add_special_tokens=False, verbose=False)["input_ids"]
        for example, question in zip(ids, lengths, strict=True):
            if limit - len(question) - self.specials <= stride:
                raise UserError(
                    f"data.question_column: the question of example {example!r} ({role} split) is "
                    f"{len(question)} tokens, leaving no more than question_answering.doc_stride ({stride}) "
                    f"of the {limit}-token window for context; raise data.max_length or lower doc_stride"
                )

    def encode(self, rows: dict[str, list[Any]], indices: list[int], role: str) -> dict[str, list[Any]]:
        """Windows of (question, context) tokens with start/end labels (or CLS), and what maps them back.

        Every window keeps `index` (its question's row in the raw split) and its CLS position; validation
        windows also keep each token's character offsets in the context (`offset_start` / `offset_end`,
        -100 for tokens that are not context), which evaluation turns into answer text.
        """
        data = self.data
        questions = [q.lstrip() for q in rows[data.question_column]]  # leading blanks waste window
        contexts = rows[data.context_column]
        ids = [str(v) for v in rows[data.id_column]] if data.id_column in rows else [str(i) for i in indices]
        self._check_questions(questions, ids, role)
        enc = self.tokenizer(
            questions,
            contexts,
            truncation="only_second",
            max_length=self.max_length,
            stride=self.options.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            verbose=False,
        )
        samples = enc.pop("overflow_to_sample_mapping")
        offsets = enc.pop("offset_mapping")
        out: dict[str, list[Any]] = {k: list(v) for k, v in enc.items()}
        out["index"] = [indices[s] for s in samples]
        out["cls_index"] = [row.index(self.cls_token_id) if self.cls_token_id in row else 0 for row in enc["input_ids"]]
        sequence_ids = [enc.sequence_ids(w) for w in range(len(samples))]
        if role == "validation":
            for key, side in (("offset_start", 0), ("offset_end", 1)):
                out[key] = [
                    [o[side] if s == 1 else NOT_CONTEXT for o, s in zip(off, seq, strict=True)]
                    for off, seq in zip(offsets, sequence_ids, strict=True)
                ]
        if self.labelled:
            chars = [
                self._answer_chars(a, example, c, role)
                for a, example, c in zip(rows[data.answers_column], ids, contexts, strict=True)
            ]
            positions = [
                label_window(offsets[w], sequence_ids[w], *chars[s], out["cls_index"][w])
                if chars[s] is not None
                else (out["cls_index"][w], out["cls_index"][w])
                for w, s in enumerate(samples)
            ]
            out["start_positions"] = [p[0] for p in positions]
            out["end_positions"] = [p[1] for p in positions]
        return out

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One target (a start/end pair) per window."""
        import torch

        return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def _losses(self, start: torch.Tensor, end: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per window: the mean of the start and end cross-entropies, over its real (unpadded) tokens."""
        import torch
        import torch.nn.functional as F

        if "attention_mask" in batch:
            padding = batch["attention_mask"] == 0
            start = start.masked_fill(padding, torch.finfo(start.dtype).min)
            end = end.masked_fill(padding, torch.finfo(end.dtype).min)
        start_loss = F.cross_entropy(start, batch["start_positions"], reduction="none")
        end_loss = F.cross_entropy(end, batch["end_positions"], reduction="none")
        return (start_loss + end_loss) / 2

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Summed start/end cross-entropy divided by the accumulated step's window count."""
        out = model(**model_inputs(batch))
        return self._losses(out.start_logits.float(), out.end_logits.float(), batch).sum() / num_items

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per window: the n-best starts and ends inside the context (position, score, character offset),
        the null score (start + end score of the CLS token), the question's row and the loss."""
        import torch

        out = model(**model_inputs(batch))
        start, end = out.start_logits.float(), out.end_logits.float()
        outside = batch["offset_start"] < 0
        k = min(self.options.n_best, start.shape[1])
        lowest = torch.finfo(start.dtype).min
        start_scores, start_tokens = start.masked_fill(outside, lowest).topk(k, dim=1)
        end_scores, end_tokens = end.masked_fill(outside, lowest).topk(k, dim=1)
        cls = batch["cls_index"][:, None]
        values = {
            "index": batch["index"],
            "start_tokens": start_tokens,
            "start_scores": start_scores,
            "start_chars": batch["offset_start"].gather(1, start_tokens),
            "end_tokens": end_tokens,
            "end_scores": end_scores,
            "end_chars": batch["offset_end"].gather(1, end_tokens),
            "null_score": (start.gather(1, cls) + end.gather(1, cls)).squeeze(1),
        }
        if "start_positions" in batch:
            values["loss"] = self._losses(start, end, batch)
        return values

    def answers(self, outputs: EvalOutputs) -> dict[int, Answer]:
        """Each evaluated question's best answer over its windows, by row in the raw validation split."""
        if self.validation_raw is None:
            raise RuntimeError("answers() needs prepare() on a validation split first")
        windows: dict[int, list[WindowCandidates]] = defaultdict(list)
        columns = [outputs.flat(key) for key in CANDIDATE_KEYS]
        for index, null, *candidates in zip(outputs.flat("index"), outputs.flat("null_score"), *columns, strict=True):
            windows[int(index)].append(WindowCandidates(*candidates, null_score=null))
        contexts = values(self.validation_raw, self.data.context_column)
        return {
            index: best_answer(
                str(contexts[index]),
                found,
                self.options.max_answer_length,
                self.options.allow_no_answer,
                self.options.null_threshold,
            )
            for index, found in sorted(windows.items())
        }

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Mean window loss, and SQuAD exact match / F1 over the evaluated questions (in percent)."""
        assert self.validation_raw is not None
        found = self.answers(outputs)
        gold = values(self.validation_raw, self.data.answers_column)
        scores = squad_metrics([a.text for a in found.values()], [list(gold[i]["text"] or []) for i in found])
        loss = outputs.sum("loss") / max(len(outputs), 1)
        return {
            "eval/loss": loss if math.isfinite(loss) else float("inf"),
            "eval/exact_match": scores["exact_match"],
            "eval/f1": scores["f1"],
        }

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """Per question, in file order: its id, the question, the answer text ("" for none) and its score."""
        assert self.validation_raw is not None
        ids = example_ids(self.validation_raw, self.data.id_column)
        questions = values(self.validation_raw, self.data.question_column)
        return [
            {
                "id": ids[i],
                "question": str(questions[i]),
                "answer": a.text,
                "score": a.score,
                "start": a.start_char,  # in the context; None when there is no answer
                "end": None if a.start_char is None else a.start_char + len(a.text),
            }
            for i, a in self.answers(outputs).items()
        ]

    def scored_pairs(self, outputs: EvalOutputs) -> tuple[list[Any], list[Any]]:
        """SQuAD-style records, as `evaluate`'s squad metric takes them: {id, prediction_text} and {id, answers}."""
        assert self.validation_raw is not None
        ids = example_ids(self.validation_raw, self.data.id_column)
        gold = values(self.validation_raw, self.data.answers_column)
        found = self.answers(outputs)
        predictions = [{"id": ids[i], "prediction_text": a.text} for i, a in found.items()]
        references = [
            {"id": ids[i], "answers": {"text": list(gold[i]["text"]), "answer_start": list(gold[i]["answer_start"])}}
            for i in found
        ]
        return predictions, references
