"""`llmtune serve`: a task-aware HTTP server for what llmtune trained or exported.

`engine.py` loads the model and its task and runs predictions and generation; `batching.py` queues concurrent
requests and runs them in batches on one worker thread; `app.py` is the FastAPI application (endpoints,
health, info, Prometheus metrics, API key, request ids, access log); `schemas.py` the request bodies.
"""
