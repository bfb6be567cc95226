"""`llmtune serve`, started for real on loopback in a subprocess with tiny models: every endpoint of every task,
batched results equal to unbatched ones and to `llmtune predict`, streaming, the 401 / 413 / 422 / 503 paths,
/health, /metrics, and SIGTERM draining the requests in flight. Load loops are bounded in count and time."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install 'llmtune[test]')")
pytest.importorskip("fastapi", reason="llmtune serve needs the serve extra (pip install 'llmtune[serve]')")

from tests.helpers import (  # noqa: E402
    Server,
    classification_recipe,
    free_port,
    instruction_pairs,
    instruction_recipe,
    ner_recipe,
    ner_sentences,
    qa_examples,
    qa_recipe,
    run_cli_in_process,
    sentiment_rows,
    seq2seq_recipe,
    translation_pairs,
    write_conll,
    write_jsonl,
    write_parallel,
    write_recipe,
    write_squad,
    write_tsv,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_cli")]

SENTENCES = ["The small parser returns a value.", "The lazy socket returns a value.", "The list returns a value."]


@pytest.fixture(scope="module")
def runs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short run per served task (tiny models), trained once for the module, and an int8 export."""
    from _pytest.capture import CaptureFixture, SysCapture

    root = tmp_path_factory.mktemp("serve-runs")
    capsys = CaptureFixture(SysCapture, None, _ispytest=True)  # type: ignore[arg-type]
    capsys._start()
    try:
        recipes: dict[str, dict[str, Any]] = {}
        train, dev = (
            write_tsv(root / "train.tsv", sentiment_rows(300, 1)),
            write_tsv(root / "dev.tsv", sentiment_rows(32, 2)),
        )
        recipes["cls"] = classification_recipe(tiny_models["bert"], train, dev, root / "cls", max_steps=40)
        ner_files = [write_conll(root / f"{n}.conll", ner_sentences(k, s)) for n, k, s in (("t", 200, 1), ("v", 16, 2))]
        recipes["ner"] = ner_recipe(tiny_models["bert"], *ner_files, root / "ner", max_steps=30)
        squad = [write_squad(root / f"{n}.json", qa_examples(k, s)) for n, k, s in (("t", 48, 1), ("v", 8, 2))]
        recipes["qa"] = qa_recipe(tiny_models["bert"], *squad, root / "qa")
        parallel = {"train": write_parallel(root, "s2s-train", translation_pairs(200, 1))}
        parallel["validation"] = write_parallel(root, "s2s-valid", translation_pairs(8, 2))
        recipes["s2s"] = seq2seq_recipe(tiny_models["t5"], {"files": parallel, "format": "parallel"}, root / "s2s")
        recipes["s2s"]["train"].update(max_steps=20, eval_every=None)
        write_jsonl(root / "train.jsonl", instruction_pairs(120, 1))
        write_jsonl(root / "valid.jsonl", instruction_pairs(8, 2))
        recipes["instruct"] = instruction_recipe(tiny_models["gpt2"], root, root / "instruct")
        recipes["instruct"]["train"].update(max_steps=20, eval_every=None)
        chats = [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in instruction_pairs(120, 3)
        ]
        (root / "chat").mkdir()
        write_jsonl(root / "chat" / "train.jsonl", chats)
        write_jsonl(root / "chat" / "valid.jsonl", chats[:8])
        chat = instruction_recipe(tiny_models["gpt2"], root / "chat", root / "chat-run", max_length=48)
        for key in ("prompt_column", "response_column"):
            chat["data"].pop(key)
        chat["data"]["messages_column"] = "messages"
        chat["train"].update(max_steps=20, eval_every=None)
        recipes["chat"] = chat
        out = {}
        for name, recipe in recipes.items():
            code, _, err = run_cli_in_process(capsys, "finetune", str(write_recipe(root / f"{name}.yaml", recipe)))
            assert code == 0, err[-2000:]
            out[name] = Path(recipe["output_dir"])
        code, _, err = run_cli_in_process(capsys, "export", str(out["cls"]), "--quantize", "int8")
        assert code in (0, 1), err[-2000:]
        out["int8"] = out["cls"] / "export"
        out["root"] = root
        return out
    finally:
        capsys.close()


@pytest.fixture(scope="module")
def servers(runs: dict[str, Path]) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for name in ("cls", "ner", "qa", "s2s", "instruct", "chat", "int8"):
            started[name] = Server(runs[name], log=runs["root"] / f"{name}.log")
        yield started
    finally:
        for server in started.values():
            if server.process.poll() is None:
                server.stop()


def predicted(capsys: pytest.CaptureFixture[str], run: Path, rows: list[dict[str, Any]], tmp: Path) -> list[dict]:
    """`llmtune predict` on the rows, as a file: the reference the server must equal."""
    data = write_jsonl(tmp / "rows.jsonl", rows)
    code, _, err = run_cli_in_process(
        capsys, "predict", str(run), "--data", str(data), "--output", str(tmp / "p.jsonl")
    )
    assert code == 0, err[-2000:]
    return [json.loads(line) for line in (tmp / "p.jsonl").read_text().splitlines()]


def test_classify_equals_predict_batched_or_not(
    servers: dict[str, Server], runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = servers["cls"]
    batched = server.post("/v1/classify", {"text": SENTENCES, "all_scores": True})
    assert batched.status_code == 200 and batched.headers["x-request-id"]
    results = batched.json()["results"]
    alone = [server.post("/v1/classify", {"text": s, "all_scores": True}).json()["results"][0] for s in SENTENCES]
    reference = predicted(capsys, runs["cls"], [{"sentence": s} for s in SENTENCES], tmp_path)
    for got, single, want in zip(results, alone, reference, strict=True):
        assert got["label"] == single["label"] == want["label"]
        assert got["score"] == pytest.approx(want["probability"], abs=1e-5)
        assert single["score"] == pytest.approx(want["probability"], abs=1e-5)
        assert got["scores"] == pytest.approx(want["probabilities"], abs=1e-5)
    info = server.client.get("/info").json()
    assert info["task"] == "sequence-classification" and info["labels"] == ["neg", "pos"]
    assert info["final_metrics"]["eval/accuracy"] > 0 and info["max_length"] == 128


def test_int8_export_is_served_on_onnx_runtime(servers: dict[str, Server], runs: dict[str, Path]) -> None:
    fp32 = servers["cls"].post("/v1/classify", {"text": SENTENCES}).json()["results"]
    int8 = servers["int8"].post("/v1/classify", {"text": SENTENCES}).json()["results"]
    assert sum(a["label"] == b["label"] for a, b in zip(fp32, int8, strict=True)) >= 2
    assert servers["int8"].client.get("/info").json()["model"] == str(runs["int8"])


def test_tag_gives_entities_with_character_offsets_equal_to_predict(
    servers: dict[str, Server], runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["John  Smith lives in New York .", "the parser of Acme Corp calls Mary"]
    response = servers["ner"].post("/v1/tag", {"text": texts})
    assert response.status_code == 200
    reference = predicted(capsys, runs["ner"], [{"tokens": t.split()} for t in texts], tmp_path)
    for result, want, text in zip(response.json()["results"], reference, texts, strict=True):
        assert result["tags"] == want["tags"]
        assert [e["type"] for e in result["entities"]] == [e["type"] for e in want["entities"]]
        for entity, expected in zip(result["entities"], want["entities"], strict=True):
            assert text[entity["start"] : entity["end"]] == entity["text"]
            assert entity["text"].split() == expected["text"].split()  # the words, with the text's own spacing


def test_answer_gives_the_span_predict_gives(
    servers: dict[str, Server], runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = qa_examples(3, seed=7)
    body = {"question": [e["question"] for e in examples], "context": [e["context"] for e in examples]}
    results = servers["qa"].post("/v1/answer", body).json()["results"]
    rows = [{"id": str(i), "question": e["question"], "context": e["context"]} for i, e in enumerate(examples)]
    reference = predicted(capsys, runs["qa"], rows, tmp_path)
    for got, want, e in zip(results, reference, examples, strict=True):
        assert got["answer"] == want["answer"] and got["score"] == pytest.approx(want["score"], abs=1e-4)
        if got["start"] is not None:
            assert e["context"][got["start"] : got["end"]] == got["answer"]


@pytest.mark.parametrize("name", ["s2s", "instruct"])
def test_greedy_generation_equals_predict_and_streams_the_same_text(
    servers: dict[str, Server], runs: dict[str, Path], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = servers[name]
    prompts = ["parser module list", "token frame"] if name == "s2s" else ["the small parser", "the lazy socket"]
    column = "source" if name == "s2s" else "prompt"
    reference = predicted(capsys, runs[name], [{column: p} for p in prompts], tmp_path)
    key = "prediction" if name == "s2s" else "response"
    for prompt, want in zip(prompts, reference, strict=True):
        text = server.post("/v1/generate", {"prompt": prompt}).json()["text"]
        assert text == want[key]
        with server.client.stream("POST", "/v1/generate", json={"prompt": prompt, "stream": True}) as stream:
            events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1]["done"] is True
        assert "".join(e["text"] for e in events[:-1]) == text
        if name == "instruct" and events[-1]["completion_tokens"] > 1:
            assert len(events) > 2  # delivered piece by piece, not at the end


def test_sampling_is_seeded_and_chat_completions_follow_the_openai_form(servers: dict[str, Server]) -> None:
    server = servers["instruct"]
    body = {"prompt": "the nested list", "temperature": 1.5, "top_k": 20, "seed": 3, "max_new_tokens": 8}
    assert server.post("/v1/generate", body).json() == server.post("/v1/generate", body).json()
    chat = servers["chat"]
    messages = [{"role": "user", "content": "the small parser"}]
    answer = chat.post("/v1/chat/completions", {"model": "tiny", "messages": messages, "temperature": 0}).json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    with chat.client.stream("POST", "/v1/chat/completions", json={"messages": messages, "stream": True}) as stream:
        lines = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == answer["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert servers["instruct"].post("/v1/chat/completions", {"messages": messages}).status_code == 404


def test_wrong_fields_lengths_and_endpoints(servers: dict[str, Server]) -> None:
    server = servers["cls"]
    wrong = server.post("/v1/classify", {"txt": "hello"})
    assert wrong.status_code == 422 and "text" in wrong.json()["error"]
    bad_json = server.client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422
    long = " ".join(["parser"] * 400)
    too_long = server.post("/v1/classify", {"text": long})
    assert too_long.status_code == 413 and "truncate" in too_long.json()["error"]
    assert server.post("/v1/classify", {"text": long, "truncate": True}).status_code == 200
    assert server.post("/v1/tag", {"text": "x"}).status_code == 404
    echoed = server.client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    metrics = server.client.get("/metrics").text
    assert 'llmtune_requests_total{endpoint="/v1/classify",status="413"} 1.0' in metrics
    assert 'llmtune_requests_total{endpoint="/v1/classify",status="422"} 2.0' in metrics
    assert "llmtune_batch_rows_bucket" in metrics and "llmtune_queue_depth" in metrics


def test_api_key_and_a_full_queue(runs: dict[str, Path], tmp_path: Path) -> None:
    server = Server(
        runs["cls"], "--api-key", "s3cret", "--max-queue", "1", "--max-batch-size", "1", log=tmp_path / "log"
    )
    try:
        assert server.client.get("/health").status_code == 200  # open to load balancers
        assert server.post("/v1/classify", {"text": "x"}).status_code == 401
        assert server.post("/v1/classify", {"text": "x"}, authorization="Bearer s3cret").status_code == 200
        assert server.post("/v1/classify", {"text": "x"}, **{"x-api-key": "s3cret"}).status_code == 200
        codes: list[int] = []
        retry: list[str] = []

        def one() -> None:
            response = server.post("/v1/classify", {"text": SENTENCES * 10}, **{"x-api-key": "s3cret"})
            codes.append(response.status_code)
            retry.append(response.headers.get("retry-after", ""))

        threads = [threading.Thread(target=one) for _ in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
        assert all(r == "1" for c, r in zip(codes, retry, strict=True) if c == 503)
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_the_request_in_flight(runs: dict[str, Path], tmp_path: Path) -> None:
    server = Server(runs["instruct"], log=tmp_path / "log")
    body = {"prompt": "the small parser", "stream": True, "temperature": 1.0, "seed": 0, "max_new_tokens": 60}
    with server.client.stream("POST", "/v1/generate", json=body) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.process.send_signal(signal.SIGTERM)  # mid-generation
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(rest[-1][6:])["done"] is True and len(rest) + 1 >= 2 and first
    assert server.process.wait(timeout=120) == 0
    log = (tmp_path / "log").read_text()
    assert '"POST /v1/generate" 200' in log and "llmtune serve: stopped" in log


def test_health_is_503_until_the_model_is_loaded(runs: dict[str, Path]) -> None:
    """The real application on loopback in this process, with a loader held back until the test lets it go."""
    import asyncio

    import uvicorn

    from llmtune.serve.app import create_app
    from llmtune.serve.batching import Limits
    from llmtune.serve.engine import load_engine

    release = threading.Event()

    def load() -> Any:
        release.wait(timeout=60)
        return load_engine(str(runs["cls"]))

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(load, Limits()), port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                first = client.get("/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert first.status_code == 503 and first.json()["status"] == "loading"
        assert client.post("/v1/classify", json={"text": "x"}).status_code == 503
        release.set()
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/health").status_code == 200
        assert client.post("/v1/classify", json={"text": "x"}).status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=60)
        client.close()


def test_bad_model_and_port_are_one_line(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli_in_process(
        capsys, "serve", str(tmp_path / "nothing-here"), "--task", "sequence-classification"
    )
    assert code == 2 and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        code, _, err = run_cli_in_process(capsys, "serve", str(runs["cls"]), "--port", port)
    assert code == 2 and "cannot listen there" in err and err.count("\n") == 1


def test_predict_wraps_the_rows_without_hashing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine.predict hands the task a Dataset of the rows, in order, without fingerprinting it (Dataset.from_list
    hashes every row with dill: the largest cost after the model of a one-sentence MiniLM request)."""
    import datasets.arrow_dataset

    from llmtune.serve.engine import Engine

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("the rows were hashed for a fingerprint")

    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)

    class Task:
        name = "sequence-classification"

        def predict_rows(self, model: Any, rows: Any) -> list[dict[str, Any]]:
            return [{"index": i, "text": row["sentence"]} for i, row in reversed(list(enumerate(rows)))]

    engine = Engine("m", Task(), None, None, None)
    assert engine.predict([{"sentence": "a"}, {"sentence": "b"}]) == [
        {"index": 0, "text": "a"},
        {"index": 1, "text": "b"},
    ]


def test_batch_wait_ends_when_the_previous_batch_is_back() -> None:
    """Under load a batch waits up to batch_wait_ms to fill, but no longer than until as many rows wait as the
    previous batch held (closed-loop clients send nothing more until answered: waiting would idle the model)."""
    import asyncio

    from llmtune.serve.batching import Batcher, Job, Limits

    batches: list[int] = []

    def run_batch(kind: str, rows: list[Any]) -> list[Any]:
        batches.append(len(rows))
        return rows

    async def rounds() -> tuple[float, float]:
        batcher = Batcher(Limits(max_batch_size=32, batch_wait_ms=300), run_batch)
        batcher.start()
        try:

            async def round_of(count: int) -> float:
                started = time.perf_counter()
                jobs = [batcher.submit(Job("classify", [i], 1)) for i in range(count)]
                assert await asyncio.wait_for(asyncio.gather(*jobs), 10) == [[i] for i in range(count)]
                return time.perf_counter() - started

            await round_of(8)
            back = await round_of(8)  # all eight clients are back: no wait
            fewer = await round_of(4)  # half of them: the batch waits for more, up to batch_wait_ms
            return back, fewer
        finally:
            await batcher.stop()

    back, fewer = asyncio.run(rounds())
    assert back < 0.25, f"the second batch of 8 waited {back:.3f}s for rows that could not come"
    assert fewer >= 0.29, f"a half-full batch ran after {fewer:.3f}s, before batch_wait_ms"
    assert sum(batches) == 20


def test_the_listening_socket_gives_connections_tcp_nodelay() -> None:
    """Connections accepted on `llmtune serve`'s socket get TCP_NODELAY from asyncio: without it every response's
    body, written after its headers, waited for the client's delayed ACK (bench_serve found it)."""
    import asyncio
    import socket as sockets

    from llmtune.serve.run import _bind

    async def accepted_nodelay() -> int:
        listener = _bind("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(sockets.IPPROTO_TCP, sockets.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
            value = await asyncio.wait_for(seen, 10)
            writer.close()
            return value
        finally:
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_length_counts_every_token_whatever_the_model_thread_left_set(runs: dict[str, Path]) -> None:
    """The length check (413) counts with its own copy of the fast tokenizer: a long text is counted in full even
    after a batch left the shared tokenizer truncating."""
    from llmtune.serve.engine import load_engine

    engine = load_engine(str(runs["cls"]))
    texts = ["the small parser", "", " ".join(["parser"] * 400), "héllo wörld ☃"]
    engine.predict(engine.classify_rows(texts[:2], None))  # the shared tokenizer now truncates to max_length
    for text in texts:
        assert engine.length(text) == len(engine.tokenizer(text, verbose=False)["input_ids"])
    assert engine.max_length is not None and engine.length(texts[2]) > engine.max_length
