"""`data.num_proc` reaches the tokenising `Dataset.map` of both data pipelines (pretraining token streams and
fine-tuning rows), and the parallel result equals the serial one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_task, synthetic_documents


@pytest.fixture
def recorded_maps(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    from datasets import Dataset

    calls: list[Any] = []
    original = Dataset.map

    def spy(self: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        calls.append(kwargs.get("num_proc"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "map", spy)
    return calls


def test_token_stream_uses_num_proc(tiny_models: dict[str, Path], recorded_maps: list[Any]) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from llmtune.tasks.packing import token_stream

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["gpt2"]))
    ds = Dataset.from_dict({"text": synthetic_documents(60, seed=3)})
    serial = token_stream(ds, tokenizer, "text", 0, None)
    parallel = token_stream(ds, tokenizer, "text", 0, 2)
    assert recorded_maps == [None, 2]
    assert serial.tolist() == parallel.tolist()


def test_finetune_rows_use_num_proc(tiny_models: dict[str, Path], recorded_maps: list[Any]) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    rows = {"sentence": synthetic_documents(40, seed=4), "label": [i % 2 for i in range(40)]}
    task = make_task("sequence-classification", data={"text_column": "sentence", "num_proc": 2})
    task.tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))
    task.labels.label2id = {"0": 0, "1": 1}
    task.labels.num_labels = 2
    encoded, _ = task.build_split("train", Dataset.from_dict(rows))
    assert recorded_maps == [2]
    assert len(encoded) == 40 and sorted(encoded["index"]) == list(range(40))
