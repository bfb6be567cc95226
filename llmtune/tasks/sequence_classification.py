"""`sequence-classification`: one label (or a score) per text or text pair.

The label <-> id map is built from the training labels (sorted; ints keep their values), stored in
the model config (`id2label` / `label2id`) and read back from it when a saved model is evaluated, so
predictions come out as the labels the data used. Float labels make it a regression (one output,
mean squared error). GPT-2 classifies from its last non-pad token (transformers does this from
`config.pad_token_id`, which the build sets).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError
from llmtune.metrics import classification_metrics, regression_metrics
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.finetune import FinetuneTask, LabelMap, model_inputs

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData


def is_regression(ds: Dataset, column: str) -> bool:
    """Float-typed labels are scores to regress on; ints and strings are classes."""
    dtype = getattr(ds.features[column], "dtype", "")
    return str(dtype).startswith("float")


def label_map(values: list[Any]) -> dict[str, int]:
    """label -> id from the training labels: ints keep their values (0..max), strings are sorted."""
    unique = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in unique):
        if unique and unique[0] < 0:
            raise UserError(f"data.label_column: integer labels must be >= 0, found {unique[0]}")
        return {str(i): i for i in range(max(unique) + 1)} if unique else {}
    return {str(v): i for i, v in enumerate(unique)}


class SequenceClassification(FinetuneTask):
    """Classification (cross-entropy; accuracy, macro-F1, Matthews) or regression (MSE; Pearson, Spearman)."""

    auto_class = "AutoModelForSequenceClassification"
    cache_version = "sequence-classification/1"

    def __init__(self, recipe: Any, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.regression = self.options.problem == "regression"
        self.labels = LabelMap({}, {}, 0)

    def model_overrides(self, raw: RawData) -> dict[str, Any]:
        """num_labels and the label maps (or a one-output regression head) from the training labels."""
        train = raw.splits["train"]
        problem = self.options.problem
        if problem == "regression" or (problem == "auto" and is_regression(train, self.data.label_column)):
            return {"num_labels": 1, "problem_type": "regression", "id2label": {0: "score"}, "label2id": {"score": 0}}
        mapping = label_map(train[self.data.label_column])
        if len(mapping) < 2:
            raise UserError(
                f"data.label_column: the train split has {len(mapping)} distinct label(s) in "
                f"{self.data.label_column!r}; classification needs at least 2"
            )
        return {
            "num_labels": len(mapping),
            "problem_type": "single_label_classification",
            "id2label": {i: label for label, i in mapping.items()},
            "label2id": mapping,
        }

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Read the label map (or regression) from the model's config."""
        super().setup(model, tokenizer)
        config = model.config
        self.regression = config.problem_type == "regression" or config.num_labels == 1
        self.labels = LabelMap.from_config(config)

    def cache_key(self) -> list[Any]:
        """The label map changes the encoded labels, so it is part of the cache key."""
        return [*super().cache_key(), self.regression, sorted(self.labels.label2id.items())]

    def encode(self, rows: dict[str, list[Any]], indices: list[int], role: str) -> dict[str, list[Any]]:
        """Tokenised, truncated texts (pairs truncated longest-first), label ids and row indices."""
        data = self.data
        pairs = rows[data.text_pair_column] if data.text_pair_column else None
        out = dict(
            self.tokenizer(rows[data.text_column], pairs, truncation=True, max_length=self.max_length, verbose=False)
        )
        out["index"] = indices
        if self.labelled:
            out["labels"] = [
                float(v) if self.regression else self.labels.id_of(v, "data.label_column", role, i)
                for v, i in zip(rows[data.label_column], indices, strict=True)
            ]
        return out

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One target per example."""
        import torch

        return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def _losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if self.regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy (or squared error) divided by the accumulated step's example count."""
        logits = model(**model_inputs(batch)).logits
        return self._losses(logits, batch["labels"]).sum() / num_items

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per example: the prediction (class id or score), its probability, the loss and the label."""
        logits = model(**model_inputs(batch)).logits.float()
        if self.regression:
            prediction = logits.squeeze(-1)
            values = {"index": batch["index"], "prediction": prediction, "confidence": prediction.new_ones(len(logits))}
        else:
            probabilities = logits.softmax(dim=-1)
            confidence, prediction = probabilities.max(dim=-1)
            values = {"index": batch["index"], "prediction": prediction, "confidence": confidence}
            values["probabilities"] = probabilities
        if "labels" in batch:
            values.update(label=batch["labels"], loss=self._losses(logits, batch["labels"]))
        return values

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Mean loss and the class or regression metrics."""
        n = max(len(outputs), 1)
        predictions, labels = outputs.flat("prediction"), outputs.flat("label")
        scores = (
            regression_metrics(predictions, labels) if self.regression else classification_metrics(predictions, labels)
        )
        loss = outputs.sum("loss") / n
        return {
            "eval/loss": loss if math.isfinite(loss) else float("inf"),
            **{f"eval/{k}": v for k, v in scores.items()},
        }

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """Per raw example, in file order: the predicted label and its probability, and every label's probability
        (regression: the score)."""
        index = outputs.flat("index")
        if self.regression:
            return [{"index": i, "score": p} for i, p in sorted(zip(index, outputs.flat("prediction"), strict=True))]
        names = self.labels.id2label
        columns = [outputs.flat(k) for k in ("prediction", "confidence", "probabilities")]
        rows = zip(index, *columns, strict=True)
        return [
            {
                "index": i,
                "label": names.get(int(p), str(int(p))),
                "probability": c,
                "probabilities": {names.get(k, str(k)): v for k, v in enumerate(all_)},
            }
            for i, p, c, all_ in sorted(rows, key=lambda row: row[0])
        ]

    def scored_pairs(self, outputs: EvalOutputs) -> tuple[list[Any], list[Any]]:
        """Predicted and reference class ids (or scores), as `evaluate`'s accuracy / f1 / pearsonr take them."""
        convert = float if self.regression else int
        return [convert(p) for p in outputs.flat("prediction")], [convert(r) for r in outputs.flat("label")]
