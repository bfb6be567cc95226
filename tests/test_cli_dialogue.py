"""End to end through the CLI: chat tuning a tiny GPT-2 on ShareGPT conversations, its dialogue metrics and
`expect:`, `llmtune chat` (against `llmtune generate`, /reset, /system, history overflow), and the refusals."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    ADJECTIVES,
    NOUNS,
    VERB_OF,
    Server,
    read_metrics,
    run_cli,
    run_cli_in_process,
    write_jsonl,
    write_recipe,
)

pytestmark = pytest.mark.slow


def conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """ShareGPT rows: two exchanges, each naming an (adjective, noun) answered by the noun's verb."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = []
        for _ in range(2):
            noun = rng.choice(NOUNS)
            turns += [
                {"from": "human", "value": f"the {rng.choice(ADJECTIVES)} {noun}"},
                {"from": "gpt", "value": VERB_OF[noun]},
            ]
        rows.append({"conversations": turns})
    return rows


def dialogue_recipe(model: Path, root: Path, out: Path) -> dict[str, Any]:
    """A ShareGPT chat-tuning recipe on the tiny GPT-2 checkpoint."""
    return {
        "task": "dialogue",
        "model": {"pretrained": str(model)},
        "data": {
            "files": {"train": str(root / "train.jsonl"), "validation": str(root / "valid.jsonl")},
            "max_length": 64,
        },
        "dialogue": {"format": "sharegpt", "max_new_tokens": 4, "eval_conversations": 6, "eval_turns": 2},
        "train": {
            "max_steps": 40,
            "batch_size": 8,
            "lr": 5e-3,
            "log_every": 5,
            "eval_every": 20,
            "seed": 0,
            "schedule": {"kind": "constant", "warmup_steps": 0},
        },
        "expect": {"eval/responses": {"min": 12, "max": 12}, "eval/distinct_1": {"min": 0.0, "max": 1.0}},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module")
def run(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One chat-tuning run shared by the checks below."""
    root = tmp_path_factory.mktemp("dialogue")
    write_jsonl(root / "train.jsonl", conversations(160, seed=1))
    write_jsonl(root / "valid.jsonl", conversations(12, seed=2))
    out = root / "run"
    recipe = write_recipe(root / "r.yaml", dialogue_recipe(tiny_models["gpt2"], root, out))
    return {"root": root, "out": out, "recipe": recipe, "done": run_cli("finetune", str(recipe))}


def test_sharegpt_chat_tuning_reports_dialogue_metrics(run: dict[str, Any]) -> None:
    done, out = run["done"], run["out"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "task: dialogue" in done.stdout and "Traceback" not in done.stderr
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["eval/responses"] == 12  # 6 conversations x 2 assistant turns, as the expect: band says
    for key in ("eval/perplexity", "eval/bleu", "eval/rougeL", "eval/distinct_1", "eval/distinct_2", "eval/gen_len"):
        assert key in final, key
    assert 0 <= final["eval/rougeL"] <= 100 and 0 < final["eval/gen_len"] <= 4
    assert "eval/responses" in done.stdout  # the expect: table
    again = run_cli("eval", str(out), "--json")  # the run's recipe, its dialogue section included
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads(again.stdout)["metrics"]
    assert metrics.keys() == final.keys()
    for key, value in final.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key


def chat_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, lines: list[str], *args: str
) -> tuple[int, str, str]:
    """`llmtune chat ARGS` in this process, its stdin the given lines."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    return run_cli_in_process(capsys, "chat", *args)


def generated(capsys: pytest.CaptureFixture[str], model: Path, messages: list[dict[str, str]]) -> str:
    """What `llmtune generate` continues the rendered conversation with (greedy, 4 tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model / "final"))
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    code, out, err = run_cli_in_process(capsys, "generate", str(model), "--prompt", prompt, "--max-new-tokens", "4")
    assert code == 0, err
    assert out.startswith(prompt)
    return out[len(prompt) :]


def test_chat_replies_as_generate_does(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, one_thread_cli: None
) -> None:
    assert run["done"].returncode == 0, run["done"].stderr[-3000:]
    out = run["out"]
    lines = [
        "the empty parser",
        "the small socket",
        "/reset",
        "the small socket",
        "/system be brief",
        "the lazy list",
        "/exit",
        "never read",
    ]
    code, stdout, stderr = chat_in_process(capsys, monkeypatch, lines, str(out), "--max-new-tokens", "4")
    assert code == 0, stderr
    replies = stdout.splitlines()
    assert len(replies) == 4, stdout
    u = [{"role": "user", "content": line} for line in ("the empty parser", "the small socket", "the lazy list")]
    first = generated(capsys, out, u[:1])
    assert replies[0] + "\n" == first
    history = [u[0], {"role": "assistant", "content": replies[0]}, u[1]]
    assert replies[1] + "\n" == generated(capsys, out, history)
    assert replies[2] + "\n" == generated(capsys, out, [u[1]])  # /reset forgot the first exchange
    system = {"role": "system", "content": "be brief"}
    after = [system, u[1], {"role": "assistant", "content": replies[2]}, u[2]]
    assert replies[3] + "\n" == generated(capsys, out, after)  # /system applies to the kept history
    assert "conversation reset" in stderr and "system prompt set: 'be brief'" in stderr
    # The same through a real pipe, as a user's `printf ... | llmtune chat` runs it.
    piped = subprocess.run(
        [sys.executable, "-m", "llmtune", "chat", str(out), "--max-new-tokens", "4"],
        input="the empty parser\n",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert piped.returncode == 0 and piped.stdout == first, piped.stderr[-2000:]


def test_chat_drops_the_oldest_turns_when_the_history_overflows(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, one_thread_cli: None
) -> None:
    assert run["done"].returncode == 0, run["done"].stderr[-3000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run["out"] / "final"))
    said = ["the empty parser", "the small socket", "the lazy list", "the frozen frame"]
    system = {"role": "system", "content": "be brief"}
    texts = [
        tok.apply_chat_template([system, {"role": "user", "content": m}], add_generation_prompt=True, tokenize=False)
        for m in said
    ]
    alone = max(len(tok(text, add_special_tokens=False)["input_ids"]) for text in texts)
    # Room for any one message and its 4-token reply, not for an earlier exchange besides.
    context = str(alone + 4 + 6)
    code, stdout, stderr = chat_in_process(
        capsys, monkeypatch, ["/system be brief", *said], str(run["out"]), "--max-new-tokens", "4", "--context", context
    )
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 4
    notes = [line for line in stderr.splitlines() if line.startswith("history:")]
    assert notes, stderr
    assert (
        len(notes) == 3
        and f"no longer fits the context of {context} tokens" in notes[0]
        and "dropped the oldest 2 messages: user 'the empty parser', assistant" in notes[0]
    )
    assert "the system prompt is kept" in notes[0]
    # A message that cannot fit even alone is not sent, and says so.
    code, stdout, stderr = chat_in_process(
        capsys, monkeypatch, ["the empty parser " * 20], str(run["out"]), "--context", context, "--max-new-tokens", "4"
    )
    assert code == 0 and stdout == "" and "message not sent" in stderr


def test_chat_refuses_a_model_that_is_not_a_causal_lm(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, stdout, stderr = chat_in_process(capsys, monkeypatch, ["hello"], str(tiny_models["bert"]))
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "not a causal LM" in stderr


@pytest.mark.parametrize(
    ("rows", "data", "message"),
    [
        (
            [{"conversations": [{"from": "robot", "value": "hi"}]}],
            {},
            "row 0 of the train split, turn 1 has the unknown from 'robot'",
        ),
        (
            [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}],
            {},
            "turn 2 (gpt) is empty",
        ),
        (
            [{"dialog": [{"from": "human", "value": "hi"}]}],
            {},
            "data.dialogue_column: column 'conversations' not in the train split",
        ),
    ],
    ids=["unknown-role", "empty-turn", "missing-column"],
)
def test_bad_conversations_are_one_line_exit_2(
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rows: list[dict[str, Any]],
    data: dict[str, Any],
    message: str,
) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "valid.jsonl", rows)
    out = tmp_path / "bad"
    recipe = write_recipe(tmp_path / "bad.yaml", dialogue_recipe(tiny_models["gpt2"], tmp_path, out))
    code, _, stderr = run_cli_in_process(capsys, "finetune", str(recipe))
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not out.exists()


def test_serve_answers_chat_completions_as_chat_does(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, one_thread_cli: None
) -> None:
    assert run["done"].returncode == 0, run["done"].stderr[-3000:]
    out = run["out"]
    code, stdout, stderr = chat_in_process(capsys, monkeypatch, ["the empty parser"], str(out), "--max-new-tokens", "4")
    assert code == 0, stderr
    server = Server(out, log=run["root"] / "serve.log")
    try:
        assert server.client.get("/info").json()["task"] == "dialogue"
        messages = [{"role": "user", "content": "the empty parser"}]
        answer = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4}).json()
    finally:
        assert server.stop() == 0
    assert answer["choices"][0]["message"]["content"] == stdout.splitlines()[0]


def test_packed_dialogue_run_trains(tiny_models: dict[str, Path], tmp_path: Path, one_thread_cli: None) -> None:
    write_jsonl(tmp_path / "train.jsonl", conversations(160, seed=1))
    write_jsonl(tmp_path / "valid.jsonl", conversations(12, seed=2))
    recipe = dialogue_recipe(tiny_models["gpt2"], tmp_path, tmp_path / "run")
    recipe["dialogue"].update(pack=True, eval_conversations=0)
    recipe["train"].update(batch_size=2, max_steps=30)
    recipe["expect"] = {}
    done = run_cli("finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train_packed_rows" in done.stdout
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert losses[-1] < 0.7 * losses[0]
