"""Instruction tuning: which tokens the loss counts, truncation drops, chat masks, loss normalisation, generation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.batching import pad_collator
from llmtune.data import load_raw
from llmtune.errors import UserError
from llmtune.recipe import build_recipe
from llmtune.tasks import get_task
from llmtune.tasks.chat import DEFAULT_CHAT_TEMPLATE
from llmtune.tasks.generation import cut_at_eos, left_align
from llmtune.tasks.instruction import InstructionTuning
from tests.helpers import tiny_gpt2

WORDS = ["<eos>", "<unk>", "Q", "A", "two", "plus", "four", "three", "five", "one"]
CHAT = [
    {"role": "user", "content": "two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "one plus two"},
    {"role": "assistant", "content": "three"},
]


@pytest.fixture(scope="module")
def word_tokenizer() -> Any:
    """A word-level tokenizer with a hand-written vocabulary (ids = positions in WORDS); EOS doubles as PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Any:
    """A GPT-2-style byte-level BPE tokenizer (`<|endoftext|>` is EOS and PAD)."""
    from llmtune.tokenizer_training import train_byte_level_bpe
    from tests.helpers import synthetic_documents

    return train_byte_level_bpe([*synthetic_documents(50), "two plus four three five one"], 300, 1, [])


def make_task(
    tokenizer: Any,
    tmp_path: Path,
    data: dict[str, Any],
    instruction: dict[str, Any] | None = None,
    labelled: bool = True,
) -> tuple[InstructionTuning, Any]:
    """The task the registry picks for a causal-lm recipe with these data keys, set up on a tiny GPT-2."""
    tree: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"pretrained": "unused"},
        "data": {"files": {"train": "unused.jsonl"}, "cache_dir": str(tmp_path / "cache"), **data},
    }
    if instruction is not None:
        tree["instruction"] = instruction
    recipe = build_recipe(tree, tmp_path)
    task = get_task(recipe, labelled)
    assert isinstance(task, InstructionTuning)
    model = tiny_gpt2(tokenizer)
    task.setup(model, tokenizer)
    return task, model


def prepare(task: InstructionTuning, tokenizer: Any, train: dict[str, list[Any]], valid: dict[str, list[Any]]) -> Any:
    """`task.prepare` on in-memory splits."""
    from datasets import Dataset

    from llmtune.data import RawData

    fingerprint = hashlib.sha256(repr((train, valid)).encode()).hexdigest()[:16]  # the cache key's data part
    raw = RawData({"train": Dataset.from_dict(train), "validation": Dataset.from_dict(valid)}, fingerprint)
    return task.prepare(raw, tokenizer)


RECIPE_BASE = {"task": "causal-lm", "model": {"pretrained": "unused"}}
PAIRS = {"data": {"prompt_column": "q", "response_column": "a"}, "instruction": {"template": "Q {prompt} A"}}


def test_prompt_positions_are_masked_and_the_response_eos_counts(word_tokenizer: Any, tmp_path: Path) -> None:
    task, _ = make_task(word_tokenizer, tmp_path, **PAIRS)
    rows = task.encode({"q": ["two plus two", "one plus two"], "a": ["four", "three five"]}, [0, 1], "train")
    # Hand-checked against WORDS: Q=2 two=4 plus=5 A=3 | four=6 <eos>=0; one=9 three=7 five=8.
    assert rows["input_ids"] == [[2, 4, 5, 4, 3, 6, 0], [2, 9, 5, 4, 3, 7, 8, 0]]
    assert rows["labels"] == [[-100] * 5 + [6, 0], [-100] * 5 + [7, 8, 0]]
    assert rows["index"] == [0, 1]

    # Collated with pad == EOS: the responses' real EOS stays a target, only the padding is -100.
    batch = pad_collator(word_tokenizer.pad_token_id)([{k: v[i] for k, v in rows.items()} for i in range(2)])
    assert batch["labels"][0].tolist() == [-100] * 5 + [6, 0, -100]
    assert batch["input_ids"][0].tolist() == [2, 4, 5, 4, 3, 6, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0]
    assert int(task.count_items(batch)) == 2 + 3  # "four <eos>" and "three five <eos>"


def test_template_columns_and_bad_templates(word_tokenizer: Any, tmp_path: Path) -> None:
    task, _ = make_task(
        word_tokenizer,
        tmp_path,
        {"prompt_column": "q", "response_column": "a"},
        {"template": "Q {prompt} {extra} A"},
    )
    assert [(c.key, c.column) for c in task.required_columns()] == [
        ("data.prompt_column", "q"),
        ("data.response_column", "a"),
        ("instruction.template {extra}", "extra"),
    ]
    rows = task.encode({"q": ["two"], "a": ["four"], "extra": [None]}, [0], "train")  # empty optional column
    assert rows["input_ids"] == [[2, 4, 3, 6, 0]]
    unlabelled, _ = make_task(
        word_tokenizer,
        tmp_path,
        {"prompt_column": "q", "response_column": "a"},
        {"template": "Q {prompt} {extra} A", "max_new_tokens": 4},
        False,
    )
    assert "data.response_column" not in [c.key for c in unlabelled.required_columns()]
    for template, message in [
        ("no prompt here", "has no {prompt} field"),
        ("Q {prompt} {0}", "is not a column name"),
        ("Q {prompt", "write a literal brace"),
    ]:
        with pytest.raises(UserError, match=message):
            make_task(word_tokenizer, tmp_path, {"prompt_column": "q", "response_column": "a"}, {"template": template})
    rows = [{"q": "two", "a": "four", "extra": "one"}] * 7 + [{"q": "two", "a": None, "extra": "one"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = build_recipe({**RECIPE_BASE, "data": {"files": {"train": str(tmp_path / "rows.jsonl")}}}, tmp_path).data
    with pytest.raises(UserError, match=r"data.response_column: column 'a' has no value in row 7 of the train split"):
        load_raw(spec, splits=("train",), columns=task.required_columns())


def test_truncation_that_removes_the_response_drops_the_example(word_tokenizer: Any, tmp_path: Path) -> None:
    task, _ = make_task(word_tokenizer, tmp_path, {**PAIRS["data"], "max_length": 8}, PAIRS["instruction"])
    long_prompt = " ".join(["two"] * 8)  # 10 prompt tokens: no room left for the response
    cut = "two plus two plus"  # 6 prompt tokens: 2 of the 3 response tokens fit, the EOS does not
    train = {"q": ["two", long_prompt, cut, "one"], "a": ["four", "four", "three five", "five"]}
    prepared = prepare(task, word_tokenizer, train, {"q": [long_prompt, "two"], "a": ["four", "three"]})
    assert prepared.stats["train_dropped"] == 1 and prepared.stats["validation_dropped"] == 1
    assert prepared.stats["train_examples"] == 3 and prepared.stats["validation_examples"] == 1
    assert prepared.stats["train_response_tokens"] == 2 + 2 + 2
    ds = prepared.splits["train"]
    assert [int(i) for i in ds["index"]] == [0, 2, 3]  # raw row numbers, the dropped row left out
    assert ds[1]["input_ids"].tolist() == [2, 4, 5, 4, 5, 3, 7, 8]
    assert ds[1]["labels"].tolist() == [-100] * 6 + [7, 8]
    assert prepared.lengths["train"] == [5, 8, 5]

    with pytest.raises(UserError, match="every response in the train split is cut away by truncation to 8"):
        prepare(task, word_tokenizer, {"q": [long_prompt], "a": ["four"]}, {"q": ["two"], "a": ["four"]})


def counted_text(task: InstructionTuning, tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(the whole rendered conversation, the text of the tokens the loss counts) after `encode_rows`."""
    rows = task.encode({"m": [messages]}, [0], "train")
    ids, labels = rows["input_ids"][0], rows["labels"][0]
    return tokenizer.decode(ids), "".join(tokenizer.decode([t]) for t in labels if t != -100)


@pytest.mark.parametrize(
    "template",
    [
        None,  # the default: assistant turns marked with {% generation %} (transformers' assistant mask)
        # no generation marks: assistant spans found by rendering successive prefixes
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    ],
    ids=["default-generation-tags", "prefix-diff"],
)
def test_chat_masking_counts_only_assistant_turns(bpe_tokenizer: Any, tmp_path: Path, template: str | None) -> None:
    task, _ = make_task(bpe_tokenizer, tmp_path, {"messages_column": "m"}, {"chat_template": template})
    text, counted = counted_text(task, bpe_tokenizer, CHAT)
    eos = bpe_tokenizer.eos_token
    assert counted == f"four{eos}three{eos}"  # assistant contents and their EOS, nothing else
    assert "two plus two" in text and "assistant" in text.lower()
    if template is None:
        assert text == (
            f"### User:\ntwo plus two\n\n### Assistant:\nfour{eos}\n\n"
            f"### User:\none plus two\n\n### Assistant:\nthree{eos}"
        )
        assert bpe_tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # saved with the tokenizer


def test_chat_rows_without_assistant_turns_or_malformed(bpe_tokenizer: Any, tmp_path: Path) -> None:
    task, _ = make_task(bpe_tokenizer, tmp_path, {"messages_column": "m", "max_length": 48})
    user_only = [{"role": "user", "content": "two plus two"}]
    long_user = [{"role": "user", "content": "two plus two " * 20}, {"role": "assistant", "content": "four"}]
    prepared = prepare(task, bpe_tokenizer, {"m": [CHAT, user_only, long_user]}, {"m": [CHAT]})
    assert prepared.stats["train_dropped"] == 2 and [int(i) for i in prepared.splits["train"]["index"]] == [0]
    for bad in ([], [{"role": "user"}], "two plus two"):
        with pytest.raises(UserError, match=r"data.messages_column \('m'\): row 3 of the train split"):
            task.encode({"m": [bad]}, [3], "train")
    # A template whose turns are not prefixes of the whole rendering cannot be masked by prefixes.
    odd = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<end>{% endif %}{% endfor %}"
    task, _ = make_task(bpe_tokenizer, tmp_path, {"messages_column": "m"}, {"chat_template": odd})
    with pytest.raises(UserError, match="mark them with"):
        task.encode({"m": [CHAT]}, [0], "train")
    with pytest.raises(UserError, match=r"instruction\.chat_template: rendering a one-message conversation failed"):
        make_task(bpe_tokenizer, tmp_path, {"messages_column": "m"}, {"chat_template": "{% for m in messages %}"})
    strict = (
        "{% if messages[0]['role'] != 'system' and messages|length > 1 %}{{ raise_exception('system first') }}"
        "{% endif %}"
    )
    task, _ = make_task(bpe_tokenizer, tmp_path, {"messages_column": "m"}, {"chat_template": strict})
    with pytest.raises(UserError, match="rendering row 5 of the train split failed: system first"):
        task.encode({"m": [CHAT]}, [5], "train")


def test_loss_is_normalised_by_the_whole_steps_token_count(word_tokenizer: Any, tmp_path: Path) -> None:
    task, model = make_task(word_tokenizer, tmp_path, **PAIRS)
    rows = task.encode(
        {
            "q": ["two", "two plus two plus two", "one plus one", "five"],
            "a": ["four four four four four", "three", "two", "one plus four plus five"],
        },
        [0, 1, 2, 3],
    )
    examples = [{k: v[i] for k, v in rows.items()} for i in range(4)]
    collate = pad_collator(word_tokenizer.pad_token_id)
    micro = [collate(examples[:1]), collate(examples[1:])]  # 6 and 2 + 7 + ... counted tokens: very unequal
    counts = [int(task.count_items(b)) for b in micro]
    assert counts[0] != counts[1]
    total = sum(task.count_items(b) for b in micro)

    model.zero_grad()
    accumulated = sum(task.loss(model, b, total) for b in micro)
    accumulated.backward()
    grads = [p.grad.clone() for p in model.parameters()]

    # Reference: every counted token of every example weighs the same (a plain per-row CE, no padding).
    model.zero_grad()
    nll = torch.zeros(())
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
        logits = model(input_ids=ids).logits[0, :-1]
        nll = nll + torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
    reference = nll / sum(counts)
    reference.backward()
    assert float(accumulated.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        mean_of_means = sum(float(task.loss(model, b, task.count_items(b))) for b in micro) / 2
    assert abs(mean_of_means - float(reference.detach())) > 1e-3  # the naive average would differ


def test_eval_metrics_are_token_weighted(word_tokenizer: Any, tmp_path: Path) -> None:
    task, model = make_task(word_tokenizer, tmp_path, **PAIRS)
    rows = task.encode({"q": ["two", "one plus two"], "a": ["four four four", "five"]}, [0, 1], "train")
    batch = pad_collator(word_tokenizer.pad_token_id)([{k: v[i] for k, v in rows.items()} for i in range(2)])
    from llmtune.tasks.base import EvalOutputs

    outputs = EvalOutputs()
    with torch.no_grad():
        outputs.add(task.eval_batch(model, batch))
        mean = float(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        )
    metrics = task.metrics(outputs)
    assert metrics["eval/tokens"] == 4 + 2
    assert metrics["eval/loss"] == pytest.approx(mean, rel=1e-5)  # transformers' own token mean
    assert metrics["eval/perplexity"] == pytest.approx(torch.tensor(mean).exp().item(), rel=1e-5)
    task.validation_raw = __import__("datasets").Dataset.from_dict({"q": ["two", "one plus two"]})
    records = task.predictions(outputs)
    assert [r["index"] for r in records] == [0, 1] and records[0]["prompt"] == "two" and records[0]["tokens"] == 4


def test_left_padded_batched_generation_matches_one_row_at_a_time(bpe_tokenizer: Any, tmp_path: Path) -> None:
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left, left_mask = left_align(ids, mask, pad_id=0)
    assert left.tolist() == [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert left_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert cut_at_eos(torch.tensor([[4, 0, 4, 0], [4, 4, 4, 4]]), [0]).tolist() == [[4, -100, -100, -100], [4, 4, 4, 4]]

    task, model = make_task(
        bpe_tokenizer, tmp_path, PAIRS["data"], {**PAIRS["instruction"], "max_new_tokens": 6}, False
    )
    prompts = ["two", "The small parser returns a sorted list", "one plus"]
    rows = task.encode({"q": prompts}, [0, 1, 2], "train")
    assert "labels" not in rows
    batch = pad_collator(bpe_tokenizer.pad_token_id)([{k: v[i] for k, v in rows.items()} for i in range(3)])
    with torch.no_grad():
        batched = task.eval_batch(model, batch)["generated"]
        for i, row in enumerate(rows["input_ids"]):
            alone = model.generate(
                input_ids=torch.tensor([row]), max_new_tokens=6, do_sample=False, pad_token_id=task.pad_id
            )[0, len(row) :]
            want = cut_at_eos(alone[None], [task.eos_id])[0].tolist()
            assert batched[i, : len(want)].tolist() == want
    from datasets import Dataset

    from llmtune.tasks.base import EvalOutputs

    task.validation_raw = Dataset.from_dict({"q": prompts})
    outputs = EvalOutputs()
    outputs.add({"index": torch.tensor([2, 0, 1]), "generated": batched})
    records = task.predictions(outputs)
    assert [(r["index"], r["prompt"]) for r in records] == list(enumerate(prompts))  # file order
    for record, row in zip(records, batched[[1, 2, 0]], strict=True):  # row k of the batch is example [2, 0, 1][k]
        want = bpe_tokenizer.decode([t for t in row.tolist() if t != -100], skip_special_tokens=True)
        assert record["response"] == want


def test_prediction_prompts_keep_their_end_and_leave_room(word_tokenizer: Any, tmp_path: Path) -> None:
    data = {**PAIRS["data"], "max_length": 8}
    task, _ = make_task(word_tokenizer, tmp_path, data, {**PAIRS["instruction"], "max_new_tokens": 3}, False)
    rows = task.encode({"q": ["one two two two two two"]}, [0], "train")
    assert rows["input_ids"] == [[4, 4, 4, 4, 3]]  # the last 8 - 3 tokens: the template's end survives
    with pytest.raises(UserError, match=r"instruction\.max_new_tokens: 8 leaves no room"):
        make_task(word_tokenizer, tmp_path, data, {**PAIRS["instruction"], "max_new_tokens": 8}, False)
    chat, _ = make_task(word_tokenizer, tmp_path, {"messages_column": "m"}, {"max_new_tokens": 4}, labelled=False)
    # a final assistant turn is left out: it is what gets predicted
    assert chat.encode({"m": [CHAT]}, [0], "train") == chat.encode({"m": [CHAT[:3]]}, [0], "train")
