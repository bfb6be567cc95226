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
from llmtune.recipe import Seq2SeqSpec
from llmtune.tasks.base import EvalOutputs, Prepared
from llmtune.tasks.finetune import FinetuneTask, encode_split, model_inputs, row_lengths, unwrap
from llmtune.tasks.token_loss import IGNORE, per_example_token_stats, token_loss_sum

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import DataSpec

ROUGE_KINDS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


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


def metric_names_for(spec: Seq2SeqSpec) -> tuple[str, ...]:
    """The metrics a seq2seq evaluation reports for these `seq2seq.metrics`."""
    names = ["eval/loss", "eval/gen_len"]
    for metric in spec.metrics:
        names.extend(f"eval/{kind}" for kind in (ROUGE_KINDS if metric == "rouge" else (metric,)))
    return tuple(dict.fromkeys(names))


class Seq2Seq(FinetuneTask):
    """Encoder-decoder fine-tuning: target-token cross-entropy; BLEU / chrF / ROUGE of generated texts."""

    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    cache_version = "seq2seq/1"

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.spec: Seq2SeqSpec = recipe.seq2seq or Seq2SeqSpec()
        self.tokenizer: Any = None

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Loss, mean generated length, and the scores of `seq2seq.metrics`."""
        return metric_names_for(self.spec)

    @property
    def max_new_tokens(self) -> int:
        """The generation budget: `seq2seq.generation_max_length`, else `max_target_length`."""
        return self.spec.generation_max_length or self.spec.max_target_length

    def required_columns(self, data: DataSpec) -> dict[str, str]:
        """The source column, and the target column when there are targets."""
        columns = {"data.source_column": data.source_column}
        if self.labelled:
            columns["data.target_column"] = data.target_column
        return columns

    def setup(self, data: DataSpec, model: Any, tokenizer: Any) -> None:
        """Refuse a model that is not an encoder-decoder; keep the tokenizer to decode generations."""
        super().setup(data, model, tokenizer)
        config = model.config
        if not getattr(config, "is_encoder_decoder", False):
            raise UserError(
                f"model: a {config.model_type!r} model is not an encoder-decoder; seq2seq needs one such as "
                "t5-small or facebook/bart-base"
            )
        if getattr(config, "decoder_start_token_id", None) is None:
            raise UserError("model: the config has no decoder_start_token_id; set model.config.decoder_start_token_id")
        self.tokenizer = tokenizer

    def cache_key(self) -> list[Any]:
        """The prefix and the target length also change the tokenised rows."""
        return [*super().cache_key(), self.spec.source_prefix, self.spec.max_target_length]

    def prepare(self, raw: RawData, tokenizer: Any, data: DataSpec) -> Prepared:
        """Prefixed, truncated sources; truncated targets as `labels` (padded with -100 per batch); row indices."""
        prefix, target_length = self.spec.source_prefix, self.spec.max_target_length

        def build(role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
            def encode(rows: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
                head = data.source_column.split(".")[0]
                sources = field_values(rows[head], data.source_column, "data.source_column", role, indices[0])
                out = dict(
                    tokenizer([prefix + s for s in sources], truncation=True, max_length=self.max_length, verbose=False)
                )
                out.pop("token_type_ids", None)  # encoder-decoders take none
                out["index"] = indices
                if self.labelled:
                    head = data.target_column.split(".")[0]
                    targets = field_values(rows[head], data.target_column, "data.target_column", role, indices[0])
                    labels = tokenizer(text_target=targets, truncation=True, max_length=target_length, verbose=False)
                    out["labels"] = labels["input_ids"]
                return out

            encoded = encode_split(ds, encode, data.num_proc)
            return encoded, ({"target_tokens": int(sum(row_lengths(encoded, "labels")))} if self.labelled else {})

        return self.prepare_rows(raw, tokenizer, build)

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
        values["generated"] = self._trim(unwrap(model), generated[:, 1:])  # rows begin with the decoder start
        return values

    @staticmethod
    def _trim(model: Any, generated: torch.Tensor) -> torch.Tensor:
        """Generated ids with everything after the first EOS, and padding, set to -100 (beam search fills
        finished rows with EOS or pad)."""
        import torch

        eos = model.generation_config.eos_token_id
        eos = model.config.eos_token_id if eos is None else eos
        ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        ends = torch.isin(generated, torch.tensor(ids, dtype=generated.dtype, device=generated.device))
        after_end = (ends.cumsum(dim=1) - ends.long()) > 0
        pad = model.config.pad_token_id
        padding = generated == pad if pad is not None else torch.zeros_like(ends)
        return generated.masked_fill(after_end | padding, IGNORE)

    def _decode(self, rows: list[list[int]]) -> list[str]:
        ids = [[t for t in row if t >= 0] for row in rows]
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

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

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """Per raw example, in file order: its source text and the generated text."""
        rows = sorted(zip(outputs.flat("index"), self._decode(outputs.flat("generated")), strict=True))
        sources = self._raw_texts([i for i, _ in rows], self.data.source_column, "data.source_column")
        return [
            {"index": i, "source": source, "prediction": text} for (i, text), source in zip(rows, sources, strict=True)
        ]
