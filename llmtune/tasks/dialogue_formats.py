"""Conversations as users bring them, read into one form: a list of `{role, content}` messages whose roles
are system, user and assistant.

- `messages`: OpenAI-style lists of `{role, content}`; roles are mapped through `dialogue.roles`.
- `sharegpt`: lists of `{from, value}` (ShareGPT / FastChat); `from` is mapped through `dialogue.roles`
  (by default human -> user, gpt -> assistant, system -> system).
- `text`: one string per conversation, each turn followed (or separated) by `dialogue.separator`, as in the
  DailyDialog release (`... __eou__ ... __eou__`); the speakers alternate, the first one being
  `dialogue.first_speaker`.

Every turn must have text: an empty one is refused with its row and turn, as is a role the mapping does
not know. `dialogue.system_prompt` becomes the first message of a conversation that has no system message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError

if TYPE_CHECKING:
    from llmtune.tasks.registry import DialogueSpec

Messages = list[dict[str, str]]
DEFAULT_COLUMNS = {"messages": "messages", "sharegpt": "conversations", "text": "text"}
_FIELDS = {"messages": ("role", "content"), "sharegpt": ("from", "value")}


def text_turns(text: str, separator: str) -> list[str]:
    """The turns of a separator-joined conversation (a separator after the last turn is optional)."""
    pieces = [piece.strip() for piece in text.split(separator)]
    if len(pieces) > 1 and not pieces[-1]:
        pieces.pop()  # DailyDialog ends every turn, the last one too, with the separator
    return pieces


class ConversationReader:
    """One format's cells -> messages, with the recipe's role mapping, separator and system prompt."""

    def __init__(self, spec: DialogueSpec, column: str) -> None:
        self.spec = spec
        self.key = f"data.dialogue_column ({column!r}, dialogue.format {spec.format})"

    def read(self, value: Any, where: str) -> Messages:
        """One cell as messages; `where` ("row 3 of the train split") names it in errors."""
        read = self._from_text if self.spec.format == "text" else self._from_turns
        messages = read(value, where)
        if self.spec.system_prompt is not None and all(m["role"] != "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.spec.system_prompt})
        return messages

    def cell(self, messages: Messages) -> Any:
        """OpenAI-form messages as one cell of this format, which `read` turns back into them (the server takes
        conversations in OpenAI form). The text format has no system turn: there, `dialogue.system_prompt`
        stands for it."""
        if self.spec.format == "text":
            return "".join(f"{m['content']} {self.spec.separator} " for m in messages if m["role"] != "system")
        role_field, text_field = _FIELDS[self.spec.format]
        names = {role: name for name, role in reversed(list(self.spec.roles.items()))}  # the first name of a role
        return [{role_field: names.get(m["role"], m["role"]), text_field: m["content"]} for m in messages]

    def _from_text(self, value: Any, where: str) -> Messages:
        if not isinstance(value, str):
            raise UserError(f"{self.key}: {where} is not text but {type(value).__name__}")
        turns = text_turns(value, self.spec.separator)
        speakers = ("user", "assistant") if self.spec.first_speaker == "user" else ("assistant", "user")
        messages = []
        for number, turn in enumerate(turns, start=1):
            if not turn:
                raise UserError(
                    f"{self.key}: {where} has an empty turn (turn {number}: nothing between two "
                    f"{self.spec.separator!r}); remove it or fix the separator"
                )
            messages.append({"role": speakers[(number - 1) % 2], "content": turn})
        return messages

    def _from_turns(self, value: Any, where: str) -> Messages:
        role_field, text_field = _FIELDS[self.spec.format]
        shape = f"a non-empty list of {{{role_field}, {text_field}}} turns"
        if not isinstance(value, list) or not value:
            raise UserError(f"{self.key}: {where} is not {shape}")
        messages = []
        for number, turn in enumerate(value, start=1):
            if not isinstance(turn, dict):
                raise UserError(f"{self.key}: {where}, turn {number} is not a {{{role_field}, {text_field}}} object")
            name, text = turn.get(role_field), turn.get(text_field)
            if not isinstance(name, str) or not isinstance(text, str):
                raise UserError(
                    f"{self.key}: {where}, turn {number} needs string {role_field!r} and {text_field!r} fields"
                )
            role = self.spec.roles.get(name)
            if role is None:
                known = ", ".join(f"{k} -> {v}" for k, v in self.spec.roles.items())
                raise UserError(
                    f"{self.key}: {where}, turn {number} has the unknown {role_field} {name!r}; map it in "
                    f"dialogue.roles (now {known})"
                )
            if not text.strip():
                raise UserError(f"{self.key}: {where}, turn {number} ({name}) is empty; give it text or remove it")
            messages.append({"role": role, "content": text})
        return messages


def last_stretch(counted: list[bool]) -> list[bool]:
    """Only the last run of counted tokens kept: the last assistant turn (turns are separated by headers)."""
    end = max((i for i, c in enumerate(counted) if c), default=-1)
    start = end
    while start > 0 and counted[start - 1]:
        start -= 1
    return [start <= i <= end for i in range(len(counted))] if end >= 0 else list(counted)
