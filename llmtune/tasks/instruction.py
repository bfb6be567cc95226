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
headers `### User:` / `### Assistant:`, EOS after each assistant turn). Only assistant turns count:
with a template that marks them with `{% generation %}` (the default does), transformers'
`return_assistant_tokens_mask` finds their tokens; with any other, each assistant turn's characters
are found by rendering the conversation up to the turn before it (with the generation prompt, so the
assistant header is prompt) and up to the turn itself, and the tokens overlapping those characters
count (the same overlap rule as transformers).

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

import math
import re
import string
from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError
from llmtune.modeling import context_length
from llmtune.tasks.base import EvalOutputs, Prepared
from llmtune.tasks.finetune import FinetuneTask, encode_split, unwrap
from llmtune.tasks.token_loss import IGNORE, per_example_token_stats

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from llmtune.data import RawData
    from llmtune.recipe import DataSpec, Recipe

# Role headers, a blank line between turns, EOS closing each assistant turn; `{% generation %}` marks
# what the loss counts. Newlines are Jinja strings: transformers compiles templates with trim_blocks.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Assistant:\\n' }}{% endif %}"
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


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


def column_values(rows: dict[str, list[Any]], column: str) -> list[Any]:
    """A batch's values of `column`; a dotted name `a.b` reads field `b` of column `a`."""
    if column in rows or "." not in column:
        return rows[column]
    head, *fields = column.split(".")
    values = rows[head]
    for name in fields:
        values = [v.get(name) if isinstance(v, dict) else None for v in values]
    return values


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows -> the same rows left-padded (decoder-only generation continues at the right end)."""
    import torch

    width = input_ids.shape[1]
    shift = width - attention_mask.sum(dim=1, keepdim=True)
    source = torch.arange(width, device=input_ids.device)[None, :] - shift
    valid = source >= 0
    ids = torch.where(valid, input_ids.gather(1, source.clamp(min=0)), torch.full_like(input_ids, pad_id))
    return ids, valid.long()


def until_eos(generated: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Generated ids with the first EOS and everything after it (padding of finished rows) set to -100."""
    finished = (generated == eos_id).cumsum(dim=1) > 0
    return generated.masked_fill(finished, IGNORE)


class InstructionTuning(FinetuneTask):
    """Causal-LM fine-tuning on prompt/response pairs or chats, the loss on responses (assistant turns) only."""

    name = "instruction-tuning"
    auto_class = "AutoModelForCausalLM"
    cache_version = "instruction/1"
    metric_names = ("eval/loss", "eval/perplexity", "eval/tokens")

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        from llmtune.recipe import InstructionSpec

        self.spec = recipe.instruction or InstructionSpec()
        self.chat = self.data.messages_column is not None
        self.fields = [] if self.chat else template_fields(self.spec.template)
        self.chat_template = self.spec.chat_template
        self.tokenizer: Any = None
        self.eos_id = 0
        self.pad_id = 0

    # --- configuration ------------------------------------------------------------------------------
    def required_columns(self, data: DataSpec) -> dict[str, str]:
        """The messages column, or the prompt (and, with labels, response) column and the template's columns."""
        if data.messages_column is not None:
            return {"data.messages_column": data.messages_column}
        assert data.prompt_column is not None and data.response_column is not None  # the recipe validator's
        columns = {"data.prompt_column": data.prompt_column}
        if self.labelled:
            columns["data.response_column"] = data.response_column
        for name in self.fields:
            if name != "prompt":
                columns[f"instruction.template {{{name}}}"] = name
        return columns

    def setup(self, data: DataSpec, model: Any, tokenizer: Any) -> None:
        """Truncation length, EOS / pad ids and the chat template; refuse what cannot be served."""
        super().setup(data, model, tokenizer)
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer: instruction tuning ends every response with EOS, and this tokenizer has none")
        self.tokenizer, self.eos_id, self.pad_id = tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id
        if not self.labelled and self.spec.max_new_tokens >= self.max_length:
            raise UserError(
                f"instruction.max_new_tokens: {self.spec.max_new_tokens} leaves no room for the prompt within "
                f"data.max_length ({self.max_length}); lower it or raise data.max_length"
            )
        if self.chat:
            if self.chat_template is None:
                own = getattr(tokenizer, "chat_template", None)
                self.chat_template = tokenizer.get_chat_template() if own else DEFAULT_CHAT_TEMPLATE
            if not getattr(tokenizer, "is_fast", False):
                raise UserError(
                    "tokenizer: chat tuning finds assistant tokens by offsets, which needs a fast tokenizer"
                )
            self._render([{"role": "user", "content": "?"}], "a one-message conversation", True)
            # Saved with the tokenizer (run_dir/tokenizer, final/), so the model is used as it was trained.
            tokenizer.chat_template = self.chat_template

    def cache_key(self) -> list[Any]:
        """The base key plus the templates and generation budget."""
        return [*super().cache_key(), self.spec.model_dump(mode="json"), self.chat_template]

    # --- preprocessing ------------------------------------------------------------------------------
    def _text(self, value: Any, key: str, role: str, row: int) -> str:
        if value is None:
            raise UserError(f"{key}: row {row} of the {role} split has no value; give every example one")
        return value if isinstance(value, str) else str(value)

    def _messages(self, value: Any, role: str, row: int) -> list[dict[str, Any]]:
        key = f"data.messages_column ({self.data.messages_column!r})"
        ok = isinstance(value, list) and value and all(isinstance(m, dict) for m in value)
        if not ok or any(not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) for m in value):
            raise UserError(
                f"{key}: row {row} of the {role} split is not a non-empty list of {{role, content}} messages "
                "with string values"
            )
        return [{k: v for k, v in m.items() if v is not None} for m in value]

    def _apply(self, messages: list[dict[str, Any]], where: str, **kwargs: Any) -> Any:
        """`apply_chat_template` with the task's template; a template error is a `UserError`."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)
        except TemplateError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"instruction.chat_template: rendering {where} failed: {first}") from None

    def _render(self, messages: list[dict[str, Any]], where: str, generation_prompt: bool = False) -> str:
        return self._apply(messages, where, tokenize=False, add_generation_prompt=generation_prompt)

    def chat_tokens(
        self, messages: list[dict[str, Any]], role: str = "train", row: int = 0
    ) -> tuple[list[int], list[bool]]:
        """A conversation's token ids and, per token, whether it is part of an assistant turn."""
        tok, where = self.tokenizer, f"row {row} of the {role} split"
        if _GENERATION_TAG.search(self.chat_template or ""):
            out = self._apply(messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        text = self._render(messages, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            through = self._render(messages[: i + 1], where)
            before = [self._render(messages[:i], where, True), self._render(messages[:i], where)] if i else [""]
            start = next((len(b) for b in before if through.startswith(b)), None)
            if start is None or not text.startswith(through):
                raise UserError(
                    f"instruction.chat_template: rendering the {role} split's row {row} turn by turn does not give "
                    "a prefix of the whole conversation, so assistant turns cannot be located; mark them with "
                    "{% generation %}...{% endgeneration %} in the template"
                )
            spans.append((start, len(through)))
        encoding = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        counted = [
            any(first < span_end and last > span_start for span_start, span_end in spans)
            for first, last in encoding["offset_mapping"]
        ]
        return list(encoding["input_ids"]), counted

    def _chat_prompt(self, messages: list[dict[str, Any]], role: str, row: int) -> list[int]:
        """The ids a response is generated after: the conversation (less a final assistant turn) + header."""
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            messages = messages[:-1]
        text = self._render(messages, f"row {row} of the {role} split", True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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

    def encode_rows(self, rows: dict[str, list[Any]], indices: list[int], role: str = "train") -> dict[str, list[Any]]:
        """One batch of raw rows -> model rows (dropped examples left out; `index` = the raw row number)."""
        tok, data = self.tokenizer, self.data
        if self.chat:
            assert data.messages_column is not None
            chats = [
                self._messages(v, role, i)
                for v, i in zip(column_values(rows, data.messages_column), indices, strict=True)
            ]
            if not self.labelled:
                return self._prompt_rows(
                    [self._chat_prompt(m, role, i) for m, i in zip(chats, indices, strict=True)], indices
                )
            pairs = [self.chat_tokens(m, role, i) for m, i in zip(chats, indices, strict=True)]
            return self._labelled_rows([p[0] for p in pairs], [p[1] for p in pairs], indices)
        assert data.prompt_column is not None and data.response_column is not None
        values = {name: column_values(rows, data.prompt_column if name == "prompt" else name) for name in self.fields}
        prompts = []
        for j, index in enumerate(indices):
            fields = {name: "" if name != "prompt" and v[j] is None else v[j] for name, v in values.items()}
            fields["prompt"] = self._text(fields["prompt"], f"data.prompt_column ({data.prompt_column!r})", role, index)
            prompts.append(self.spec.template.format(**{k: str(v) for k, v in fields.items()}))
        prompt_ids = tok(prompts, verbose=False)["input_ids"]
        if not self.labelled:
            return self._prompt_rows(prompt_ids, indices)
        key = f"data.response_column ({data.response_column!r})"
        responses = [
            self._text(v, key, role, i) for v, i in zip(column_values(rows, data.response_column), indices, strict=True)
        ]
        response_ids = tok(responses, add_special_tokens=False, verbose=False)["input_ids"]
        ids = [[*p, *r, self.eos_id] for p, r in zip(prompt_ids, response_ids, strict=True)]
        counted = [[False] * len(p) + [True] * (len(r) + 1) for p, r in zip(prompt_ids, response_ids, strict=True)]
        return self._labelled_rows(ids, counted, indices)

    def prepare(self, raw: RawData, tokenizer: Any, data: DataSpec) -> Prepared:
        """Tokenised, truncated, labelled examples per split (cached), with drop counts and lengths."""
        import numpy as np

        def build(role: str, ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
            encoded = encode_split(ds, lambda rows, indices: self.encode_rows(rows, indices, role), data.num_proc)
            stats: dict[str, Any] = {}
            if self.labelled:
                stats["dropped"] = len(ds) - len(encoded)
                if len(encoded) == 0:
                    what = "every conversation's assistant turns" if self.chat else "every response"
                    raise UserError(
                        f"data.max_length: {what} in the {role} split is cut away by truncation to "
                        f"{self.max_length} tokens (or there is none); raise data.max_length or shorten the prompts"
                    )
                labels = encoded.data.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                stats["response_tokens"] = int(np.count_nonzero(labels != IGNORE))
            return encoded, stats

        return self.prepare_rows(raw, tokenizer, build)

    # --- training and evaluation -------------------------------------------------------------------
    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens the loss counts: labelled positions after the first of each row (the shift drops it)."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy summed over the counted tokens, divided by the accumulated step's count."""
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
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
        inner = unwrap(model)
        ids, mask = left_align(batch["input_ids"], batch["attention_mask"], self.pad_id)
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
        return {"index": batch["index"], "generated": until_eos(out[:, ids.shape[1] :], self.eos_id)}

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Token-weighted loss over the counted (response) tokens, its perplexity, and their number."""
        nll, tokens = outputs.sum("nll"), outputs.sum("tokens")
        loss = nll / max(tokens, 1.0)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)), "eval/tokens": tokens}

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
        return [
            {
                "index": i,
                **self._source(i),
                "response": self.tokenizer.decode([t for t in ids if t != IGNORE], skip_special_tokens=True),
            }
            for i, ids in rows
        ]
