"""`weightstream chat` as ollama's `run` behaves (issue 17): Ctrl-C stops the reply only, /bye,
/clear, multi-line input, an empty line asks again, a newline on exit, --system, readline history."""
import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

from weightstream.engine.cli.chat import chat_loop, read_message, start_history


def scripted(lines):
    """An input() stand-in: returns the lines in turn, then raises EOFError (Ctrl-D)."""
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_multiline_backslash_and_triple_quotes():
    assert read_message(scripted(["first \\", "second"])) == "first \nsecond"
    assert read_message(scripted(['"""', "a", "b", '"""'])) == "a\nb"
    assert read_message(scripted(['"""start', "end\"\"\""])) == "start\nend"
    assert read_message(scripted(['"""one line"""'])) == "one line"
    assert read_message(scripted([])) is None


def test_ctrl_c_at_the_prompt_clears_the_line():
    calls = iter(["half typed \\", KeyboardInterrupt, "again"])

    def read(prompt):
        value = next(calls)
        if value is KeyboardInterrupt:
            raise KeyboardInterrupt
        return value
    assert read_message(read) == "again"  # the half-typed line was dropped, not joined


@pytest.fixture(scope="module")
def engine(demo_model):
    from weightstream.engine.runtime.engine import Engine

    with Engine.load(demo_model, n_ctx=512) as e:
        yield e


class Spy:
    """Records the messages each engine.chat call was given (a copy: the loop appends later)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def chat(self, messages, *args, **kwargs):
        self.calls.append([dict(m) for m in messages])
        return self.engine.chat(messages, *args, **kwargs)


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(engine, capsys):
    spy, shown = Spy(engine), []

    def write(piece):  # Ctrl-C arriving while the third piece of the first reply is printed
        shown.append(piece)
        if len(spy.calls) == 1 and len(shown) == 3:
            raise KeyboardInterrupt

    chat_loop(spy, "You are terse.", 12, {}, scripted(["Tell me a long story.", "", "What is 2+2?"]), write)
    assert len(spy.calls) == 2  # the empty line neither quit nor reached the model
    first_reply = spy.calls[1][2]
    assert spy.calls[1][0] == {"role": "system", "content": "You are terse."}  # --system opens it
    assert first_reply["role"] == "assistant" and first_reply["content"] == "".join(shown[:3])  # what was shown
    assert len(shown) > 3  # the second reply was generated: the engine was freed by the Ctrl-C
    assert capsys.readouterr().out.endswith("\n")  # a newline on exit


def test_bye_and_clear(engine, capsys):
    spy = Spy(engine)
    chat_loop(spy, "Sys.", 3, {}, scripted(["Hello", "/clear", "Hi again", "/bye", "never read"]), lambda p: None)
    assert len(spy.calls) == 2
    assert spy.calls[1] == [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi again"}]
    assert "(conversation cleared)" in capsys.readouterr().err


def test_history_saved_across_sessions(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    path = tmp_path / "history"
    readline.clear_history()
    save = start_history(path)
    readline.add_history("what input() records for a typed line")
    save()
    readline.clear_history()
    start_history(path)  # the next session
    assert readline.get_history_item(readline.get_current_history_length()) == "what input() records for a typed line"


def test_sigint_mid_reply_returns_to_the_prompt(demo_model, tmp_path):
    """The real thing: SIGINT to a `weightstream chat` process while it writes a reply."""
    env = dict(os.environ, WEIGHTSTREAM_CACHE=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "weightstream", "chat", str(demo_model), "-n", "400", "-c", "1024"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b"Write a long story about a dragon who learns to cook.\n")
        proc.stdin.flush()
        out, sel = b"", selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while out.count(b">>> ") < 1 or len(out.split(b">>> ", 1)[1]) < 40:  # the reply is under way
            assert time.monotonic() < deadline and proc.poll() is None, (out, proc.stderr.read())
            if sel.select(1):
                out += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        rest, err = proc.communicate(b"/bye\n", timeout=120)
    finally:
        proc.kill()
    out += rest
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.count(b">>> ") == 2, out  # back at the prompt, then /bye
    assert out.endswith(b"\n") and b"^C (reply stopped)" in err and b"Traceback" not in err
