"""`weightstream serve`: an OpenAI-compatible HTTP server over one Engine, with a live page.

    app.py       the FastAPI app: endpoints, SSE, errors in OpenAI's shape
    protocol.py  request models, their checks, response shapes
    worker.py    the generation thread and its bounded queue (one generation at a time)
    figures.py   /v1/stats and /metrics from the engine, its expert store and profiler
    static/      the page at / (plain HTML/JS/CSS)

Needs the `serve` extra (fastapi, uvicorn): this package is imported only by `weightstream serve`."""
