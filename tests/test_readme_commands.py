"""The README's commands run as shown (issue 17). Every command the README shows (its shell code
blocks, and each `weightstream ...` span of its text and tables) is extracted; optional [...] parts
are kept and the first of a|b alternatives taken, placeholders (MODEL, PROMPT, FILE, ...) become the
demo model, a short prompt, a text file. Every weightstream command must parse with the real
parser; every one not in SKIPPED below, with the reason it is skipped, is run in-process and must
exit 0. And every repository path the README names must exist."""
import io
import re
import shlex
from pathlib import Path

import pytest

from weightstream.engine.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

SERVES = ("a server: runs until stopped (tests/test_serve.py runs `weightstream serve` in a subprocess "
          "on a loopback port and talks to it)")
# command (as normalized, before placeholders) -> why this test does not run it
SKIPPED = {
    "pip install -e .": "network: installs the package (the test runs from an installed checkout)",
    'pip install -e ".[test,distributed]"': "network: installs the extras",
    "python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder": "the whole test suite, this test included",
    "weightstream demo": "96 tokens under the streaming budget: a minute on a shared core; "
                         "tests/test_cli.py runs the same demo with -n 12",
    "weightstream demo --moe": "big model: writes a 2.3 GB synthetic MoE (tests/test_cli.py runs it with -n 4)",
    "weightstream demo --memory-budget 92MiB --moe": "big model: the 2.3 GB synthetic MoE",
    'pip install -e ".[serve]"': "network: installs the serve extra",
    "weightstream serve ~/.cache/weightstream/SmolLM2-135M-Instruct.Q4_1.gguf --memory-budget 90MiB --prefetch lookahead":
        SERVES,
    "weightstream serve MODEL --port 8080 --memory-budget B": SERVES,
    "weightstream serve MODEL --host 127.0.0.1 --port 8080 --max-queue 8 --alias NAME": SERVES,
    "weightstream convert HF_DIR OUT.gguf --type f32 --imatrix F": "needs a Hugging Face checkpoint "
                                                                   "(network); tests/test_convert.py converts tiny ones",
    "weightstream quantize IN.gguf OUT.gguf q2_k --imatrix F": "needs an imatrix and requantizes 135 M weights "
                                                               "(minutes); tests/test_cli_edges.py quantizes a tiny model",
    "weightstream bench kernels --quick --write-table": "a benchmark (minutes), and writes the backend table",
    "weightstream bench kernels --write-table": "a benchmark (minutes), and writes the backend table",
    "weightstream bench decode MODEL -p 512 -n 128 -t 1,2": "a benchmark (minutes)",
    "weightstream bench bandwidth": "a benchmark: reads 1 GiB buffers",
    "weightstream bench io FILE --make-gib 1 --threads 1,2,4": "a benchmark: writes 1 GiB, drops its page cache",
    "weightstream synth --preset qwen3-30b-a3b --layers N OUT.gguf": "big model: GBs of synthetic experts",
    "weightstream run MODEL -p P --ray-address auto --stages 2 --stage-budgets 2GiB,2GiB --transport compiled":
        "needs a running Ray cluster (tests/test_distributed.py starts one)",
}


def readme_commands() -> list[str]:
    """Every command shown, normalized: "[--x A\\|B]" -> "--x A"."""
    shown = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S):
        if lang in ("", "sh", "bash", "shell"):
            shown += [part for line in body.splitlines() for part in line.split("&&")]
    text = re.sub(r"```.*?```", "", README, flags=re.S)
    shown += [span for span in re.findall(r"`([^`]+)`", text) if span.startswith("weightstream ")]
    out = []
    for cmd in shown:
        cmd = " ".join(cmd.replace("\\|", "|").split())
        if cmd.startswith("weightstream "):  # its usage syntax (not pip's ".[extras]")
            cmd = re.sub(r"[\[\]]", "", cmd)  # optional parts are shown: run them
            cmd = re.sub(r"(\S+?)(\|\S+)+", r"\1", cmd)  # alternatives: the first
        if cmd and cmd not in out:
            out.append(cmd)
    return out


COMMANDS = readme_commands()


def test_ci_runs_the_readmes_install_and_test_command():
    """.ci/run is what CI runs on a fresh clone: the README's test command, so that what the
    README tells a contributor to run is what CI proves passes (workers, --dist included)."""
    shown = re.search(r'^pip install -e "\.\[test,distributed\]" && python -m pytest .*$', README, re.M)
    assert shown, "README.md: no `pip install -e \".[test,distributed]\" && python -m pytest ...` line"
    ci = (ROOT / ".ci" / "run").read_text()
    assert shown.group(0) in ci.splitlines(), f".ci/run does not run the README's line {shown.group(0)!r}"


def test_extraction_found_the_commands():
    assert len(COMMANDS) > 15 and "weightstream info MODEL" in COMMANDS
    assert not [c for c in SKIPPED if c not in COMMANDS], "SKIPPED names a command the README no longer shows"


@pytest.fixture(scope="module")
def places(demo_model, tmp_path_factory):
    from pydoc_data.topics import topics

    tmp = tmp_path_factory.mktemp("readme")
    text = tmp / "text.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:3000])  # one chunk of 512 tokens, not two
    return {"MODEL": str(demo_model), "IN.gguf": str(demo_model), "PROMPT": "The capital of France is",
            "P": "The capital of France is", "N": "1", "T": "0.8", "S": "1", "B": "92MiB",
            "FILE": str(text), "CALIBRATION.txt": str(text), "imatrix.dat": str(tmp / "imatrix.dat"),
            "OUT.gguf": str(tmp / "out.gguf"), "out.json": str(tmp / "trace.json"), "out.png": str(tmp / "out.png"),
            "f.json": str(tmp / "f.json"), "HF_DIR": str(tmp / "hf"), "F": str(tmp / "imatrix.dat"),
            "COMMAND": "run", "TEXT": "You are terse."}


def argv_of(cmd: str, places: dict) -> list[str]:
    return [places.get(word, word) for word in shlex.split(cmd)[1:]]


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.startswith("weightstream ")])
def test_every_weightstream_command_parses(cmd, places, capsys):
    try:
        build_parser().parse_args(argv_of(cmd, places))
    except SystemExit as done:  # argparse exits with 2 on what does not exist, 0 after --help or --version
        assert done.code == 0, f"{cmd}: {capsys.readouterr().err}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c not in SKIPPED])
def test_readme_command_runs(cmd, places, monkeypatch, capsys):
    assert cmd.startswith("weightstream "), f"{cmd!r}: not a weightstream command; run it here or say in SKIPPED why not"
    argv = argv_of(cmd, places)
    if argv[0] == "chat":  # load, then quit (a reply is up to 512 tokens; tests/test_cli_chat.py chats)
        monkeypatch.setattr("sys.stdin", io.StringIO("/bye\n"))
    if argv[0] == "profile":
        pytest.importorskip("matplotlib")
    try:
        rc = main(argv)
    except SystemExit as done:  # --help, --version
        rc = done.code
    out, err = capsys.readouterr()
    assert rc == 0, f"{cmd}: exit {rc}\n{err[-2000:]}"
    assert "Traceback" not in err


def test_readme_paths_are_in_the_repository():
    named = set(re.findall(r"(?<![\w~$/.])((?:bench|docs|engine|kernels|tests|weightstream)/[\w./<>-]*\w)", README))
    assert "docs/DESIGN.md" in named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README.md names paths that are not in the repository: {missing}"
    assert not re.search(r"(?<![\w~.])/(work|home|tmp|Users)/", README), "README.md names an absolute path"
