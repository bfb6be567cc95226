"""The model card in every final/ (and in an export): it parses with huggingface_hub, its model-index carries the
run's final metrics, and it says how the model was trained and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    classification_recipe,
    run_cli_in_process,
    sentiment_rows,
    tiny_recipe,
    write_recipe,
    write_tsv,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_cli")]


@pytest.fixture(scope="module")
def runs(
    tiny_models: dict[str, Path], corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A tiny fine-tune (with an `expect:` band met and one missed), a tiny LoRA fine-tune and a tiny pretrain."""
    from _pytest.capture import CaptureFixture, SysCapture

    root = tmp_path_factory.mktemp("card-runs")
    # The tiny "pretrained" model states a licence in its own card, as a hub model does.
    (tiny_models["bert"] / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n", encoding="utf-8")
    capsys = CaptureFixture(SysCapture, None, _ispytest=True)  # type: ignore[arg-type]
    capsys._start()
    try:
        train = write_tsv(root / "train.tsv", sentiment_rows(200, 1))
        valid = write_tsv(root / "dev.tsv", sentiment_rows(32, 2))
        cls = classification_recipe(tiny_models["bert"], train, valid, root / "cls", max_steps=12)
        cls["expect"] = {"eval/loss": {"max": 100.0}, "eval/accuracy": {"min": 1.01}}  # one met, one missed
        lora = classification_recipe(tiny_models["bert"], train, valid, root / "lora", max_steps=2)
        lora["strategy"] = {"kind": "lora", "r": 2, "target_modules": ["query", "value"]}
        lm = tiny_recipe(corpus, root / "lm", train={"max_steps": 6, "log_every": 3})
        done = {}
        for name, recipe, command, code in (
            ("cls", cls, "finetune", 1),
            ("lora", lora, "finetune", 0),
            ("lm", lm, "pretrain", 0),
        ):
            got, _, err = run_cli_in_process(capsys, command, str(write_recipe(root / f"{name}.yaml", recipe)))
            assert got == code, err[-2000:]
            done[name] = Path(recipe["output_dir"])
        return done
    finally:
        capsys.close()
        (tiny_models["bert"] / "README.md").unlink()


def _index(card: Any) -> dict[str, float]:
    """metric name -> value, as the hub reads them from the card's model-index."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name
    return {r.metric_name: r.metric_value for r in results}


def test_finetune_card_parses_and_carries_the_metrics(runs: dict[str, Path]) -> None:
    from huggingface_hub import ModelCard

    final = runs["cls"] / "final"
    card = ModelCard.load(final / "README.md")
    metrics = json.loads((runs["cls"] / "final_metrics.json").read_text())
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.license == "mit"  # read from the base model's own card
    assert data.base_model is None  # a local directory is no hub id; the text names it
    assert data.datasets == ["train.tsv", "dev.tsv"]
    assert "llmtune" in data.tags and "sequence-classification" in data.tags
    index = _index(card)
    assert set(index) == {k for k in metrics if k != "eval/tokens"}
    for key, value in index.items():
        assert value == pytest.approx(metrics[key], abs=1e-6), key
    text = card.text
    assert "| steps | 12 of 12 planned" in text and "| learning rate | 0.01 |" in text
    assert "16 per device x 1 accumulation x 1 device(s) = 16" in text
    assert "| precision | fp32 |" in text and "**Wall time:**" in text and "cpu" in text
    assert "| eval/loss | <= 100 |" in text and "| met |" in text
    assert "| eval/accuracy | >= 1.01 |" in text and "| missed |" in text
    assert f'AutoModelForSequenceClassification.from_pretrained("{final}")' in text
    assert f"llmtune serve {runs['cls']}" in text and "## Limitations" in text

    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(str(final))  # the card sits beside a loadable model


def test_pretrain_card(runs: dict[str, Path]) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(runs["lm"] / "final" / "README.md")
    metrics = json.loads((runs["lm"] / "final_metrics.json").read_text())
    assert card.data.pipeline_tag == "text-generation" and card.data.license is None and card.data.base_model is None
    index = _index(card)
    assert index["eval/perplexity"] == pytest.approx(metrics["eval/perplexity"], abs=1e-6)
    assert "eval/tokens" not in index  # a count, not a quality
    assert "trained from scratch" in card.text and "trained: byte-level-bpe, 400 tokens" in card.text
    assert "llmtune generate" in card.text


def test_adapter_card_says_how_to_load_it_with_peft(runs: dict[str, Path]) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(runs["lora"] / "final" / "README.md")
    assert card.data.library_name == "peft"
    assert "PeftModel.from_pretrained(base" in card.text and "lora" in card.text
    status = json.loads((runs["lora"] / "run_status.json").read_text())
    assert status["status"] == "finished" and status["step"] == status["total_steps"] == 2


def test_export_updates_the_card(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "pruned"
    code, _, err = run_cli_in_process(capsys, "export", str(runs["cls"]), "--prune", "0.5", "--output", str(out))
    assert code == 1, err  # the missed band is missed by the export too
    report = json.loads((out / "export_report.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert "prune" in card.data.tags
    index = _index(card)
    assert index["eval/accuracy"] == pytest.approx(report["export"]["metrics"]["eval/accuracy"], abs=1e-6)
    assert "## Export" in card.text and "**prune** (" in card.text and "amount 0.5" in card.text
    assert card.data.license == "mit"  # kept from the run's card
    assert f"{report['source']['parameters']:,}" in card.text and f"{report['export']['parameters']:,}" in card.text
    assert f'from_pretrained("{out}")' in card.text and f"llmtune eval {out}" in card.text
