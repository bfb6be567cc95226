"""End to end through the CLI: BERT masked-LM and T5 span-corruption pretraining, eval, exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import (
    assert_same_tensors,
    read_metrics,
    run_cli,
    run_interrupted,
    tiny_config,
    tiny_recipe,
    write_recipe,
)

pytestmark = pytest.mark.slow


# BERT's and T5's default dropout (0.1): exact resume must restore the dropout RNG too
BERT = tiny_config("bert", max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
T5 = tiny_config("t5", dropout_rate=0.1)
FAMILIES = {
    "masked-lm": {"model": BERT, "tokenizer": {"kind": "wordpiece", "vocab_size": 400, "lowercase": True}},
    "span-corruption": {"model": T5, "tokenizer": {"kind": "unigram", "vocab_size": 400, "num_sentinels": 20}},
}


def _recipe(corpus: dict[str, Path], out: Path, task: str, **train: Any) -> dict[str, Any]:
    family = FAMILIES[task]
    recipe = tiny_recipe(
        corpus, out, train={"max_steps": 120, "log_every": 1, "save_every": 40, "eval_every": 60, "lr": 3e-3, **train}
    )
    recipe.update(task=task, model={"from_scratch": dict(family["model"])}, tokenizer={"train": family["tokenizer"]})
    return recipe


def _documents(corpus: dict[str, Path]) -> list[str]:
    return [d.strip() for d in corpus["valid"].read_text().split("\n\n") if d.strip()]


def _stream(tok: Any, docs: list[str], separator: int) -> list[int]:
    return [t for d in docs for t in [*tok(d, add_special_tokens=False)["input_ids"], separator]]


def independent_masked_lm_loss(model_dir: Path, docs: list[str], block: int, seed: int) -> float:
    """Masked-token loss with plain transformers: our own packing, the model's own loss; only the
    (documented, unit-tested) mask draw is llmtune's, with the same per-example seed."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from llmtune.recipe import MaskingSpec
    from llmtune.tasks.masked_lm import mask_tokens

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    stream = _stream(tok, docs, tok.sep_token_id)
    inner = block - 2
    rows = [stream[i : i + inner] for i in range(0, len(stream), inner)]
    special = set(tok.all_special_ids)
    total, count = 0.0, 0
    for example, piece in enumerate(rows):
        ids = torch.tensor([[tok.cls_token_id, *piece, tok.sep_token_id]])
        maskable = torch.tensor([[i not in special for i in ids[0].tolist()]])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + example)
        inputs, labels = mask_tokens(ids, maskable, MaskingSpec(), tok.mask_token_id, len(tok), generator)
        n = int((labels != -100).sum())
        if n:
            with torch.no_grad():
                total += float(model(input_ids=inputs, labels=labels).loss) * n
            count += n
    return total / count


def independent_span_corruption_loss(model_dir: Path, docs: list[str], block: int, seed: int) -> float:
    """Target-token loss with plain transformers (the model shifts labels itself); the raw chunks are
    cut here, the published span draw and sentinel replacement are llmtune's functions."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from llmtune.tasks.span_corruption import corrupt, input_and_target_lengths, random_spans_noise_mask

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
    raw, _ = input_and_target_lengths(block, 0.15, 3.0)
    stream = np.array(_stream(tok, docs, tok.eos_token_id))
    sentinels = np.array(tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(20)]))
    total, count = 0.0, 0
    for example in range(len(stream) // raw):
        chunk = stream[example * raw : (example + 1) * raw]
        noise = random_spans_noise_mask(raw, 0.15, 3.0, np.random.default_rng([seed, example]))
        inputs, targets = corrupt(chunk, noise, sentinels, tok.eos_token_id)
        assert len(inputs) == block
        with torch.no_grad():
            loss = model(input_ids=torch.from_numpy(inputs)[None], labels=torch.from_numpy(targets)[None]).loss
        total += float(loss) * len(targets)
        count += len(targets)
    return total / count


@pytest.mark.parametrize("task", ["masked-lm", "span-corruption"])
def test_pretrain_eval_resume(task: str, corpus: dict[str, Path], tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    recipe = write_recipe(tmp_path / "a.yaml", _recipe(corpus, straight, task))
    done = run_cli("pretrain", str(recipe))
    assert done.returncode == 0, done.stderr[-3000:]

    losses = [r["train/loss"] for r in read_metrics(straight) if "train/loss" in r]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0  # the loss falls

    import transformers

    auto = transformers.AutoModelForMaskedLM if task == "masked-lm" else transformers.AutoModelForSeq2SeqLM
    model = auto.from_pretrained(str(straight / "final"))
    tok = transformers.AutoTokenizer.from_pretrained(str(straight / "final"))
    assert model.config.vocab_size == len(tok)

    final_metrics = json.loads((straight / "final_metrics.json").read_text())
    again = run_cli("eval", str(straight), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["metrics"] == pytest.approx(final_metrics, rel=1e-6)

    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(corpus)))
    ours = run_cli("eval", str(straight / "final"), "--task", task, "--data", str(data), "--block-size", "32", "--json")
    assert ours.returncode == 0, ours.stderr[-3000:]
    got = json.loads(ours.stdout)["metrics"]["eval/loss"]
    independent = independent_masked_lm_loss if task == "masked-lm" else independent_span_corruption_loss
    assert got == pytest.approx(independent(straight / "final", _documents(corpus), 32, seed=0), rel=1e-4)

    broken = tmp_path / "broken"
    recipe_b = write_recipe(tmp_path / "b.yaml", _recipe(corpus, broken, task))
    stopped_at = run_interrupted(recipe_b, broken)
    resumed = run_cli("pretrain", str(recipe_b), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped_at})" in resumed.stdout
    assert_same_tensors(straight / "final" / "model.safetensors", broken / "final" / "model.safetensors")


@pytest.mark.parametrize(
    ("task", "model", "message"),
    [
        (
            "masked-lm",
            {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64},
            "a 'gpt2' model cannot do masked-lm",
        ),
        ("span-corruption", BERT, "a 'bert' model cannot do span-corruption"),
    ],
)
def test_model_that_does_not_fit_the_task(
    task: str, model: dict, message: str, corpus: dict[str, Path], tmp_path: Path
) -> None:
    from llmtune.errors import UserError
    from llmtune.run import train as pretrain

    recipe = _recipe(corpus, tmp_path / "out", task)
    recipe["model"] = {"from_scratch": model}
    with pytest.raises(UserError, match=message):
        pretrain(str(write_recipe(tmp_path / "r.yaml", recipe)), [])
    assert not (tmp_path / "out").exists()
