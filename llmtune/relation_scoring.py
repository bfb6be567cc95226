"""Relation-classification scores: the SemEval-2010 Task 8 official score, TACRED micro-F1, per-relation F1.

Pure Python over lists of label strings; F1 and precision / recall in percent (as the papers quote them),
accuracy as a fraction, like `llmtune.metrics`.
"""

from __future__ import annotations

import re
from collections import Counter

DIRECTION = re.compile(r"\(e[12],e[12]\)$")


def relation_type(label: str) -> str:
    """A label without its direction suffix: `Cause-Effect(e2,e1)` -> `Cause-Effect` (others unchanged)."""
    return DIRECTION.sub("", label)


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def semeval_official(predictions: list[str], references: list[str], negative: str = "Other") -> dict[str, float]:
    """The SemEval-2010 Task 8 official score: macro-F1 of the "(9+1)-way evaluation with directionality taken
    into account", exactly as `semeval2010_task8_scorer-v1.2.pl` computes it (its `evaluate` with WRONG_DIR).

    For every relation type T (the label with `(e1,e2)` / `(e2,e1)` stripped) that occurs among the references,
    except the negative label (`Other`):
    - correct(T): examples whose prediction equals the reference *exactly* (type and direction) and whose
      reference has type T;
    - proposed(T): every prediction of type T. The scorer files a prediction of the right type but the wrong
      direction in a WRONG_DIR row instead of T's column, then adds that row back to T's precision
      denominator (`allLabelsProposed{T} + wrongDirectionCnt`), so a wrong-direction prediction is wrong
      (not in correct(T)) but still counts as proposed T;
    - gold(T): references of type T.
    P = correct/proposed (0 when nothing proposed), R = correct/gold, F1 = 2PR/(P+R) (0 when P+R = 0). The
    official score is the mean F1 over the reference types other than the negative one (the scorer divides by
    the distinct reference types less `_Other`); a type only ever predicted is not averaged in.

    Returns `semeval_macro_f1` (percent) and `semeval_f1_<type>` for each averaged type.
    """
    gold = Counter(relation_type(r) for r in references)
    proposed = Counter(relation_type(p) for p in predictions)
    correct = Counter(relation_type(r) for p, r in zip(predictions, references, strict=True) if p == r)
    scores: dict[str, float] = {}
    types = sorted(t for t in gold if t != relation_type(negative))
    for kind in types:
        precision = correct[kind] / proposed[kind] if proposed[kind] else 0.0
        recall = correct[kind] / gold[kind]
        scores[f"semeval_f1_{kind}"] = 100 * _f1(precision, recall)
    macro = sum(scores.values()) / len(types) if types else 0.0
    return {"semeval_macro_f1": macro, **scores}


def micro_scores(predictions: list[str], references: list[str], negative: str) -> dict[str, float]:
    """Micro precision / recall / F1 over the non-negative labels: the TACRED convention (`score` in Zhang et
    al.'s 2017 `scorer.py`).

    A prediction other than `negative` is a guess; a reference other than `negative` is a gold relation; a guess
    equal to a gold relation is correct (directional labels are distinct). Precision is correct/guesses (1 when
    there are no guesses, as that scorer has it), recall correct/gold (0 when there is no gold relation).
    """
    guessed = sum(p != negative for p in predictions)
    gold = sum(r != negative for r in references)
    correct = sum(p == r and r != negative for p, r in zip(predictions, references, strict=True))
    precision = correct / guessed if guessed else 1.0
    recall = correct / gold if gold else 0.0
    return {"micro_precision": 100 * precision, "micro_recall": 100 * recall, "micro_f1": 100 * _f1(precision, recall)}


def per_label_f1(predictions: list[str], references: list[str]) -> dict[str, float]:
    """F1 (percent) of every label that occurs in the references or the predictions, directions distinct."""
    gold, guessed = Counter(references), Counter(predictions)
    hits = Counter(r for p, r in zip(predictions, references, strict=True) if p == r)
    out = {}
    for label in sorted(set(gold) | set(guessed)):
        precision = hits[label] / guessed[label] if guessed[label] else 0.0
        recall = hits[label] / gold[label] if gold[label] else 0.0
        out[f"f1_{label}"] = 100 * _f1(precision, recall)
    return out


def relation_metrics(
    predictions: list[str], references: list[str], negative: str, per_relation: bool = False
) -> dict[str, float]:
    """Accuracy, TACRED micro P/R/F1, the SemEval-2010 official macro-F1 and, on request, per-label F1."""
    n = len(references)
    result = {"accuracy": sum(p == r for p, r in zip(predictions, references, strict=True)) / n if n else 0.0}
    result.update(micro_scores(predictions, references, negative))
    result["semeval_macro_f1"] = semeval_official(predictions, references, negative)["semeval_macro_f1"]
    if per_relation:
        result.update(per_label_f1(predictions, references))
    return result
