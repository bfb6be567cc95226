"""Using a trained model: `eval` (metrics, predictions), `predict`, `generate` and `export`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.atomic import write_text_atomic
from llmtune.errors import UserError
from llmtune.modeling import context_length
from llmtune.recipe import Recipe, load_recipe
from llmtune.run import has_accelerator, quiet_libraries
from llmtune.run_dir import RunDir, run_dir_of


@dataclass
class ModelRef:
    """What MODEL on the command line named: the model to load and, for a run directory, the run and its recipe."""

    model: str
    run: RunDir | None
    recipe: Recipe | None


def resolve_model(name: str) -> ModelRef:
    """A run directory (its final/), an export (with the recipe of the run it came from), a model directory, or a
    hub id."""
    from llmtune.export.exporting import EXPORT_RECIPE

    run = run_dir_of(name)
    if run is not None:
        if not run.final.is_dir():
            raise UserError(f"{name}: the run has no final/ model yet; finish it with llmtune pretrain --resume")
        return ModelRef(str(run.final), run, load_recipe(run.recipe))
    if Path(name).exists() and not Path(name).is_dir():
        raise UserError(f"MODEL: {name} is a file; pass a run directory, a model directory or a hub id")
    if (Path(name) / EXPORT_RECIPE).is_file():
        return ModelRef(name, None, load_recipe(Path(name) / EXPORT_RECIPE))
    return ModelRef(name, None, None)


FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".conll")


def _data_keys(spec: dict[str, Any], data: str, split: str, data_config: str | None) -> None:
    """Point a data section at `--data` (a file, or a hub dataset), keeping a declared format for files like the
    training ones (e.g. squad json)."""
    trained_on = [
        Path(p).suffix for ps in (spec.get("files") or {}).values() for p in ([ps] if isinstance(ps, str) else ps)
    ]
    keep_format = spec.get("format") is not None and Path(data).suffix in trained_on
    for key in ("source", "hub", "hub_config", "files", "revision", *([] if keep_format else ["format"])):
        spec.pop(key, None)
    if Path(data).exists() or Path(data).suffix.lower() in FILE_SUFFIXES:
        spec["files"] = {split: str(Path(data).resolve())}
    else:
        spec.update(hub=data, hub_config=data_config)
    spec["validation_split"] = split


def eval_recipe(ref: ModelRef, args: EvalArgs, config: Any, need_data: bool = True) -> Recipe:
    """The recipe `eval` / `predict` run by: the run's own (model = its final/), or one made from the flags.

    `--set` overrides apply to it like to a training recipe (e.g. --set data.label_column=sentiment). With
    `--task` naming another task than the run's, only the data's source is kept. Without `need_data` (serving)
    a model directory gets an empty data source.
    """
    from llmtune.recipe import GENERAL_KEYS, build_recipe
    from llmtune.tasks.registry import recipe_tasks, task_entry

    if args.task is not None and args.task not in recipe_tasks():
        raise UserError(f"--task {args.task}: no such task; choose one of {', '.join(recipe_tasks())}")
    if ref.recipe is not None:
        tree = ref.recipe.model_dump(mode="json", include=set(GENERAL_KEYS) | {ref.recipe.entry.section or "task"})
        tree.pop("expect", None)
        tree.pop("tracking", None)
        if args.task is not None and args.task != tree["task"]:
            reads = {c.key for c in task_entry(args.task).columns}
            data = {k: v for k, v in tree["data"].items() if not k.endswith("_column") or k in reads}
            tree = {"task": args.task, "data": data, "train": {"seed": tree["train"]["seed"]}}
        tree["tokenizer"] = {}
    else:
        tree = {"task": args.task or "causal-lm", "data": {}, "train": {"seed": 0}}  # eval masks: seed 0
    tree["model"] = {
        "pretrained": ref.model,
        "trust_remote_code": tree.get("model", {}).get("trust_remote_code", False),
    }
    if args.data is not None:
        _data_keys(tree["data"], args.data, args.split, args.data_config)
    elif ref.recipe is None and need_data:
        raise UserError("--data is needed when MODEL is not a run directory (a file path or a hub dataset name)")
    elif ref.recipe is None:
        tree["data"]["files"] = {}  # nothing is read
    if args.seed is not None:
        tree["train"]["seed"] = args.seed
    if args.block_size is not None:
        tree["data"]["block_size"] = args.block_size
    elif ref.recipe is None:
        tree["data"]["block_size"] = min(context_length(config) or 1024, 1024)
    tree["data"]["eval_stride"] = args.stride
    return build_recipe(tree, Path.cwd(), args.overrides, source="eval")


def check_output_file(path: str | None, option: str, directory: bool = False) -> None:
    """Refuse an output path that is of the wrong kind (a directory for a file, a file for a directory) or cannot
    be written, before any work is done."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir() and not directory:
        raise UserError(f"{option} {path}: is a directory; give a file path")
    if target.exists() and not target.is_dir() and directory:
        raise UserError(f"{option} {path}: is a file; give a directory path")
    existing = next(p for p in (target.parent.resolve(), *target.parent.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, not a directory; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: {existing} is not writable; give a path you can write to")


@dataclass
class EvalArgs:
    """What `llmtune eval` / `predict` were asked for."""

    data: str | None = None
    split: str = "validation"
    data_config: str | None = None
    block_size: int | None = None
    stride: int | None = None
    batch_size: int = 8
    task: str | None = None
    output: str | None = None
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)
    predictions: str | None = None
    labelled: bool = True


def evaluate_model(model_name: str, args: EvalArgs) -> dict[str, Any] | None:
    """`llmtune eval` / `predict`: a saved model's metrics (and per-example predictions) on a dataset.

    By default the data is the run's validation split; `--data` names a file or hub dataset. The task's
    methods are called in the order training calls them (see `llmtune.tasks.base`). Under several
    processes every rank evaluates its share; only the main process gets the result (others None).
    """
    check_output_file(args.output, "--output")
    check_output_file(args.predictions, "--predictions" if args.labelled else "--output")
    ref = resolve_model(model_name)
    quiet_libraries()
    from llmtune.data import load_raw
    from llmtune.evaluation import collect, score
    from llmtune.lean_encoder import apply_lean_encoder
    from llmtune.metrics import load_metric_modules
    from llmtune.modeling import load_config, load_for_inference
    from llmtune.tasks import get_task

    trust = ref.recipe.model.trust_remote_code if ref.recipe is not None else False
    recipe = eval_recipe(ref, args, load_config(ref.model, trust))
    task = get_task(recipe, labelled=args.labelled)
    if (args.predictions is not None or not args.labelled) and not recipe.entry.predicts:
        command = "predict" if not args.labelled else "--predictions"
        raise UserError(f"{command}: {task.name} gives no per-example predictions; use llmtune eval or generate")
    modules = load_metric_modules(recipe.metrics) if args.labelled else []
    # carved off train exactly as training did, if need be
    raw = load_raw(recipe.data, splits=("validation",), columns=task.required_columns())
    model, tokenizer = load_for_inference(ref.model, task.auto_class, task.name, trust, recipe.strategy)
    apply_lean_encoder(model)  # BERT-family encoders skip padding and unread work (llmtune/lean_encoder.py)
    task.setup(model, tokenizer)
    prepared = task.prepare(raw, tokenizer)

    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from llmtune.batching import longest_first
    from llmtune.export.onnx import OnnxModel

    accelerator = Accelerator(cpu=not has_accelerator())
    collate = task.collator(tokenizer)
    lengths = prepared.lengths.get("validation")
    loader = DataLoader(
        prepared.splits["validation"],
        batch_size=args.batch_size,
        shuffle=False,
        **({"collate_fn": collate} if collate else {}),
        **({"sampler": longest_first(lengths)} if lengths else {}),
    )
    if isinstance(model, OnnxModel):  # ONNX Runtime runs it; only the data is accelerate's
        loader = accelerator.prepare(loader)
    else:
        model, loader = accelerator.prepare(model, loader)
    outputs = collect(accelerator, model, loader, task)
    metrics: dict[str, Any] = score(task, outputs, modules) if args.labelled else {}
    data = recipe.data
    result = {
        "model": ref.model,
        "data": args.data or "recipe validation split",
        "split": args.split,
        "task": task.name,
        "seed": task.seed,
        "block_size": data.block_size,
        **({"stride": data.eval_stride or data.block_size} if task.name == "causal-lm" else {}),
        "metrics": metrics,
    }
    if not accelerator.is_main_process:
        return None
    if args.predictions is not None:
        rows = task.predictions(outputs)
        _write_jsonl(Path(args.predictions), rows)
        result["predictions"] = {"path": str(Path(args.predictions).resolve()), "count": len(rows)}
    targets = [Path(args.output)] if args.output else []
    if ref.run is not None and args.labelled:
        name = "validation" if args.data is None else Path(args.data).stem + "-" + args.split
        targets.append(ref.run.eval / f"{name}.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(result, indent=1))
    return result


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write records one JSON per line, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def sampling_kwargs(sample: bool, temperature: float | None, top_k: int | None, top_p: float | None) -> dict[str, Any]:
    """`generate` keyword arguments for greedy decoding or sampling (which any sampling option implies)."""
    if not (sample or any(v is not None for v in (temperature, top_k, top_p))):
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature or 1.0, "top_k": top_k or 0, "top_p": top_p or 1.0}


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
    from llmtune.tasks.generation import cut_at_eos, decode, eos_ids

    do_sample = sample or any(v is not None for v in (temperature, top_k, top_p))
    if not do_sample and num_return > 1:
        raise UserError("--num-return > 1 needs sampling; add --sample")
    ref = resolve_model(model_name)
    quiet_libraries()
    strategy = ref.recipe.strategy if ref.recipe is not None else None
    model, tokenizer = load_for_inference(ref.model, "AutoModelForCausalLM", "generate", strategy=strategy)
    model.eval()
    set_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        inputs = {"input_ids": torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id]])}
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_return_sequences": num_return,
        "pad_token_id": tokenizer.pad_token_id,
        **sampling_kwargs(sample, temperature, top_k, top_p),
    }
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    generated = cut_at_eos(out[:, inputs["input_ids"].shape[1] :], eos_ids(model), tokenizer.pad_token_id)
    return [prompt + text for text in decode(tokenizer, generated.tolist())]
