"""Starting the server: check what can be checked before listening, bind the port, run uvicorn until a signal."""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from llmtune.errors import UserError

EXTRA = "pip install 'llmtune[serve]'"


def serve(
    model: str,
    task: str | None,
    host: str,
    port: int,
    max_batch_size: int,
    max_batch_tokens: int,
    batch_wait_ms: float,
    max_queue: int,
    api_key: str | None,
) -> None:
    """`llmtune serve`: refuse a bad MODEL / task / port in one line, then serve until SIGINT or SIGTERM."""
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"serve needs the {module} package, in the serve extra: {EXTRA}") from None
    import uvicorn

    from llmtune.inference import EvalArgs, eval_recipe, resolve_model
    from llmtune.modeling import load_config
    from llmtune.serve.app import create_app
    from llmtune.serve.batching import Limits
    from llmtune.serve.engine import ENDPOINTS, load_engine

    ref = resolve_model(model)
    trust = ref.recipe.model.trust_remote_code if ref.recipe is not None else False
    recipe = eval_recipe(ref, EvalArgs(task=task), load_config(ref.model, trust), need_data=False)
    if recipe.entry.name not in ENDPOINTS:
        raise UserError(f"serve: a {recipe.entry.name} model has nothing to serve; serve a fine-tuned or causal LM")
    listener = _bind(host, port)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    limits = Limits(max_batch_size, max_batch_tokens, batch_wait_ms, max_queue)
    app = create_app(lambda: load_engine(model, task), limits, api_key)
    print(
        f"llmtune serve: {recipe.entry.name} model {model} on http://{host}:{listener.getsockname()[1]} "
        "(GET /health answers 200 once the model is loaded)",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=60)
    _server_class(uvicorn)(config).run(sockets=[listener])
    print("llmtune serve: stopped", flush=True)


def _server_class(uvicorn: Any) -> Any:
    """uvicorn's server, stopping gracefully on SIGINT / SIGTERM and then exiting 0: uvicorn itself re-raises
    the signal after its graceful shutdown, which would end the process with 143 after a clean stop."""

    class Server(uvicorn.Server):  # type: ignore[misc, name-defined]
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on connections whose socket says TCP, and
    # without it a response's body (written after its headers) waits for the client's delayed ACK (Nagle).
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise UserError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror}); choose another port"
        ) from None
    listener.listen(2048)
    return listener
