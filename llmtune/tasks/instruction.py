"""`causal-lm` on prompt/response pairs or chats: instruction tuning, with the loss on the responses only.

Selected for `task: causal-lm` when the recipe sets `data.prompt_column` + `data.response_column`, or
`data.messages_column`; plain text keeps the packed-block `CausalLM`.

Prompt/response: each example is the tokens of `instruction.template` with `{prompt}` filled in (any
other `{name}` in the template is the row's column `name`, e.g. Alpaca's `{input}`; tokenised with the
tokenizer's own special tokens, e.g. a BOS where it adds one), then the response's tokens and EOS, cut
to `data.max_length` tokens. Prompt positions get label -100, so the loss counts the response and its
EOS. The prompt is tokenised on its own, exactly as it is at prediction time.

Chat: `data.messages_column` holds lists of `{role, content}` messages, rendered with
`instruction.chat_template`, else the tokenizer's chat template, else `DEFAULT_CHAT_TEMPLATE` (role
headers `### User:` / `### Assistant:`, EOS after each assistant turn). Only assistant turns count
(`llmtune.tasks.chat` finds their tokens).

An example whose response (or every assistant turn) is cut away by truncation contributes nothing: it
is dropped, and the run log counts the drops (`train_dropped`, `validation_dropped`).

Loss: next-token cross-entropy summed over the counted tokens and divided by the accumulated step's
count; evaluation reports loss, perplexity and the number of counted tokens. `llmtune predict`
(prompts or conversations without responses) generates each response greedily, up to
`instruction.max_new_tokens` tokens or the first EOS, from left-padded batches (prompts longer than
`data.max_length - max_new_tokens` keep their last tokens); a conversation that ends with an assistant
turn has that turn left out and predicted.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

from llmtune.data import Required
from llmtune.errors import UserError
from llmtune.modeling import context_length
from llmtune.tasks.base import EvalOutputs, column_values
from llmtune.tasks.causal_lm import perplexity_metrics
from llmtune.tasks.chat import ChatRenderer, checked_messages
from llmtune.tasks.finetune import FinetuneTask, require_fast_tokenizer, row_lengths, unwrap
from llmtune.tasks.generation import cut_at_eos, decode, left_align
from llmtune.tasks.sft_packing import packed_split
from llmtune.tasks.token_loss import IGNORE, per_example_token_stats

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import Recipe
    from llmtune.tasks.base import Prepared
    from llmtune.tasks.registry import InstructionSpec


def template_fields(template: str) -> list[str]:
    """The `{name}` fields of a prompt template; refuse one without `{prompt}` or with odd fields."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserError(f"instruction.template: {exc} (write a literal brace as {{{{ or }}}})") from None
    for name in names:
        if not name.isidentifier():
            raise UserError(
                f"instruction.template: field {{{name}}} is not a column name; use {{prompt}} and {{column}} fields"
            )
    if "prompt" not in names:
        raise UserError("instruction.template: it has no {prompt} field; put {prompt} where the prompt goes")
    return list(dict.fromkeys(names))


class InstructionTuning(FinetuneTask):
    """Causal-LM fine-tuning on prompt/response pairs or chats, the loss on responses (assistant turns) only."""

    auto_class = "AutoModelForCausalLM"
    cache_version = "instruction/1"

    def __init__(self, recipe: Recipe, labelled: bool = True) -> None:
        super().__init__(recipe, labelled)
        self.spec: InstructionSpec = self.options
        self.chat = self.data.messages_column is not None
        self.fields = [] if self.chat else template_fields(self.spec.template)
        self.renderer: ChatRenderer | None = None
        self.eos_id = 0
        self.pad_id = 0

    # --- configuration ------------------------------------------------------------------------------
    def required_columns(self) -> list[Required]:
        """The messages column, or the prompt (and, with labels, response) column and the template's columns."""
        data = self.data
        if data.messages_column is not None:
            return [Required("data.messages_column", data.messages_column, "list")]
        columns = [Required("data.prompt_column", data.prompt_column, "text")]
        if self.labelled:
            columns.append(Required("data.response_column", data.response_column, "text"))
        # Template fields may be empty (Alpaca's {input} often is): they render as "".
        columns += [Required(f"instruction.template {{{n}}}", n, "any", "allow") for n in self.fields if n != "prompt"]
        return columns

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Truncation length, EOS / pad ids and the chat template; refuse what cannot be served."""
        super().setup(model, tokenizer)
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer: instruction tuning ends every response with EOS, and this tokenizer has none")
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        if not self.labelled and self.spec.max_new_tokens >= self.max_length:
            raise UserError(
                f"{self.entry.section}.max_new_tokens: {self.spec.max_new_tokens} leaves no room for the prompt within "
                f"data.max_length ({self.max_length}); lower it or raise data.max_length"
            )
        if self.chat:
            require_fast_tokenizer(tokenizer, "chat tuning", "finds assistant tokens by offsets")
            self.renderer = ChatRenderer(tokenizer, self.spec.chat_template, f"{self.entry.section}.chat_template")
            # Saved with the tokenizer (run_dir/tokenizer, final/), so the model is used as it was trained.
            tokenizer.chat_template = self.renderer.template

    def cache_key(self) -> list[Any]:
        """The base key plus the templates and generation budget."""
        template = self.renderer.template if self.renderer is not None else None
        return [*super().cache_key(), self.spec.model_dump(mode="json"), template]

    # --- preprocessing ------------------------------------------------------------------------------
    def _labelled_rows(
        self, ids: list[list[int]], counted: list[list[bool]], indices: list[int]
    ) -> dict[str, list[Any]]:
        """Truncate, label the counted tokens, and keep the rows that still have a target."""
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": [], "index": []}
        for row_ids, row_counted, index in zip(ids, counted, indices, strict=True):
            row_ids, row_counted = row_ids[: self.max_length], row_counted[: self.max_length]
            labels = [t if c else IGNORE for t, c in zip(row_ids, row_counted, strict=True)]
            if all(label == IGNORE for label in labels[1:]):  # the first position is never predicted
                continue
            out["input_ids"].append(row_ids)
            out["attention_mask"].append([1] * len(row_ids))
            out["labels"].append(labels)
            out["index"].append(index)
        return out

    def _prompt_rows(self, ids: list[list[int]], indices: list[int]) -> dict[str, list[Any]]:
        budget = self.max_length - self.spec.max_new_tokens
        ids = [row[-budget:] for row in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "index": indices}

    def encode(self, rows: dict[str, list[Any]], indices: list[int], role: str = "train") -> dict[str, list[Any]]:
        """One batch of raw rows -> model rows (dropped examples left out; `index` = the raw row number)."""
        if self.chat:
            return self._encode_chats(rows, indices, role)
        data = self.data
        values = {name: column_values(rows, data.prompt_column if name == "prompt" else name) for name in self.fields}
        prompts = []
        for j in range(len(indices)):
            fields = {name: "" if v[j] is None else str(v[j]) for name, v in values.items()}
            prompts.append(self.spec.template.format(**fields))
        prompt_ids = self.tokenizer(prompts, verbose=False)["input_ids"]
        if not self.labelled:
            return self._prompt_rows(prompt_ids, indices)
        responses = column_values(rows, data.response_column)
        response_ids = self.tokenizer(responses, add_special_tokens=False, verbose=False)["input_ids"]
        ids = [[*p, *r, self.eos_id] for p, r in zip(prompt_ids, response_ids, strict=True)]
        counted = [[False] * len(p) + [True] * (len(r) + 1) for p, r in zip(prompt_ids, response_ids, strict=True)]
        return self._labelled_rows(ids, counted, indices)

    def _encode_chats(self, rows: dict[str, list[Any]], indices: list[int], role: str) -> dict[str, list[Any]]:
        assert self.renderer is not None and self.data.messages_column is not None  # setup made it
        key = f"data.messages_column ({self.data.messages_column!r})"
        column = column_values(rows, self.data.messages_column)
        chats = [
            (checked_messages(v, key, role, i), f"row {i} of the {role} split")
            for v, i in zip(column, indices, strict=True)
        ]
        if not self.labelled:
            return self._prompt_rows([self.renderer.prompt_ids(m, where) for m, where in chats], indices)
        pairs = [self.renderer.tokens(m, where) for m, where in chats]
        return self._labelled_rows([p[0] for p in pairs], [p[1] for p in pairs], indices)

    def prepare(self, raw: RawData, tokenizer: Any) -> Prepared:
        """The tokenised rows (cached); with `instruction.pack`, the training split packed into rows of up to
        `data.max_length` tokens (evaluation stays one example per row, so its metrics are per example)."""
        prepared = super().prepare(raw, tokenizer)
        if self.spec.pack and self.labelled:
            packed = packed_split(prepared.splits["train"], self.max_length)
            prepared.splits["train"] = packed
            prepared.lengths["train"] = row_lengths(packed)
            tokens = int(sum(prepared.lengths["train"]))
            prepared.stats["train_packed_rows"] = len(packed)
            prepared.stats["train_packing_fill"] = round(tokens / max(len(packed) * self.max_length, 1), 3)
        return prepared

    def split_stats(self, role: str, raw: Dataset, encoded: Dataset) -> dict[str, Any]:
        """With labels: examples dropped by truncation (refused when all are) and the response tokens."""
        import numpy as np

        if not self.labelled:
            return {}
        if len(encoded) == 0:
            what = "every conversation's assistant turns" if self.chat else "every response"
            raise UserError(
                f"data.max_length: {what} in the {role} split is cut away by truncation to "
                f"{self.max_length} tokens (or there is none); raise data.max_length or shorten the prompts"
            )
        labels = encoded.data.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return {"dropped": len(raw) - len(encoded), "response_tokens": int(np.count_nonzero(labels != IGNORE))}

    # --- training and evaluation -------------------------------------------------------------------
    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens the loss counts: labelled positions after the first of each row (the shift drops it)."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy summed over the counted tokens, divided by the accumulated step's count.

        Packed rows (`instruction.pack`) carry `position_ids` and no attention mask: transformers builds the
        per-example causal mask from the positions (see `llmtune.tasks.sft_packing`)."""
        where = (
            {"position_ids": batch["position_ids"]}
            if "position_ids" in batch
            else {"attention_mask": batch["attention_mask"]}
        )
        return model(
            input_ids=batch["input_ids"],
            **where,
            labels=batch["labels"],
            num_items_in_batch=num_items,
            use_cache=False,
        ).loss

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With labels: per-example summed NLL and counted tokens. Without: the greedily generated ids."""
        if "labels" in batch:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            stats = per_example_token_stats(logits[:, :-1], batch["labels"][:, 1:])
            return {"index": batch["index"], "nll": stats["nll"], "tokens": stats["tokens"]}
        ids, mask = left_align(batch["input_ids"], batch["attention_mask"], self.pad_id)
        return {"index": batch["index"], "generated": self.greedy(unwrap(model), ids, mask)}

    def greedy(self, inner: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Greedy continuations of left-padded prompts (at most `max_new_tokens`, within the model's context),
        cut at the first EOS."""
        limit = context_length(inner.config)
        new_tokens = self.spec.max_new_tokens if limit is None else min(self.spec.max_new_tokens, limit - ids.shape[1])
        out = inner.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(new_tokens, 1),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )
        return cut_at_eos(out[:, ids.shape[1] :], [self.eos_id])

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Token-weighted loss over the counted (response) tokens, its perplexity, and their number."""
        return perplexity_metrics(outputs)

    def _source(self, index: int) -> dict[str, Any]:
        assert self.validation_raw is not None
        row = self.validation_raw[index]
        if self.chat:
            assert self.data.messages_column is not None
            return {"messages": column_values({k: [v] for k, v in row.items()}, self.data.messages_column)[0]}
        assert self.data.prompt_column is not None
        return {"prompt": column_values({k: [v] for k, v in row.items()}, self.data.prompt_column)[0]}

    def predictions(self, outputs: EvalOutputs) -> list[dict[str, Any]]:
        """Per raw example, in file order: the prompt (or messages) and the generated response.

        On labelled data (`llmtune eval --predictions`) nothing is generated; each example gets its
        response's loss and counted tokens instead.
        """
        if "generated" not in outputs.batches:
            rows = sorted(zip(outputs.flat("index"), outputs.flat("nll"), outputs.flat("tokens"), strict=True))
            return [{"index": i, **self._source(i), "loss": n / max(t, 1.0), "tokens": int(t)} for i, n, t in rows]
        rows = sorted(zip(outputs.flat("index"), outputs.flat("generated"), strict=True))
        texts = decode(self.tokenizer, [ids for _, ids in rows])
        return [{"index": i, **self._source(i), "response": text} for (i, _), text in zip(rows, texts, strict=True)]
