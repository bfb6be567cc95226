"""End to end through the real CLI: instruction tuning (prompt/response and chat) and plain causal-LM fine-tuning
of a tiny GPT-2 checkpoint; eval, predict, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.errors import UserError
from tests.helpers import (
    ADJECTIVES,
    NOUNS,
    VERBS,
    instruction_pairs,
    instruction_recipe,
    read_metrics,
    run_cli,
    write_jsonl,
    write_recipe,
)

pytestmark = pytest.mark.slow

TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"  # the recipe default


@pytest.fixture(scope="module")
def run(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One prompt/response fine-tuning run shared by the checks below."""
    root = tmp_path_factory.mktemp("instruction")
    write_jsonl(root / "train.jsonl", instruction_pairs(240, seed=1))
    write_jsonl(root / "valid.jsonl", instruction_pairs(24, seed=2))
    out = root / "run"
    recipe = write_recipe(root / "r.yaml", instruction_recipe(tiny_models["gpt2"], root, out))
    done = run_cli("finetune", str(recipe))
    return {"root": root, "out": out, "recipe": recipe, "done": done}


def test_training_learns_and_final_loads(run: dict[str, Any]) -> None:
    done, out = run["done"], run["out"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "task: instruction-tuning" in done.stdout and "length-grouped batches" in done.stdout
    assert "train_dropped 0" in done.stdout and "train_response" in done.stdout  # what the loss counts
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out / "final")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    # The response loss with plain transformers: prompt tokens masked, the response and its EOS counted.
    nll, counted = 0.0, 0
    for row in instruction_pairs(24, seed=2):
        prompt = tok(TEMPLATE.format(prompt=row["prompt"]))["input_ids"]
        response = [*tok(row["response"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        labels = torch.tensor([[-100] * len(prompt) + response])
        with torch.no_grad():
            loss = model(torch.tensor([prompt + response]), labels=labels).loss
        nll += float(loss) * len(response)
        counted += len(response)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["eval/tokens"] == counted
    assert final["eval/loss"] == pytest.approx(nll / counted, rel=1e-4)

    again = run_cli("eval", str(out), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads(again.stdout)["metrics"]
    assert metrics.keys() == final.keys()
    for key, value in final.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key


def test_predict_generates_responses(run: dict[str, Any]) -> None:
    assert run["done"].returncode == 0, run["done"].stderr[-3000:]
    prompts = [{"prompt": f"the {adj} {noun}"} for adj, noun in zip(ADJECTIVES, NOUNS, strict=True)]  # no responses
    data = write_jsonl(run["root"] / "prompts.jsonl", prompts)
    target = run["root"] / "predictions.jsonl"
    done = run_cli("predict", str(run["out"]), "--data", str(data), "--output", str(target))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(prompts)))
    assert [r["prompt"] for r in records] == [p["prompt"] for p in prompts]
    # 40 steps teach the tiny model the answers' form (one verb, then EOS: generation stops there), not
    # yet which verb goes with which noun.
    assert {r["response"] for r in records} <= set(VERBS), records


def test_chat_messages_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    def chats(n: int, seed: int) -> list[dict[str, Any]]:
        return [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in instruction_pairs(n, seed)
        ]

    write_jsonl(tmp_path / "train.jsonl", chats(160, seed=3))
    write_jsonl(tmp_path / "valid.jsonl", chats(16, seed=4))
    recipe = instruction_recipe(tiny_models["gpt2"], tmp_path, tmp_path / "chat", max_length=48)
    for key in ("prompt_column", "response_column"):
        recipe["data"].pop(key)
    recipe["data"]["messages_column"] = "messages"
    recipe["train"].update(max_steps=20, eval_every=None)
    done = run_cli("finetune", str(write_recipe(tmp_path / "chat.yaml", recipe)))
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "chat") if "train/loss" in r]
    assert losses[-1] < losses[0]

    from transformers import AutoTokenizer

    from llmtune.tasks.chat import DEFAULT_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "chat" / "final"))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # the model is saved with the template it learnt
    final = json.loads((tmp_path / "chat" / "final_metrics.json").read_text())
    # Only assistant turns count: each verb's tokens and its EOS.
    want = sum(len(tok(c["messages"][1]["content"])["input_ids"]) + 1 for c in chats(16, seed=4))
    assert final["eval/tokens"] == want


def test_plain_text_causal_lm_finetune(tiny_models: dict[str, Path], corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = {
        "task": "causal-lm",
        "model": {"pretrained": str(tiny_models["gpt2"])},
        "data": {"files": {"train": str(corpus["train"]), "validation": str(corpus["valid"])}, "block_size": 32},
        "train": {"max_steps": 15, "batch_size": 8, "lr": 3e-3, "log_every": 5, "seed": 0},
        "output_dir": str(tmp_path / "plain"),
    }
    done = run_cli("finetune", str(write_recipe(tmp_path / "plain.yaml", recipe)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "task: causal-lm" in done.stdout
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "plain") if "train/loss" in r]
    assert losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain" / "final")).config.n_layer == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"instruction": {"template": "no field"}}, "instruction.template: it has no {prompt} field"),
        ({"data": {"prompt_column": "question"}}, "data.prompt_column: column 'question' not in the train split"),
        ({"data": {"max_length": 8}}, "data.max_length: every response in the train split is cut away"),
        (
            {"data": {"prompt_column": None, "response_column": None, "messages_column": "prompt"}},
            "data.messages_column: column 'prompt' of the train split holds text values, not a list",
        ),
        ({"data": {"max_length": 4096}}, "data.max_length: 4096 is longer than the model's context (128)"),
        # GPT-2's LM head is its input embedding matrix: a frozen body leaves nothing to train.
        ({"strategy": {"kind": "head"}}, "strategy.kind: head: a gpt2 GPT2LMHeadModel has no task head"),
    ],
    ids=["template", "column", "all-dropped", "messages", "too-long", "head-on-tied-gpt2"],
)
def test_bad_input_is_one_line_and_writes_nothing(
    run: dict[str, Any], tiny_models: dict[str, Path], change: dict[str, Any], message: str, one_thread: None
) -> None:
    from llmtune.run import train

    out = run["root"] / "bad"
    recipe = instruction_recipe(tiny_models["gpt2"], run["root"], out)
    for section, values in change.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    with pytest.raises(UserError) as caught:
        train(str(write_recipe(run["root"] / "bad.yaml", recipe)), [], command="finetune")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists()
