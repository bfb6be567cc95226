"""Using a trained model: `eval` (metrics, predictions), `predict`, `generate` and `export`."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.errors import UserError
from llmtune.recipe import Recipe, load_recipe
from llmtune.run import has_accelerator, quiet_libraries


@dataclass
class ModelRef:
    """What MODEL on the command line named: the model to load and, for a run directory, its recipe."""

    model: str
    run_dir: Path | None
    recipe: Recipe | None


def resolve_model(name: str) -> ModelRef:
    """A run directory (its final/), a model directory, or a hub id."""
    path = Path(name)
    if (path / "recipe.resolved.yaml").is_file():
        if not (path / "final").is_dir():
            raise UserError(f"{name}: the run has no final/ model yet; finish it with llmtune pretrain --resume")
        return ModelRef(str(path / "final"), path, load_recipe(path / "recipe.resolved.yaml"))
    return ModelRef(name, None, None)


def _eval_recipe(
    ref: ModelRef,
    data: str | None,
    split: str,
    data_config: str | None,
    task_name: str | None,
    overrides: list[str],
) -> Recipe:
    """The recipe `eval` / `predict` run by: the run's own (model = its final/), or one made from the flags.

    `--set` overrides apply to it like to a training recipe (e.g. --set data.label_column=sentiment).
    """
    from llmtune.recipe import TASK_SECTIONS, build_recipe

    if ref.recipe is not None:
        tree = ref.recipe.model_dump(mode="json", exclude={"expect", "tracking"})
        if task_name is not None and task_name != tree["task"]:
            tree["task"] = task_name
            for key in TASK_SECTIONS:
                tree.pop(key, None)
        tree["tokenizer"] = {}
    else:
        tree = {"task": task_name or "causal-lm", "data": {}, "train": {"seed": 0}}  # eval masks: seed 0
    tree["model"] = {
        "pretrained": ref.model,
        "trust_remote_code": tree.get("model", {}).get("trust_remote_code", False),
    }
    if data is not None:
        spec = tree["data"]
        trained_on = [
            Path(p).suffix for ps in (spec.get("files") or {}).values() for p in ([ps] if isinstance(ps, str) else ps)
        ]
        keep_format = spec.get("format") is not None and Path(data).suffix in trained_on  # e.g. squad json
        for key in ("source", "hub", "hub_config", "files", "revision", *([] if keep_format else ["format"])):
            spec.pop(key, None)
        is_file = Path(data).exists() or Path(data).suffix.lower() in FILE_SUFFIXES
        if is_file:
            spec["files"] = {split: str(Path(data).resolve())}
        else:
            spec.update(hub=data, hub_config=data_config)
        spec["validation_split"] = split
    elif ref.recipe is None:
        raise UserError("--data is needed when MODEL is not a run directory (a file path or a hub dataset name)")
    return build_recipe(tree, Path.cwd(), overrides, source="eval")


FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".conll")


def evaluate_model(
    model_name: str,
    data: str | None,
    split: str,
    data_config: str | None,
    block_size: int | None,
    stride: int | None,
    batch_size: int,
    task_name: str | None,
    output: str | None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    predictions: str | None = None,
    labelled: bool = True,
) -> dict[str, Any] | None:
    """`llmtune eval` / `predict`: a saved model's metrics (and per-example predictions) on a dataset.

    By default the data is the run's validation split; `--data` names a file or hub dataset. Under
    several processes every rank evaluates its share; only the main process gets the result (others None).
    """
    ref = resolve_model(model_name)
    quiet_libraries()
    recipe = _eval_recipe(ref, data, split, data_config, task_name, list(overrides or []))
    from llmtune.data import load_raw
    from llmtune.evaluation import collect
    from llmtune.modeling import context_length, load_for_inference
    from llmtune.tasks import get_task

    task = get_task(recipe.task, recipe)
    if seed is not None:
        task.seed = seed  # masks / spans of masked-lm and span-corruption evaluation
    if not labelled:
        if not hasattr(task, "predictions"):
            raise UserError(f"predict: {task.name} gives no per-example predictions; use llmtune eval or generate")
        task.labelled = False
    if predictions is not None and not hasattr(task, "predictions"):
        raise UserError(f"--predictions: {task.name} gives no per-example predictions")
    model, tokenizer = load_for_inference(
        ref.model, task.auto_class, task.name, recipe.model.trust_remote_code, recipe.strategy
    )
    spec = recipe.data
    if block_size is not None:
        spec.block_size = block_size
    elif ref.recipe is None:
        spec.block_size = min(context_length(model.config) or 1024, 1024)
    spec.eval_stride = stride
    spec = type(spec).model_validate(spec.model_dump())  # re-check stride <= block size
    task.setup(spec, model, tokenizer)
    # carved off train exactly as training did, if need be
    raw = load_raw(spec, splits=("validation",), columns=task.required_columns(spec))
    prepared = task.prepare(raw, tokenizer, spec)

    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from llmtune.batching import longest_first

    accelerator = Accelerator(cpu=not has_accelerator())
    collate = task.collator(tokenizer)
    lengths = prepared.lengths.get("validation")
    loader = DataLoader(
        prepared.splits["validation"],
        batch_size=batch_size,
        shuffle=False,
        **({"collate_fn": collate} if collate else {}),
        **({"sampler": longest_first(lengths)} if lengths else {}),
    )
    model, loader = accelerator.prepare(model, loader)
    outputs = collect(accelerator, model, loader, task)
    metrics: dict[str, Any] = task.metrics(outputs) if labelled else {}
    result = {
        "model": ref.model,
        "data": data or "recipe validation split",
        "split": split,
        "task": task.name,
        "seed": task.seed,
        "block_size": spec.block_size,
        **({"stride": spec.eval_stride or spec.block_size} if task.name == "causal-lm" else {}),
        "metrics": metrics,
    }
    if not accelerator.is_main_process:
        return None
    if predictions is not None:
        rows = task.predictions(outputs)
        _write_jsonl(Path(predictions), rows)
        result["predictions"] = {"path": str(Path(predictions).resolve()), "count": len(rows)}
    targets = [Path(output)] if output else []
    if ref.run_dir is not None and labelled:
        name = "validation" if data is None else Path(data).stem + "-" + split
        targets.append(ref.run_dir / "eval" / f"{name}.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write records one JSON per line, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def generate(
    model_name: str,
    prompt: str,
    max_new_tokens: int,
    sample: bool,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    num_return: int,
) -> list[str]:
    """`llmtune generate`: continuations of a prompt, greedy or sampled."""
    import torch
    from transformers import set_seed

    from llmtune.modeling import load_for_inference

    ref = resolve_model(model_name)
    quiet_libraries()
    strategy = ref.recipe.strategy if ref.recipe is not None else None
    model, tokenizer = load_for_inference(ref.model, "AutoModelForCausalLM", "generate", strategy=strategy)
    model.eval()
    do_sample = sample or any(v is not None for v in (temperature, top_k, top_p))
    if not do_sample and num_return > 1:
        raise UserError("--num-return > 1 needs sampling; add --sample")
    set_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        inputs = {"input_ids": torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id]])}
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_return_sequences": num_return,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if do_sample:
        kwargs.update(temperature=temperature or 1.0, top_k=top_k or 0, top_p=top_p or 1.0)
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    start = inputs["input_ids"].shape[1]
    return [prompt + tokenizer.decode(row[start:], skip_special_tokens=True) for row in out]


def export(run: str, output: str | None, merge: bool) -> Path:
    """`llmtune export`: a standalone Hugging Face model directory from a run (LoRA / IA3 merged in)."""
    from llmtune.strategies import merge as merge_adapter
    from llmtune.strategies import strategy_info

    ref = resolve_model(run)
    if ref.recipe is None or ref.run_dir is None:
        raise UserError(f"{run}: not an llmtune run directory (no recipe.resolved.yaml); export takes a run")
    info = strategy_info(ref.model)
    target = Path(output) if output else ref.run_dir / "export"
    if target.exists():
        raise UserError(f"--output {target} already exists; remove it or choose another directory")
    quiet_libraries()
    from llmtune.atomic import atomic_dir
    from llmtune.modeling import load_for_inference
    from llmtune.tasks import get_task

    if info is None:
        if merge:
            raise UserError(f"export --merge: {run} trained with strategy {ref.recipe.strategy.kind}: nothing to merge")
        with atomic_dir(target) as tmp:
            shutil.copytree(ref.model, tmp, dirs_exist_ok=True)
        return target
    if not merge:
        raise UserError(f"export: {run} holds {info['kind']} adapter weights; pass --merge to fold them into the base")
    task = get_task(ref.recipe.task, ref.recipe)
    if info["kind"] not in ("lora", "adalora", "ia3"):
        merge_adapter(None, info["kind"])  # refuses with the reason
    model, tokenizer = load_for_inference(
        ref.model, task.auto_class, task.name, ref.recipe.model.trust_remote_code, ref.recipe.strategy
    )
    merged = merge_adapter(model, info["kind"])
    with atomic_dir(target) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return target
