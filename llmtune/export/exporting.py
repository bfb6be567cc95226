"""`llmtune export RUN`: a deployable model directory, evaluated on the spot against the run's own model.

What can be asked for, and combined: `--merge` (fold LoRA / AdaLoRA / IA3 into the base), `--prune AMOUNT`
(structured feed-forward pruning, any task: a plain transformers directory), `--format onnx` (fp32 ONNX of
the forward pass: classification, tagging and QA) and `--quantize int8` (ONNX Runtime dynamic int8, which
implies ONNX). The export directory holds the model, its config and tokenizer, `llmtune_export.json`
(what was done, settings, versions), `llmtune_recipe.yaml` (the run's recipe, so `llmtune eval EXPORT`
knows its task and data), `README.md` (the run's model card, updated with the export's method, settings and
metrics before and after) and `export_report.json`: size, parameters, CPU latency and throughput, and
every metric, for the source model and the export, measured in this one process. The recipe's `expect:`
bands are checked against the export (exit 1 when missed).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from llmtune.atomic import atomic_dir
from llmtune.errors import UserError
from llmtune.export.measure import Measured, format_report, speed, weights_size_mib
from llmtune.export.onnx import ONNX_FILE, check_exportable, export_onnx, quantize_int8, require
from llmtune.export.prune import prune_feed_forward
from llmtune.strategies import MERGEABLE
from llmtune.strategies import merge as merge_adapter

EXPORT_RECORD = "llmtune_export.json"
EXPORT_RECIPE = "llmtune_recipe.yaml"
REPORT = "export_report.json"


@dataclass
class ExportOptions:
    """What `llmtune export` was asked for."""

    merge: bool = False
    format: Literal["torch", "onnx"] | None = None
    quantize: Literal["int8"] | None = None
    prune: float | None = None
    data: str | None = None
    split: str = "validation"
    output: str | None = None
    overwrite: bool = False
    batch_size: int = 32

    @property
    def runtime_format(self) -> str:
        """torch or onnx: int8 is an ONNX Runtime format."""
        return self.format or ("onnx" if self.quantize else "torch")


def _versions() -> dict[str, str]:
    found = {}
    for package in ("llmtune", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "peft"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _check_options(options: ExportOptions, adapter: dict[str, Any] | None, kind: str, run: str) -> None:
    """Refuse combinations that cannot be exported, before any work."""
    if options.prune is not None and not 0 < options.prune < 1:
        raise UserError(f"--prune: {options.prune} is not a share of neurons in (0, 1); e.g. --prune 0.4")
    if options.quantize and options.format == "torch":
        raise UserError(
            "--quantize int8 --format torch: int8 is exported as ONNX Runtime dynamic quantisation (2.5x the fp32 "
            "throughput here, against 1.5x for torchao's int8 on the PyTorch model); drop --format torch"
        )
    if options.merge and adapter is None:
        raise UserError(f"export --merge: {run} trained with strategy {kind}: nothing to merge")
    if adapter is not None and not options.merge:
        raise UserError(
            f"export: {run} holds {adapter['kind']} adapter weights; pass --merge to fold them into the base "
            "(--prune, --format and --quantize then apply to the merged model)"
        )
    if adapter is not None and adapter["kind"] not in MERGEABLE:
        merge_adapter(None, adapter["kind"])  # refuses, saying which kinds can


def export_run(run: str, options: ExportOptions) -> int:
    """Write the export, evaluate it against the source, print the report; the exit code (1: expect missed)."""
    from llmtune.inference import EvalArgs, check_output_file, eval_recipe, resolve_model
    from llmtune.run import quiet_libraries
    from llmtune.strategies import strategy_info

    ref = resolve_model(run)
    if ref.recipe is None or ref.run is None:
        raise UserError(f"{run}: not an llmtune run directory (no recipe.resolved.yaml); export takes a run")
    adapter = strategy_info(ref.model)
    _check_options(options, adapter, ref.recipe.strategy.kind, run)
    target = Path(options.output) if options.output else ref.run.export
    if target.exists() and not options.overwrite:
        raise UserError(f"--output {target} already exists; pass --overwrite to replace it, or choose another")
    check_output_file(str(target), "--output", directory=True)
    if options.runtime_format == "onnx":
        check_exportable(ref.recipe.entry.name, f"--format onnx{' --quantize int8' if options.quantize else ''}")
        for module in ("onnx", "onnxruntime", "onnxscript"):
            require(module, "--format onnx")
    quiet_libraries()
    from llmtune.modeling import load_config

    recipe = eval_recipe(ref, EvalArgs(data=options.data, split=options.split), load_config(ref.model))
    return _export(ref, recipe, adapter, options, target)


def _export(ref: Any, recipe: Any, adapter: dict[str, Any] | None, options: ExportOptions, target: Path) -> int:
    """Load, evaluate the source, build the export in a temporary directory, evaluate it, move it into place."""
    from llmtune.data import load_raw
    from llmtune.modeling import load_for_inference
    from llmtune.strategies import count_parameters
    from llmtune.tasks import get_task

    task = get_task(recipe)
    raw = load_raw(recipe.data, splits=("validation",), columns=task.required_columns())
    trust = recipe.model.trust_remote_code
    model, tokenizer = load_for_inference(ref.model, task.auto_class, task.name, trust, recipe.strategy)
    if adapter is not None:
        model = merge_adapter(model, adapter["kind"])
    model.eval()
    task.setup(model, tokenizer)
    prepared = task.prepare(raw, tokenizer)
    rows, collate = prepared.splits["validation"], task.collator(tokenizer) or _stack
    source = _measure("source (final/)", "pytorch", model, task, rows, collate, options, Path(ref.model))

    exported = copy.deepcopy(model) if options.prune is not None else model
    done: dict[str, Any] = {"source": str(ref.run.root), "task": task.name, "steps": []}
    if adapter is not None:
        done["steps"].append({"method": "merge", "kind": adapter["kind"]})
    if options.prune is not None:
        done["steps"].append({**prune_feed_forward(exported, options.prune), "method": "prune"})
    parameters = count_parameters(exported)[0]
    with atomic_dir(target) as tmp:
        if options.runtime_format == "onnx":
            outputs = check_exportable(task.name, "--format onnx")
            example = {
                k: v for k, v in collate([rows[i] for i in range(min(len(rows), 4))]).items() if k in _inputs(exported)
            }
            export_onnx(exported, example, outputs, tmp / ONNX_FILE)
            done["steps"].append({"method": "onnx", "exporter": "torch.onnx.export(dynamo=True)", "outputs": outputs})
            if options.quantize:
                quantize_int8(tmp / ONNX_FILE, tmp / "model.int8.onnx")
                (tmp / "model.int8.onnx").replace(tmp / ONNX_FILE)
                done["steps"].append(
                    {"method": "quantize", "kind": "int8 dynamic (onnxruntime quantize_dynamic, QInt8)"}
                )
            exported.config.architectures = [type(exported).__name__]  # what save_pretrained would record
            exported.config.save_pretrained(str(tmp))
        else:
            exported.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_RECIPE).write_text(ref.run.recipe.read_text(encoding="utf-8"), encoding="utf-8")
        done["versions"] = _versions()
        (tmp / EXPORT_RECORD).write_text(json.dumps(done, indent=1), encoding="utf-8")
        reloaded, _ = load_for_inference(str(tmp), task.auto_class, task.name, trust, None)
        runtime = "onnxruntime" if options.runtime_format == "onnx" else "pytorch"
        result = _measure("export", runtime, reloaded, task, rows, collate, options, tmp, parameters)
        report: dict[str, Any] = {
            "batch_size": options.batch_size,
            "source": source.as_dict(),
            "export": result.as_dict(),
        }
        if options.runtime_format == "onnx":
            report["max_abs_output_difference"] = _max_difference(exported, reloaded, rows, collate, options)
        report["what"] = done["steps"]
        (tmp / REPORT).write_text(json.dumps(report, indent=1), encoding="utf-8")
        from llmtune.model_card import write_export_card
        from llmtune.recipe import load_recipe

        write_export_card(ref.run, load_recipe(ref.run.recipe), tmp, str(target), done, report)
    print(format_report([source, result], options.batch_size))
    if "max_abs_output_difference" in report:
        print(f"largest output difference from the PyTorch model: {report['max_abs_output_difference']:.3g}")
    print(f"exported to {target}")
    return _check_expect(recipe, ref, result.metrics)


def _stack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation for fixed-length rows."""
    import torch

    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _inputs(model: Any) -> set[str]:
    """The model's forward inputs that a prepared batch may hold."""
    import inspect

    return {"input_ids", "attention_mask", "token_type_ids"} & set(inspect.signature(model.forward).parameters)


def _measure(
    name: str,
    runtime: str,
    model: Any,
    task: Any,
    rows: Any,
    collate: Any,
    options: ExportOptions,
    directory: Path,
    parameters: int | None = None,
) -> Measured:
    """Metrics over the whole split, speed on its first rows, size and parameters of one model."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from llmtune.evaluation import collect, score
    from llmtune.strategies import count_parameters

    loader = DataLoader(rows, batch_size=options.batch_size, collate_fn=collate)
    metrics = score(task, collect(Accelerator(cpu=True), model, loader, task), [])
    latency, throughput = speed(model, task, rows, collate, options.batch_size)
    count = parameters if parameters is not None else count_parameters(model)[0]
    return Measured(name, runtime, weights_size_mib(directory), count, latency, throughput, metrics)


def _max_difference(model: Any, onnx_model: Any, rows: Any, collate: Any, options: ExportOptions) -> float:
    """The largest absolute difference between PyTorch's and ONNX Runtime's outputs on the first batches."""
    import torch

    largest = 0.0
    with torch.no_grad():
        for start in range(0, min(len(rows), 4 * options.batch_size), options.batch_size):
            batch = collate([rows[i] for i in range(start, min(start + options.batch_size, len(rows)))])
            inputs = {k: v for k, v in batch.items() if k in _inputs(model)}
            ours, theirs = model(**inputs), onnx_model(**inputs)
            for name in vars(theirs):
                largest = max(largest, float((getattr(ours, name) - getattr(theirs, name)).abs().max()))
    return largest


def _check_expect(recipe: Any, ref: Any, metrics: dict[str, float]) -> int:
    """The run's `expect:` bands, checked against the export's metrics."""
    from llmtune.expect import check_expectations, format_checks
    from llmtune.recipe import load_recipe

    expect = load_recipe(ref.run.recipe).expect  # the eval recipe drops it
    if not expect:
        return 0
    checks = check_expectations(metrics, expect)
    print("expectations (export):\n" + format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1
