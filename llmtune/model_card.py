"""The model card (`README.md` in the Hugging Face model card format) of a run's `final/` and of an export.

The metadata goes through `huggingface_hub`'s `ModelCardData` / `EvalResult`, so the metrics land in the
`model-index` form the hub reads; the body is a small Jinja template rendered by `ModelCard.from_template`.
Everything comes from what the run wrote: the resolved recipe, `environment.json` (hardware, versions,
parameters, data counts), `final/llmtune_metrics.json` (the model's metrics and step), `run_status.json`
(steps and wall time) and, for an export, `export_report.json`.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from llmtune.expect import check_expectations
from llmtune.run_dir import FINAL_METRICS, RunDir
from llmtune.run_status import read_status

CARD_FILE = "README.md"

# The hub's pipeline tag for each task (registry entry name).
PIPELINE_TAGS = {
    "causal-lm": "text-generation",
    "instruction-tuning": "text-generation",
    "masked-lm": "fill-mask",
    "span-corruption": "text2text-generation",
    "sequence-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "seq2seq": "text2text-generation",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ summary }}

## Training procedure

| setting | value |
|---|---|
{% for key, value in procedure %}| {{ key }} | {{ value }} |
{% endfor %}
{% if hardware %}
**Hardware and software:** {{ hardware }}
{% endif %}
{% if wall_time %}
**Wall time:** {{ wall_time }}{{ wall_note }}
{% endif %}

## Results

{{ results_intro }}

| metric | value |
|---|---|
{% for name, value in metrics %}| {{ name }} | {{ value }} |
{% endfor %}
{% if checks %}
The recipe's `expect:` bands:

| metric | band | value | result |
|---|---|---|---|
{% for c in checks %}| {{ c.metric }} | {{ c.band }} | {{ c.value }} | {{ c.result }} |
{% endfor %}
{% endif %}
{% if export %}
## Export

{{ export.what }}

| model | runtime | size MiB | parameters | p50 ms (batch 1) | examples/s (batch {{ export.batch_size }}) \
{% for m in export.metric_names %}| {{ m }} {% endfor %}|
|---|---|---|---|---|---{% for m in export.metric_names %}|---{% endfor %}|
{% for row in export.rows %}| {{ row | join(" | ") }} |
{% endfor %}
{% endif %}
## How to use

{{ load_text }}

```python
{{ load_code }}
```

With llmtune:

```bash
{{ llmtune_code }}
```

## Limitations

{% for line in limitations %}- {{ line }}
{% endfor %}
*Written by llmtune from the run's own records.*
"""


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:,.0f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m {rest % 60:02d}s" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _base_card_license(base: str, revision: str | None) -> str | None:
    """The licence the base model's own card states (a local directory's README.md, or the hub card in the local
    cache; nothing is downloaded), or None."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    local = Path(base) / CARD_FILE
    path: Any = local if local.is_file() else None
    if path is None and _HUB_ID.match(base) and not Path(base).exists():
        try:
            cached = try_to_load_from_cache(base, CARD_FILE, revision=revision)
        except Exception:  # a malformed id: no cache entry to read
            cached = None
        path = cached if isinstance(cached, str) else None
    if path is None:
        return None
    try:
        license_ = ModelCard.load(path, ignore_metadata_errors=True).data.license
    except Exception:  # an unreadable card states no licence we can rely on
        return None
    return license_ if isinstance(license_, str) and license_ else None


def _license(run: RunDir, recipe: Any, export: bool) -> str | None:
    """The base model's licence; an export keeps the one its run's card stated."""
    base = recipe.model.pretrained
    found = _base_card_license(base, recipe.model.revision) if base else None
    if found is None and export and base:
        found = _base_card_license(str(run.final), None)
    return found


def _data_names(data: Any) -> tuple[list[str], str]:
    """(the training data as hub ids or file names, the name of the evaluation data)."""
    if data.hub:
        return [data.hub], data.hub + (f" ({data.hub_config})" if data.hub_config else "")
    if data.source:
        return [data.source], data.source
    names: dict[str, list[str]] = {}
    for split, paths in (data.files or {}).items():
        names[split] = [Path(p).name for p in ([paths] if isinstance(paths, str) else paths)]
    every = list(dict.fromkeys(n for ns in names.values() for n in ns))
    validation = names.get(data.validation_split) or names.get("validation")
    if validation:
        return every, ", ".join(validation)
    return every, f"{', '.join(names.get(data.train_split, every))} (held-out {data.validation_fraction:.0%})"


def _auto_class(entry: Any) -> str:
    module, name = entry.target.split(":")
    return str(getattr(importlib.import_module(module), name).auto_class)


def _procedure(recipe: Any, env: dict[str, Any], status: dict[str, Any], step: int | None) -> list[tuple[str, str]]:
    t, s = recipe.train, recipe.strategy
    params = env.get("parameters") or {}
    strategy = s.kind
    if params.get("total"):
        strategy += f" ({params['trainable']:,} of {params['total']:,} parameters trained)"
    world = env.get("world_size", 1)
    steps = str(status.get("step") or step or "?")
    if status.get("total_steps"):
        steps += f" of {status['total_steps']} planned"
    if step is not None:
        steps += f"; this model is from step {step}"
    lr = f"{t.lr:g}" + (f" (head {t.head_lr:g})" if t.head_lr else "")
    rows = [
        ("task", recipe.entry.name),
        ("base model", recipe.model.pretrained or "none: trained from scratch"),
        ("strategy", strategy),
        ("steps", steps),
        (
            "batch",
            f"{t.batch_size} per device x {t.grad_accum} accumulation x {world} device(s) = "
            f"{t.batch_size * t.grad_accum * world}",
        ),
        ("learning rate", lr),
        ("schedule", f"{t.schedule.kind}, {t.schedule.warmup_steps} warmup steps"),
        ("optimizer", f"{t.optimizer.kind}, weight decay {t.weight_decay:g}"),
        ("precision", "fp32" if t.precision == "no" else t.precision),
        ("seed", str(t.seed)),
    ]
    if recipe.tokenizer.train is not None:
        rows.append(
            ("tokenizer", f"trained: {recipe.tokenizer.train.kind}, {recipe.tokenizer.train.vocab_size} tokens")
        )
    data = env.get("data") or {}
    counts = ", ".join(f"{k} {v:,}" for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool))
    if counts:
        rows.append(("data", counts))
    done = status.get("step") or step
    if done and data.get("train_examples"):
        seen = done * t.batch_size * t.grad_accum * world
        rows.append(("examples seen", f"{seen:,} ({seen / data['train_examples']:.2f} epochs)"))
    return rows


def _hardware(env: dict[str, Any]) -> str:
    if not env:
        return ""
    packages = env.get("packages") or {}
    versions = ", ".join(f"{k} {v}" for k, v in packages.items())
    device = f"{env.get('world_size', 1)} x {env.get('device', '?')}"
    if str(env.get("device", "")).startswith("cpu"):
        device += f" ({env.get('torch_threads', '?')} torch threads)"
    return f"{device}; Python {env.get('python', '?')}; {versions}"


def _loading(
    entry: Any, model_dir: Path, shown: str, adapter: dict[str, Any] | None, onnx: bool, run_path: str
) -> tuple[str, str, str, str]:
    """(library_name, the text before the snippet, the Python snippet, the llmtune commands)."""
    auto = _auto_class(entry)
    pipeline = PIPELINE_TAGS.get(entry.name, "")
    commands = [f"llmtune eval {run_path}                      # its metrics on the validation data"]
    if entry.predicts:
        commands.append(f"llmtune predict {run_path} --data FILE --output predictions.jsonl")
    if entry.name in ("causal-lm", "instruction-tuning"):
        commands.append(f'llmtune generate {run_path} --prompt "..."')
    commands.append(f"llmtune serve {run_path}                     # HTTP on 127.0.0.1:8000")
    llmtune_code = "\n".join(commands)
    if onnx:
        text = (
            "An ONNX model (`model.onnx`) with its config and tokenizer; run it with ONNX Runtime (the outputs are "
            "the model's logits), or through llmtune, which evaluates and serves it as the PyTorch model."
        )
        code = (
            "import onnxruntime as ort\nfrom transformers import AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{shown}")\n'
            f'session = ort.InferenceSession("{shown}/model.onnx")\n'
            'inputs = tokenizer(["An example."], return_tensors="np")\n'
            "names = {i.name for i in session.get_inputs()}\n"
            "logits = session.run(None, {k: v for k, v in inputs.items() if k in names})[0]"
        )
        return "transformers", text, code, llmtune_code
    if adapter is None:
        text = f"A complete `transformers` model (`{auto}`) with its tokenizer."
        code = (
            f"from transformers import {auto}, AutoTokenizer, pipeline\n\n"
            f'model = {auto}.from_pretrained("{shown}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{shown}")\n'
        )
        if pipeline and entry.name not in ("span-corruption",):
            code += f'pipe = pipeline("{pipeline}", model=model, tokenizer=tokenizer)'
        return "transformers", text, code.rstrip(), llmtune_code
    from llmtune.strategies import PEFT_KINDS

    if adapter["kind"] in PEFT_KINDS:
        text = (
            f"A peft {adapter['kind']} adapter (with the task head) for `{adapter.get('base')}`: load the base with "
            "this directory's config (its label maps and head size), then the adapter on it."
        )
        code = (
            f"from peft import PeftModel\nfrom transformers import AutoConfig, {auto}, AutoTokenizer\n\n"
            f'config = AutoConfig.from_pretrained("{shown}")\n'
            f'base = {auto}.from_pretrained("{adapter.get("base")}", config=config, ignore_mismatched_sizes=True)\n'
            f'model = PeftModel.from_pretrained(base, "{shown}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{shown}")\n'
            "# or fold it into the base for deployment: llmtune export RUN --merge"
        )
        return "peft", text, code, llmtune_code
    text = (
        f"Bottleneck adapters (llmtune's own, not peft) and the task head for `{adapter.get('base')}`, in "
        "`adapter.safetensors`: plain `transformers` cannot load them; llmtune rebuilds the model from the run "
        "directory (recipe, base and adapter weights)."
    )
    code = (
        "from safetensors.torch import load_file\n\n"
        f'weights = load_file("{shown}/adapter.safetensors")  # the trained adapter and head parameters\n'
        "# llmtune eval / predict / serve load the whole model from the run directory"
    )
    return "transformers", text, code, llmtune_code


def _limitations(recipe: Any, env: dict[str, Any], eval_data: str, checks: list[Any]) -> list[str]:
    found = [f"Measured only on {eval_data}; on other data, domains or languages the numbers will differ."]
    base = recipe.model.pretrained
    data = env.get("data") or {}
    if base is None:
        tokens = data.get("train_tokens")
        found.append(
            "Trained from scratch"
            + (f" on {tokens:,} tokens" if isinstance(tokens, int) else "")
            + ": a research or test model, not one to put in front of users."
        )
    else:
        found.append(f"It inherits the biases and limitations of its base model ({base}) and of that model's data.")
    if recipe.entry.name in ("causal-lm", "instruction-tuning", "seq2seq", "span-corruption"):
        found.append("Generated text can be false, biased or offensive; check it before relying on it.")
    if checks:
        found.append("The `expect:` bands are this recipe's regression checks, not published results.")
    if recipe.data.max_length is not None or recipe.entry.name not in ("causal-lm", "masked-lm", "span-corruption"):
        found.append("Inputs longer than the training length are truncated.")
    return found


def build_card(
    run: RunDir,
    recipe: Any,
    model_dir: Path,
    shown: str,
    wall_seconds: float | None,
    export: dict[str, Any] | None = None,
) -> Any:
    """The `huggingface_hub.ModelCard` of `model_dir` (final/, or an export when `export` holds its report and
    record), shown to users at path `shown`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from llmtune.strategies import strategy_info

    env = _read_json(run.environment)
    status = read_status(run.root) or {}
    saved = _read_json(run.final / FINAL_METRICS)
    metrics: dict[str, float] = dict(saved.get("metrics") or {})
    step = saved.get("step")
    if export is not None:
        metrics = dict(export["report"]["export"]["metrics"])
    entry = recipe.entry
    pipeline = PIPELINE_TAGS.get(entry.name)
    datasets, eval_data = _data_names(recipe.data)
    base = recipe.model.pretrained
    onnx = (model_dir / "model.onnx").is_file()
    adapter = strategy_info(model_dir)
    used_as = shown if export is not None else str(run.root)  # llmtune commands take a run or an export
    library, load_text, load_code, llmtune_code = _loading(entry, model_dir, shown, adapter, onnx, used_as)
    ranked = {
        n: v for n, v in metrics.items() if (m := recipe.metric(n)) is not None and m.higher_is_better is not None
    }
    name = run.root.name + ("-export" if export is not None else "")
    eval_results = [
        EvalResult(
            task_type=pipeline or entry.name,
            task_name=entry.name,
            dataset_type=datasets[0] if recipe.data.hub or recipe.data.source else eval_data,
            dataset_name=eval_data,
            dataset_config=recipe.data.hub_config,
            dataset_split=recipe.data.validation_split,
            metric_type=metric.removeprefix("eval/"),
            metric_name=metric,
            metric_value=round(float(value), 6),
        )
        for metric, value in ranked.items()
    ]
    tags = ["llmtune", entry.name, f"strategy-{recipe.strategy.kind}"]
    if export is not None:
        tags += [step_["method"] for step_ in export["record"]["steps"]]
    data = ModelCardData(
        model_name=name,
        base_model=base if base and _HUB_ID.match(base) and not Path(base).exists() else None,
        datasets=datasets,
        library_name=library,
        license=_license(run, recipe, export is not None),
        pipeline_tag=pipeline,
        tags=tags,
        metrics=[m.removeprefix("eval/") for m in ranked] or None,
        eval_results=eval_results or None,
    )
    checks = [
        {
            "metric": c.metric,
            "band": " and ".join(
                p
                for p in (
                    f">= {c.bound.min:g}" if c.bound.min is not None else "",
                    f"<= {c.bound.max:g}" if c.bound.max is not None else "",
                )
                if p
            ),
            "value": "missing" if c.value is None else _number(c.value),
            "result": "met" if c.ok else "missed",
        }
        for c in check_expectations(metrics, recipe.expect)
    ]
    verb = "trained from scratch" if base is None else f"fine-tuned from `{base}`"
    if base is not None and "pretrain" in entry.commands and "finetune" not in entry.commands:
        verb = f"further pretrained from `{base}`"
    summary = f"A {entry.name} model {verb} with llmtune, {recipe.strategy.kind} strategy, on {', '.join(datasets)}."
    where = f"on {eval_data} (split `{recipe.data.validation_split}`)"
    results_intro = (
        f"Metrics of this export {where}, measured when it was exported."
        if export is not None
        else f"Metrics of this model {where}" + (f", at step {step}." if step is not None else ".")
    )
    context: dict[str, Any] = {
        "name": name,
        "summary": summary,
        "procedure": _procedure(recipe, env, status, step),
        "hardware": _hardware(env),
        "wall_time": _duration(wall_seconds) if wall_seconds is not None else "",
        "wall_note": " (data preparation, training, evaluation and saving; every session of the run)",
        "results_intro": results_intro,
        "metrics": [(n, _number(v)) for n, v in metrics.items()],
        "checks": checks,
        "export": _export_section(export) if export is not None else None,
        "load_text": load_text,
        "load_code": load_code,
        "llmtune_code": llmtune_code,
        "limitations": _limitations(recipe, env, eval_data, checks),
    }
    return ModelCard.from_template(data, template_str=TEMPLATE, **context)


def _export_section(export: dict[str, Any]) -> dict[str, Any]:
    """What the export did and its report, source against export."""
    report, record = export["report"], export["record"]
    what = []
    for step in record["steps"]:
        settings = ", ".join(f"{k} {v}" for k, v in step.items() if k != "method" and not isinstance(v, list | dict))
        what.append(f"**{step['method']}**" + (f" ({settings})" if settings else ""))
    rows_in = [report["source"], report["export"]]
    names = list(dict.fromkeys(k for row in rows_in for k in row["metrics"]))
    rows = []
    for row in rows_in:
        cells = [row["name"], row["runtime"], f"{row['size_mib']:.1f}", f"{row['parameters']:,}"]
        cells += [f"{row['latency_ms_p50']:.2f}", f"{row['throughput']:.1f}"]
        cells += [_number(row["metrics"][m]) if m in row["metrics"] else "-" for m in names]
        rows.append(cells)
    text = "Exported from the run's final/ model by `llmtune export`: " + ", then ".join(what) + "."
    text += " Both models were measured in the same process on a CPU; the table is `export_report.json`."
    return {"what": text, "rows": rows, "metric_names": names, "batch_size": report.get("batch_size", "?")}


def write_model_card(run: RunDir, recipe: Any, wall_seconds: float | None) -> Path:
    """Write `final/README.md` (atomically) for the run's final model; its path."""
    from llmtune.atomic import write_text_atomic

    card = build_card(run, recipe, run.final, str(run.final), wall_seconds)
    path = run.final / CARD_FILE
    write_text_atomic(path, str(card))
    return path


def write_export_card(run: RunDir, recipe: Any, directory: Path, shown: str, record: dict, report: dict) -> Path:
    """Write the export directory's `README.md`: the run's card with the export's method, settings and metrics
    before and after (from `export_report.json`); its path."""
    from llmtune.atomic import write_text_atomic

    wall = (read_status(run.root) or {}).get("wall_seconds")
    card = build_card(run, recipe, directory, shown, wall, export={"record": record, "report": report})
    path = directory / CARD_FILE
    write_text_atomic(path, str(card))
    return path
