"""Shared fixtures: a small synthetic corpus, tiny recipes, and the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"

_NOUNS = ["parser", "module", "function", "class", "list", "string", "token", "frame", "thread", "socket"]
_VERBS = ["returns", "raises", "holds", "reads", "writes", "calls", "builds", "parses", "joins", "splits"]
_ADJ = ["empty", "mutable", "small", "nested", "lazy", "sorted", "encoded", "shared", "frozen", "local"]


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Documents of templated sentences: structure a tiny model can learn in a few steps."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} a {rng.choice(_ADJ)} "
            f"{rng.choice(_NOUNS)}."
            for _ in range(rng.randint(1, 6))
        ]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train.txt / valid.txt (documents separated by blank lines) and a jsonl copy of the train split."""
    root = tmp_path_factory.mktemp("corpus")
    train, valid = synthetic_documents(600, seed=1), synthetic_documents(40, seed=2)
    (root / "train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (root / "valid.txt").write_text("\n\n".join(valid) + "\n", encoding="utf-8")
    (root / "train.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in train), encoding="utf-8")
    return {"train": root / "train.txt", "valid": root / "valid.txt", "jsonl": root / "train.jsonl"}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every test (and every CLI subprocess, which inherits the environment) caches into the session's tmp dir.

    Session-scoped so that module-scoped fixtures that run the CLI are covered too.
    """
    before = os.environ.get("LLMTUNE_CACHE")
    os.environ["LLMTUNE_CACHE"] = str(tmp_path_factory.getbasetemp() / "llmtune-cache")
    yield
    if before is None:
        os.environ.pop("LLMTUNE_CACHE", None)
    else:
        os.environ["LLMTUNE_CACHE"] = before


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they run ~100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_GPT2 = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def tiny_recipe(corpus: dict[str, Path], out: Path, **sections: Any) -> dict[str, Any]:
    """A causal-LM recipe on the synthetic corpus with a tiny GPT-2; `sections` update its parts."""
    recipe: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"from_scratch": dict(TINY_GPT2)},
        "tokenizer": {"train": {"kind": "byte-level-bpe", "vocab_size": 400}},
        "data": {
            "files": {"train": str(corpus["train"]), "validation": str(corpus["valid"])},
            "block_size": 32,
        },
        "train": {
            "max_steps": 30,
            "batch_size": 8,
            "lr": 3e-3,
            "log_every": 5,
            "seed": 0,
            "schedule": {"kind": "cosine", "warmup_steps": 3},
        },
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    """Write a recipe dict as YAML."""
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m llmtune ARGS` the way a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "llmtune", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_tensors(path: Path) -> dict[str, Any]:
    """All tensors of a safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path))


def run_interrupted(recipe: Path, run_dir: Path, after_step: int = 12) -> int:
    """Start `llmtune pretrain`, SIGTERM it once `after_step` is logged; return the last logged step."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtune", "pretrain", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= after_step for r in read_metrics(run_dir)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert not (run_dir / "final").exists()
    return max(r["step"] for r in read_metrics(run_dir))


def assert_same_tensors(a_file: Path, b_file: Path) -> None:
    """Two safetensors files hold bit-identical tensors."""
    import torch

    a, b = load_tensors(a_file), load_tensors(b_file)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- tiny "pretrained" model directories for the fine-tuning tests --------------------------------------

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": {
        "model_type": "bert",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    "gpt2": {**TINY_GPT2, "n_positions": 128},
    "t5": {
        "model_type": "t5",
        "num_layers": 2,
        "num_decoder_layers": 2,
        "d_model": 32,
        "d_ff": 64,
        "d_kv": 16,
        "num_heads": 2,
        "dropout_rate": 0.0,
        "tie_word_embeddings": True,
    },
}


def make_tiny_model(family: str, where: Path, texts: list[str]) -> Path:
    """Save a tiny randomly initialised `family` model (bert, gpt2, t5) with a tokenizer trained on `texts`.

    The directory looks like any downloaded checkpoint: config.json, model.safetensors, tokenizer files.
    Its body is the bare model (`AutoModel`), so every task adds its own fresh head, as with a hub model.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    from llmtune.tokenizer_training import train_byte_level_bpe, train_unigram, train_wordpiece

    if family == "bert":
        tokenizer = train_wordpiece(texts, 400, 1, True, [])
    elif family == "gpt2":
        tokenizer = train_byte_level_bpe(texts, 400, 1, [])
    else:
        tokenizer = train_unigram(texts, 400, 20, [])
    keys = dict(TINY_CONFIGS[family])
    config = AutoConfig.for_model(keys.pop("model_type"), **keys, vocab_size=len(tokenizer))
    for name in ("bos", "eos", "pad"):
        if getattr(tokenizer, f"{name}_token_id", None) is not None:
            setattr(config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    if family == "t5":
        config.decoder_start_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(str(where))
    tokenizer.save_pretrained(str(where))
    return where


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of tiny BERT, GPT-2 and T5 "checkpoints" (random weights, tokenizers trained here)."""
    root = tmp_path_factory.mktemp("tiny-models")
    extra = "Paris London Berlin John Mary Acme Corp the of in at is was what who where when 0 1 2 3 4 5 6 7 8 9"
    texts = [*synthetic_documents(300, seed=5), extra]
    return {family: make_tiny_model(family, root / family, texts) for family in TINY_CONFIGS}


def run_cli_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI's entry point (`llmtune.cli.main`) in this process: (exit code, stdout, stderr).

    The same code path as the console script, without paying the ~8 s of imports of a fresh process;
    for the many short bad-input checks.
    """
    from llmtune.cli import main

    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["llmtune", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def make_task(task: str, labelled: bool = True, **sections: Any) -> Any:
    """The task a recipe with these sections selects (model and data keys default to placeholders)."""
    from llmtune.recipe import build_recipe
    from llmtune.tasks import get_task

    tree: dict[str, Any] = {"task": task, "model": {"pretrained": "unused-model"}, "data": {}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    tree["data"].setdefault("files", {"train": "unused.txt"})
    return get_task(build_recipe(tree, Path.cwd()), labelled)
