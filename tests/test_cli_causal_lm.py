"""End to end through the real CLI: pretrain -> eval -> generate, exact resume, data parallel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    assert_same_tensors,
    launch_two_ranks,
    load_tensors,
    read_metrics,
    run_cli,
    run_interrupted,
    tiny_recipe,
    write_recipe,
)

pytestmark = pytest.mark.slow


def independent_perplexity(model_dir: Path, docs: list[str], window: int, stride: int) -> float:
    """Sliding-window perplexity as in the Hugging Face perplexity guide, with plain transformers.

    One difference from the guide's snippet: it counts `valid - 1` loss tokens per window, but only
    the first window loses a token to the label shift (later windows' first label is context, -100),
    so this counts the tokens the loss really averaged over.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = torch.tensor([t for d in docs for t in [*tok(d)["input_ids"], tok.eos_token_id]])[None]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        target_len = end - prev_end
        inputs = ids[:, begin:end]
        targets = inputs.clone()
        targets[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(inputs, labels=targets).loss
        counted = int((targets[:, 1:] != -100).sum())
        nll_sum += float(loss) * counted
        n_tokens += counted
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / n_tokens)


def test_pretrain_eval_generate(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(corpus, out, train={"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 5}),
    )
    done = run_cli("pretrain", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    records = read_metrics(out)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0  # it learned
    evals = [r for r in records if "eval/perplexity" in r]
    assert evals[-1]["eval/perplexity"] < 0.25 * 400  # far below an untrained model (~vocabulary size)
    assert {"recipe.resolved.yaml", "environment.json", "metrics.jsonl", "final", "checkpoints"} <= {
        p.name for p in out.iterdir()
    }
    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 1 and env["global_batch"] == 8
    assert "train" in done.stdout and "tokens" in done.stdout  # the run log states tokens per split

    # final/ is a standard model directory that plain transformers loads.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = out / "final"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (final / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    assert model.config.vocab_size == len(tok) and tok.pad_token is not None

    # llmtune eval on the run's own validation split reproduces the end-of-training number.
    default = run_cli("eval", str(out), "--json")
    assert default.returncode == 0, default.stderr[-3000:]
    final_metrics = json.loads((out / "final_metrics.json").read_text())
    assert json.loads(default.stdout)["metrics"]["eval/perplexity"] == pytest.approx(
        final_metrics["eval/perplexity"], rel=1e-6
    )
    assert (out / "eval" / "validation.json").is_file()

    # ... and on a new file with a sliding window, it agrees with the independent computation.
    docs = [line.strip() for line in corpus["valid"].read_text().split("\n\n") if line.strip()]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    ours = run_cli(
        "eval",
        str(out),
        "--data",
        str(data),
        "--text-column",
        "body",
        "--block-size",
        "32",
        "--stride",
        "16",
        "--json",
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    got = json.loads(ours.stdout)["metrics"]["eval/perplexity"]
    assert got == pytest.approx(independent_perplexity(final, docs, 32, 16), rel=1e-4)

    greedy = [run_cli("generate", str(out), "--prompt", "The small", "--max-new-tokens", "8") for _ in range(2)]
    assert greedy[0].returncode == 0, greedy[0].stderr[-3000:]
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.startswith("The small")
    sampled = run_cli(
        "generate",
        str(out),
        "--prompt",
        "The",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "3",
        "--num-return",
        "2",
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert len(sampled.stdout.strip().splitlines()) >= 2


def _resume_recipe(corpus: dict[str, Path], out: Path) -> dict:
    # Dropout on, accumulation across an epoch boundary: everything exact resume has to get right.
    model = {
        "from_scratch": {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 2,
            "n_positions": 64,
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
        }
    }
    return tiny_recipe(
        corpus,
        out,
        model=model,
        data={"block_size": 64},
        train={
            "max_steps": 150,
            "grad_accum": 2,
            "batch_size": 4,
            "log_every": 1,
            "save_every": 50,
            "eval_every": 40,
            "eval_max_batches": 2,
        },
    )


def test_interrupted_run_resumes_bit_identical(corpus: dict[str, Path], tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    done = run_cli("pretrain", str(write_recipe(tmp_path / "a.yaml", _resume_recipe(corpus, straight))))
    assert done.returncode == 0, done.stderr[-3000:]

    broken = tmp_path / "broken"
    recipe = write_recipe(tmp_path / "b.yaml", _resume_recipe(corpus, broken))
    stopped_at = run_interrupted(recipe, broken)
    assert stopped_at < 150

    resumed = run_cli("pretrain", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped_at})" in resumed.stdout
    assert_same_tensors(straight / "final" / "model.safetensors", broken / "final" / "model.safetensors")
    # metrics.jsonl of the resumed run has each step once, and the same losses as the straight run.
    steps = [r["step"] for r in read_metrics(broken) if "train/loss" in r]
    assert steps == sorted(set(steps))
    straight_losses = [r["train/loss"] for r in read_metrics(straight) if "train/loss" in r]
    assert [r["train/loss"] for r in read_metrics(broken) if "train/loss" in r] == straight_losses


def test_two_process_data_parallel_matches_one_process(corpus: dict[str, Path], tmp_path: Path) -> None:
    single = tmp_path / "single"
    one = run_cli(
        "pretrain",
        str(write_recipe(tmp_path / "one.yaml", tiny_recipe(corpus, single, train={"max_steps": 12, "batch_size": 8}))),
    )
    assert one.returncode == 0, one.stderr[-3000:]

    double = tmp_path / "double"
    recipe = write_recipe(tmp_path / "two.yaml", tiny_recipe(corpus, double, train={"max_steps": 12, "batch_size": 4}))
    two = launch_two_ranks("pretrain", str(recipe), port=29517)
    assert two.returncode == 0, two.stderr[-3000:]
    env = json.loads((double / "environment.json").read_text())
    assert env["world_size"] == 2 and env["global_batch"] == 8
    assert two.stdout.count("run: ") == 1  # only the main process reports
    a = load_tensors(single / "final" / "model.safetensors")
    b = load_tensors(double / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    ea = json.loads((single / "final_metrics.json").read_text())
    eb = json.loads((double / "final_metrics.json").read_text())
    assert ea["eval/tokens"] == eb["eval/tokens"]  # each validation window counted once
    assert ea["eval/loss"] == pytest.approx(eb["eval/loss"], rel=1e-4)
