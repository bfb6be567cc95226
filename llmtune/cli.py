"""The `llmtune` command line. Thin: each command imports the heavy machinery only when it runs."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from llmtune.errors import UserError

app = typer.Typer(
    help="Pretrain and fine-tune Transformer language models from YAML recipes; evaluate, predict and sample.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: --set train.lr=1e-4 (values parse as YAML)."),
]


@app.command()
def pretrain(
    recipe: Annotated[str, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir exactly.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in output_dir.")] = False,
) -> None:
    """Pretrain as the recipe says (causal-lm, masked-lm, span-corruption); exit 1 if an expect: bound is missed."""
    from llmtune.run import train

    raise typer.Exit(train(recipe, set_ or [], resume=resume, overwrite=overwrite, command="pretrain"))


@app.command()
def finetune(
    recipe: Annotated[str, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir exactly.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in output_dir.")] = False,
) -> None:
    """Fine-tune as the recipe says (sequence-classification, token-classification, relation-classification,
    question-answering, seq2seq, causal-lm / instruction tuning, dialogue); exit 1 if an expect: bound is missed."""
    from llmtune.run import train

    raise typer.Exit(train(recipe, set_ or [], resume=resume, overwrite=overwrite, command="finetune"))


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
) -> None:
    """Check a recipe and print it resolved (defaults filled, paths absolute) without importing torch."""
    from llmtune.recipe import dump_recipe, load_recipe

    typer.echo(dump_recipe(load_recipe(recipe, set_ or [])), nl=False)


@app.command()
def keys(
    section: Annotated[
        str | None, typer.Argument(help="A section (train, data, strategy, ...) or key; default every key.")
    ] = None,
) -> None:
    """List every recipe key with its type, default and description (from the schema)."""
    from llmtune.recipe.keys import format_keys, recipe_keys

    typer.echo(format_keys(recipe_keys(section)))


DataOption = Annotated[
    str | None,
    typer.Option(
        help="A data file (.txt .json .jsonl .csv .tsv .parquet .conll; others with --set data.format=...) or a "
        "hub dataset name; default: the run's validation split."
    ),
]
SplitOption = Annotated[str, typer.Option(help="Split to evaluate (for hub datasets).")]
DataConfigOption = Annotated[str | None, typer.Option(help="Hub dataset config, e.g. wikitext-2-raw-v1.")]
TaskOption = Annotated[
    str | None,
    typer.Option(help="The task (e.g. causal-lm, sequence-classification); default the run's, else causal-lm."),
]
EvalSetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key of the evaluation: --set data.label_column=sentiment."),
]


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="A run directory, a model directory or a hub id.")],
    data: DataOption = None,
    split: SplitOption = "validation",
    data_config: DataConfigOption = None,
    text_column: Annotated[str | None, typer.Option(help="Column holding the text (data.text_column).")] = None,
    block_size: Annotated[int | None, typer.Option(help="Window length; default the run's or the model's.")] = None,
    stride: Annotated[int | None, typer.Option(help="Sliding-window stride; default the window length.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples (windows) per batch.")] = 8,
    task: TaskOption = None,
    set_: EvalSetOption = None,
    output: Annotated[str | None, typer.Option(help="Also write the metrics JSON here.")] = None,
    predictions: Annotated[
        str | None, typer.Option(help="Also write per-example predictions here (JSON lines; fine-tuning tasks).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of evaluation masks/spans; default the run's train.seed, else 0.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Evaluate a saved model with its task's metrics: perplexity (sliding window), masked/target-token
    loss, accuracy / F1 / Matthews, entity F1, SQuAD EM / F1, BLEU / chrF / ROUGE."""
    from llmtune.inference import EvalArgs, evaluate_model

    overrides = [*(set_ or []), *([f"data.text_column={text_column}"] if text_column else [])]
    args = EvalArgs(
        data, split, data_config, block_size, stride, batch_size, task, output, seed, overrides, predictions
    )
    result = evaluate_model(model, args)
    if result is None:  # not the main process of a multi-process evaluation
        return
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    shape = (
        f"window {result['block_size']}, stride {result['stride']}"
        if "stride" in result
        else f"sequence length {result['block_size']}"
        if result["task"] in ("masked-lm", "span-corruption")
        else result["task"]
    )
    typer.echo(f"model: {result['model']}\ndata: {result['data']} ({result['split']}), {shape}")
    width = max((len(k) for k in result["metrics"]), default=0)
    for key, value in result["metrics"].items():
        typer.echo(f"{key.ljust(width)}  {value:.6g}")
    if "predictions" in result:
        typer.echo(f"predictions: {result['predictions']['count']} written to {result['predictions']['path']}")


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="A run directory, a model directory or a hub id.")],
    output: Annotated[str, typer.Option(help="Where to write the predictions (JSON lines, one per example).")],
    data: DataOption = None,
    split: SplitOption = "validation",
    data_config: DataConfigOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per batch.")] = 8,
    task: TaskOption = None,
    set_: EvalSetOption = None,
) -> None:
    """Per-example predictions of a fine-tuned model (label, entities, answer text, generated text); the
    data needs no labels."""
    from llmtune.inference import EvalArgs, evaluate_model

    args = EvalArgs(
        data, split, data_config, batch_size=batch_size, task=task, overrides=set_ or [], predictions=output
    )
    result = evaluate_model(model, EvalArgs(**{**vars(args), "labelled": False}))
    if result is not None:
        typer.echo(f"{result['predictions']['count']} predictions written to {result['predictions']['path']}")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A run directory, a model directory or a hub id.")],
    prompt: Annotated[str, typer.Option(help="The text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 50,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Sampling temperature (implies --sample).")] = None,
    top_k: Annotated[int | None, typer.Option(min=0, help="Sample from the k likeliest tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    num_return: Annotated[int, typer.Option(min=1, help="Continuations to return.")] = 1,
) -> None:
    """Continue a prompt with a causal LM."""
    from llmtune.inference import generate as run_generate

    for text in run_generate(model, prompt, max_new_tokens, sample, temperature, top_k, top_p, seed, num_return):
        typer.echo(text)


@app.command()
def chat(
    model: Annotated[
        str, typer.Argument(help="A run directory, a model directory or a hub id (a chat-tuned causal LM).")
    ],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply in tokens.")] = 50,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Sampling temperature (implies --sample).")] = None,
    top_k: Annotated[int | None, typer.Option(min=0, help="Sample from the k likeliest tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    system: Annotated[
        str | None, typer.Option(help="The system prompt; default a dialogue run's dialogue.system_prompt.")
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(min=2, help="Tokens of conversation kept (history + reply); default the model's context."),
    ] = None,
) -> None:
    """Talk with a chat-tuned causal LM: history kept, replies streamed; /reset, /system TEXT, /exit. Reads one
    message per line when stdin is not a terminal."""
    from llmtune.chatting import ChatOptions
    from llmtune.chatting import chat as run_chat

    run_chat(model, ChatOptions(max_new_tokens, sample, temperature, top_k, top_p, seed, system, context))


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="A run directory.")],
    merge: Annotated[
        bool, typer.Option("--merge", help="Fold LoRA / AdaLoRA / IA3 weights into the base model's.")
    ] = False,
    prune: Annotated[
        float | None,
        typer.Option(help="Remove this share (0-1) of every block's feed-forward neurons, e.g. 0.4."),
    ] = None,
    format_: Annotated[
        str | None, typer.Option("--format", help="torch (a transformers directory) or onnx; default torch.")
    ] = None,
    quantize: Annotated[
        str | None, typer.Option(help="int8: ONNX Runtime dynamic quantisation for CPU inference (implies onnx).")
    ] = None,
    data: DataOption = None,
    split: SplitOption = "validation",
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size of evaluation and of the throughput figure.")] = 32,
    output: Annotated[str | None, typer.Option(help="Where to write the model; default RUN/export.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
) -> None:
    """Write a run's model for deployment (merged, pruned, ONNX, int8) and evaluate it against the run's own
    model on the spot: size, parameters, latency, throughput and metrics; exit 1 if an expect: bound is missed."""
    from llmtune.export.exporting import ExportOptions, export_run

    if format_ not in (None, "torch", "onnx"):
        raise UserError(f"--format {format_}: choose torch or onnx")
    if quantize not in (None, "int8"):
        raise UserError(f"--quantize {quantize}: the one quantisation is int8")
    options = ExportOptions(merge, format_, quantize, prune, data, split, output, overwrite, batch_size)  # type: ignore[arg-type]
    raise typer.Exit(export_run(run, options))


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="A run directory, an export, a model directory or a hub id.")],
    task: TaskOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 to accept other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most rows one model call takes.")] = 32,
    max_batch_tokens: Annotated[
        int, typer.Option(min=1, help="Most rows x longest row tokens one model call takes.")
    ] = 16384,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="Under load, how long a batch may wait to fill.")] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting beyond this get 503 + Retry-After.")] = 256,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LLMTUNE_API_KEY", help="Require this key (Authorization: Bearer or X-API-Key)."),
    ] = None,
) -> None:
    """Serve the model over HTTP: its task's endpoint (classify, tag, answer, generate, chat), /health, /info and
    Prometheus /metrics, with dynamic batching; SIGINT / SIGTERM finish the requests in flight, then exit."""
    from llmtune.serve.run import serve as run_server

    run_server(model, task, host, port, max_batch_size, max_batch_tokens, batch_wait_ms, max_queue, api_key)


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="One or more run directories.")],
    output: Annotated[
        str | None,
        typer.Option(help="Where to write report.md and the PNGs; default RUN/report, or compare-A-B beside the runs."),
    ] = None,
) -> None:
    """Figures (loss raw and smoothed, learning rate, every evaluation metric, throughput) and a Markdown summary
    (final metrics against expect:, recipe differences, wall time, throughput) of one run or several overlaid."""
    from llmtune.report import make_report

    target = make_report(runs, output)
    typer.echo(f"report written to {target / 'report.md'} (figures beside it)")


@app.command()
def sweep(
    recipe: Annotated[str, typer.Argument(help="The recipe YAML file.")],
    space: Annotated[str, typer.Option(help="The search space: a YAML file of recipe keys and their ranges.")],
    trials: Annotated[int, typer.Option(min=1, help="Finished trials to reach (a continued sweep counts its own).")],
    sampler: Annotated[str, typer.Option(help="tpe, random or grid (every combination of the choices).")] = "tpe",
    prune: Annotated[
        bool, typer.Option("--prune", help="Stop a trial whose evaluation is worse than the median of finished ones.")
    ] = False,
    output: Annotated[
        str | None, typer.Option(help="The sweep directory (study.db, trial-NNN/); default OUTPUT_DIR-sweep.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler.")] = 0,
    set_: SetOption = None,
) -> None:
    """Search hyper-parameters with optuna: each trial a run directory, the objective the recipe's best_metric;
    a table of trials, best_recipe.yaml and a figure at the end. The same command again continues the sweep."""
    from llmtune.sweep import SweepOptions
    from llmtune.sweep import sweep as run_sweep

    options = SweepOptions(recipe, space, trials, sampler, prune, output, seed, tuple(set_ or []))
    raise typer.Exit(run_sweep(options))


@app.command()
def reproduce(
    recipes: Annotated[list[str], typer.Argument(help="The recipe YAML files, each with an expect: block.")],
    set_: SetOption = None,
    junit: Annotated[
        str | None, typer.Option(help="Also write a JUnit XML report here: each recipe and each band a test case.")
    ] = None,
    output: Annotated[
        str | None, typer.Option(help="Folder for the runs, one fresh directory per recipe; default ./reproduce-TIME.")
    ] = None,
) -> None:
    """Train each recipe afresh and check its expect: bands (what a CI job runs): one summary table, optional JUnit
    XML; exit 1 if a band is missed or a run fails."""
    from llmtune.reproduce import reproduce as run_reproduce

    raise typer.Exit(run_reproduce(recipes, set_ or [], junit, output))


@app.command()
def runs(
    folder: Annotated[str, typer.Argument(help="The folder to search (a few levels deep) for run directories.")] = ".",
    sort: Annotated[
        str | None, typer.Option(help="Best first by this metric, in its declared direction: --sort eval/f1.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the runs under a folder: task, model, strategy, steps, best metric, status (finished, interrupted,
    failed, running) and wall time."""
    from llmtune.runs_table import as_json as runs_json
    from llmtune.runs_table import format_table, list_runs

    found = list_runs(folder, sort)
    if as_json:
        typer.echo(runs_json(found))
    elif not found:
        typer.echo(f"no run directories under {folder}")
    else:
        typer.echo(format_table(found, sort))


def main() -> None:
    """Console entry point: user errors (bad input, bad options) become one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:
        # Click's exceptions, matched by name: typer >= 0.27 vendors its own copy of click.
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        context = getattr(exc, "ctx", None)
        if "NoArgsIsHelpError" in kinds:
            typer.echo(context.get_help() if context is not None else "")
            sys.exit(0)
        if "UsageError" in kinds:
            command = context.command_path if context is not None else "llmtune"
            _fail(f"{exc.format_message()} (see {command} --help)")  # type: ignore[attr-defined]
        if "Abort" in kinds:
            _interrupted()
        raise
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    """Print one error line and exit 2."""
    print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(2)


def _interrupted() -> None:
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
