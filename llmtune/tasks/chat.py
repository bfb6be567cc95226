"""Chat rendering: conversations (lists of {role, content} messages) as text and tokens, with the tokens of
assistant turns marked (the ones chat tuning trains on).

With a template that marks assistant turns with `{% generation %}` (the default does), transformers'
`return_assistant_tokens_mask` finds their tokens; with any other, each assistant turn's characters are
found by rendering the conversation up to the turn before it (with the generation prompt, so the assistant
header is prompt) and up to the turn itself, and the tokens overlapping those characters count (the same
overlap rule as transformers).
"""

from __future__ import annotations

import re
from typing import Any

from llmtune.errors import UserError

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

Messages = list[dict[str, Any]]


def checked_messages(value: Any, key: str, role: str, row: int) -> Messages:
    """One cell of a messages column, refused unless it is a non-empty list of {role, content} strings."""
    ok = isinstance(value, list) and value and all(isinstance(m, dict) for m in value)
    if not ok or any(not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) for m in value):
        raise UserError(
            f"{key}: row {row} of the {role} split is not a non-empty list of {{role, content}} messages "
            "with string values"
        )
    return [{k: v for k, v in m.items() if v is not None} for m in value]


class ChatRenderer:
    """A tokenizer and a chat template: conversations -> text, token ids, and which tokens are assistant's."""

    def __init__(self, tokenizer: Any, template: str | None, key: str = "instruction.chat_template") -> None:
        self.key = key  # the recipe key errors name
        if template is None:
            own = getattr(tokenizer, "chat_template", None)
            template = tokenizer.get_chat_template() if own else DEFAULT_CHAT_TEMPLATE
        self.tokenizer, self.template = tokenizer, template
        self.render([{"role": "user", "content": "?"}], "a one-message conversation", True)  # fails early

    def _apply(self, messages: Messages, where: str, **kwargs: Any) -> Any:
        """`apply_chat_template` with this template; a template error is a `UserError`."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **kwargs)
        except TemplateError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{self.key}: rendering {where} failed: {first}") from None

    def render(self, messages: Messages, where: str, generation_prompt: bool = False) -> str:
        """The conversation as text (with the assistant header after it when `generation_prompt`)."""
        return self._apply(messages, where, tokenize=False, add_generation_prompt=generation_prompt)

    def tokens(self, messages: Messages, where: str) -> tuple[list[int], list[bool]]:
        """A conversation's token ids and, per token, whether it is part of an assistant turn."""
        if _GENERATION_TAG.search(self.template):
            out = self._apply(messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        text = self.render(messages, where)
        spans = [
            self._assistant_span(messages, i, text, where) for i, m in enumerate(messages) if m["role"] == "assistant"
        ]
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        counted = [
            any(first < span_end and last > span_start for span_start, span_end in spans)
            for first, last in encoding["offset_mapping"]
        ]
        return list(encoding["input_ids"]), counted

    def _assistant_span(self, messages: Messages, i: int, text: str, where: str) -> tuple[int, int]:
        """The characters of assistant turn `i` in the rendered conversation `text`."""
        through = self.render(messages[: i + 1], where)
        before = [self.render(messages[:i], where, True), self.render(messages[:i], where)] if i else [""]
        start = next((len(b) for b in before if through.startswith(b)), None)
        if start is None or not text.startswith(through):
            raise UserError(
                f"{self.key}: rendering {where} turn by turn does not give a prefix of the whole "
                "conversation, so assistant turns cannot be located; mark them with "
                "{% generation %}...{% endgeneration %} in the template"
            )
        return start, len(through)

    def prompt_ids(self, messages: Messages, where: str) -> list[int]:
        """The ids a response is generated after: the conversation (less a final assistant turn) + header."""
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            messages = messages[:-1]
        return self.tokenizer(self.render(messages, where, True), add_special_tokens=False)["input_ids"]
