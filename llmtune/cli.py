"""The `llmtune` command line. Thin: each command imports the heavy machinery only when it runs."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from llmtune.errors import UserError

app = typer.Typer(
    help="Pretrain Transformer language models from YAML recipes; evaluate and sample from them.",
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
    from llmtune.run import pretrain as run_pretrain

    raise typer.Exit(run_pretrain(recipe, set_ or [], resume=resume, overwrite=overwrite))


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
) -> None:
    """Check a recipe and print it resolved (defaults filled, paths absolute) without importing torch."""
    from llmtune.recipe import dump_recipe, load_recipe

    typer.echo(dump_recipe(load_recipe(recipe, set_ or [])), nl=False)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="A run directory, a model directory or a hub id.")],
    data: Annotated[
        str | None,
        typer.Option(
            help="A data file (.txt/.json/.jsonl/.csv/.parquet) or a hub "
            "dataset name; default: the run's validation split."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate (for hub datasets).")] = "validation",
    data_config: Annotated[str | None, typer.Option(help="Hub dataset config, e.g. wikitext-2-raw-v1.")] = None,
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    block_size: Annotated[int | None, typer.Option(help="Window length; default the run's or the model's.")] = None,
    stride: Annotated[int | None, typer.Option(help="Sliding-window stride; default the window length.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per batch.")] = 8,
    task: Annotated[
        str | None, typer.Option(help="causal-lm, masked-lm or span-corruption; default the run's, else causal-lm.")
    ] = None,
    output: Annotated[str | None, typer.Option(help="Also write the metrics JSON here.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of evaluation masks/spans; default the run's train.seed, else 0.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Evaluate a saved model: sliding-window perplexity (causal-lm), masked-token loss/accuracy
    (masked-lm), target-token loss/accuracy (span-corruption)."""
    from llmtune.run import evaluate_model

    result = evaluate_model(
        model, data, split, text_column, data_config, block_size, stride, batch_size, task, output, seed
    )
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(
        f"model: {result['model']}\ndata: {result['data']} ({result['split']}), "
        + (
            f"window {result['block_size']}, stride {result['stride']}"
            if "stride" in result
            else f"sequence length {result['block_size']}"
        )
    )
    width = max(len(k) for k in result["metrics"])
    for key, value in result["metrics"].items():
        typer.echo(f"{key.ljust(width)}  {value:.6g}")


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
    from llmtune.run import generate as run_generate

    for text in run_generate(model, prompt, max_new_tokens, sample, temperature, top_k, top_p, seed, num_return):
        typer.echo(text)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
