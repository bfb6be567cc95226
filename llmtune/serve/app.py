"""The HTTP application (FastAPI on uvicorn): task endpoints, health, info, Prometheus metrics, API key,
request ids, one access-log line per request, and 413 / 422 / 503 answers that say what to do."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llmtune.errors import UserError
from llmtune.serve.batching import Batcher, Job, Limits, QueueFull
from llmtune.serve.engine import Engine, GenerationOptions
from llmtune.serve.schemas import (
    AnswerRequest,
    ChatRequest,
    ClassifyRequest,
    GenerateRequest,
    RelateRequest,
    TagRequest,
)

log = logging.getLogger("llmtune.serve")
OPEN_PATHS = ("/health", "/metrics")  # load balancers and Prometheus reach these without the API key


class HTTPProblem(Exception):
    """An answer other than 200, with a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmtune_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "llmtune_request_seconds",
            "Request latency",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "llmtune_batch_rows", "Rows per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry
        )
        self.batch_seconds = Histogram("llmtune_batch_seconds", "Model time per batch", registry=self.registry)
        self.queue = Gauge("llmtune_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.queue.set_function(depth)
        self.tokens = Counter("llmtune_input_tokens", "Input tokens processed", registry=self.registry)
        self.generated = Counter("llmtune_generated_tokens", "Tokens generated", registry=self.registry)

    def batch(self, rows: int, tokens: int, seconds: float) -> None:
        """Record one model batch."""
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)
        self.tokens.inc(tokens)


class State:
    """What the endpoints share: the engine once loaded, the batcher, the metrics, the settings."""

    def __init__(self, load: Callable[[], Engine], limits: Limits, api_key: str | None) -> None:
        self.load, self.limits, self.api_key = load, limits, api_key
        self.engine: Engine | None = None
        self.loading: asyncio.Task[None] | None = None
        self.ready = False
        self.failed: str | None = None
        self.batcher = Batcher(limits, self._run_batch)
        self.metrics = Metrics(lambda: self.batcher.depth)
        self.batcher.on_batch = self.metrics.batch

    def _run_batch(self, kind: str, rows: list[Any]) -> list[Any]:
        assert self.engine is not None
        return self.engine.predict(rows)

    def start(self) -> None:
        """Start the worker, and the model's loading and warm-up off the event loop (the server answers /health
        with 503 meanwhile)."""
        self.batcher.start()
        self.loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            self.engine = await asyncio.get_running_loop().run_in_executor(self.batcher.executor, self._load_and_warm)
            self.ready = True
            log.info("model loaded and warmed up: ready")
        except Exception as exc:  # reported by /health; the server stays up to say so
            self.failed = f"the model failed to load: {exc}"
            log.error("error: %s", self.failed)

    def _load_and_warm(self) -> Engine:
        engine = self.load()
        if engine.endpoint == "generate":
            engine.generate("warm up", GenerationOptions(max_new_tokens=1))
        elif engine.endpoint == "answer":
            engine.predict(engine.answer_rows(["warm up?"], ["warm up"]))
        elif engine.endpoint == "tag":
            engine.predict(engine.tag_rows(["warm up"])[0])
        elif engine.endpoint == "relate":
            engine.predict(engine.relate_rows(["<e1>warm</e1> <e2>up</e2>"], None, None))
        else:
            engine.predict(engine.classify_rows(["warm up"], None if not engine.task.data.text_pair_column else ["x"]))
        return engine


def _engine(request: Request) -> Engine:
    state: State = request.app.state.llmtune
    if not state.ready or state.engine is None:
        raise HTTPProblem(503, state.failed or "the model is loading; retry shortly", {"Retry-After": "1"})
    return state.engine


def _require(engine: Engine, endpoint: str) -> None:
    if engine.endpoint != endpoint:
        raise HTTPProblem(404, f"a {engine.task.name} model serves POST /v1/{engine.endpoint}, not /v1/{endpoint}")


def _listed(value: str | list[str], field: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        raise HTTPProblem(422, f"{field}: give at least one text")
    return values


def _spans(value: Any, field: str, count: int) -> list[tuple[int, int]] | None:
    """One [start, end] per text (a single span for a single text), or None."""
    if value is None:
        return None
    spans = [value] if isinstance(value, tuple) else list(value)
    if len(spans) != count:
        raise HTTPProblem(422, f"{field}: {len(spans)} spans for {count} texts; give one per text")
    return spans


def _check_length(engine: Engine, texts: list[str], truncate: bool) -> int:
    """The longest text's tokens; 413 when over the model's limit and the client did not ask to truncate."""
    lengths = [engine.length(t) for t in texts]
    limit = engine.max_length
    if limit is not None and not truncate:
        for i, n in enumerate(lengths):
            if n > limit:
                raise HTTPProblem(
                    413, f"input {i} is {n} tokens; the model reads at most {limit}: shorten it or send truncate: true"
                )
    return max(lengths)


async def _submit(state: State, job: Job) -> Any:
    try:
        return await state.batcher.submit(job)
    except QueueFull:
        raise HTTPProblem(503, "the server is at capacity; retry shortly", {"Retry-After": "1"}) from None
    except UserError as exc:
        raise HTTPProblem(413, str(exc)) from None


def create_app(load: Callable[[], Engine], limits: Limits, api_key: str | None = None) -> FastAPI:
    """The application; `load` builds the engine (called once, off the event loop, after startup)."""
    state = State(load, limits, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        await state.batcher.stop()  # uvicorn lets requests in flight finish before this runs

    app = FastAPI(title="llmtune serve", lifespan=lifespan)
    app.state.llmtune = state

    app.add_middleware(Envelope, state=state)

    @app.exception_handler(HTTPProblem)
    async def problem(request: Request, exc: HTTPProblem) -> Response:
        return _problem(exc, getattr(request.state, "request_id", ""))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 422)

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "failed" if state.failed else "loading", "error": state.failed}, 503)

    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        engine = _engine(request)
        return {
            "model": engine.name,
            "task": engine.task.name,
            "endpoint": f"/v1/{engine.endpoint}",
            "chat": engine.chat,
            "labels": engine.labels(),
            "max_length": engine.max_length,
            "strategy": engine.recipe.strategy.kind,
            "final_metrics": engine.final_metrics,
            "limits": vars(state.limits),
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        engine = _engine(request)
        _require(engine, "classify")
        texts = _listed(body.text, "text")
        pairs = None if body.text_pair is None else _listed(body.text_pair, "text_pair")
        if pairs is not None and len(pairs) != len(texts):
            raise HTTPProblem(422, f"text_pair: {len(pairs)} pairs for {len(texts)} texts; give one per text")
        if (pairs is None) != (engine.task.data.text_pair_column is None):
            need = "needs" if pairs is None else "takes no"
            raise HTTPProblem(422, f"text_pair: this model {need} a second text per example")
        joined = texts if pairs is None else [t + " " + p for t, p in zip(texts, pairs, strict=True)]
        tokens = _check_length(engine, joined, body.truncate)
        records = await _submit(state, Job("classify", engine.classify_rows(texts, pairs), tokens))
        return _json({"results": [_classified(r, body.all_scores) for r in records]})

    @app.post("/v1/tag")
    async def tag(body: TagRequest, request: Request) -> Response:
        engine = _engine(request)
        _require(engine, "tag")
        texts = _listed(body.text, "text")
        tokens = _check_length(engine, texts, body.truncate)
        rows, spans = engine.tag_rows(texts)
        records = await _submit(state, Job("tag", rows, tokens))
        return _json({"results": [_entities(r, text, s) for r, text, s in zip(records, texts, spans, strict=True)]})

    @app.post("/v1/relate")
    async def relate(body: RelateRequest, request: Request) -> Response:
        engine = _engine(request)
        _require(engine, "relate")
        texts = _listed(body.text, "text")
        e1, e2 = _spans(body.e1, "e1", len(texts)), _spans(body.e2, "e2", len(texts))
        if (e1 is None) != (e2 is None):
            raise HTTPProblem(422, "e1, e2: give both entities' spans, or neither and mark them inline")
        try:
            rows = engine.relate_rows(texts, e1, e2)
        except ValueError as exc:
            raise HTTPProblem(422, f"text: {exc}") from None
        # Long sentences are cut around the two entities, as in training: no 413 here.
        tokens = max(engine.length(t) for t in texts)
        records = await _submit(state, Job("relate", rows, tokens))
        return _json({"results": [{"relation": r["relation"], "score": r["score"]} for r in records]})

    @app.post("/v1/answer")
    async def answer(body: AnswerRequest, request: Request) -> Response:
        engine = _engine(request)
        _require(engine, "answer")
        questions, contexts = _listed(body.question, "question"), _listed(body.context, "context")
        if len(questions) != len(contexts):
            raise HTTPProblem(422, f"context: {len(contexts)} contexts for {len(questions)} questions; one each")
        tokens = max(engine.length(q + " " + c) for q, c in zip(questions, contexts, strict=True))
        records = await _submit(state, Job("answer", engine.answer_rows(questions, contexts), tokens))
        return _json({"results": [{k: r[k] for k in ("answer", "score", "start", "end")} for r in records]})

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        engine = _engine(request)
        _require(engine, "generate")
        options = GenerationOptions(body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed)
        if body.stream:
            return _stream(state, engine, body.prompt, None, options, _generate_event, _generate_end)
        result = await _generation(state, engine, body.prompt, None, options)
        return JSONResponse(
            {"text": result.text, "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        engine = _engine(request)
        if not engine.chat:
            raise HTTPProblem(404, f"this {engine.task.name} model is not chat-tuned; use POST /v1/{engine.endpoint}")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        budget = body.max_completion_tokens or body.max_tokens
        temperature = body.temperature or None  # OpenAI's temperature 0 is greedy
        options = GenerationOptions(budget, temperature, None, body.top_p, body.seed)
        completion_id, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or engine.name
        if body.stream:
            return _stream(
                state,
                engine,
                None,
                messages,
                options,
                lambda piece: _chat_chunk(completion_id, created, name, {"content": piece}, None),
                lambda result: _chat_chunk(completion_id, created, name, {}, result.finish_reason) + "data: [DONE]\n\n",
            )
        result = await _generation(state, engine, None, messages, options)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                },
            }
        )

    return app


class Envelope:
    """What every request goes through: the API key, the request id (echoed, or made), the requests and latency
    metrics by route and status, and one access-log line once the response is sent (a stream's when it ends).

    A plain ASGI middleware rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs each request
    through an extra task and memory streams, CPU the event loop shares with the model on a small machine."""

    def __init__(self, app: Any, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500  # what an exception that escapes the application becomes

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        key = self.state.api_key
        try:
            if key and scope["path"] not in OPEN_PATHS and not _authorised(headers, key):
                refused = JSONResponse({"error": "missing or wrong API key", "request_id": request_id}, 401)
                await refused(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            endpoint = getattr(scope.get("route"), "path", "unmatched")  # the route: bounded label values
            self.state.metrics.requests.labels(endpoint, str(status)).inc()
            self.state.metrics.latency.labels(endpoint).observe(seconds)
            client = scope.get("client")
            log.info(
                '%s "%s %s" %d %.1fms id=%s',
                client[0] if client else "-",
                scope["method"],
                endpoint,
                status,
                1000 * seconds,
                request_id,
            )


def _authorised(headers: dict[bytes, bytes], key: str) -> bool:
    given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
    return hmac.compare_digest(given, key.encode())


def _json(content: dict[str, Any]) -> JSONResponse:
    """A 200 JSON answer made directly: the endpoints build plain JSON values, so FastAPI's encoding and
    validation of a returned dict (a measurable share of the event loop's time per request) are not needed."""
    return JSONResponse(content)


def _problem(problem: HTTPProblem, request_id: str) -> JSONResponse:
    return JSONResponse({"error": problem.message, "request_id": request_id}, problem.status, problem.headers)


def _classified(record: dict[str, Any], all_scores: bool) -> dict[str, Any]:
    if "score" in record and "label" not in record:  # regression
        return {"score": record["score"]}
    out = {"label": record["label"], "score": record["probability"]}
    if all_scores:
        out["scores"] = record["probabilities"]
    return out


def _entities(record: dict[str, Any], text: str, spans: list[tuple[int, int]]) -> dict[str, Any]:
    """Entities with character offsets in the text (word spans mapped to the words' characters)."""
    found = []
    for entity in record["entities"]:
        start, end = spans[entity["start"]][0], spans[entity["end"] - 1][1]
        found.append({"type": entity["type"], "start": start, "end": end, "text": text[start:end]})
    return {"entities": found, "tags": record["tags"]}


async def _generation(
    state: State, engine: Engine, prompt: str | None, messages: list[dict[str, Any]] | None, options: GenerationOptions
) -> Any:
    """A non-streamed generation: greedy with the default budget shares batches (equal to `llmtune predict`);
    anything else runs alone."""
    from llmtune.serve.engine import Generated

    greedy_default = not options.sampling and options.max_new_tokens in (None, engine.default_new_tokens())
    if greedy_default and options.seed is None and engine.task.name != "causal-lm":
        tokens = len(await asyncio.to_thread(engine.prompt_ids, prompt, messages))
        records = await _submit(state, Job("generate", [engine.prompt_row(prompt, messages)], tokens))
        text = records[0].get("response", records[0].get("prediction", ""))
        completion = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        finish = "length" if completion >= engine.default_new_tokens() else "stop"
        result = Generated(text, tokens, completion, finish)
    else:
        result = await _submit(state, Job(None, [], 0, run_alone=lambda: engine.generate(prompt, options, messages)))
    state.metrics.generated.inc(result.completion_tokens)
    return result


def _stream(
    state: State,
    engine: Engine,
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    options: GenerationOptions,
    event: Callable[[str], str],
    end: Callable[[Any], str],
) -> StreamingResponse:
    """Server-sent events: one per generated piece of text as the model produces it, then a closing event."""
    if state.batcher.depth >= state.limits.max_queue:
        raise HTTPProblem(503, "the server is at capacity; retry shortly", {"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def run() -> Any:
        try:
            return engine.generate(prompt, options, messages, lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t))
        finally:
            loop.call_soon_threadsafe(pieces.put_nowait, None)

    job = Job(None, [], 0, run_alone=run)
    finished = asyncio.ensure_future(state.batcher.submit(job))

    async def events() -> AsyncIterator[str]:
        while (piece := await pieces.get()) is not None:
            yield event(piece)
        try:
            result = await finished
        except Exception as exc:  # e.g. a prompt over the model's length
            yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
            return
        state.metrics.generated.inc(result.completion_tokens)
        yield end(result)

    return StreamingResponse(events(), media_type="text/event-stream")


def _generate_event(piece: str) -> str:
    return f"data: {json.dumps({'text': piece})}\n\n"


def _generate_end(result: Any) -> str:
    totals = {"done": True, "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
    return f"data: {json.dumps(totals)}\n\n"


def _chat_chunk(completion_id: str, created: int, model: str, delta: dict[str, str], finish: str | None) -> str:
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n"
