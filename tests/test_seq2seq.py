"""seq2seq unit tests: tokenisation, dotted columns, loss normalisation, generation metrics, bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.batching import pad_collator
from llmtune.data import RawData, load_raw
from llmtune.errors import UserError
from llmtune.metrics import generation_metrics
from llmtune.recipe import Recipe
from llmtune.tasks import get_task
from llmtune.tasks.base import EvalOutputs
from llmtune.tasks.generation import cut_at_eos, eos_ids
from llmtune.tasks.seq2seq import Seq2Seq, field_values

PAIRS = [
    ("the small parser returns a token", "das kleine parser gibt ein token"),
    ("a list", "eine liste"),
    ("the nested module reads the sorted frame of the shared thread", "der modul liest den rahmen"),
    ("the lazy class", "die klasse"),
]


def make_task(tmp_path: Path, model_dir: Path, labelled: bool = True, data: Any = None, **seq2seq: Any) -> Seq2Seq:
    """A seq2seq task on a tiny model, its recipe built like any other."""
    recipe = Recipe.model_validate(
        {
            "task": "seq2seq",
            "model": {"pretrained": str(model_dir)},
            "data": {"files": {"train": "x.jsonl"}, "max_length": seq2seq.pop("max_length", None), **(data or {})},
            "seq2seq": seq2seq,
            "output_dir": str(tmp_path / "run"),
        }
    )
    task = get_task(recipe, labelled)
    assert isinstance(task, Seq2Seq)
    return task


@pytest.fixture(scope="module")
def t5(tiny_models: dict[str, Path]) -> tuple[Any, Any]:
    """The tiny T5 with its LM head (tied to the embeddings) and tokenizer."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_models["t5"])).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_models["t5"]))


def raw_pairs(pairs: list[tuple[str, str]] = PAIRS) -> RawData:
    from datasets import Dataset

    ds = Dataset.from_dict({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})
    return RawData({"train": ds, "validation": ds}, fingerprint=f"unit-{len(pairs)}")


def prepared_task(tmp_path: Path, tiny_models: dict[str, Path], t5: tuple[Any, Any], **options: Any) -> Any:
    model, tokenizer = t5
    task = make_task(tmp_path, tiny_models["t5"], **options)
    task.setup(model, tokenizer)
    return task, task.prepare(raw_pairs(), tokenizer)


def test_tokenisation_applies_prefix_and_truncates(
    tmp_path: Path, tiny_models: dict[str, Path], t5: tuple[Any, Any]
) -> None:
    _, tokenizer = t5
    prefix = "the frozen list "  # words the tiny tokenizer knows
    task, prepared = prepared_task(tmp_path, tiny_models, t5, source_prefix=prefix, max_length=24, max_target_length=5)
    rows = prepared.splits["train"]
    for i, (source, target) in enumerate(PAIRS):
        row = rows[i]
        full = tokenizer(prefix + source)["input_ids"]
        assert row["input_ids"].tolist() == tokenizer(prefix + source, truncation=True, max_length=24)["input_ids"]
        assert len(row["input_ids"]) == min(len(full), 24)
        assert row["input_ids"][-1] == tokenizer.eos_token_id  # truncation keeps the EOS
        assert row["labels"].tolist() == tokenizer(text_target=target, truncation=True, max_length=5)["input_ids"]
        assert int(row["index"]) == i
    prefix_ids = tokenizer(prefix)["input_ids"][:-1]  # without its EOS
    assert all(r[: len(prefix_ids)].tolist() == prefix_ids for r in rows["input_ids"])
    assert tokenizer.decode(rows[1]["input_ids"], skip_special_tokens=True).split() == (prefix + PAIRS[1][0]).split()
    assert any(len(tokenizer(prefix + s)["input_ids"]) > 24 for s, _ in PAIRS)  # truncation was exercised
    assert any(len(tokenizer(t)["input_ids"]) > 5 for _, t in PAIRS)
    assert "token_type_ids" not in rows.column_names
    assert prepared.stats["train_target_tokens"] == sum(len(r) for r in rows["labels"])

    # The collator pads labels with -100, sources with the pad id (mask 0).
    batch = pad_collator(tokenizer.pad_token_id)([rows[1], rows[2]])
    short = len(rows[1]["labels"])
    assert (batch["labels"][0, short:] == -100).all() and (batch["labels"][0, :short] >= 0).all()
    n = len(rows[1]["input_ids"])
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["attention_mask"][0, :n] == 1).all()
    assert int(task.count_items(batch)) == short + len(rows[2]["labels"])


def test_prefix_and_target_length_are_in_the_cache_key(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    a = make_task(tmp_path, tiny_models["t5"], source_prefix="summarize: ").cache_key()
    b = make_task(tmp_path, tiny_models["t5"], source_prefix="").cache_key()
    c = make_task(tmp_path, tiny_models["t5"], source_prefix="summarize: ", max_target_length=7).cache_key()
    assert a != b and a != c


def test_dotted_columns_read_dict_fields(tmp_path: Path, tiny_models: dict[str, Path], t5: tuple[Any, Any]) -> None:
    from datasets import Dataset

    rows = [{"en": "a list", "de": "eine liste"}, {"en": "the lazy class", "de": "die klasse"}]
    assert field_values(rows, "translation.de", "data.target_column", "train") == ["eine liste", "die klasse"]
    assert field_values([{"a": {"b": 3}}], "x.a.b", "k", "train") == ["3"]
    with pytest.raises(
        UserError,
        match=r"data.source_column: 'translation' in the train split \(row 4\) has no "
        r"field 'fr' \(found: en, de\)",
    ):
        field_values(rows, "translation.fr", "data.source_column", "train", first_row=4)
    with pytest.raises(UserError, match=r"has no field 'en'.*found: str"):
        field_values(["plain text"], "translation.en", "data.source_column", "train")
    with pytest.raises(UserError, match="column 'target' is empty in the validation split \\(row 1\\)"):
        field_values(["x", None], "target", "data.target_column", "validation")

    model, tokenizer = t5
    dotted = {"source_column": "translation.en", "target_column": "translation.de"}
    task = make_task(tmp_path, tiny_models["t5"], data=dotted)
    task.setup(model, tokenizer)
    ds = Dataset.from_list([{"translation": r} for r in rows])
    prepared = task.prepare(RawData({"train": ds, "validation": ds}, "dotted"), tokenizer)
    assert prepared.splits["train"][1]["labels"].tolist() == tokenizer(text_target="die klasse")["input_ids"]
    assert prepared.splits["train"][0]["input_ids"].tolist() == tokenizer("a list")["input_ids"]

    task = make_task(tmp_path, tiny_models["t5"], data={**dotted, "target_column": "translation.ro"})
    task.setup(model, tokenizer)
    with pytest.raises(UserError, match=r"data.target_column: 'translation' in the train split .* no field 'ro'"):
        task.prepare(RawData({"train": ds, "validation": ds}, "dotted-ro"), tokenizer)


def test_loss_over_unequal_micro_batches_is_the_full_batch_mean(
    tmp_path: Path, tiny_models: dict[str, Path], t5: tuple[Any, Any]
) -> None:
    model, tokenizer = t5
    task, prepared = prepared_task(tmp_path, tiny_models, t5)
    rows = [prepared.splits["train"][i] for i in range(len(PAIRS))]
    collate = pad_collator(tokenizer.pad_token_id)
    full = collate(rows)
    with torch.no_grad():
        reference = model(**{k: full[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        micro = [collate(rows[:1]), collate(rows[1:])]  # 1 + 3 examples, different target lengths
        num_items = sum(task.count_items(b) for b in micro)
        assert int(num_items) == int((full["labels"] != -100).sum())
        ours = sum(task.loss(model, b, num_items) for b in micro)
        # the plain per-micro-batch mean would weigh the one-example batch's tokens far more
        naive = sum(task.loss(model, b, task.count_items(b)) for b in micro) / 2
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    assert abs(float(naive) - float(reference)) > 1e-4


def test_generation_metrics_match_hand_values_and_the_libraries() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    # "a b c d" against "a b c d e": every n-gram precision is 1, brevity penalty exp(1 - 5/4).
    got = generation_metrics(["a b c d"], ["a b c d e"], ["bleu"])
    assert got == {"bleu": pytest.approx(100 * math.exp(-0.25))}
    same = ["the cat sat on the mat"]
    assert generation_metrics(same, same, ["bleu", "chrf"]) == {"bleu": pytest.approx(100), "chrf": pytest.approx(100)}
    assert generation_metrics(["the cat sat"], ["the cat sat"], ["bleu"]) == {"bleu": 0.0}  # no 4-gram to match
    # ROUGE-1: 3 shared unigrams, precision 3/3, recall 3/6 -> F1 2/3.
    rouge = generation_metrics(["the cat sat"], ["the cat sat on the mat"], ["rouge"])
    assert set(rouge) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert rouge["rouge1"] == pytest.approx(200 / 3)
    assert rouge["rouge2"] == pytest.approx(100 * 2 * (2 / 2) * (2 / 5) / (1 + 2 / 5))

    predictions = ["The dog runs in the park.", "A man is cooking dinner. He smiles.", "Kids play"]
    references = ["A dog is running in a park.", "A man cooks dinner. He is smiling.", "Children are playing"]
    got = generation_metrics(predictions, references, ["bleu", "chrf", "rouge"])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    scorer = rouge_scorer.RougeScorer(["rouge2", "rougeLsum"], use_stemmer=True)
    scores = [
        scorer.score(r.replace(". ", ".\n"), p.replace(". ", ".\n"))
        for p, r in zip(predictions, references, strict=True)
    ]
    assert got["rouge2"] == pytest.approx(100 * sum(s["rouge2"].fmeasure for s in scores) / 3)
    assert got["rougeLsum"] == pytest.approx(100 * sum(s["rougeLsum"].fmeasure for s in scores) / 3)
    assert got["rougeLsum"] != pytest.approx(
        100 * sum(scorer.score(r, p)["rougeLsum"].fmeasure for p, r in zip(predictions, references, strict=True)) / 3
    )


def reported(task: Seq2Seq) -> tuple[str, ...]:
    return tuple(m.name for m in task.recipe.reported_metrics())


def test_metric_names_follow_the_recipe(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    assert reported(make_task(tmp_path, tiny_models["t5"])) == ("eval/loss", "eval/gen_len", "eval/bleu", "eval/chrf")
    names = reported(make_task(tmp_path, tiny_models["t5"], metrics=["rouge"]))
    assert names == ("eval/loss", "eval/gen_len", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/rougeLsum")


def test_metrics_score_decoded_generations_against_raw_targets_by_index(
    tmp_path: Path, tiny_models: dict[str, Path], t5: tuple[Any, Any]
) -> None:
    _, tokenizer = t5
    task, _ = prepared_task(tmp_path, tiny_models, t5, metrics=["bleu", "chrf", "rouge"])
    order = [2, 0, 3, 1]  # evaluation order is not file order
    ids = [tokenizer(text_target=PAIRS[i][1])["input_ids"] for i in order]
    width = max(len(r) for r in ids)
    outputs = EvalOutputs()
    for rows, idx in ((ids[:2], order[:2]), (ids[2:], order[2:])):  # two batches
        outputs.add(
            {
                "index": torch.tensor(idx),
                "generated": torch.tensor([r + [-100] * (width - len(r)) for r in rows]),
                "nll": torch.tensor([1.0, 3.0]),
                "tokens": torch.tensor([2.0, 6.0]),
            }
        )
    metrics = task.metrics(outputs)
    assert metrics["eval/bleu"] == pytest.approx(100.0) and metrics["eval/chrf"] == pytest.approx(100.0)
    assert metrics["eval/rouge1"] == pytest.approx(100.0)
    assert metrics["eval/loss"] == pytest.approx(8.0 / 16.0)  # token-weighted, not the mean of means
    assert metrics["eval/gen_len"] == pytest.approx(sum(len(r) for r in ids) / 4)
    assert set(metrics) == set(reported(task))

    predictions = task.predictions(outputs)
    assert [p["index"] for p in predictions] == [0, 1, 2, 3]
    assert [p["source"] for p in predictions] == [s for s, _ in PAIRS]
    assert [p["prediction"] for p in predictions] == [t for _, t in PAIRS]


def test_eval_batch_generates_within_the_budget(
    tmp_path: Path, tiny_models: dict[str, Path], t5: tuple[Any, Any]
) -> None:
    model, tokenizer = t5
    task, prepared = prepared_task(tmp_path, tiny_models, t5, num_beams=2, max_target_length=9, generation_max_length=4)
    batch = pad_collator(tokenizer.pad_token_id)([prepared.splits["validation"][i] for i in range(4)])
    with torch.no_grad():
        values = task.eval_batch(model, batch)
    assert values["generated"].shape[0] == 4 and values["generated"].shape[1] <= 4
    assert values["tokens"].tolist() == (batch["labels"] != -100).sum(dim=1).float().tolist()
    assert values["index"].tolist() == [0, 1, 2, 3]
    assert (values["generated"] != tokenizer.pad_token_id).all()  # pads are -100, the start token is dropped
    assert (values["generated"] != tokenizer.eos_token_id).all()  # the text ends before the first EOS


def test_generations_are_cut_after_the_first_eos_and_padding(t5: tuple[Any, Any]) -> None:
    model, tokenizer = t5
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generated = torch.tensor([[5, eos, eos, eos], [5, 6, pad, pad], [5, 6, 7, 8], [eos, 9, eos, pad]])
    want = [[5, -100, -100, -100], [5, 6, -100, -100], [5, 6, 7, 8], [-100, -100, -100, -100]]
    assert cut_at_eos(generated, eos_ids(model), pad).tolist() == want  # the text ends before the first EOS


def test_refuses_a_model_that_is_not_an_encoder_decoder(
    tmp_path: Path, tiny_models: dict[str, Path], t5: tuple[Any, Any]
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmtune.modeling import check_task_fits

    gpt2 = AutoModelForCausalLM.from_pretrained(str(tiny_models["gpt2"]))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["gpt2"]))
    tokenizer.pad_token = tokenizer.eos_token
    task = make_task(tmp_path, tiny_models["gpt2"])
    with pytest.raises(UserError, match="'gpt2' model is not an encoder-decoder"):
        task.setup(gpt2, tokenizer)
    # before any weights load, transformers' own model mapping refuses them for AutoModelForSeq2SeqLM
    for family in ("bert", "gpt2"):
        config = AutoConfig.from_pretrained(str(tiny_models[family]))
        with pytest.raises(UserError, match=f"a '{family}' model cannot do seq2seq"):
            check_task_fits(config, task.auto_class, task.name)
    check_task_fits(AutoConfig.from_pretrained(str(tiny_models["t5"])), task.auto_class, task.name)


def test_required_columns_and_mismatched_parallel_files(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    task = make_task(tmp_path, tiny_models["t5"])
    assert [(c.key, c.column) for c in task.required_columns()] == [
        ("data.source_column", "source"),
        ("data.target_column", "target"),
    ]
    unlabelled = make_task(tmp_path, tiny_models["t5"], labelled=False)
    assert [(c.key, c.column) for c in unlabelled.required_columns()] == [("data.source_column", "source")]

    src, tgt = tmp_path / "train.en", tmp_path / "train.de"
    src.write_text("a\nb\nc\n", encoding="utf-8")
    tgt.write_text("x\ny\n", encoding="utf-8")
    spec = task.data.model_copy(update={"files": {"train": [str(src), str(tgt)]}, "format": "parallel"})
    with pytest.raises(UserError, match=r"has 3 lines but .* has 2; parallel files must be line-aligned"):
        load_raw(spec, columns=task.required_columns())
    tgt.write_text("x\ny\nz\n", encoding="utf-8")
    raw = load_raw(spec, splits=("train",), columns=task.required_columns())
    assert raw.splits["train"]["target"] == ["x", "y", "z"]
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"source": "a", "summary": "b"}\n', encoding="utf-8")
    spec = task.data.model_copy(update={"files": {"train": str(rows)}})
    with pytest.raises(
        UserError, match=r"data.target_column: column 'target' not in the train split; columns found: source, summary"
    ):
        load_raw(spec, splits=("train",), columns=task.required_columns())
