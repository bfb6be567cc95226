"""Dialogue: every format renders to the rows of its `messages` equivalent, last-turn-only and system prompts,
bad conversations, the response metrics against hand-computed values, and evaluation by generation."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.errors import UserError
from llmtune.recipe import build_recipe
from llmtune.tasks import get_task
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.dialogue import Dialogue, distinct_n, response_metrics
from llmtune.tasks.dialogue_formats import text_turns
from llmtune.tasks.token_loss import IGNORE
from tests.helpers import tiny_gpt2

CHAT = [
    {"role": "user", "content": "two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "one plus two"},
    {"role": "assistant", "content": "three"},
]
SHAREGPT = [
    {"from": "human", "value": "two plus two"},
    {"from": "gpt", "value": "four"},
    {"from": "human", "value": "one plus two"},
    {"from": "gpt", "value": "three"},
]
TEXT = "two plus two __eou__ four __eou__ one plus two __eou__ three __eou__"
SYSTEM = "you add numbers"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A GPT-2-style byte-level BPE tokenizer (`<|endoftext|>` is EOS and PAD)."""
    from llmtune.tokenizer_training import train_byte_level_bpe
    from tests.helpers import synthetic_documents

    return train_byte_level_bpe([*synthetic_documents(50), "two plus four three five one add numbers"], 300, 1, [])


def make(tokenizer: Any, tmp_path: Path, task: str, data: dict[str, Any], section: dict[str, Any] | None = None) -> Any:
    """The task a recipe with these keys selects, set up on a tiny GPT-2."""
    tree: dict[str, Any] = {
        "task": task,
        "model": {"pretrained": "unused"},
        "data": {"files": {"train": "unused.jsonl"}, "cache_dir": str(tmp_path / "cache"), "max_length": 128, **data},
    }
    if section is not None:
        tree["dialogue" if task == "dialogue" else "instruction"] = section
    built = get_task(build_recipe(tree, tmp_path))
    built.setup(tiny_gpt2(tokenizer), tokenizer)
    return built


def rows_of(task: Any, column: str, values: list[Any]) -> dict[str, list[Any]]:
    """The encoded training rows of `values`."""
    return task.encode({column: values}, list(range(len(values))), "train")


def reference_rows(tokenizer: Any, tmp_path: Path, chats: list[Any]) -> dict[str, list[Any]]:
    """What instruction tuning's chat path makes of the same conversations as `messages`."""
    return rows_of(make(tokenizer, tmp_path, "causal-lm", {"messages_column": "m"}), "m", chats)


@pytest.mark.parametrize(
    ("section", "column", "value"),
    [
        ({}, "messages", CHAT),
        ({"format": "sharegpt"}, "conversations", SHAREGPT),
        ({"format": "text"}, "text", TEXT),
        ({"format": "text"}, "text", TEXT.removesuffix(" __eou__")),  # no separator after the last turn
    ],
    ids=["messages", "sharegpt", "eou-text", "eou-text-unterminated"],
)
def test_each_format_renders_the_rows_of_its_messages_equivalent(
    tokenizer: Any, tmp_path: Path, section: dict[str, Any], column: str, value: Any
) -> None:
    task = make(tokenizer, tmp_path, "dialogue", {}, section)
    assert isinstance(task, Dialogue)
    got = rows_of(task, column, [value])
    assert got == reference_rows(tokenizer, tmp_path, [CHAT])
    counted = [t for t, label in zip(got["input_ids"][0], got["labels"][0], strict=True) if label != IGNORE]
    assert tokenizer.decode(counted) == f"four{tokenizer.eos_token}three{tokenizer.eos_token}"


def test_system_prompt_and_role_mapping(tokenizer: Any, tmp_path: Path) -> None:
    with_system = [{"role": "system", "content": SYSTEM}, *CHAT]
    section = {"format": "sharegpt", "system_prompt": SYSTEM}
    got = rows_of(make(tokenizer, tmp_path, "dialogue", {}, section), "conversations", [SHAREGPT])
    assert got == reference_rows(tokenizer, tmp_path, [with_system])
    # A conversation's own system message wins over the recipe's.
    own = [{"from": "system", "value": "be brief"}, *SHAREGPT]
    got = rows_of(make(tokenizer, tmp_path, "dialogue", {}, section), "conversations", [own])
    assert got == reference_rows(tokenizer, tmp_path, [[{"role": "system", "content": "be brief"}, *CHAT]])
    # A mapping of other names; the text format's first speaker may be the assistant.
    mapped = {"format": "sharegpt", "roles": {"q": "user", "a": "assistant"}}
    renamed = [{"from": "q" if t["from"] == "human" else "a", "value": t["value"]} for t in SHAREGPT]
    got = rows_of(make(tokenizer, tmp_path, "dialogue", {"dialogue_column": "turns"}, mapped), "turns", [renamed])
    assert got == reference_rows(tokenizer, tmp_path, [CHAT])
    greeting = {"format": "text", "first_speaker": "assistant", "system_prompt": SYSTEM}
    got = rows_of(make(tokenizer, tmp_path, "dialogue", {}, greeting), "text", ["hello __eou__ two plus two __eou__"])
    expected = [
        {"role": "system", "content": SYSTEM},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "two plus two"},
    ]
    assert got == reference_rows(tokenizer, tmp_path, [expected])


def test_last_turn_only_counts_the_last_assistant_turn(tokenizer: Any, tmp_path: Path) -> None:
    task = make(tokenizer, tmp_path, "dialogue", {}, {"format": "text", "train_on": "last", "system_prompt": SYSTEM})
    got = rows_of(task, "text", [TEXT])
    full = [{"role": "system", "content": SYSTEM}, *CHAT]
    reference = reference_rows(tokenizer, tmp_path, [full])
    assert got["input_ids"] == reference["input_ids"]
    # Labels: everything up to the last assistant header is prompt; its content and EOS count.
    prompt = tokenizer(task.renderer.render(full[:-1], "x", True), add_special_tokens=False)["input_ids"]
    ids = got["input_ids"][0]
    assert got["labels"][0] == [IGNORE] * len(prompt) + ids[len(prompt) :]
    assert tokenizer.decode(ids[len(prompt) :]) == f"three{tokenizer.eos_token}"


@pytest.mark.parametrize(
    ("section", "column", "value", "message"),
    [
        ({"format": "sharegpt"}, "conversations", [{"from": "bot", "value": "hi"}], "unknown from 'bot'"),
        ({}, "messages", [{"role": "tool", "content": "hi"}], "unknown role 'tool'"),
        ({"format": "sharegpt"}, "conversations", [*SHAREGPT[:1], {"from": "gpt", "value": " "}], r"turn 2 \(gpt\)"),
        ({"format": "text"}, "text", "hi __eou__  __eou__ there __eou__", "empty turn"),
        ({"format": "sharegpt"}, "conversations", [{"role": "user", "content": "hi"}], "needs string 'from'"),
        ({"format": "sharegpt"}, "conversations", [], "not a non-empty list"),
    ],
    ids=["unknown-from", "unknown-role", "empty-turn", "empty-text-turn", "wrong-fields", "empty"],
)
def test_bad_conversations_are_refused_with_their_row(
    tokenizer: Any, tmp_path: Path, section: dict[str, Any], column: str, value: Any, message: str
) -> None:
    task = make(tokenizer, tmp_path, "dialogue", {}, section)
    with pytest.raises(UserError, match=rf"data.dialogue_column \('{column}'.*row 7 of the train split.*{message}"):
        task.encode({column: [value]}, [7], "train")


def test_text_turns() -> None:
    assert text_turns("a b __eou__ c __eou__", "__eou__") == ["a b", "c"]
    assert text_turns("a b __eou__ c", "__eou__") == ["a b", "c"]
    assert text_turns("a b", "__eou__") == ["a b"]


def test_response_metrics_against_hand_computed_values() -> None:
    # distinct: "a b a" + "a b c": unigrams a b a a b c -> 3 distinct / 6; bigrams ab ba ab bc -> 3 / 4.
    assert distinct_n(["a b a", "a b c"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a", "a b c"], 2) == pytest.approx(0.75)
    assert distinct_n(["a", ""], 2) == 0.0
    # BLEU of "a b c d" against "a b c e": precisions 3/4, 2/3, 1/2 and 0/1, which sacreBLEU's default
    # exp smoothing makes 1/2 (1 / (2 * 1)); equal lengths, so no brevity penalty.
    bleu = 100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    # ROUGE-L of "a b c d" against "a c d e": LCS a c d = 3 tokens, precision = recall = 3/4.
    metrics = response_metrics(["a b c d", "x y"], ["a b c e", "x y"])
    single = response_metrics(["a b c d"], ["a b c e"])
    assert single["eval/bleu"] == pytest.approx(bleu, abs=1e-3)
    assert single["eval/rougeL"] == pytest.approx(75.0)
    assert metrics["eval/rougeL"] == pytest.approx((75.0 + 100.0) / 2)
    assert metrics["eval/distinct_1"] == pytest.approx(1.0)


def test_evaluation_generates_and_scores_the_assistant_turns(tokenizer: Any, tmp_path: Path) -> None:
    from datasets import Dataset

    from llmtune.batching import pad_collator
    from llmtune.data import RawData

    torch.manual_seed(0)
    task = make(tokenizer, tmp_path, "dialogue", {}, {"eval_conversations": 2, "eval_turns": 1, "max_new_tokens": 5})
    model = tiny_gpt2(tokenizer)
    valid = [CHAT, CHAT[:2], CHAT]  # the third is past eval_conversations
    data = {"messages": valid}
    fingerprint = hashlib.sha256(repr(data).encode()).hexdigest()[:16]
    raw = RawData({"train": Dataset.from_dict(data), "validation": Dataset.from_dict(data)}, fingerprint)
    prepared = task.prepare(raw, tokenizer)
    rows = list(prepared.splits["validation"])
    outputs = EvalOutputs()
    with torch.no_grad():
        outputs.add(task.eval_batch(model, pad_collator(tokenizer.pad_token_id)(rows)))
    predictions, references, lengths = task.responses(outputs)
    assert references == ["four", "four"] and len(predictions) == 2
    # Each response is what greedy generation after the history gives, cut at EOS.
    prompt = tokenizer(task.renderer.render(CHAT[:1], "x", True), return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    alone = out[0, prompt["input_ids"].shape[1] :].tolist()
    alone = alone[: alone.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in alone else alone
    assert predictions == [tokenizer.decode(alone)] * 2 and lengths == [len(alone)] * 2
    metrics = task.metrics(outputs)
    assert metrics["eval/responses"] == 2 and metrics["eval/gen_len"] == len(alone)
    assert {"eval/loss", "eval/perplexity", "eval/bleu", "eval/rougeL", "eval/distinct_1"} <= metrics.keys()
