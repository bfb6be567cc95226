"""What the server runs: a model and its task, loaded the way `llmtune eval` / `predict` load them, and the calls
the endpoints need — predictions for a batch of rows (the task's own encoding, model call and post-processing,
so they equal `llmtune predict`), and text generation with sampling options and token streaming.

Runs in one worker thread (models are not thread-safe); the event loop never calls it directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmtune.errors import UserError

WORD = re.compile(r"\S+")

# Which endpoint serves which task (registry entry name).
ENDPOINTS = {
    "sequence-classification": "classify",
    "token-classification": "tag",
    "relation-classification": "relate",
    "question-answering": "answer",
    "seq2seq": "generate",
    "instruction-tuning": "generate",
    "dialogue": "generate",
    "causal-lm": "generate",
}


@dataclass
class GenerationOptions:
    """What a generation request may set; None means the model's / recipe's default (greedy)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def sampling(self) -> bool:
        """Any sampling option switches from greedy decoding to sampling."""
        return any(v is not None for v in (self.temperature, self.top_k, self.top_p))


@dataclass
class Generated:
    """A generated text and its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length


@dataclass
class Engine:
    """A loaded model with its task: `predict` for batches of rows, `generate` for one prompt."""

    name: str
    task: Any
    model: Any
    tokenizer: Any
    recipe: Any
    final_metrics: dict[str, float] = field(default_factory=dict)
    # `length` runs on the event loop while the model's thread tokenizes too: a fast tokenizer's own copy of its Rust
    # tokenizer, without truncation or padding, counts (a shared one has its truncation set by the other thread's
    # calls, and costs the event loop transformers' per-call overhead); None: the tokenizer itself
    _counter: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        import copy

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._counter = copy.deepcopy(backend)
            self._counter.no_truncation()
            self._counter.no_padding()

    @property
    def endpoint(self) -> str:
        """classify, tag, relate, answer or generate."""
        return ENDPOINTS[self.task.name]

    @property
    def chat(self) -> bool:
        """Whether the model takes conversations (chat-tuned, or a tokenizer with a chat template)."""
        if self.task.name in ("instruction-tuning", "dialogue"):
            return bool(getattr(self.task, "chat", False))
        return self.task.name == "causal-lm" and bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def max_length(self) -> int | None:
        """The longest input in tokens the model reads (None: unbounded)."""
        from llmtune.modeling import context_length

        return getattr(self.task, "max_length", None) or context_length(self.model.config)

    def labels(self) -> list[str]:
        """The classes, tags or relations the model predicts (empty for other tasks)."""
        if self.task.name == "relation-classification":
            return list(self.task.relations)
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [id2label[k] for k in sorted(id2label)] if self.task.name.endswith("classification") else []

    def length(self, text: str) -> int:
        """Tokens of one text, special tokens included (for length limits and token budgets)."""
        if self._counter is None:
            return len(self.tokenizer(text, verbose=False)["input_ids"])
        return len(self._counter.encode(text).ids)

    # --- batched predictions --------------------------------------------------------------------------
    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The task's per-example predictions for rows of the task's columns, in the rows' order."""
        import uuid

        from datasets import Dataset
        from datasets.table import InMemoryTable

        # Not Dataset.from_list: it names the dataset by hashing every row (dill), the largest cost after the model
        # of a one-sentence MiniLM request. These rows live for one call and are never cached: any unique name does.
        rows_dataset = Dataset(InMemoryTable.from_pylist(rows), fingerprint=uuid.uuid4().hex)
        records = self.task.predict_rows(self.model, rows_dataset)
        return sorted(records, key=lambda r: r.get("index", 0))

    def classify_rows(self, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        """Rows for sequence classification."""
        data = self.task.data
        if pairs is None:
            return [{data.text_column: t} for t in texts]
        return [{data.text_column: t, data.text_pair_column: p} for t, p in zip(texts, pairs, strict=True)]

    def tag_rows(self, texts: list[str]) -> tuple[list[dict[str, Any]], list[list[tuple[int, int]]]]:
        """Rows for token classification (words split at whitespace) and each word's character span."""
        spans = [[m.span() for m in WORD.finditer(t)] for t in texts]
        rows = [{self.task.data.tokens_column: [t[a:b] for a, b in s]} for t, s in zip(texts, spans, strict=True)]
        return rows, spans

    def relate_rows(
        self, texts: list[str], e1: list[tuple[int, int]] | None, e2: list[tuple[int, int]] | None
    ) -> list[dict[str, Any]]:
        """Rows for relation classification in the columns the run read (inline markers, or spans): from texts with
        inline `<e1>..</e1>` / `<e2>..</e2>` markers, or plain texts and their [start, end) entity spans. A text
        without both entities (or with nested, overlapping or out-of-range ones) is a ValueError naming it."""
        from llmtune.tasks.relation import check_spans, insert_markers, parse_marked

        data = self.task.data
        rows = []
        for i, text in enumerate(texts):
            try:
                if e1 is None or e2 is None:
                    clean, a, b = parse_marked(text)
                else:
                    clean, (a, b) = text, check_spans(text, e1[i], e2[i])
            except ValueError as exc:
                raise ValueError(f"text {i} {exc}") from None
            if data.e1_span_column is None:
                rows.append({data.text_column: insert_markers(clean, a, b)})
            else:
                rows.append({data.text_column: clean, data.e1_span_column: list(a), data.e2_span_column: list(b)})
        return rows

    def answer_rows(self, questions: list[str], contexts: list[str]) -> list[dict[str, Any]]:
        """Rows for extractive question answering (ids are the row numbers)."""
        data = self.task.data
        return [
            {data.id_column: str(i), data.question_column: q, data.context_column: c}
            for i, (q, c) in enumerate(zip(questions, contexts, strict=True))
        ]

    def prompt_row(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The row a generating task reads for one prompt (or conversation)."""
        data = self.task.data
        if self.task.name == "seq2seq":
            return {data.source_column: prompt}
        if self.task.name == "dialogue":  # requests are OpenAI messages, whatever format the run trained on
            conversation = messages or [{"role": "user", "content": prompt or ""}]
            return {self.task.column: self.task.reader.cell(conversation)}
        if self.task.name == "instruction-tuning":
            if self.chat:  # a chat model given a bare prompt: a one-message conversation
                return {data.messages_column: messages or [{"role": "user", "content": prompt or ""}]}
            others = {name: "" for name in self.task.fields if name != "prompt"}  # e.g. Alpaca's {input}
            return {data.prompt_column: prompt, **others}
        return {"text": prompt}

    # --- generation -----------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        """The token ids a generation continues: the task's own prompt encoding (template, chat template)."""
        if self.task.name in ("instruction-tuning", "dialogue"):
            encoded = self.task.encode({k: [v] for k, v in self.prompt_row(prompt, messages).items()}, [0], "serve")
            return list(encoded["input_ids"][0])
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.task.name == "seq2seq":
            prefix = self.task.spec.source_prefix
            return self.tokenizer(prefix + (prompt or ""), truncation=True, max_length=self.task.max_length)[
                "input_ids"
            ]
        ids = self.tokenizer(prompt or "")["input_ids"]
        return ids or [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]

    def default_new_tokens(self) -> int:
        """The generation budget the task predicts with (instruction.max_new_tokens, seq2seq's), else 50."""
        if self.task.name in ("instruction-tuning", "dialogue"):
            return self.task.spec.max_new_tokens
        if self.task.name == "seq2seq":
            return self.task.max_new_tokens
        return 50

    def generate(
        self,
        prompt: str | None,
        options: GenerationOptions,
        messages: list[dict[str, Any]] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generated:
        """Generate one continuation (greedy unless a sampling option is set), calling `on_text` with each new
        piece of text as it is produced. The text ends before the first EOS (the rule `llmtune predict`
        follows)."""
        import torch
        from transformers import set_seed

        from llmtune.tasks.finetune import unwrap
        from llmtune.tasks.generation import cut_at_eos, decode, eos_ids

        ids = self.prompt_ids(prompt, messages)
        model = unwrap(self.model)
        budget = options.max_new_tokens or self.default_new_tokens()
        if not model.config.is_encoder_decoder and self.max_length is not None:
            if len(ids) >= self.max_length:
                raise UserError(f"the prompt is {len(ids)} tokens; the model reads at most {self.max_length - 1}")
            budget = min(budget, self.max_length - len(ids))
        kwargs: dict[str, Any] = {"max_new_tokens": budget, "pad_token_id": self.tokenizer.pad_token_id}
        if options.sampling:
            kwargs.update(do_sample=True, temperature=options.temperature or 1.0, top_k=options.top_k or 0)
            kwargs["top_p"] = options.top_p or 1.0
        else:
            kwargs.update(do_sample=False, num_beams=self._beams())
        if options.seed is not None:
            set_seed(options.seed)
        streamer = (
            _Streamer(self.tokenizer, on_text) if on_text is not None and kwargs.get("num_beams", 1) == 1 else None
        )
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), streamer=streamer, **kwargs)
        start = 1 if model.config.is_encoder_decoder else len(ids)  # seq2seq rows begin with the decoder start
        new = out[:, start:]
        kept = cut_at_eos(new, eos_ids(model))[0]
        text = decode(self.tokenizer, [kept.tolist()])[0]
        if self.task.name == "seq2seq":
            text = text.strip()
        completion = int((kept >= 0).sum())
        finish = "length" if completion >= budget else "stop"
        if on_text is not None and streamer is None:
            on_text(text)  # beam search cannot stream: the whole text at once
        return Generated(text, len(ids), completion, finish)

    def _beams(self) -> int:
        return self.task.spec.num_beams if self.task.name == "seq2seq" else 1


class _Streamer:
    """Turns generated ids into text pieces as they come (the same decoding as the final text): each piece is
    the difference between the decoded text so far and what was already sent, so the pieces join to exactly
    the final text; text is held back while it ends in an incomplete character, and nothing after EOS is sent."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.ended = False
        self.eos = {tokenizer.eos_token_id}

    def put(self, value: Any) -> None:
        """Called by `generate` with the prompt first, then each new token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.ended:
            return
        for token in value.reshape(-1).tolist():
            if token in self.eos:
                self.ended = True
                return
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        """Generation finished."""


def load_engine(model: str, task: str | None = None) -> Engine:
    """The model named on the command line (run directory, export, model directory or hub id) and its task, ready
    to predict: loaded as `llmtune eval` loads it, set up by the task."""
    import json

    from llmtune.inference import EvalArgs, eval_recipe, resolve_model
    from llmtune.lean_encoder import apply_lean_encoder
    from llmtune.modeling import load_config, load_for_inference
    from llmtune.run import quiet_libraries
    from llmtune.tasks import get_task

    ref = resolve_model(model)
    quiet_libraries()
    trust = ref.recipe.model.trust_remote_code if ref.recipe is not None else False
    recipe = eval_recipe(ref, EvalArgs(task=task), load_config(ref.model, trust), need_data=False)
    if recipe.entry.name not in ENDPOINTS:
        raise UserError(f"serve: a {recipe.entry.name} model has nothing to serve; serve a fine-tuned or causal LM")
    labelled_task = get_task(recipe, labelled=False)
    loaded, tokenizer = load_for_inference(
        ref.model, labelled_task.auto_class, labelled_task.name, trust, recipe.strategy
    )
    if hasattr(loaded, "eval"):
        loaded.eval()
    # BERT-family encoders skip padding and unread work; the weights never change here, so query, key and value can
    # run as one product on cached weights (llmtune/lean_encoder.py)
    apply_lean_encoder(loaded, fuse_projections=True)
    labelled_task.setup(loaded, tokenizer)
    metrics = {}
    if ref.run is not None and ref.run.final_metrics.is_file():
        metrics = json.loads(ref.run.final_metrics.read_text(encoding="utf-8"))
    return Engine(model, labelled_task, loaded, tokenizer, recipe, metrics)
