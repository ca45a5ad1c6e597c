"""Record, then compare, the engine's outputs on the test fixtures: a guard for refactors that must
not change a single bit (moving modules, reshaping the store or the decode state).

    python -m tests.golden_outputs record DIR    # writes the model files and DIR/golden.npz
    python -m tests.golden_outputs compare DIR   # recomputes on the same files; exit 1 on any difference

Cases: every architecture of tests/hf_models.CASES (converted once, F32 and Q8_0, kernels chosen
by "auto" and by each named backend); the two MoE fixtures resident and streamed under every cache
policy, prefetch mode and I/O mode of tests/test_streaming.py; the demo model (Q4_1) resident and
with its FFNs streamed under a budget. Each case stores the logits of a fixed prompt and greedy
tokens decoded through the cache. Outputs depend on the CPU's instruction set (kernels are built
with -march=native), so record and compare on one machine; this is a tool, not a test.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from weightstream import Engine

N_PROMPT, N_GREEDY, N_BATCH = 24, 12, 16
STREAM_SETTINGS = [(policy, prefetch, io, mult)
                   for policy in ("lru", "lfu", "decay", "page-cache")
                   for prefetch, io, mult in (("none", "buffered", 1), ("routing", "direct", 1),
                                              ("lookahead", "auto", 3), ("lookahead", "buffered", 1))
                   if not (policy == "page-cache" and io == "direct")]


def build_models(directory: Path) -> dict[str, Path]:
    """The fixture GGUF files, written once into directory (reused by compare)."""
    import torch

    from tests.hf_models import CASES, make_hf_model, moe_gguf_file, smollm2_gguf_path
    from weightstream.engine.tools.convert import convert_hf_to_gguf

    files: dict[str, Path] = {}
    for case in sorted(CASES):
        torch.manual_seed(0)
        _, hf_dir = make_hf_model(case, directory / f"hf-{case}", seed=1)
        for out_type in ("f32", "q8_0"):
            files[f"{case}-{out_type}"] = convert_hf_to_gguf(hf_dir, directory / f"{case}-{out_type}.gguf", out_type)
    for arch in ("qwen3moe", "mixtral"):
        (directory / f"moe-{arch}").mkdir(exist_ok=True)
        files[f"moe-{arch}"] = moe_gguf_file(arch, directory / f"moe-{arch}")
    files["smollm2"] = smollm2_gguf_path()
    return files


def model_files(directory: Path) -> dict[str, Path]:
    files = {p.stem: p for p in directory.glob("*.gguf")}
    files.update({p.parent.name: p for p in directory.glob("moe-*/*.gguf")})
    from tests.hf_models import smollm2_gguf_path

    files["smollm2"] = smollm2_gguf_path()
    return files


def run_case(path: Path, **load) -> tuple[np.ndarray, np.ndarray]:
    with Engine.load(path, n_ctx=64, n_batch=N_BATCH, threads=2, **load) as eng:
        n_vocab = eng.config.n_vocab
        ids = np.random.default_rng(0).integers(5, min(n_vocab, 500), N_PROMPT).tolist()
        logits = eng.logits(ids)
        tokens = np.array(list(eng.generate_tokens(ids[:8], N_GREEDY)), dtype=np.int64)
    return logits, tokens


def outputs(files: dict[str, Path]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    def record(key, path, **load):
        logits, tokens = run_case(path, **load)
        out[key + "/logits"], out[key + "/tokens"] = logits, tokens
        print(f"{key}: {tokens[:6].tolist()}...", file=sys.stderr)

    for name, path in sorted(files.items()):
        if name.startswith("moe-"):
            record(f"{name}/resident", path)
            for policy, prefetch, io, mult in STREAM_SETTINGS:
                record(f"{name}/{policy}-{prefetch}-{io}-{mult}", path, stream="experts", cache_policy=policy,
                       prefetch=prefetch, io=io, cache_slots=mult * 2, io_threads=2)
        elif name == "smollm2":
            record("smollm2/resident", path)
            record("smollm2/ffn-92MiB", path, stream="ffn", memory_budget="92MiB")
        else:
            for backend in ("auto", "numpy", "cython", "numba"):
                record(f"{name}/{backend}", path, backend=backend)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    directory.mkdir(parents=True, exist_ok=True)
    if argv[0] == "record":
        got = outputs(build_models(directory))
        np.savez(directory / "golden.npz", **got)
        print(f"recorded {len(got) // 2} cases in {directory / 'golden.npz'}")
        return 0
    want = dict(np.load(directory / "golden.npz"))
    got = outputs(model_files(directory))
    differ = sorted(k for k in want.keys() | got.keys()
                    if k not in want or k not in got or not np.array_equal(want[k], got[k]))
    for key in differ:
        print(f"DIFFERS: {key}")
    print(f"{len(want) // 2} cases recorded, {len(got) // 2} recomputed, {len(differ)} arrays differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
