"""Request bodies of the task endpoints (unknown fields are refused with 422, except in the OpenAI-compatible
chat endpoint, whose clients send fields this server does not use)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Strict):
    """POST /v1/classify: one text or a list (and, for pair models, the second texts)."""

    text: str | list[str] = Field(description="A text, or a list of texts.")
    text_pair: str | list[str] | None = Field(None, description="The second text of each pair (pair models).")
    all_scores: bool = Field(False, description="Also return every label's probability.")
    truncate: bool = Field(False, description="Cut inputs longer than the model reads instead of answering 413.")


class TagRequest(_Strict):
    """POST /v1/tag: one text or a list; words are split at whitespace."""

    text: str | list[str] = Field(description="A text, or a list of texts.")
    truncate: bool = Field(False, description="Tag what fits (later words get O) instead of answering 413.")


class RelateRequest(_Strict):
    """POST /v1/relate: a sentence with its two entities marked inline (`<e1>..</e1>`, `<e2>..</e2>`), or a plain
    sentence and the entities' [start, end) character spans; or lists of them."""

    text: str | list[str] = Field(description="A sentence, or a list of sentences.")
    e1: tuple[int, int] | list[tuple[int, int]] | None = Field(
        None, description="Entity 1's [start, end) in each text, instead of inline markers."
    )
    e2: tuple[int, int] | list[tuple[int, int]] | None = Field(
        None, description="Entity 2's [start, end) in each text, instead of inline markers."
    )


class AnswerRequest(_Strict):
    """POST /v1/answer: a question and the context holding its answer (or lists of both)."""

    question: str | list[str]
    context: str | list[str]


class GenerateRequest(_Strict):
    """POST /v1/generate: a prompt (seq2seq: the source text); greedy unless a sampling option is set."""

    prompt: str
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stream: bool = Field(False, description="Server-sent events: text pieces as they are generated.")


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(BaseModel):
    """POST /v1/chat/completions, as OpenAI's API takes it (one choice)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    stream: bool = False
