"""A `weightstream serve` app on a free loopback port, in a thread of the test process (so a test
can read the app's worker and engine as well as talk HTTP to it): tests/test_serve.py and
tests/test_serve_page.py share it."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


@contextmanager
def serving(engine, model_id: str = "test-model", max_queue: int = 8):
    """Yields (base URL, app) while uvicorn serves create_app(engine, ...); stops it on exit."""
    import uvicorn

    from weightstream.engine.serve.app import create_app

    app = create_app(engine, model_id, max_queue)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free one, held by us until uvicorn takes the socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    """Poll condition() until it is truthy; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value
