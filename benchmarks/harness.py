"""What the benchmarks share: child processes, alternation, process measurements, llmtune's run files, checks, tables.

A benchmark script is both the parent (parses its options, writes recipes, runs children, prints the table)
and every child: the parent re-invokes the script as `python SCRIPT _child MODE RESULT.json ARGS...`, and
`child_main` runs the named mode and writes RESULT.json with the mode's figures plus the child's own
measurements (peak RSS from `getrusage(RUSAGE_SELF)`, CUDA peak, seconds, where it imported llmtune from).

llmtune's figures are read only from what llmtune writes into its run directory (`LlmtuneRun`):
`metrics.jsonl` (one training record per `train.log_every` steps: cumulative `train/tokens`, `train/examples`,
`train/seconds` of training time only, and `train/peak_rss_mib`), `environment.json` (versions, device,
batch sizes, `parameters`, and `data`: the prepared data's counts and its tokenised-data cache) and
`final_metrics.json`. The stock `transformers.Trainer` side is timed by
`step_clock` (a `TrainerCallback`) and counted by `CountingCollator` (what its data loader actually fed).

Nothing here imports torch, transformers or llmtune at module level: the parent stays light, and each child
imports llmtune from the path the parent chose (`LlmtuneSource`).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLMTUNE, TRAINER = "llmtune", "Trainer"
SIDES = (LLMTUNE, TRAINER)
CHILD = "_child"  # argv[1] of a child process
OTHER_CPU_WARN = 10.0  # % of all cores other processes may use during a run before the table warns

ChildMode = Callable[[list[str]], dict[str, Any]]
ModelBuilder = Callable[[Any, Any, Any, dict[str, Any]], Any]  # (recipe, task, tokenizer, overrides) -> model


class BenchError(RuntimeError):
    """A child run failed, or the two sides turned out not to do the same work."""


# --- measurements of this process and of the machine ------------------------------------------------------


def max_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cuda_peak_mib() -> float | None:
    """Peak CUDA memory allocated by this process's tensors, in MiB; None without a GPU (or torch not imported)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / (1024 * 1024)


def busy_cpu_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by this process's finished children (cumulative: only differences are meaningful)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(limit_s: float, sample_s: float = 2.0) -> float | None:
    """Wait (up to `limit_s`) until other processes use under OTHER_CPU_WARN % of the CPUs; return the last share.

    Only a start condition: work that starts during a run still shows in that run's `other_cpu_pct`.
    """
    deadline, said = time.monotonic() + limit_s, False
    while True:
        before = busy_cpu_seconds()
        if before is None:
            return None
        time.sleep(sample_s)
        after = busy_cpu_seconds()
        share = ((after or before) - before) / (sample_s * (os.cpu_count() or 1)) * 100
        if share < OTHER_CPU_WARN or time.monotonic() >= deadline:
            return share
        if not said:
            print(f"  machine busy ({share:.0f}% CPU); waiting up to {limit_s:.0f}s", file=sys.stderr, flush=True)
            said = True


def write_json(path: str | Path, payload: Any) -> None:
    """Write `payload` as indented JSON."""
    Path(path).write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --- which llmtune the children import ---------------------------------------------------------------------


@dataclass(frozen=True)
class LlmtuneSource:
    """The directory every child imports llmtune from (put first on PYTHONPATH) and a description of it."""

    path: Path
    version: str


def git_version() -> str:
    """The checkout's short commit, marked when llmtune/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "llmtune"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return f"{head} + uncommitted changes in llmtune/" if dirty else head


def llmtune_source(work: Path, snapshot: bool) -> LlmtuneSource:
    """With `snapshot`, copy the llmtune package into `work/llmtune-src` so every run imports the same code.

    Without a snapshot an edit to the working tree between runs would compare two different llmtunes (and,
    if the data cache key changed, train them on different caches); without it the live tree is imported.
    """
    if not snapshot:
        return LlmtuneSource(ROOT, git_version() + " (live working tree)")
    target = work / "llmtune-src"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ROOT / "llmtune", target / "llmtune", ignore=shutil.ignore_patterns("__pycache__"))
    return LlmtuneSource(target, git_version())


# --- the child side -----------------------------------------------------------------------------------------


def child_main(argv: list[str], modes: dict[str, ChildMode]) -> int:
    """Run child mode `argv[1]` (argv = [CHILD, MODE, RESULT_JSON, *args]) and write its result; the exit code.

    The result is the mode's figures plus this process's own measurements, written in a `finally` so that it
    exists however the mode ends; the exit code is the mode's `exit_code` (0 if it returns none).
    """
    mode, result_path, rest = argv[1], argv[2], argv[3:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    figures: dict[str, Any] = {"exit_code": 1}
    try:
        figures = {"exit_code": 0, **modes[mode](rest)}
    finally:
        torch = sys.modules.get("torch")
        llmtune = sys.modules.get("llmtune")
        write_json(
            result_path,
            {
                **figures,
                "mode": mode,
                "max_rss_mib": max_rss_mib(),
                "cuda_peak_mib": cuda_peak_mib(),
                "seconds": time.perf_counter() - started,
                "llmtune_file": getattr(llmtune, "__file__", None),
                "torch_threads": torch.get_num_threads() if torch is not None else None,
            },
        )
    return int(figures["exit_code"])


def llmtune_cli_mode(cli_args: list[str]) -> dict[str, Any]:
    """Child mode: run `llmtune <cli_args>` in this process, exactly what the console script runs."""
    from llmtune.cli import main

    sys.argv = ["llmtune", *cli_args]
    try:
        main()
    except SystemExit as exc:  # typer/click always end with SystemExit
        code = exc.code
        return {"exit_code": code if isinstance(code, int) else (0 if code is None else 1)}
    return {"exit_code": 0}


NOT_COUNTS = ("cache", "prepare_seconds")  # data facts that differ between two preparations of the same rows


def data_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """The counts of prepared data's stats (examples, tokens, blocks, skipped rows per split): the scalar facts
    that two preparations of the same rows share, i.e. all but `cache` and `prepare_seconds`."""
    return {k: v for k, v in stats.items() if k not in NOT_COUNTS and isinstance(v, int | float | str)}


def cache_dir_of(cache: str) -> str:
    """The tokenised-data cache directory of a `cache` stat ("hit DIR" or "miss, saved DIR")."""
    return cache.removeprefix("hit ").removeprefix("miss, saved ")


@dataclass
class LlmtuneData:
    """What llmtune's training prepares for a recipe, made with llmtune's own functions in `run.py::train`'s order."""

    task: Any
    raw: Any
    tokenizer: Any
    tokenizer_origin: str
    model: Any
    prepared: Any

    @property
    def cache_dir(self) -> str:
        """The tokenised-data cache directory the splits were loaded from (or saved to)."""
        return cache_dir_of(str(self.prepared.stats["cache"]))

    def facts(self) -> dict[str, Any]:
        """The facts the checks compare across runs: cache directory, data counts, vocabulary, rows, where llmtune
        came from."""
        import llmtune

        stats = {k: v for k, v in self.prepared.stats.items() if isinstance(v, int | float | str)}
        return {
            "llmtune_file": llmtune.__file__,
            "cache_dir": self.cache_dir,
            "cache": self.prepared.stats["cache"],
            "data_counts": data_counts(self.prepared.stats),
            "tokenizer": self.tokenizer_origin,
            "vocab": len(self.tokenizer),
            "train_rows": len(self.prepared.splits["train"]),
            "stats": stats,
        }


def llmtune_data(recipe: Any, build_model: ModelBuilder) -> LlmtuneData:
    """Task, raw data, tokenizer, model and prepared splits for `recipe`, in the order `llmtune.run.train` makes them.

    `build_model(recipe, task, tokenizer, overrides)` builds the model (the Trainer side builds it with plain
    transformers); the seed is set just before it, as llmtune does.
    """
    from transformers import set_seed

    from llmtune.data import load_raw
    from llmtune.modeling import build_tokenizer
    from llmtune.tasks import get_task

    task = get_task(recipe)
    raw = load_raw(recipe.data, columns=task.required_columns())
    train_split = raw.splits["train"]
    tokenizer, origin = build_tokenizer(
        recipe.tokenizer,
        recipe.model,
        lambda: task.tokenizer_texts(train_split),
        raw.fingerprint,
        recipe.data.cache_dir,
    )
    set_seed(recipe.train.seed)
    model = build_model(recipe, task, tokenizer, task.model_overrides(raw))
    task.setup(model, tokenizer)
    prepared = task.prepare(raw, tokenizer)
    return LlmtuneData(task, raw, tokenizer, origin, model, prepared)


def prepare_mode(build_model: ModelBuilder) -> ChildMode:
    """Child mode [RECIPE]: train/cache the tokenizer and tokenise the data once, untimed; the data's facts.

    Run before the measured runs so that every one of them is a cache hit.
    """

    def mode(rest: list[str]) -> dict[str, Any]:
        from llmtune.recipe import load_recipe

        return llmtune_data(load_recipe(rest[0]), build_model).facts()

    return mode


def child_modes(**extra: ChildMode) -> dict[str, ChildMode]:
    """The child mode every benchmark has (`llmtune`) plus the benchmark's own."""
    return {"llmtune": llmtune_cli_mode, **extra}


# --- the Trainer side ---------------------------------------------------------------------------------------


def trainer_arguments(recipe: Any, output_dir: str | Path, **overrides: Any) -> Any:
    """`TrainingArguments` that match the recipe's `train:` section, with no evaluation, saving or reporting.

    Same batch, steps (or epochs), fused AdamW with the recipe's betas, eps and weight decay, schedule and
    warmup, clipping, seed, precision, compile, data-loader workers.
    """
    import torch
    from transformers import TrainingArguments

    spec = recipe.train
    length = {"max_steps": spec.max_steps} if spec.max_steps else {"num_train_epochs": spec.epochs or 1.0}
    keys: dict[str, Any] = {
        **length,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": spec.batch_size,
        "per_device_eval_batch_size": spec.eval_batch_size or spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "learning_rate": spec.lr,
        "weight_decay": spec.weight_decay,
        "adam_beta1": spec.optimizer.betas[0],
        "adam_beta2": spec.optimizer.betas[1],
        "adam_epsilon": spec.optimizer.eps,
        "optim": "adamw_torch_fused",
        "lr_scheduler_type": spec.schedule.kind,
        "warmup_steps": spec.schedule.warmup_steps,
        "max_grad_norm": spec.max_grad_norm or 0.0,
        "seed": spec.seed,
        "bf16": spec.precision == "bf16",
        "fp16": spec.precision == "fp16",
        "torch_compile": spec.compile,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "dataloader_num_workers": spec.num_workers,
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning means nothing without a GPU (and warns)
        "disable_tqdm": True,
    }
    keys.update(overrides)
    return TrainingArguments(**keys)


class CountingCollator:
    """Wraps a collate function and records the rows and tokens (`input_ids` elements) of every batch it makes.

    The Trainer's data loader may prepare one batch ahead, so a run's trained batches are the first
    `steps` ones (one micro-batch per step).
    """

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate
        self.rows: list[int] = []
        self.tokens: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate one batch and count it."""
        batch = self.collate(features)
        ids = batch["input_ids"]
        self.rows.append(int(ids.shape[0]))
        self.tokens.append(int(ids.numel()))
        return batch


def step_clock(sync_steps: Iterable[int] = ()) -> Any:
    """A `TrainerCallback` that takes `perf_counter()` at `on_train_begin` (`.begin`) and every `on_step_end` (`.ends`).

    The device is synchronised at the start and at the steps in `sync_steps` (the ends of measured spans).
    """
    from transformers import TrainerCallback

    def synchronize() -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):  # type: ignore[misc]
        """perf_counter() at the start of training and at the end of every optimizer step."""

        def __init__(self) -> None:
            self.begin = 0.0
            self.ends: list[float] = []
            self.sync = set(sync_steps)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Mark the start of the training loop."""
            synchronize()
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """Mark the end of an optimizer step (synchronised at measured boundaries and the last step)."""
            if state.global_step in self.sync or state.global_step == state.max_steps:
                synchronize()
            self.ends.append(time.perf_counter())

    return StepClock()


@dataclass(frozen=True)
class Span:
    """Work done over a stretch of training: tokens and examples fed, and the training seconds they took."""

    tokens: int
    examples: int
    seconds: float

    def rate(self, unit: str) -> float:
        """`tokens` or `examples` per second."""
        return float(getattr(self, unit)) / self.seconds


def trainer_span(clock: Any, counter: CountingCollator, skip: int = 0) -> Span:
    """The Trainer's steps after the first `skip`: their tokens and examples over the time they took.

    With `skip` 0 the time runs from `on_train_begin` to the end of the last step.
    """
    steps = len(clock.ends)
    if len(counter.rows) < steps:
        raise BenchError(f"the Trainer ran {steps} steps on {len(counter.rows)} batches (gradient accumulation?)")
    start = clock.ends[skip - 1] if skip else clock.begin
    return Span(sum(counter.tokens[skip:steps]), sum(counter.rows[skip:steps]), clock.ends[-1] - start)


# --- llmtune's run directory ---------------------------------------------------------------------------------


@dataclass
class LlmtuneRun:
    """What one llmtune run wrote: its training records, environment and final metrics."""

    root: Path
    train: list[dict[str, Any]]  # metrics.jsonl records of training windows, in step order
    environment: dict[str, Any]
    final_metrics: dict[str, Any]

    @classmethod
    def read(cls, root: str | Path) -> LlmtuneRun:
        """Read a finished run directory (it must hold training records and final metrics)."""
        root = Path(root)
        lines = (root / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        train = [r for r in records if "train/seconds" in r]
        if not train:
            raise BenchError(f"{root}/metrics.jsonl has no training records")
        if not (root / "final_metrics.json").is_file():
            raise BenchError(f"{root} has no final_metrics.json: the run did not finish")
        return cls(root, train, read_json(root / "environment.json"), read_json(root / "final_metrics.json"))

    @property
    def steps(self) -> list[int]:
        """The steps of the training records."""
        return [int(r["step"]) for r in self.train]

    @property
    def parameters(self) -> dict[str, Any]:
        """{strategy, total, trainable} from environment.json."""
        return dict(self.environment["parameters"])

    @property
    def data(self) -> dict[str, Any]:
        """The prepared data's stats as the run recorded them (environment.json `data`): per-split counts and
        `cache` ("hit DIR" or "miss, saved DIR")."""
        data = self.environment.get("data")
        if not isinstance(data, dict) or "cache" not in data:
            raise BenchError(f"{self.root}/environment.json has no data.cache: llmtune older than this benchmark")
        return dict(data)

    @property
    def cache(self) -> str:
        """environment.json's `data.cache`: "hit DIR" or "miss, saved DIR"."""
        return str(self.data["cache"])

    @property
    def cache_dir(self) -> str:
        """The tokenised-data cache directory the run trained on."""
        return cache_dir_of(self.cache)

    @property
    def data_counts(self) -> dict[str, Any]:
        """The prepared data's counts (see `data_counts`)."""
        return data_counts(self.data)

    @property
    def train_end_rss_mib(self) -> float | None:
        """The process's peak RSS when training ended: the last training record's `train/peak_rss_mib`."""
        value = self.train[-1].get("train/peak_rss_mib")
        return None if value is None else float(value)

    @property
    def mean_loss(self) -> float:
        """The mean of the logged windows' training losses."""
        return statistics.fmean(float(r["train/loss"]) for r in self.train)

    def span(self, skip: int = 0) -> Span:
        """Tokens, examples and training seconds of the windows after the first `skip` (cumulative counters)."""
        last = self.train[-1]
        first = self.train[skip - 1] if skip else {"train/tokens": 0, "train/examples": 0, "train/seconds": 0.0}
        return Span(
            int(last["train/tokens"] - first["train/tokens"]),
            int(last["train/examples"] - first["train/examples"]),
            float(last["train/seconds"] - first["train/seconds"]),
        )


# --- the parent side --------------------------------------------------------------------------------------


def run_child(
    script: str | Path,
    mode: str,
    args: Sequence[str],
    work: Path,
    name: str,
    source: LlmtuneSource,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run `script` in child `mode`; its output goes to `work/NAME.log`; return its result JSON.

    The result also gets `wall_s` (the child's whole life, seen from here) and `other_cpu_pct`: the CPU time
    other processes on the machine used while the child ran (all busy CPU time from /proc/stat minus the
    child's own), as a share of all cores (None where /proc/stat is missing).
    """
    result, log = work / f"{name}.json", work / f"{name}.log"
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source.path), env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(Path(script).resolve()), CHILD, mode, str(result), *args]
    busy, own, wall = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        try:
            done = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name} ran past the {timeout:.0f}s timeout; see {log}") from None
    wall = time.perf_counter() - wall
    busy_after = busy_cpu_seconds()
    if done.returncode != 0 or not result.is_file():
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise BenchError(f"{name} exited with {done.returncode}; last lines of {log}:\n{tail}")
    info: dict[str, Any] = read_json(result)
    info["wall_s"] = wall
    info["other_cpu_pct"] = None
    if busy is not None and busy_after is not None:
        others = (busy_after - busy) - (children_cpu_seconds() - own)
        info["other_cpu_pct"] = max(others, 0.0) / (wall * (os.cpu_count() or 1)) * 100
    return info


def add_parent_options(parser: Any, workdir: Path, timeout: float, quiet_wait: float, quiet_help: str) -> None:
    """The options every benchmark has: --workdir, --timeout, --quiet-wait, --no-snapshot, --json."""
    parser.add_argument("--workdir", default=str(workdir), help="Recipes, run directories, one log and result per run.")
    parser.add_argument("--timeout", type=float, default=timeout, help="Seconds one child run may take.")
    parser.add_argument("--quiet-wait", type=float, default=quiet_wait, help=quiet_help)
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="Import llmtune from the working tree in every run instead of from a copy taken at the start.",
    )
    parser.add_argument("--json", default=None, help="Also write every run's figures to this JSON file.")


class Children:
    """A benchmark's child runs: each through `run_child`, every result kept for the checks at the end."""

    def __init__(self, script: str | Path, args: Any) -> None:
        """Create `args.workdir` and take the llmtune snapshot (unless `args.no_snapshot`)."""
        self.script, self.timeout = script, args.timeout
        self.work = Path(args.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.source = llmtune_source(self.work, snapshot=not args.no_snapshot)
        self.infos: list[dict[str, Any]] = []

    def run(self, mode: str, rest: Sequence[str], name: str) -> dict[str, Any]:
        """One child run (see `run_child`); its result, with `name` added."""
        info = run_child(self.script, mode, rest, self.work, name, self.source, self.timeout)
        info["name"] = name
        self.infos.append(info)
        return info

    def check_llmtune_runs(self, runs: Sequence[Run]) -> None:
        """Give each llmtune run the data facts its run directory recorded (environment.json `data`: `cache`,
        `cache_dir`, `data_counts`); refuse runs whose data was not in the prepared cache (a miss) and runs that
        imported llmtune from anywhere but the snapshot. Each llmtune Run must have `figures["run_dir"]`."""
        for run in runs:
            if run.side != LLMTUNE:
                continue
            recorded = LlmtuneRun.read(run.figures["run_dir"])
            run.figures.update(cache=recorded.cache, cache_dir=recorded.cache_dir, data_counts=recorded.data_counts)
            if not recorded.cache.startswith("hit "):
                raise BenchError(f"{run.name}: its data was not in the prepared cache ({recorded.cache})")
        require_imported_from(self.infos, self.source)


@dataclass
class Run:
    """One measured run of one side."""

    side: str
    repeat: int
    rate: float  # the benchmark's throughput: training tokens/s or examples/s
    peak_rss_mib: float  # the child's own ru_maxrss over its whole life
    train_end_rss_mib: float | None  # peak RSS when training ended (before llmtune's final evaluation and save)
    wall_s: float  # the child process's life, seen from the parent
    other_cpu_pct: float | None  # CPU other processes used during the run, % of all cores (Linux)
    group: str = ""  # what the run belongs to besides its side (bench_sst2: the strategy)
    figures: dict[str, Any] = field(default_factory=dict)  # the benchmark's other figures and facts

    @property
    def name(self) -> str:
        """E.g. `llmtune #2`."""
        return f"{self.side} #{self.repeat}"


def alternate(
    repeats: int,
    sides: Sequence[tuple[str, Callable[[int], Run]]],
    quiet_wait: float = 0.0,
    on_run: Callable[[Run], None] | None = None,
) -> list[Run]:
    """Run each side once per repeat, alternating (A B A B ...), so that drift of the machine hits every side.

    `sides` are (name, run(repeat) -> Run); repeats count from 1. With `quiet_wait`, wait up to that many
    seconds for an idle machine before each run.
    """
    runs: list[Run] = []
    for repeat in range(1, repeats + 1):
        for _, measure in sides:
            if quiet_wait > 0:
                wait_for_quiet(quiet_wait)
            run = measure(repeat)
            runs.append(run)
            if on_run is not None:
                on_run(run)
    return runs


def require_imported_from(infos: Iterable[dict[str, Any]], source: LlmtuneSource) -> None:
    """Refuse results of children that imported llmtune from anywhere but `source`."""
    for info in infos:
        where = info.get("llmtune_file")
        if where is None or not Path(where).resolve().is_relative_to(source.path.resolve()):
            raise BenchError(f"a {info.get('mode', 'child')} run imported llmtune from {where}, not from {source.path}")


def require_same(runs: Sequence[Run], key: str, what: str, expected: Any = None) -> None:
    """Refuse to compare runs whose `figures[key]` differ (or differ from `expected`, when given)."""
    values = {run.name + (f" ({run.group})" if run.group else ""): run.figures.get(key) for run in runs}
    distinct = {json.dumps(v, sort_keys=True, default=str) for v in values.values()}
    if expected is not None:
        distinct.add(json.dumps(expected, sort_keys=True, default=str))
    if len(distinct) > 1:
        listed = "; ".join(f"{name}: {value}" for name, value in values.items())
        wanted = f" (expected {expected})" if expected is not None else ""
        raise BenchError(f"the runs did not do the same work: {what} differ{wanted}: {listed}")


def median(runs: Iterable[Run], value: Callable[[Run], float | None]) -> float | None:
    """The median of `value` over `runs`; None if any run lacks it or there are none."""
    values = [value(run) for run in runs]
    if not values or any(v is None for v in values):
        return None
    return float(statistics.median(v for v in values if v is not None))


def ratio(mine: float | None, theirs: float | None) -> float | None:
    """mine / theirs, or None when either is missing or theirs is 0."""
    return None if mine is None or not theirs else mine / theirs


def contention_warning(runs: Sequence[Run]) -> str | None:
    """A warning line naming the runs during which other processes used more than OTHER_CPU_WARN % of the CPUs."""
    return busy_warning({r.name + (f" ({r.group})" if r.group else ""): r.other_cpu_pct for r in runs})


def busy_warning(shares: dict[str, float | None]) -> str | None:
    """A warning line naming the runs (name -> other processes' CPU share, %) above OTHER_CPU_WARN %; None if none."""
    busy = [name for name, share in shares.items() if (share or 0.0) > OTHER_CPU_WARN]
    if not busy:
        return None
    return (
        f"warning: other processes used more than {OTHER_CPU_WARN:.0f}% of the CPUs during {', '.join(busy)}; "
        "their figures are contended (rerun on a quiet machine, or rely on the medians)"
    )


@dataclass(frozen=True)
class Column:
    """One column of a plain-text table: title, width, value format, alignment."""

    title: str
    width: int
    fmt: str = ""  # format spec of the values, e.g. ".1f", ",", ".0e"
    left: bool = False

    def cell(self, value: Any) -> str:
        """`value` formatted and padded to the column's width ("n/a" for None)."""
        text = "n/a" if value is None else format(value, self.fmt)
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"

    def head(self) -> str:
        """The title padded to the column's width."""
        return f"{self.title:<{self.width}}" if self.left else f"{self.title:>{self.width}}"


def table(columns: Sequence[Column], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A header line and one line per row, columns separated by one space."""
    lines = [" ".join(c.head() for c in columns)]
    lines += [" ".join(c.cell(v) for c, v in zip(columns, row, strict=True)) for row in rows]
    return lines
