"""End to end through the real CLI: parameter-efficient fine-tuning on every task family.

LoRA on a BERT classifier, a T5 seq2seq model and a GPT-2 instruction model: what the run log says, what
`final/` holds (adapter and head weights alone), `eval` on the run, `export --merge` to a standalone model
that plain transformers loads with the same outputs, `generate` on an adapter run; LoRA with gradient
checkpointing and with bf16; and the refusals (one line, exit 2, nothing written).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import (
    classification_recipe,
    instruction_pairs,
    instruction_recipe,
    load_tensors,
    read_metrics,
    run_cli,
    run_cli_in_process,
    sentiment_rows,
    seq2seq_recipe,
    tiny_config,
    translation_pairs,
    write_jsonl,
    write_parallel,
    write_recipe,
    write_tsv,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_cli")]

LORA = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}
SENTENCES = ["The small parser returns a value.", "The lazy socket returns a value.", "The list returns a value."]


@pytest.fixture(scope="module")
def sst(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sentence-classification data: the label is decided by the sentence's noun."""
    root = tmp_path_factory.mktemp("sst")
    return {
        "train": write_tsv(root / "train.tsv", sentiment_rows(160, seed=1)),
        "valid": write_tsv(root / "dev.tsv", sentiment_rows(32, seed=2)),
        "root": root,
    }


def _bert_recipe(
    tiny_models: dict[str, Path], sst: dict[str, Path], out: Path, strategy: dict[str, Any], **train: Any
) -> dict[str, Any]:
    """The sentence-classification recipe on the tiny BERT with `strategy`."""
    recipe = classification_recipe(tiny_models["bert"], sst["train"], sst["valid"], out, **train)
    recipe["strategy"] = strategy
    return recipe


def _finetune_in_process(capsys: pytest.CaptureFixture[str], recipe: dict[str, Any], path: Path) -> tuple[str, str]:
    code, out, err = run_cli_in_process(capsys, "finetune", str(write_recipe(path, recipe)))
    assert code == 0, err[-3000:]
    return out, err


def _eval_reproduces_final_metrics(capsys: pytest.CaptureFixture[str], run: Path, *args: str) -> None:
    """`llmtune eval RUN --json` (base + adapter loaded from final/) gives the end-of-training numbers."""
    code, stdout, err = run_cli_in_process(capsys, "eval", str(run), "--json", *args)
    assert code == 0, err[-3000:]
    metrics = json.loads(stdout)["metrics"]
    final = json.loads((run / "final_metrics.json").read_text())
    assert metrics.keys() == final.keys()
    for key, value in final.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI in this process; it must exit 2 with one error line and no traceback. Returns the line."""
    code, _, err = run_cli_in_process(capsys, *args)
    assert code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _adapter_only(final: Path) -> dict[str, torch.Tensor]:
    """final/ holds adapter weights (and the fine-tuned config), not a whole model; returns the weights."""
    names = {p.name for p in final.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "llmtune_strategy.json", "config.json"} <= names
    assert "model.safetensors" not in names and "pytorch_model.bin" not in names
    return load_tensors(final / "adapter_model.safetensors")


# --- LoRA sequence classification on the tiny BERT --------------------------------------------------------


@pytest.fixture(scope="module")
def lora_cls(
    sst: dict[str, Path], tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """One LoRA classification run (head at its own learning rate) shared by the checks below."""
    out = tmp_path_factory.mktemp("lora-cls") / "run"
    recipe = _bert_recipe(tiny_models, sst, out, LORA, max_steps=60, log_every=10, save_every=60, lr=2e-2, head_lr=5e-2)
    done = run_cli("finetune", str(write_recipe(out.parent / "r.yaml", recipe)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return out, done.stdout


def test_lora_run_logs_its_strategy_and_saves_the_adapter_alone(
    lora_cls: tuple[Path, str], tiny_models: dict[str, Path]
) -> None:
    out, stdout = lora_cls
    match = re.search(r"model: bert, ([\d,]+) parameters \(([\d,]+) trainable, ([\d.]+)%\) \| strategy: lora", stdout)
    assert match, stdout
    total, trainable = (int(match.group(i).replace(",", "")) for i in (1, 2))
    # LoRA r=4 on query and value of 2 layers (each A: 4x32, B: 32x4) + the classifier (32x2 + 2)
    assert trainable == 2 * 2 * (4 * 32 + 32 * 4) + 32 * 2 + 2
    info = json.loads((out / "final" / "llmtune_strategy.json").read_text())
    assert info["kind"] == "lora" and info["base"] == str(tiny_models["bert"])
    assert (info["total_parameters"], info["trainable_parameters"]) == (total, trainable)
    env = json.loads((out / "environment.json").read_text())
    assert env["parameters"] == {"strategy": "lora", "total": total, "trainable": trainable}

    weights = _adapter_only(out / "final")
    assert all("lora_" in name or "classifier" in name for name in weights), sorted(weights)
    assert any("lora_B" in name and bool(t.abs().sum() > 0) for name, t in weights.items())  # LoRA trained
    adapter_bytes = (out / "final" / "adapter_model.safetensors").stat().st_size
    assert info["adapter_bytes"] == adapter_bytes
    assert adapter_bytes * 10 < (tiny_models["bert"] / "model.safetensors").stat().st_size
    assert f"adapter and head weights alone: {adapter_bytes / 1024:,.0f} KiB" in stdout

    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]  # measured: 0.70 -> 0.06
    assert json.loads((out / "final_metrics.json").read_text())["eval/accuracy"] >= 0.8  # measured: 1.0
    # the optimizer holds the trainable parameters alone: the LoRA matrices at train.lr, the head at head_lr
    optimizer = torch.load(out / "checkpoints" / "step-0000060" / "optimizer.bin", weights_only=True)
    groups = sorted((g["lr"], len(g["params"])) for g in optimizer["param_groups"] if g["params"])
    assert sum(n for _, n in groups) == len(optimizer["state"]) == 2 * 2 * 2 + 2
    assert {lr for lr, _ in groups} == {2e-2, 5e-2}
    assert sum(n for lr, n in groups if lr == 5e-2) == 2  # classifier weight and bias


def test_eval_of_a_lora_run_reproduces_its_final_metrics(
    lora_cls: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = lora_cls
    assert "eval/accuracy" in json.loads((out / "final_metrics.json").read_text())
    _eval_reproduces_final_metrics(capsys, out, "--batch-size", "5")


def test_export_merge_writes_a_plain_model_with_the_same_outputs(
    lora_cls: tuple[Path, str], sst: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmtune.modeling import load_for_inference

    out, _ = lora_cls
    target = out.parent / "merged"
    code, stdout, err = run_cli_in_process(capsys, "export", str(out), "--merge", "--output", str(target))
    assert code == 0, err[-3000:]
    assert f"exported to {target}" in stdout
    names = {p.name for p in target.iterdir()}
    assert "model.safetensors" in names and not any("adapter" in n or n == "llmtune_strategy.json" for n in names)

    merged = AutoModelForSequenceClassification.from_pretrained(str(target)).eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted, _ = load_for_inference(str(out / "final"), "AutoModelForSequenceClassification", "sequence-classification")
    adapted.eval()
    batch = AutoTokenizer.from_pretrained(str(target))(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = adapted(**batch).logits, merged(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the outputs depend on the input

    # llmtune eval on the exported directory (a plain model dir, no run) gives the run's numbers
    code, stdout, err = run_cli_in_process(
        capsys,
        "eval",
        str(target),
        "--task",
        "sequence-classification",
        "--data",
        str(sst["valid"]),
        "--text-column",
        "sentence",
        "--json",
    )
    assert code == 0, err[-3000:]
    metrics = json.loads(stdout)["metrics"]
    final = json.loads((out / "final_metrics.json").read_text())
    assert metrics.keys() == final.keys()
    for key, value in final.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key

    # exporting again to the same place is refused rather than overwriting
    assert "already exists" in _refused(capsys, "export", str(out), "--merge", "--output", str(target))
    # an adapter run exported without --merge says what to pass
    assert "--merge" in _refused(capsys, "export", str(out))
    assert not (out / "export").exists()


# --- LoRA on seq2seq (T5) and causal LM (GPT-2): train, adapter-only save, merge ---------------------------


def _merged_matches(
    capsys: pytest.CaptureFixture[str], run: Path, auto_class: str, task: str, batch: dict[str, torch.Tensor]
) -> Path:
    """`llmtune export RUN --merge` (default target RUN/export) loads with plain transformers and gives the
    adapter model's logits on `batch`."""
    import transformers

    from llmtune.modeling import load_for_inference

    code, _, err = run_cli_in_process(capsys, "export", str(run), "--merge")
    assert code == 0, err[-3000:]
    target = run / "export"
    merged = getattr(transformers, auto_class).from_pretrained(str(target)).eval()
    adapted, _ = load_for_inference(str(run / "final"), auto_class, task)
    adapted.eval()
    with torch.no_grad():
        expected, got = adapted(**batch).logits, merged(**batch).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    return target


def test_seq2seq_lora_trains_saves_the_adapter_and_merges(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("mt-lora")
    files = {
        "files": {
            "train": write_parallel(root, "train", translation_pairs(160, seed=1)),
            "validation": write_parallel(root, "valid", translation_pairs(8, seed=2)),
        },
        "format": "parallel",
    }
    out = root / "run"
    recipe = seq2seq_recipe(tiny_models["t5"], files, out, max_steps=20, eval_every=20)
    recipe["seq2seq"] = {"num_beams": 1, "max_target_length": 8, "metrics": ["chrf"]}
    recipe["strategy"] = {"kind": "lora", "r": 4}  # peft's default T5 targets: q, v
    done = run_cli("finetune", str(write_recipe(root / "r.yaml", recipe)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "strategy: lora" in done.stdout
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert losses[-1] < losses[0]
    weights = _adapter_only(out / "final")
    assert weights and all("lora_" in name for name in weights), sorted(weights)  # tied LM head: no head saved
    assert {name.split(".")[-3] for name in weights} == {"q", "v"}  # e.g. ...SelfAttention.q.lora_A.weight
    _eval_reproduces_final_metrics(capsys, out)  # generation with the adapter loaded back on the base

    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    batch = dict(tok(["parser module", "thread list socket"], return_tensors="pt", padding=True))
    batch["decoder_input_ids"] = tok(["frame class", "list token"], return_tensors="pt", padding=True)["input_ids"]
    _merged_matches(capsys, out, "AutoModelForSeq2SeqLM", "seq2seq", batch)


@pytest.fixture(scope="module")
def gpt2_lora(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA instruction-tuning run on the tiny GPT-2 (peft's default target: c_attn)."""
    root = tmp_path_factory.mktemp("gpt2-lora")
    write_jsonl(root / "train.jsonl", instruction_pairs(120, seed=1))
    write_jsonl(root / "valid.jsonl", instruction_pairs(8, seed=2))
    out = root / "run"
    recipe = instruction_recipe(tiny_models["gpt2"], root, out)
    recipe["train"].update(max_steps=20, eval_every=20, lr=1e-2)
    recipe["strategy"] = {"kind": "lora", "r": 4}
    done = run_cli("finetune", str(write_recipe(root / "r.yaml", recipe)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "strategy: lora" in done.stdout
    return out


def test_causal_lm_lora_trains_saves_the_adapter_and_merges(
    gpt2_lora: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    losses = [r["train/loss"] for r in read_metrics(gpt2_lora) if "train/loss" in r]
    assert losses[-1] < losses[0]
    weights = _adapter_only(gpt2_lora / "final")
    assert weights and all("lora_" in name and ".c_attn." in name for name in weights), sorted(weights)
    _eval_reproduces_final_metrics(capsys, gpt2_lora)
    tok = AutoTokenizer.from_pretrained(str(gpt2_lora / "final"))
    batch = dict(tok(["### Instruction:\nthe lazy parser\n\n### Response:\n"], return_tensors="pt"))
    _merged_matches(capsys, gpt2_lora, "AutoModelForCausalLM", "causal-lm", batch)


def test_generate_on_a_lora_run_matches_its_merged_export(gpt2_lora: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "### Instruction:\nthe small socket\n\n### Response:\n"
    args = ("--prompt", prompt, "--max-new-tokens", "6")
    code, adapted, err = run_cli_in_process(capsys, "generate", str(gpt2_lora), *args)
    assert code == 0, err[-3000:]
    assert adapted.startswith(prompt) and len(adapted) > len(prompt) + 1
    if not (gpt2_lora / "export").exists():  # the merge test exports it; run alone, export here
        assert run_cli_in_process(capsys, "export", str(gpt2_lora), "--merge")[0] == 0
    code, merged, err = run_cli_in_process(capsys, "generate", str(gpt2_lora / "export"), *args)
    assert code == 0, err[-3000:]
    assert merged == adapted  # greedy decoding: the base + adapter and the merged model agree


# --- combinations -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "log"),
    [({"gradient_checkpointing": True}, None), ({"precision": "bf16", "max_steps": 2}, "warning: bf16 on a CPU")],
    ids=["gradient-checkpointing", "bf16"],
)
def test_lora_trains_with(
    train: dict[str, Any],
    log: str | None,
    sst: dict[str, Path],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from llmtune.run import has_accelerator

    if log is not None and has_accelerator():
        log = None  # on a GPU bf16 is native: no warning
    from accelerate.state import AcceleratorState

    out = tmp_path / "run"
    recipe = _bert_recipe(tiny_models, sst, out, LORA, **{"max_steps": 4, "log_every": 1, **train})
    # accelerate's state is one per process: its mixed precision is fixed by the first Accelerator made in
    # it, so this in-process run starts from a fresh state (as a new `llmtune` process would) and leaves one.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        stdout, _ = _finetune_in_process(capsys, recipe, tmp_path / "r.yaml")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "strategy: lora" in stdout
    if log is not None:
        assert log in stdout
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses) == recipe["train"]["max_steps"] and all(loss == loss and loss > 0 for loss in losses)
    weights = _adapter_only(out / "final")
    # LoRA's B matrices start at zero: non-zero ones mean gradients reached the adapters through the
    # checkpointed (recomputed) blocks / the bf16 autocast
    trained = [name for name, t in weights.items() if "lora_B" in name and bool(t.abs().sum() > 0)]
    assert len(trained) == 4, sorted(weights)


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy", [{"kind": "prompt", "num_virtual_tokens": 4}, {"kind": "adapter"}], ids=["prompt", "bottleneck-adapter"]
)
def test_export_merge_refuses_what_cannot_merge(
    strategy: dict[str, Any],
    sst: dict[str, Path],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    recipe = _bert_recipe(tiny_models, sst, out, strategy, max_steps=2, log_every=1)
    _finetune_in_process(capsys, recipe, tmp_path / "r.yaml")
    assert json.loads((out / "final" / "llmtune_strategy.json").read_text())["kind"] == strategy["kind"]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    line = _refused(capsys, "export", str(out), "--merge")
    assert f"export --merge: a '{strategy['kind']}' model cannot be merged" in line, line
    assert "only lora, adalora, ia3" in line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (
            {"kind": "lora", "target_modules": ["query", "c_attn"]},
            r"strategy\.target_modules: no module 'c_attn' in this bert model; candidates: .*\bquery\b.*\bvalue\b",
        ),
        ({"kind": "top_k", "k": 3}, r"strategy\.k: 3 is more than the model's 2 blocks"),
        ({"kind": "prefix"}, r"strategy\.kind: .*prefix.*use prompt or lora"),
        ({"kind": "lora", "k": 2}, r"strategy\.k applies to kind top_k, not lora"),
        ({"kind": "adapter", "from_scratch": True}, r"strategy\.kind: adapter .*model\.from_scratch"),
    ],
    ids=["unknown-target", "k-too-large", "prefix-on-classifier", "key-of-another-kind", "adapter-from-scratch"],
)
def test_bad_strategy_is_one_line_and_writes_nothing(
    strategy: dict[str, Any],
    message: str,
    sst: dict[str, Path],
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    strategy = dict(strategy)
    out = tmp_path / "out"
    recipe = _bert_recipe(tiny_models, sst, out, strategy, max_steps=2)
    if strategy.pop("from_scratch", False):
        recipe["model"] = {"from_scratch": tiny_config("bert")}
        recipe["tokenizer"] = {"pretrained": str(tiny_models["bert"])}
    line = _refused(capsys, "finetune", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert re.search(message, line), line
    assert not out.exists()
