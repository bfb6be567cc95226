"""`dialogue`: chat tuning of a causal LM on multi-turn conversations, measured by perplexity and by the
responses it generates.

Conversations come as OpenAI `messages`, ShareGPT `conversations` or separator-joined text (DailyDialog);
`llmtune.tasks.dialogue_formats` reads each into `{role, content}` messages, which are then rendered and
masked exactly as instruction tuning's chats are (`InstructionTuning`, `llmtune.tasks.chat`): the loss
counts the assistant turns (`dialogue.train_on: all`) or only each conversation's last one (`last`).

Evaluation reports the loss and perplexity over the assistant tokens, and, for the first
`dialogue.eval_conversations` validation conversations, generates (greedily, up to
`dialogue.max_new_tokens` tokens) each of their first `dialogue.eval_turns` assistant turns from the real
history before it, then scores the responses against the turns: corpus BLEU (sacreBLEU, 13a), ROUGE-L F1
(rouge-score, stemmed; both in percent, as seq2seq reports them), and distinct-1 / distinct-2 (Li et al.,
2016: distinct n-grams / all n-grams over every generated response, whitespace tokens, a share in [0, 1]),
plus the mean response length in tokens (`eval/gen_len`) and how many responses were scored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtune.data import Required
from llmtune.errors import UserError
from llmtune.metrics import generation_metrics
from llmtune.tasks.base import EvalOutputs, column_values
from llmtune.tasks.causal_lm import perplexity_metrics
from llmtune.tasks.dialogue_formats import DEFAULT_COLUMNS, ConversationReader, Messages, last_stretch
from llmtune.tasks.finetune import FinetuneTask, unwrap
from llmtune.tasks.generation import decode
from llmtune.tasks.instruction import InstructionTuning
from llmtune.tasks.token_loss import IGNORE

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from datasets import Dataset

    from llmtune.recipe import Recipe
    from llmtune.tasks.registry import DialogueSpec

TURN_END = -2  # separates the generated turns of one conversation in an `eval_batch` row (-100 pads it)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (whitespace tokens, n-grams within each text); 0 if none."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def response_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """BLEU and ROUGE-L F1 (percent) of generated responses against the reference turns, and distinct-1/2."""
    scores = generation_metrics(predictions, references, ["bleu", "rouge"])
    return {
        "eval/bleu": scores["bleu"],
        "eval/rougeL": scores["rougeL"],
        "eval/distinct_1": distinct_n(predictions, 1),
        "eval/distinct_2": distinct_n(predictions, 2),
    }


class Dialogue(InstructionTuning):
    """Chat tuning on conversations in one of three formats; perplexity and generated-response metrics."""

    cache_version = "dialogue/1"

    def __init__(self, recipe: Recipe, labelled: bool = True) -> None:
        FinetuneTask.__init__(self, recipe, labelled)  # InstructionTuning's reads the instruction section
        self.spec: DialogueSpec = self.options  # type: ignore[assignment]
        self.chat = True
        self.fields = []
        self.renderer = None
        self.eos_id = 0
        self.pad_id = 0
        self.column = self.data.dialogue_column or DEFAULT_COLUMNS[self.spec.format]
        self.reader = ConversationReader(self.spec, self.column)

    def required_columns(self) -> list[Required]:
        """The conversation column: text for the text format, a list of turns otherwise."""
        cells = "text" if self.spec.format == "text" else "list"
        return [Required("data.dialogue_column", self.column, cells)]

    def tokenizer_texts(self, split: Dataset) -> Iterator[str]:
        """Every turn's text (a trained tokenizer learns from the conversations)."""
        for rows in split.iter(batch_size=1000):
            for i, value in enumerate(column_values(rows, self.column)):
                for message in self.reader.read(value, f"row {i} of the train split"):
                    yield message["content"]

    def setup(self, model: Any, tokenizer: Any) -> None:
        """Instruction tuning's checks, and room for the generated responses evaluation scores."""
        super().setup(model, tokenizer)
        if self.labelled and self.spec.eval_conversations and self.spec.max_new_tokens >= self.max_length:
            raise UserError(
                f"dialogue.max_new_tokens: {self.spec.max_new_tokens} leaves no room for the history within "
                f"data.max_length ({self.max_length}); lower it, raise data.max_length, or set "
                "dialogue.eval_conversations: 0"
            )

    # --- preprocessing ------------------------------------------------------------------------------
    def conversation(self, value: Any, where: str) -> Messages:
        """One cell of the conversation column as messages."""
        return self.reader.read(value, where)

    def encode(self, rows: dict[str, list[Any]], indices: list[int], role: str = "train") -> dict[str, list[Any]]:
        """Conversations -> token rows, the assistant turns (or the last one) labelled."""
        assert self.renderer is not None  # setup made it
        chats = [
            (self.conversation(v, f"row {i} of the {role} split"), f"row {i} of the {role} split")
            for v, i in zip(column_values(rows, self.column), indices, strict=True)
        ]
        if not self.labelled:
            return self._prompt_rows([self.renderer.prompt_ids(m, where) for m, where in chats], indices)
        pairs = [self.renderer.tokens(m, where) for m, where in chats]
        counted = [last_stretch(c) if self.spec.train_on == "last" else c for _, c in pairs]
        return self._labelled_rows([ids for ids, _ in pairs], counted, indices)

    def _conversation_at(self, index: int) -> Messages:
        assert self.validation_raw is not None
        value = column_values({k: [v] for k, v in self.validation_raw[index].items()}, self.column)[0]
        return self.conversation(value, f"row {index} of the validation split")

    def _source(self, index: int) -> dict[str, Any]:
        return {"messages": self._conversation_at(index)}

    # --- evaluation ---------------------------------------------------------------------------------
    def scored_turns(self, messages: Messages) -> list[int]:
        """The positions of the assistant turns evaluation generates (each after at least one message)."""
        return [k for k, m in enumerate(messages) if m["role"] == "assistant" and k > 0][: self.spec.eval_turns]

    def eval_batch(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Instruction tuning's per-example loss; with labels, also the generated responses of the first
        `eval_conversations` conversations (one row each: turns ended by TURN_END, padded with -100)."""
        out = super().eval_batch(model, batch)
        if "labels" in batch and self.spec.eval_conversations > 0:
            out["responses"] = self._generate_turns(model, batch["index"])
        return out

    def _generate_turns(self, model: Any, index: torch.Tensor) -> torch.Tensor:
        import torch

        assert self.renderer is not None
        inner = unwrap(model)
        prompts: list[list[int]] = []
        owners: list[int] = []
        for row, i in enumerate(index.tolist()):
            if i >= self.spec.eval_conversations:
                continue
            messages = self._conversation_at(i)
            for k in self.scored_turns(messages):
                text = self.renderer.render(messages[:k], f"row {i} of the validation split", True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                prompts.append(ids[-(self.max_length - self.spec.max_new_tokens) :])
                owners.append(row)
        rows: list[list[int]] = [[] for _ in range(len(index))]
        if prompts:
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=index.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=index.device)
            generated = self.greedy(inner, ids, mask).tolist()
            for owner, tokens in zip(owners, generated, strict=True):
                rows[owner] += [t for t in tokens if t != IGNORE] + [TURN_END]
        longest = max([len(r) for r in rows] + [1])
        return torch.tensor([r + [IGNORE] * (longest - len(r)) for r in rows], device=index.device)

    def responses(self, outputs: EvalOutputs) -> tuple[list[str], list[str], list[int]]:
        """(generated responses, the reference turns, their lengths in tokens), in file order."""
        generated: list[list[int]] = []
        references: list[str] = []
        for i, row in sorted(zip(outputs.flat("index"), outputs.flat("responses"), strict=True)):
            turns: list[list[int]] = [[]]
            for token in row:
                if token == TURN_END:
                    turns.append([])
                elif token != IGNORE:
                    turns[-1].append(token)
            turns.pop()  # what follows the last TURN_END: padding
            if not turns:
                continue
            messages = self._conversation_at(i)
            generated += turns
            references += [messages[k]["content"] for k in self.scored_turns(messages)]
        return decode(self.tokenizer, generated), references, [len(t) for t in generated]

    def metrics(self, outputs: EvalOutputs) -> dict[str, float]:
        """Loss and perplexity over the assistant tokens; BLEU, ROUGE-L, distinct-1/2 of the generated responses."""
        metrics = perplexity_metrics(outputs)
        if "responses" not in outputs.batches:
            return metrics
        predictions, references, lengths = self.responses(outputs)
        if predictions:
            metrics.update(response_metrics(predictions, references))
            metrics["eval/gen_len"] = sum(lengths) / len(lengths)
        metrics["eval/responses"] = float(len(predictions))
        return metrics
