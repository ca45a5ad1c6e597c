"""The ASGI app: OpenAI's /v1/chat/completions and /v1/completions (SSE streaming or one JSON
answer), /v1/models, /health, /metrics (Prometheus), /v1/stats (the page's JSON) and the page at /.

    app = create_app(engine, model_id="smollm2", max_queue=8)   # uvicorn.run(app, ...)

The event loop never runs the engine: prompts are tokenized and figures computed in the thread
pool, generations in the GenerationWorker's thread (serve/worker.py), whose pieces of text arrive
on each Job's asyncio.Queue. A client that goes away cancels its job: every response looks for
the disconnect while it waits (_items), and a stream whose write fails is closed by Starlette."""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import protocol as P
from .figures import prometheus, snapshot
from .worker import GenerationWorker, Job, QueueFull

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.2  # how often a request looks for its client having gone (a stream waiting its turn writes nothing)


def create_app(engine, model_id: str, max_queue: int = 8) -> FastAPI:
    worker = GenerationWorker(engine, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()  # the engine is the caller's to close

    app = FastAPI(title="weightstream", lifespan=lifespan)
    app.state.worker, app.state.engine, app.state.model_id = worker, engine, model_id
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- errors in OpenAI's shape ----------------------------------------------------------------
    @app.exception_handler(P.ApiError)
    async def api_error(request, e: P.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(P.ApiError(400, f"the body is not valid JSON: {first['msg']}", code="json_invalid").body(),
                                status_code=400)
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        found = f", got {first['input']!r}" if "input" in first and first["type"] != "missing" else ""
        return JSONResponse(P.ApiError(400, f"{where or 'body'}: {first['msg']}{found}", param=where or None,
                                       code=first["type"]).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind).body(),
                            status_code=e.status_code)

    # ---- the model and the figures ---------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "generating": worker.running is not None,
                "queue_depth": worker.waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(engine.path.stat().st_mtime),
                                            "owned_by": "weightstream", "n_ctx": engine.model.n_ctx}]}

    @app.get("/v1/stats")
    async def stats():
        return await run_in_threadpool(snapshot, engine, worker, model_id)

    @app.get("/metrics")
    async def metrics():
        snap = await run_in_threadpool(snapshot, engine, worker, model_id)
        return PlainTextResponse(prometheus(snap), media_type="text/plain; version=0.0.4")

    # ---- generation --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatRequest, request: Request):
        ids = await run_in_threadpool(_chat_ids, engine, req)
        job = _submit(worker, req, ids, engine.model.n_ctx, default_max=None)
        rid = P.new_id("chatcmpl")
        if req.stream:
            def chunk(text, finish):
                return P.chat_chunk(rid, model_id, {"content": text} if text is not None else {}, finish)

            first = P.chat_chunk(rid, model_id, {"role": "assistant", "content": ""}, None)
            return _sse(worker, job, request, req, [first], chunk, rid, model_id)
        text, finish = await _collect(worker, job, request)
        return P.chat_response(rid, model_id, text, finish, P.usage(len(ids), job.generated))

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        ids = await run_in_threadpool(_prompt_ids, engine, req.prompt)
        job = _submit(worker, req, ids, engine.model.n_ctx, default_max=16)  # OpenAI's default for completions
        rid = P.new_id("cmpl")
        if req.stream:
            return _sse(worker, job, request, req, [], lambda text, finish: P.completion_chunk(
                rid, model_id, text or "", finish), rid, model_id)
        text, finish = await _collect(worker, job, request)
        return P.completion_response(rid, model_id, text, finish, P.usage(len(ids), job.generated))

    return app


def _chat_ids(engine, req: P.ChatRequest) -> list[int]:
    """The messages' prompt ids, as Engine.chat renders them (a template's refusal is the client's 400)."""
    messages = [{"role": m.role, "content": P.message_text(m, i)} for i, m in enumerate(req.messages)]
    try:
        return engine.chat_ids(messages)
    except Exception as e:  # noqa: BLE001 (a template may raise anything, e.g. for a role order it refuses)
        raise P.ApiError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None


def _prompt_ids(engine, prompt) -> list[int]:
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    else:
        n_vocab = engine.config.n_vocab
        bad = next((t for t in prompt if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise P.ApiError(400, f"prompt: token ids must be in [0, {n_vocab}), got {bad}", param="prompt")
        ids = list(prompt)
    if not ids:
        raise P.ApiError(400, "prompt: empty (no tokens to continue from)", param="prompt")
    return ids


def _submit(worker: GenerationWorker, req, ids: list[int], n_ctx: int, default_max) -> Job:
    args = P.generation_args(req, len(ids), n_ctx, default_max)
    job = Job(ids=ids, loop=asyncio.get_running_loop(), **args)
    try:
        worker.submit(job)
    except QueueFull as e:
        raise P.ApiError(503, str(e), type="server_error", code="queue_full") from None
    return job


async def _items(worker: GenerationWorker, job: Job, request: Request):
    """The job's items as the worker hands them over: ("text", str) ..., then ("done", finish
    reason) or ("error", exception). Stops early, cancelling the job, when the client disconnects
    (looked for every DISCONNECT_POLL_S, even while tokens flow and while the job waits its turn:
    a stream writes nothing then, so a failed write cannot tell) or when our caller is cancelled."""
    ended, checked = False, time.monotonic()
    get = asyncio.ensure_future(job.out.get())  # one pending get, kept across the polls: no item is lost
    try:
        while True:
            done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
            if time.monotonic() - checked >= DISCONNECT_POLL_S or not done:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if done:
                item = get.result()
                ended = item[0] != "text"
                yield item
                if ended:
                    return
                get = asyncio.ensure_future(job.out.get())
    finally:
        get.cancel()
        if not ended:
            worker.cancel(job)


async def _collect(worker: GenerationWorker, job: Job, request: Request) -> tuple[str, str]:
    """A non-streaming answer: the job's whole text and finish reason ("cancelled" if the client went away)."""
    pieces = []
    async for kind, value in _items(worker, job, request):
        if kind == "text":
            pieces.append(value)
        elif kind == "done":
            return "".join(pieces), value
        else:
            raise P.ApiError(500, f"generation failed: {value}", type="server_error")
    return "".join(pieces), "cancelled"


def _sse(worker: GenerationWorker, job: Job, request: Request, req, head: list[dict], chunk, rid: str,
         model_id: str) -> StreamingResponse:
    """Server-sent events, as OpenAI streams: `data: {chunk}` per piece of text, one with the
    finish reason, a usage chunk if stream_options.include_usage, then `data: [DONE]`."""
    include_usage = bool((req.stream_options or {}).get("include_usage"))

    async def events():
        for c in head:
            yield _event(c)
        items, ended = _items(worker, job, request), False
        try:
            async for kind, value in items:
                ended = kind != "text"
                if kind == "text":
                    yield _event(chunk(value, None))
                elif kind == "done":
                    yield _event(chunk(None, value))
                else:  # the status line is sent: the error goes in the stream, in OpenAI's body shape
                    yield _event(P.ApiError(500, f"generation failed: {value}", type="server_error").body())
        finally:  # reached too when Starlette closes us (a write failed: the client is gone)
            await items.aclose()  # which cancels the job if it has not ended
        if not ended:  # the client is gone
            return
        if include_usage:
            yield _event({"id": rid, "object": chunk(None, None)["object"], "model": model_id, "choices": [],
                          "usage": P.usage(len(job.ids), job.generated)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
