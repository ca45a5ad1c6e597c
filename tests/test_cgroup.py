"""A model several times larger than its memory budget runs inside a memory cgroup whose limit
(page cache included) is the budget plus the process's own overhead, and gives the same tokens as
the resident run. Needs root and the cgroup v1 memory controller; skipped with the reason otherwise."""
import json
import subprocess
import sys
import textwrap

import pytest

from weightstream.engine.stream.disk import drop_cached_pages
from bench.cgroup import MemoryCgroup, cgroup_unavailable
from weightstream.engine.tools.synth import Preset, synth_model
from tests.hf_models import smollm2_gguf_path

reason = cgroup_unavailable()
if reason:
    pytest.skip(reason, allow_module_level=True)
if smollm2_gguf_path() is None:
    pytest.skip("demo model (tokenizer source) unavailable", allow_module_level=True)

# qwen3moe-shaped, ~0.9 GB: 12 layers of 128 Q2_K experts (1024 <-> 512, ~0.5 MB each), top-8
TEST_MOE = Preset("test-moe-900m", "qwen3moe", "Qwen3MoeForCausalLM", n_layer=12, n_embd=1024, n_head=8,
                  n_head_kv=2, head_dim=128, n_expert=128, n_expert_used=8, n_ff_exp=512, n_vocab=49152,
                  n_ff=3072, rope_base=1e6, rms_eps=1e-6, n_ctx=4096, norm_topk=True)
BUDGET = 200 * 2**20
# The process's own memory beyond the budget: interpreter and libraries (~95 MiB), the parsed
# metadata and tokenizer (~90 MiB for this 49k vocabulary), thread stacks and allocator slack.
OVERHEAD = 256 * 2**20
PROMPT = [1, 504, 3458, 282, 4649, 314, 2]
N_NEW = 12

CHILD = textwrap.dedent("""
    import json, sys
    from weightstream.engine import Engine
    path, n_new = sys.argv[1], int(sys.argv[3])
    prompt = json.loads(sys.argv[4])
    opts = dict(stream="experts", memory_budget=int(sys.argv[2]), prefetch="lookahead") if int(sys.argv[2]) else {}
    with Engine.load(path, n_ctx=256, **opts) as eng:
        tokens = list(eng.generate_tokens(prompt, n_new))
        print(json.dumps({"tokens": tokens, "stats": eng.stats()}))
""")


def run_child(cmd_runner, path, budget):
    out = cmd_runner([sys.executable, "-c", CHILD, str(path), str(budget), str(N_NEW), json.dumps(PROMPT)],
                     capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_moe(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("cgroup") / "moe.gguf", TEST_MOE, progress=False)


def test_model_3x_the_budget_runs_in_a_cgroup(big_moe):
    size = big_moe.stat().st_size
    limit = BUDGET + OVERHEAD
    assert size >= 3 * BUDGET and size > limit  # neither the budget nor the cgroup can hold the file
    resident = run_child(subprocess.run, big_moe, 0)
    drop_cached_pages(big_moe)  # its pages were charged outside the cgroup: make the child read them
    with MemoryCgroup(limit) as cg:
        streamed = run_child(cg.run, big_moe, BUDGET)
    assert cg.oom_kills == 0
    assert cg.peak_bytes <= limit
    assert streamed["tokens"] == resident["tokens"]
    x = streamed["stats"]["experts"]
    assert x["misses"] > 0 and streamed["stats"]["memory"]["budget"] == BUDGET
    print(f"\nmodel {size / 2**20:.0f} MiB, budget {BUDGET >> 20} MiB, cgroup limit {limit >> 20} MiB, "
          f"peak {cg.peak_bytes / 2**20:.0f} MiB; hit rate {x['hit_rate']:.1%}, {x['bytes_read'] / 2**20:.0f} MiB read")
