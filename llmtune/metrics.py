"""Task metrics, computed with the libraries `evaluate`'s own metric modules wrap (which need the hub).

scikit-learn for accuracy / F1 / Matthews, scipy for Pearson / Spearman, seqeval for entities,
sacreBLEU for BLEU / chrF, rouge-score for ROUGE, and the official SQuAD v1.1 normalisation. Every
function takes plain Python lists and returns percentages where the literature quotes percentages
(F1, EM, BLEU, ROUGE) and fractions otherwise (accuracy, correlations), named as the tasks report them.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any


def classification_metrics(predictions: list[int], references: list[int]) -> dict[str, float]:
    """Accuracy, macro-averaged F1 and Matthews correlation (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {
        "accuracy": float(accuracy_score(references, predictions)),
        "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
        "matthews": float(matthews_corrcoef(references, predictions)) if len(set(references)) > 1 else 0.0,
    }


def regression_metrics(predictions: list[float], references: list[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy) and mean squared error."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    p, r = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    constant = len(p) < 2 or p.std() == 0 or r.std() == 0  # correlation is undefined
    return {
        "pearson": 0.0 if constant else float(pearsonr(p, r)[0]),
        "spearman": 0.0 if constant else float(spearmanr(p, r)[0]),
        "mse": float(np.mean((p - r) ** 2)) if len(p) else 0.0,
    }


def entity_metrics(references: list[list[str]], predictions: list[list[str]], scheme: str = "IOB2") -> dict[str, float]:
    """Entity-level micro precision / recall / F1 and per-type F1 (seqeval), in percent.

    IOB1/IOB2 are scored as conlleval does (seqeval's default mode, the figure CoNLL-2003 papers quote);
    the other schemes need seqeval's strict mode, which reads entities by that scheme's rules.
    """
    from seqeval import metrics as sq

    kwargs: dict[str, Any] = {}
    if scheme not in ("IOB1", "IOB2"):
        from seqeval import scheme as schemes

        kwargs = {"mode": "strict", "scheme": getattr(schemes, scheme)}
    report = sq.classification_report(references, predictions, output_dict=True, zero_division=0, **kwargs)
    result = {
        "precision": 100 * float(sq.precision_score(references, predictions, zero_division=0, **kwargs)),
        "recall": 100 * float(sq.recall_score(references, predictions, zero_division=0, **kwargs)),
        "f1": 100 * float(sq.f1_score(references, predictions, zero_division=0, **kwargs)),
    }
    for kind, row in report.items():
        if kind not in ("micro avg", "macro avg", "weighted avg"):
            result[f"f1_{kind}"] = 100 * float(row["f1-score"])
    return result


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:  # SQuAD v2's rule: both empty is a match, one empty is not
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """SQuAD exact match and F1 in percent: the best over each question's gold answers, averaged.

    A question with no gold answer (v2) counts as [""]: only an empty prediction matches it.
    """
    em = f1 = 0.0
    for prediction, truths in zip(predictions, references, strict=True):
        truths = truths or [""]
        em += max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths)
        f1 += max(_token_f1(prediction, t) for t in truths)
    n = max(len(predictions), 1)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n}


def generation_metrics(predictions: list[str], references: list[str], which: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacreBLEU, default 13a tokenisation) and/or ROUGE-1/2/L/Lsum F1 (rouge-score,
    Porter stemming), each in percent."""
    result: dict[str, float] = {}
    if "bleu" in which or "chrf" in which:
        import sacrebleu

        if "bleu" in which:
            result["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
        if "chrf" in which:
            result["chrf"] = float(sacrebleu.corpus_chrf(predictions, [references]).score)
    if "rouge" in which:
        from rouge_score import rouge_scorer

        kinds = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
        sums = dict.fromkeys(kinds, 0.0)
        for prediction, reference in zip(predictions, references, strict=True):
            # rougeLsum scores sentence by sentence: one sentence per line, as in the summarisation papers.
            scores = scorer.score(reference.replace(". ", ".\n"), prediction.replace(". ", ".\n"))
            for kind in kinds:
                sums[kind] += scores[kind].fmeasure
        n = max(len(predictions), 1)
        result.update({kind: 100 * total / n for kind, total in sums.items()})
    return result


def load_metric_modules(specs: list[Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """The recipe's `metrics:` entries as loaded `evaluate` modules: (report name, module, compute args).

    Loaded before anything is trained, so a module that cannot load is a one-line error up front.
    """
    if not specs:
        return []
    import evaluate

    from llmtune.errors import UserError

    loaded = []
    for index, spec in enumerate(specs):
        try:
            module = evaluate.load(spec.module, keep_in_memory=True)
        except Exception as exc:  # evaluate raises many types (FileNotFoundError, ConnectionError, ...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(
                f"metrics[{index}].module: cannot load {spec.module!r} ({first}); name a local metric script "
                "(e.g. ./my_metric.py) or a hub metric id reachable from here"
            ) from None
        loaded.append((spec.label, module, dict(spec.args)))
    return loaded


def module_metrics(
    modules: list[tuple[str, Any, dict[str, Any]]], predictions: list[Any], references: list[Any]
) -> dict[str, float]:
    """Each module's numeric results on the task's predictions and references: `eval/<name>` when it returns
    one value, else `eval/<name>_<key>` for each."""
    from llmtune.errors import UserError

    found: dict[str, float] = {}
    for name, module, args in modules:
        try:
            result = module.compute(predictions=predictions, references=references, **args)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(
                f"metrics: the evaluate module {name!r} failed on this task's predictions: {first}"
            ) from None
        numbers = {
            k: float(v) for k, v in (result or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if len(numbers) == 1:
            found[f"eval/{name}"] = next(iter(numbers.values()))
        else:
            found.update({f"eval/{name}_{key}": value for key, value in numbers.items()})
    return found
