"""Extractive QA post-processing: per-window n-best start/end candidates -> one answer span per question.

Plain Python and numpy on what `QuestionAnswering.eval_batch` reduced on the device: for each window
the n-best start and end token positions, their scores and their character offsets in the context
(-100 for a position outside the context), and the window's null (no-answer) score. This mirrors
`postprocess_qa_predictions` of Hugging Face's run_qa example, vectorised per window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NOT_CONTEXT = -100  # the character offset of a token outside the context (question, special, padding)


@dataclass
class WindowCandidates:
    """One window's n-best start and end candidates: token positions, scores and character offsets.

    `start_chars[i]` is where token `start_tokens[i]` begins in the context, `end_chars[j]` where token
    `end_tokens[j]` ends; either is `NOT_CONTEXT` for a token that is not context.
    """

    start_tokens: Sequence[int]
    start_scores: Sequence[float]
    start_chars: Sequence[int]
    end_tokens: Sequence[int]
    end_scores: Sequence[float]
    end_chars: Sequence[int]
    null_score: float


@dataclass
class Answer:
    """The chosen answer of a question: the context's text span (empty for no answer) and its score."""

    text: str
    score: float
    start_char: int | None = None  # None for no answer


def best_answer(
    context: str,
    windows: Sequence[WindowCandidates],
    max_answer_length: int,
    allow_no_answer: bool = False,
    null_threshold: float = 0.0,
) -> Answer:
    """The best span over all windows of one question.

    A candidate pairs a start with an end of the same window: both inside the context, start <= end
    (in tokens) and at most `max_answer_length` tokens long; its score is start + end score and its
    text is `context[start_char:end_char]`. With `allow_no_answer` (SQuAD v2) the answer is empty when
    the smallest null score over the windows beats the best span's score by more than `null_threshold`.
    Without any valid candidate the answer is empty, scored with that null score.
    """
    best: Answer | None = None
    null = min((float(w.null_score) for w in windows), default=float("nan"))
    for w in windows:
        s_tok, e_tok = np.asarray(w.start_tokens), np.asarray(w.end_tokens)
        s_char, e_char = np.asarray(w.start_chars), np.asarray(w.end_chars)
        scores = np.asarray(w.start_scores, dtype=np.float64)[:, None] + np.asarray(w.end_scores, dtype=np.float64)
        length = e_tok[None, :] - s_tok[:, None] + 1
        valid = (
            (s_char[:, None] >= 0)
            & (e_char[None, :] >= 0)
            & (length >= 1)
            & (length <= max_answer_length)
            & (e_char[None, :] > s_char[:, None])
        )
        if not valid.any():
            continue
        i, j = np.unravel_index(np.argmax(np.where(valid, scores, -np.inf)), scores.shape)
        score = float(scores[i, j])
        if best is None or score > best.score:
            best = Answer(context[int(s_char[i]) : int(e_char[j])], score, int(s_char[i]))
    if best is None or (allow_no_answer and null - best.score > null_threshold):
        return Answer("", null)
    return best
