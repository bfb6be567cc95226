"""`llmtune chat`: a conversation in the terminal with a chat-tuned causal LM.

Each message is rendered with the model's chat template (the one its tokenizer saved, else llmtune's
default role headers) after the history and the system prompt, and the reply is generated exactly as
`llmtune generate` would continue that rendered text (same options, same end-at-EOS rule), its tokens
printed as they come (transformers' `TextStreamer`). Replies go to stdout, notices to stderr.

When the history and the reply's room (`--max-new-tokens`) no longer fit the context, the oldest turns are
dropped (a user message and the replies after it, the system prompt always kept) and a line says what
went. Commands: `/reset` forgets the history, `/system TEXT` sets the system prompt (`/system` alone
removes it), `/exit` (or end of input) ends. Without a terminal on stdin, each line is one message.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from llmtune.errors import UserError

COMMANDS = "/reset (forget the conversation), /system TEXT (set the system prompt; /system alone removes it), /exit"


@dataclass
class ChatOptions:
    """What `llmtune chat` was asked for (the sampling options are `llmtune generate`'s)."""

    max_new_tokens: int = 50
    sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    system: str | None = None
    context: int | None = None


def _preview(text: str, width: int = 40) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 1] + "…")


class ChatSession:
    """A conversation with one model: the history, the system prompt, and how each reply is generated."""

    def __init__(self, model: Any, tokenizer: Any, options: ChatOptions, notices: TextIO) -> None:
        from llmtune.inference import sampling_kwargs
        from llmtune.modeling import context_length
        from llmtune.tasks.chat import ChatRenderer

        self.model, self.tokenizer, self.options, self.notices = model, tokenizer, options, notices
        self.renderer = ChatRenderer(tokenizer, None, "the model's chat template")
        self.system = options.system
        self.history: list[dict[str, str]] = []
        limit = context_length(model.config)
        if options.context is not None and limit is not None and options.context > limit:
            raise UserError(f"--context {options.context}: longer than the model's context ({limit}); give <= {limit}")
        self.context = options.context or limit
        if self.context is not None and options.max_new_tokens >= self.context:
            raise UserError(
                f"--max-new-tokens {options.max_new_tokens}: leaves no room for the conversation in the context "
                f"of {self.context} tokens; lower it"
            )
        self.kwargs = sampling_kwargs(options.sample, options.temperature, options.top_k, options.top_p)

    def note(self, line: str) -> None:
        """One notice line (stderr)."""
        print(line, file=self.notices, flush=True)

    def messages(self) -> list[dict[str, str]]:
        """The conversation as the model sees it: the system prompt (if any), then the history."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history]

    def prompt_text(self) -> str:
        """The rendered conversation followed by the assistant header: what the reply continues."""
        return self.renderer.render(self.messages(), "the conversation", generation_prompt=True)

    def _fitted_ids(self) -> list[int] | None:
        """The prompt's ids after dropping the oldest turns until it and the reply fit (None: it cannot)."""
        dropped: list[dict[str, str]] = []
        while True:
            ids = self.tokenizer(self.prompt_text(), add_special_tokens=False)["input_ids"]
            if self.context is None or len(ids) + self.options.max_new_tokens <= self.context:
                break
            if len(self.history) <= 1:
                self.note(
                    f"message not sent: with the system prompt it is {len(ids)} tokens, and with room for "
                    f"{self.options.max_new_tokens} new ones that exceeds the context of {self.context}; shorten "
                    "it, the system prompt or --max-new-tokens"
                )
                self.history.clear()
                return None
            # A turn is a user message and the replies after it: drop whole turns.
            dropped.append(self.history.pop(0))
            while len(self.history) > 1 and self.history[0]["role"] != "user":
                dropped.append(self.history.pop(0))
        if dropped:
            what = ", ".join(f"{m['role']} {_preview(m['content'])}" for m in dropped)
            self.note(
                f"history: the conversation no longer fits the context of {self.context} tokens (with room for "
                f"{self.options.max_new_tokens} new ones); dropped the oldest {len(dropped)} messages: {what}"
                + ("; the system prompt is kept" if self.system else "")
            )
        return ids

    def reply(self, text: str) -> str | None:
        """Send a user message; stream and return the reply (None when the message cannot fit)."""
        import torch
        from transformers import TextStreamer

        from llmtune.tasks.generation import cut_at_eos, decode, eos_ids

        self.history.append({"role": "user", "content": text})
        ids = self._fitted_ids()
        if ids is None:
            return None
        inputs = torch.tensor([ids])
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=self.options.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                **self.kwargs,
            )
        generated = cut_at_eos(out[:, inputs.shape[1] :], eos_ids(self.model), self.tokenizer.pad_token_id)
        answer = decode(self.tokenizer, generated.tolist())[0]
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def handle(self, line: str) -> bool:
        """One input line: a command or a message. False when the conversation ends."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command == "/exit":
                return False
            if command == "/reset":
                self.history.clear()
                self.note("conversation reset" + (" (the system prompt is kept)" if self.system else ""))
            elif command == "/system":
                self.system = rest.strip() or None
                self.note(f"system prompt set: {_preview(self.system)}" if self.system else "system prompt removed")
            else:
                self.note(f"unknown command {command}; the commands are {COMMANDS}")
            return True
        self.reply(text)
        return True


def default_system_prompt(recipe: Any) -> str | None:
    """A dialogue run's `dialogue.system_prompt` (what it was trained with), else None."""
    section = getattr(recipe, "dialogue", None) if recipe is not None else None
    return getattr(section, "system_prompt", None)


def chat(model_name: str, options: ChatOptions, lines: TextIO | None = None) -> None:
    """`llmtune chat`: load the model, then read messages and commands (from `lines`, default stdin) until /exit
    or the end of input."""
    from transformers import set_seed

    from llmtune.inference import resolve_model
    from llmtune.modeling import load_for_inference
    from llmtune.run import quiet_libraries

    ref = resolve_model(model_name)
    quiet_libraries()
    strategy = ref.recipe.strategy if ref.recipe is not None else None
    model, tokenizer = load_for_inference(ref.model, "AutoModelForCausalLM", "chat", strategy=strategy)
    model.eval()
    if options.system is None:
        options.system = default_system_prompt(ref.recipe)
    session = ChatSession(model, tokenizer, options, sys.stderr)
    set_seed(options.seed)
    lines = sys.stdin if lines is None else lines  # looked up now: tests and callers may replace sys.stdin
    terminal = lines.isatty()
    if terminal:
        session.note(f"chatting with {ref.model}; {COMMANDS}")
    while True:
        if terminal:
            try:
                line = input("you> ")
            except EOFError:
                break
        else:
            line = lines.readline()
            if not line:
                break
        if not session.handle(line):
            break
