"""What the tests share: synthetic data, tiny model configs (the one source of them), recipe builders, and
ways to run the real CLI (a subprocess, in process, or two ranks under `accelerate launch`).

Test modules import from here; none imports another test module. Fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"

# --- synthetic text ----------------------------------------------------------------------------------------------

NOUNS = ["parser", "module", "function", "class", "list", "string", "token", "frame", "thread", "socket"]
VERBS = ["returns", "raises", "holds", "reads", "writes", "calls", "builds", "parses", "joins", "splits"]
ADJECTIVES = ["empty", "mutable", "small", "nested", "lazy", "sorted", "encoded", "shared", "frozen", "local"]


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Documents of templated sentences: structure a tiny model can learn in a few steps."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} "
            f"{rng.choice(NOUNS)}."
            for _ in range(rng.randint(1, 6))
        ]
        docs.append(" ".join(sentences))
    return docs


# --- tiny models: the one source of their configs ------------------------------------------------------------------

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


def tiny_config(family: str, **changes: Any) -> dict[str, Any]:
    """A copy of the tiny `family` config (bert, gpt2, t5) with `changes` applied, e.g. dropout for resume tests."""
    return {**TINY_CONFIGS[family], **changes}


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


def make_task(task: str, labelled: bool = True, **sections: Any) -> Any:
    """The task a recipe with these sections selects (model and data keys default to placeholders)."""
    from llmtune.recipe import build_recipe
    from llmtune.tasks import get_task

    tree: dict[str, Any] = {"task": task, "model": {"pretrained": "unused-model"}, "data": {}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    tree["data"].setdefault("files", {"train": "unused.txt"})
    return get_task(build_recipe(tree, Path.cwd()), labelled)


def tiny_gpt2(tokenizer: Any) -> Any:
    """A randomly initialised 1-layer GPT-2 LM (context 128, no dropout) for the tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_positions=128,
        vocab_size=len(tokenizer),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return GPT2LMHeadModel(config).eval()


# --- recipes and files ------------------------------------------------------------------------------------------


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


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tsv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...] = ("sentence", "label")) -> Path:
    """A GLUE-style tab-separated file with a header row."""
    lines = ["\t".join(columns), *("\t".join(str(r[c]) for c in columns) for r in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parallel(root: Path, name: str, rows: list[tuple[str, str]]) -> list[str]:
    """`name.src` / `name.tgt`, line-aligned."""
    src, tgt = root / f"{name}.src", root / f"{name}.tgt"
    src.write_text("".join(s + "\n" for s, _ in rows), encoding="utf-8")
    tgt.write_text("".join(t + "\n" for _, t in rows), encoding="utf-8")
    return [str(src), str(tgt)]


# instruction tuning: prompts naming an (adjective, noun), the response is the noun's verb
VERB_OF = dict(zip(NOUNS, VERBS, strict=True))  # the mapping to learn: noun -> verb


def instruction_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Prompts naming an (adjective, noun); the response is the noun's verb."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun = rng.choice(NOUNS)
        rows.append({"prompt": f"the {rng.choice(ADJECTIVES)} {noun}", "response": VERB_OF[noun]})
    return rows


def instruction_recipe(model: Path, root: Path, out: Path, **data: Any) -> dict[str, Any]:
    """A prompt/response recipe on the tiny GPT-2 checkpoint."""
    return {
        "task": "causal-lm",
        "model": {"pretrained": str(model)},
        "data": {
            "files": {"train": str(root / "train.jsonl"), "validation": str(root / "valid.jsonl")},
            "prompt_column": "prompt",
            "response_column": "response",
            "max_length": 64,
            **data,
        },
        "instruction": {"max_new_tokens": 6},
        "train": {
            "max_steps": 40,
            "batch_size": 8,
            "lr": 5e-3,
            "log_every": 5,
            "eval_every": 20,
            "seed": 0,
            "schedule": {"kind": "constant", "warmup_steps": 0},
        },
        "output_dir": str(out),
    }


# seq2seq: a toy "language" in which each word translates to a fixed other word, in place (a tiny T5 learns it
# within a few dozen steps)
WORDS = ["parser", "module", "function", "class", "list", "string", "token", "frame", "thread", "socket"]
LEXICON = {w: WORDS[(i + 3) % len(WORDS)] for i, w in enumerate(WORDS)}
SEQ2SEQ = {"num_beams": 2, "max_target_length": 16, "metrics": ["bleu", "chrf", "rouge"]}


def translation_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentences of 2-3 words and their word-by-word translations."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 3))]
        out.append((" ".join(words), " ".join(LEXICON[w] for w in words)))
    return out


def seq2seq_recipe(model: Path, data: dict[str, Any], out: Path, **train_keys: Any) -> dict[str, Any]:
    """A few dozen steps of seq2seq on the tiny T5."""
    return {
        "task": "seq2seq",
        "model": {"pretrained": str(model)},
        "data": data,
        "seq2seq": dict(SEQ2SEQ),
        "train": {
            "max_steps": 80,
            "batch_size": 16,
            "lr": 1e-2,
            "log_every": 5,
            "eval_every": 40,
            "seed": 0,
            "schedule": {"kind": "linear", "warmup_steps": 5},
            **train_keys,
        },
        "output_dir": str(out),
    }


# sequence classification: the label is decided by the noun a sentence contains
POSITIVE = ["parser", "module", "function", "class", "list"]
NEGATIVE = ["string", "token", "frame", "thread", "socket"]


def sentiment_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Sentences whose label is decided by the noun they contain: learnable by a tiny model in a few steps.

    The number of adjectives varies independently of the label, so that length-grouped batches (which
    sort by length) still mix both labels: if length gave the label away, every batch would hold one class.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        noun = rng.choice(POSITIVE if positive else NEGATIVE)
        adjectives = " ".join(rng.choices(["empty", "small", "nested", "lazy", "sorted"], k=rng.randint(0, 4)))
        sentence = f"The {adjectives} {noun} returns a value.".replace("  ", " ")
        rows.append({"sentence": sentence, "label": "pos" if positive else "neg"})
    return rows


def classification_recipe(model: Path, train: Path, valid: Path, out: Path, **train_keys: Any) -> dict[str, Any]:
    """A few dozen steps of sequence classification on the tiny checkpoint."""
    return {
        "task": "sequence-classification",
        "model": {"pretrained": str(model)},
        "data": {"files": {"train": str(train), "validation": str(valid)}, "text_column": "sentence"},
        "train": {
            "max_steps": 40,
            "batch_size": 16,
            "lr": 1e-2,
            "log_every": 5,
            "seed": 0,
            "schedule": {"kind": "constant", "warmup_steps": 2},
            **train_keys,
        },
        "output_dir": str(out),
    }


# token classification: templated sentences whose entities a tiny model learns in a few dozen steps
PEOPLE = [["John"], ["Mary"], ["John", "Smith"], ["Mary", "Jones"]]
PLACES = [["Paris"], ["London"], ["Berlin"], ["New", "York"]]
ORGS = [["Acme", "Corp"], ["Acme"], ["Globex", "Inc"]]
NER_NOUNS = ["parser", "module", "function", "thread", "socket"]


def _entity(words: list[str], kind: str) -> list[tuple[str, str]]:
    return [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]


def ner_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Templated sentences whose entities a tiny model learns in a few dozen steps (IOB2 tags)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        person, place, org = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(ORGS)
        form = rng.randrange(3)
        if form == 0:
            words = [*_entity(person, "PER"), ("lives", "O"), ("in", "O"), *_entity(place, "LOC"), (".", "O")]
        elif form == 1:
            words = [*_entity(person, "PER"), ("works", "O"), ("at", "O"), *_entity(org, "ORG")]
            words += [("in", "O"), *_entity(place, "LOC")]
        else:
            words = [("the", "O"), (rng.choice(NER_NOUNS), "O"), ("of", "O"), *_entity(org, "ORG")]
            words += [("calls", "O"), *_entity(person, "PER")]
        sentences.append(words)
    return sentences


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    """CoNLL columns (word, a dummy POS column, tag), a blank line between sentences."""
    blocks = ["\n".join(f"{w} X {t}" for w, t in s) for s in sentences]
    path.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def ner_recipe(model: Path, train: Path, valid: Path, out: Path, **train_keys: Any) -> dict[str, Any]:
    """A few dozen steps of token classification on a tiny checkpoint."""
    return {
        "task": "token-classification",
        "model": {"pretrained": str(model)},
        "data": {"files": {"train": str(train), "validation": str(valid)}},
        "train": {
            "max_steps": 40,
            "batch_size": 16,
            "lr": 3e-3,
            "log_every": 5,
            "seed": 0,
            "schedule": {"kind": "linear", "warmup_steps": 2},
            **train_keys,
        },
        "output_dir": str(out),
    }


# question answering: a name's sentence inside a context long enough for several windows
NAMES = ["John", "Mary", "Paris", "London", "Berlin"]
THINGS = ["parser", "module", "function", "class", "list", "string", "token", "frame", "thread", "socket"]


def qa_examples(n: int, seed: int) -> list[dict[str, Any]]:
    """Questions whose answer (a name) sits in one sentence of a context long enough for several windows."""
    rng = random.Random(seed)
    fillers = [s.strip() + "." for d in synthetic_documents(200, seed=seed + 10) for s in d.split(".") if s.strip()]
    examples = []
    for i in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        sentences = rng.sample(fillers, 7)
        sentences.insert(rng.randint(0, 7), f"{name} holds the shared {thing}.")
        context = " ".join(sentences)
        examples.append(
            {
                "id": f"q{seed}-{i}",
                "question": f"Who holds the shared {thing}?",
                "context": context,
                "answer": name,
                "answer_start": context.index(f"{name} holds"),
            }
        )
    return examples


def write_squad(path: Path, examples: list[dict[str, Any]]) -> Path:
    """A SQuAD v1.1 json file: one paragraph per question."""
    paragraphs = [
        {
            "context": e["context"],
            "qas": [
                {
                    "id": e["id"],
                    "question": e["question"],
                    "answers": [{"text": e["answer"], "answer_start": e["answer_start"]}],
                }
            ],
        }
        for e in examples
    ]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}), "utf-8")
    return path


def qa_recipe(model: Path, train: Path, valid: Path, out: Path) -> dict[str, Any]:
    """Short windows (48 tokens, stride 16) so every context spans several of them."""
    return {
        "task": "question-answering",
        "model": {"pretrained": str(model)},
        "data": {"files": {"train": str(train), "validation": str(valid)}, "format": "squad", "max_length": 48},
        "question_answering": {"doc_stride": 16, "max_answer_length": 8},
        "train": {
            "max_steps": 16,
            "batch_size": 16,
            "lr": 5e-3,
            "log_every": 4,
            "eval_every": 8,
            "seed": 0,
            "schedule": {"kind": "constant", "warmup_steps": 2},
        },
        "output_dir": str(out),
    }


# --- running the CLI ----------------------------------------------------------------------------------------------


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


def launch_two_ranks(*args: str, port: int, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`accelerate launch --multi_gpu --num_processes 2 -m llmtune ARGS`: two gloo ranks on this CPU (plain
    `--num_processes 2` quietly runs one process here)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), "-m", "llmtune", *args]
    return subprocess.run(
        launch, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False
    )


def run_interrupted(recipe: Path, run_dir: Path, after_step: int = 12, command: str = "pretrain") -> int:
    """Start `llmtune COMMAND` (pretrain), SIGTERM it once `after_step` is logged; return the last logged step."""

    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtune", command, str(recipe)],
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


# --- reading what a run wrote --------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_tensors(path: Path) -> dict[str, Any]:
    """All tensors of a safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a_file: Path, b_file: Path) -> None:
    """Two safetensors files hold bit-identical tensors."""
    import torch

    a, b = load_tensors(a_file), load_tensors(b_file)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- a real server on loopback ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """`llmtune serve MODEL` in a subprocess on a free loopback port, ready once /health answers 200."""

    def __init__(self, model: Path, *args: str, log: Path) -> None:
        import httpx

        self.port = free_port()
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "llmtune", "serve", str(model), "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()[-3000:]
            try:
                health = self.client.get("/health")
                if health.status_code == 200:
                    return
                assert health.json()["status"] == "loading", health.text
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become healthy: " + log.read_text()[-3000:])

    def post(self, path: str, body: Any, **headers: str) -> Any:
        """POST a JSON body; the httpx response."""
        return self.client.post(path, json=body, headers=headers)

    def stop(self) -> int:
        """SIGTERM, as a process manager stops it; its exit code."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        self.client.close()
        return code
