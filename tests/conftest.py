"""Shared fixtures: a small synthetic corpus, tiny model directories, an isolated cache, one-thread modes.

What tests share besides fixtures (builders, CLI runners, tiny configs) is in tests/helpers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TINY_CONFIGS, make_tiny_model, synthetic_documents

os.environ["HF_HUB_OFFLINE"] = "1"


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


# --- tiny "pretrained" model directories for the fine-tuning tests --------------------------------------


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of tiny BERT, GPT-2 and T5 "checkpoints" (random weights, tokenizers trained here)."""
    root = tmp_path_factory.mktemp("tiny-models")
    extra = "Paris London Berlin John Mary Acme Corp the of in at is was what who where when 0 1 2 3 4 5 6 7 8 9"
    texts = [*synthetic_documents(300, seed=5), extra]
    return {family: make_tiny_model(family, root / family, texts) for family in TINY_CONFIGS}


@pytest.fixture(scope="module")
def one_thread_cli() -> Any:
    """One intra-op thread, in the CLI subprocesses and in this process (for the in-process CLI calls):
    tiny models gain nothing from more, and on a busy machine thread contention makes each step much slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)
