"""`seq2seq`: translation and summarisation with any encoder-decoder (`AutoModelForSeq2SeqLM`; T5, BART, ...).

Sources (with `seq2seq.source_prefix` prepended, e.g. T5's `translate English to German: `) are
truncated to `data.max_length` tokens, targets to `seq2seq.max_target_length`; the model builds its
decoder inputs itself by shifting the labels right. A dotted column name `translation.en` reads field
`en` of a dict column, the way hub translation datasets store their pairs. Evaluation generates
(beam search, `seq2seq.num_beams`) and scores the decoded texts against the raw target texts:
sacreBLEU BLEU / chrF for translation, ROUGE for summaries; `eval/loss` is the teacher-forced
target-token cross-entropy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError
from llmtune.metrics import generation_metrics
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.finetune import FinetuneTask, model_inputs, row_lengths, unwrap
from llmtune.tasks.generation import cut_at_eos, decode, eos_ids
from llmtune.tasks.token_loss import per_example_token_stats, token_loss_sum

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.tasks.registry import Seq2SeqSpec


def field_values(values: list[Any], column: str, key: str, role: str, first_row: int = 0) -> list[str]:
    """The texts of `column` from its top-level column's `values`: `a.b` reads field `b` of each dict of `a`.

    A missing field or an empty (null) value is a `UserError` naming the recipe key, split and row.
    """
    fields = column.split(".")[1:]
    texts = []
    for offset, value in enumerate(values):
        for depth, name in enumerate(fields):
            if not isinstance(value, dict) or name not in value:
                found = ", ".join(value) if isinstance(value, dict) else type(value).__name__
                inner = ".".join(column.split(".")[: depth + 1])
                raise UserError(
                    f"{key}: {inner!r} in the {role} split (row {first_row + offset}) has no field {name!r} "
                    f"(found: {found}); name an existing field, e.g. translation.en"
                )
            value = value[name]
        if value is None:
            raise UserError(f"{key}: column {column!r} is empty in the {role} split (row {first_row + offset})")
        texts.append(str(value))
    return texts


class Seq2Seq(FinetuneTask):
    """Encoder-decoder fine-tuning: target-token cross-entropy; BLEU / chrF / ROUGE of generated texts."""

    auto_class = "AutoModelForSeq2SeqLM"
    cache_version = "seq2seq/1"

    def __init__(self, recipe: Any, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.spec: Seq2SeqSpec = self.options

    @property
    def max_new_tokens(self) -> int:
        """The generation budget: `seq2seq.generation_max_length`, else `max_target_length`."""
        return self.spec.generation_max_length or self.spec.max_target_length

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Refuse a model that is not an encoder-decoder; keep the tokenizer to decode generations."""
        super().setup(model, tokenizer)
        config = model.config
        if not getattr(config, "is_encoder_decoder", False):
            raise UserError(
                f"model: a {config.model_type!r} model is not an encoder-decoder; seq2seq needs one such as "
                "t5-small or facebook/bart-base"
            )
        if getattr(config, "decoder_start_token_id", None) is None:
            raise UserError("model: the config has no decoder_start_token_id; set model.config.decoder_start_token_id")

    def cache_key(self) -> list[Any]:
        """The prefix and the target length also change the tokenised rows."""
        return [*super().cache_key(), self.spec.source_prefix, self.spec.max_target_length]

    def _texts(self, rows: dict[str, list[Any]], column: str, key: str, role: str, indices: list[int]) -> list[str]:
        return field_values(rows[column.split(".")[0]], column, key, role, indices[0])

    def encode(self, rows: dict[str, list[Any]], indices: list[int], role: str) -> dict[str, list[Any]]:
        """Prefixed, truncated sources; truncated targets as `labels` (padded with -100 per batch); row indices."""
        prefix = self.spec.source_prefix
        sources = self._texts(rows, self.data.source_column, "data.source_column", role, indices)
        out = dict(
            self.tokenizer([prefix + s for s in sources], truncation=True, max_length=self.max_length, verbose=False)
        )
        out.pop("token_type_ids", None)  # encoder-decoders take none
        out["index"] = indices
        if self.labelled:
            targets = self._texts(rows, self.data.target_column, "data.target_column", role, indices)
            labels = self.tokenizer(
                text_target=targets, truncation=True, max_length=self.spec.max_target_length, verbose=False
            )
            out["labels"] = labels["input_ids"]
        return out

    def split_stats(self, role: str, raw: Dataset, encoded: Dataset) -> dict[str, Any]:
        """Target tokens, with labels."""
        return {"target_tokens": int(sum(row_lengths(encoded, "labels")))} if self.labelled else {}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Summed target-token cross-entropy over the accumulated step's target-token count."""
        logits = model(**model_inputs(batch), labels=batch["labels"]).logits
        return token_loss_sum(logits, batch["labels"]) / num_items

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per example: the generated ids (up to the first EOS; -100 after) and, with targets, the
        teacher-forced NLL sum and target-token count."""
        inputs = model_inputs(batch)
        values = {"index": batch["index"]}
        if "labels" in batch:
            stats = per_example_token_stats(model(**inputs, labels=batch["labels"]).logits, batch["labels"])
            values.update(nll=stats["nll"], tokens=stats["tokens"])
        generated = unwrap(model).generate(
            **inputs, num_beams=self.spec.num_beams, max_new_tokens=self.max_new_tokens, do_sample=False
        )
        inner = unwrap(model)
        # Rows begin with the decoder start token; beam search fills finished rows with EOS or pad.
        values["generated"] = cut_at_eos(generated[:, 1:], eos_ids(inner), inner.config.pad_token_id)
        return values

    def _decode(self, rows: list[list[int]]) -> list[str]:
        return [t.strip() for t in decode(self.tokenizer, rows)]

    def _raw_texts(self, indices: list[int], column: str, key: str) -> list[str]:
        if self.validation_raw is None:
            raise RuntimeError("metrics before prepare: no validation split")
        values = self.validation_raw.select(indices)[column.split(".")[0]]
        return field_values(values, column, key, "validation")

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Token-weighted loss, mean generated length, and BLEU / chrF / ROUGE against the raw targets."""
        indices = outputs.flat("index")
        generated = outputs.flat("generated")
        predictions = self._decode(generated)
        references = self._raw_texts(indices, self.data.target_column, "data.target_column")
        scores = generation_metrics(predictions, references, list(self.spec.metrics))
        lengths = [sum(1 for t in row if t >= 0) for row in generated]
        return {
            "eval/loss": outputs.sum("nll") / max(outputs.sum("tokens"), 1.0),
            "eval/gen_len": sum(lengths) / max(len(lengths), 1),
            **{f"eval/{k}": v for k, v in scores.items()},
        }

    def scored_pairs(self, outputs: EvalOutputs) -> tuple[list[Any], list[Any]]:
        """Generated texts and their reference targets, as `evaluate`'s sacrebleu / rouge / bleu take them."""
        predictions = self._decode(outputs.flat("generated"))
        return predictions, self._raw_texts(outputs.flat("index"), self.data.target_column, "data.target_column")

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """Per raw example, in file order: its source text and the generated text."""
        rows = sorted(zip(outputs.flat("index"), self._decode(outputs.flat("generated")), strict=True))
        sources = self._raw_texts([i for i, _ in rows], self.data.source_column, "data.source_column")
        return [
            {"index": i, "source": source, "prediction": text} for (i, text), source in zip(rows, sources, strict=True)
        ]
