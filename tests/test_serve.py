"""`weightstream serve` (engine/serve/) through the real `openai` client and raw HTTP: chat and
completions, streaming, stop strings, seeds, the queue (turns, 503 when full), a client that goes
away cancelling its generation, OpenAI-shaped 400s, /metrics under a memory budget, the command."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the test extra's openai client")
httpx = pytest.importorskip("httpx")

from weightstream.engine import Engine  # noqa: E402
from tests.serving import serving, wait_for  # noqa: E402

N_CTX = 512
LONG = 400  # tokens a cancelled generation is asked for: ~10 s of decode if the cancel failed
STORY = "Once upon a time, in a land far away,"  # greedy SmolLM2 goes on past 150 tokens
HI = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def engine(demo_model):
    with Engine.load(demo_model, n_ctx=N_CTX, threads=1, profile=True) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine, "smollm2", max_queue=1) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def test_models_health_and_the_page(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "sseData" in httpx.get(url + "/static/app.js").text


def test_chat_answers_as_the_engine_does(engine, client):
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert text and text == engine.chat(HI, 24, temperature=0.0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.completion_tokens == engine.last_stats.generated_tokens
    assert r.usage.prompt_tokens == engine.last_stats.prompt_tokens


def test_completion_streamed_equals_whole(client):
    args = dict(model="smollm2", prompt="The capital of France is", max_tokens=12, temperature=0)
    whole = client.completions.create(**args)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    chunks = list(client.completions.create(stream=True, **args))
    assert len(chunks) > 2  # one per token, then the finish reason
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streams_with_usage(client):
    stream = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 10 and text
    whole = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=10, temperature=0)
    assert text == whole.choices[0].message.content


def test_stop_strings(client):
    args = dict(model="smollm2", prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0)
    full = client.completions.create(**args).choices[0].text
    assert " 8," in full, full  # the count goes on: a stop string to cut it at
    cut = client.completions.create(stop=[" 8,", "never"], **args).choices[0]
    assert cut.text == full[:full.index(" 8,")] and cut.finish_reason == "stop"


def test_same_seed_same_text(client):
    args = dict(model="smollm2", prompt="Once upon a time", max_tokens=20, temperature=1.0)
    a, b, c = (client.completions.create(seed=s, **args).choices[0].text for s in (7, 7, 8))
    assert a == b
    assert a != c  # 20 tokens at temperature 1: another seed gives other text


def test_concurrent_requests_take_turns(server, client):
    _, app = server
    worker = app.state.worker
    before = len(worker.finished)
    answers = [None, None]

    def ask(i):
        answers[i] = client.completions.create(model="smollm2", prompt=f"Request {i}:", max_tokens=40, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(a is not None and a.usage.completion_tokens > 0 for a in answers)
    first, second = sorted(list(worker.finished)[before:], key=lambda j: j.t_start)
    assert second.t_queued < first.t_end <= second.t_start  # asked while the first ran, started after it


@contextmanager
def streaming(url: str, body: dict, path: str = "/v1/completions", first_data: bool = True):
    """A streaming request held open (read up to its first `data:` line if first_data) until the
    block ends, which closes it: the client's disconnect. The line iterator stays referenced here:
    dropped, its finalizer would close the connection early."""
    with httpx.Client(timeout=30) as c, c.stream("POST", url + path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while first_data and not next(lines).startswith("data: "):
            pass
        yield r


def test_disconnect_cancels_the_generation(server, engine):
    url, app = server
    worker = app.state.worker
    n = len(worker.finished)
    with streaming(url, {"prompt": STORY, "max_tokens": LONG, "temperature": 0}):
        wait_for(lambda: worker.running is not None and worker.running.t_first, what="the generation to start")
        time.sleep(0.5)  # it goes on while the client stays
        assert worker.running is not None and len(worker.finished) == n
    wait_for(lambda: len(worker.finished) > n, what="the cancelled generation to end")
    job = worker.finished[-1]
    assert job.finish_reason == "cancelled" and job.generated < LONG // 4, (job.finish_reason, job.generated)
    assert engine.last_stats.generated_tokens == job.generated  # the engine itself stopped early
    # a plain (non-streaming) request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"prompt": STORY, "max_tokens": LONG, "temperature": 0}, timeout=1.0)
    wait_for(lambda: len(worker.finished) > n + 1, what="the abandoned request's generation to end")
    assert worker.finished[-1].finish_reason == "cancelled" and worker.finished[-1].generated < LONG // 2


def test_queue_full_answers_503(server, client):
    url, app = server
    worker = app.state.worker  # max_queue=1: one generating, one waiting
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=client.completions.create(
        model="smollm2", prompt="Hi", max_tokens=3)))
    with streaming(url, {"prompt": STORY, "max_tokens": LONG, "temperature": 0}):
        t.start()
        wait_for(lambda: worker.waiting == 1, what="the second request to wait in the queue")
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="smollm2", prompt="Hi", max_tokens=3)
        assert e.value.status_code == 503
        err = e.value.body if "message" in e.value.body else e.value.body["error"]
        assert err["code"] == "queue_full" and "waiting" in err["message"]
    t.join(60)  # the long one was cancelled when its client left: the waiting one ran
    assert waiting["r"].usage.completion_tokens > 0


def test_a_waiting_request_whose_client_leaves_is_dropped(server):
    url, app = server
    worker = app.state.worker
    with streaming(url, {"prompt": STORY, "max_tokens": LONG, "temperature": 0}):
        with streaming(url, {"messages": HI, "max_tokens": 5}, "/v1/chat/completions", first_data=False):
            wait_for(lambda: worker.waiting == 1, what="the second request to wait")
            cancelled, done = worker.cancelled, len(worker.finished)
        wait_for(lambda: worker.waiting == 0, what="the queue to drop the request whose client left")
        assert worker.cancelled == cancelled + 1 and worker.running is not None  # the first still runs
    wait_for(lambda: len(worker.finished) > done, what="the first generation to stop")
    assert [j.finish_reason for j in list(worker.finished)[done:]] == ["cancelled"]  # the dropped one never ran


BAD = [  # (path, body, param named in the error)
    ("/v1/chat/completions", {"messages": HI, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": HI, "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"messages": HI, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "stop": ""}, "stop"),
    ("/v1/chat/completions", {"messages": HI, "seed": -5}, "seed"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": N_CTX}, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * (N_CTX + 10)}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p.split('/')[-1]}-{param}" for p, _, param in BAD])
def test_bad_requests_get_openai_shaped_400(server, path, body, param):
    r = httpx.post(server[0] + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"], err


def test_null_means_the_default(server):
    body = {"messages": HI, "max_tokens": 3, "temperature": None, "top_p": None, "n": None, "stop": None,
            "seed": None, "stream": None, "logprobs": None, "tools": None, "user": "extra fields are ignored"}
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def test_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="smollm2", prompt="Hi", max_tokens=10 * N_CTX)
    r = httpx.post(str(client.base_url) + "chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in r.json()["error"]["message"]


# ---- a MoE under a memory budget: the expert figures --------------------------------------------
@pytest.fixture(scope="module")
def moe_engine(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.hf_models import moe_gguf_file

    path = moe_gguf_file("qwen3moe", tmp_path_factory.mktemp("moe"))
    with Engine.load(path, stream="experts", n_ctx=128, n_batch=16) as eng:
        plan = eng.plan
    budget = plan.host + plan.resident + plan.kv_cache + plan.work + 4 * plan.slot_bytes  # 4 of 2 layers x 8 experts fit
    with Engine.load(path, n_ctx=128, n_batch=16, memory_budget=budget, threads=1, profile=True) as eng:
        assert eng.store is not None and eng.store.n_slots == 4
        yield eng


def _metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_under_a_memory_budget(moe_engine):
    with serving(moe_engine, "moe") as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="moe", prompt="Hello there", max_tokens=24, temperature=0.8, seed=1)
        assert r.usage.completion_tokens == 24
        text = httpx.get(url + "/metrics").text
        stats = httpx.get(url + "/v1/stats").json()
    for name in ("queue_depth", "tokens_per_second", "last_time_to_first_token_seconds", "expert_cache_hit_rate",
                 "stall_ms_per_token", "read_bytes_per_token", "read_gbps", "time_to_first_token_seconds"):
        assert f"# TYPE weightstream_{name} " in text, name
    m = _metrics(text)
    x = moe_engine.store.summary()
    assert 0 < m["weightstream_expert_cache_hit_rate"] < 1 and m["weightstream_expert_cache_hit_rate"] == pytest.approx(x["hit_rate"])
    assert m["weightstream_expert_cache_misses_total"] == x["misses"] > 0
    assert m["weightstream_generated_tokens_total"] == 24 and m["weightstream_tokens_per_second"] > 0
    assert m["weightstream_stall_ms_per_token"] > 0 and m["weightstream_read_bytes_per_token"] > 0
    assert m["weightstream_read_gbps"] > 0 and m["weightstream_time_to_first_token_seconds_count"] == 1
    layers = {int(k.split('"')[1]): v for k, v in m.items() if k.startswith("weightstream_layer_hit_rate{")}
    assert sorted(layers) == list(range(moe_engine.config.n_layer))
    assert stats["generation"]["decode_passes"] == 23  # the profiler's records are this generation's
    assert stats["experts"]["hits"] == x["hits"] and stats["memory"]["budget"] == moe_engine.plan.budget


def test_the_page_ships_with_the_package():
    """Every file under engine/serve/static/ matches pyproject's package-data for the serve package
    (a file left out works from a clone and is missing from a wheel)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from fnmatch import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "weightstream.engine.serve" in setup["packages"]
    patterns = setup["package-data"]["weightstream.engine.serve"]
    static = root / "engine" / "serve" / "static"
    files = [p.relative_to(static.parent).as_posix() for p in static.rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(files)
    assert [f for f in files if not any(fnmatch(f, pat) for pat in patterns)] == []


# ---- the command ---------------------------------------------------------------------------------
def test_the_serve_command(demo_model, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "weightstream.engine", "serve", demo_model, "-t", "1", "-c", "256",
                             "--port", str(port), "--alias", "demo", "--memory-budget", "110MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_for(up, timeout=60, what=f"weightstream serve on port {port}")
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 5, "temperature": 0}).json()
        assert r["model"] == "demo" and r["usage"]["completion_tokens"] == 5
        assert re.search(r"^weightstream_expert_cache_misses_total [1-9]", httpx.get(url + "/metrics").text, re.M)
        assert json.loads(httpx.get(url + "/v1/stats").text)["memory"]["budget"] == 110 * 2**20
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Uvicorn running" in out or "weightstream serve: http://" in out, out


def test_the_command_names_the_missing_extra(demo_model, monkeypatch, capsys):
    from weightstream.engine.cli.main import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    assert main(["serve", str(demo_model)]) == 1
    assert "serve needs the serve extra (uvicorn is missing): pip install 'weightstream[serve]'" in capsys.readouterr().err
