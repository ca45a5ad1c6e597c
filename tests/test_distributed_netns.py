"""Two pipeline stages on two "machines": network namespaces joined by a veth pair, each with its
own address and a Ray node (tests/netns.py), the driver attached by address from the head's side
(tests/netns_driver.py). The stages give the single process's logits and tokens; a machine
killed mid-generation, or the wire between them cut, gives StageFailedError naming the stage on
the lost machine within the step timeout plus one ping, and every stage is shut down.

One cluster for the module (Ray starts take seconds each); a test that breaks the worker machine
marks it, and the next test that needs two machines starts a new worker node first."""
import json
import os
import queue
import re
import sys
import threading
import warnings

import numpy as np
import pytest

from tests import netns

_reason = netns.unavailable()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from tests import test_distributed  # noqa: E402
from weightstream.engine.runtime.distributed import PING_TIMEOUT_S  # noqa: E402

# the same model, options and single-process reference as the loopback tests (their fixtures)
OPTS, moe4, reference = test_distributed.OPTS, test_distributed.moe4, test_distributed.reference

pytestmark = pytest.mark.distributed

STEP_TIMEOUT_S = 8.0  # DistributedConfig.timeout_s in the driver
SLACK_S = 5.0  # shutting the stages down, and a busy 2-core machine
LOST = netns.SUBNET + ".2"  # the worker machine's address


@pytest.fixture(scope="module")
def machines(request):
    """nsA (Ray head) and nsB (Ray worker node), torn down in a finalizer whatever happens."""
    nodes = netns.TwoNodes(str(os.getpid() % 100000))
    request.addfinalizer(nodes.destroy)
    nodes.create()
    nodes.start_head()
    nodes.start_worker()
    nodes.wait_for_nodes()
    nodes.broken = False
    if not nodes.shaping.startswith("netem"):  # the tests still run, on a link without added latency
        warnings.warn(f"tests/netns.py: {nodes.shaping}")
    return nodes


@pytest.fixture
def cluster(machines):
    """Both machines up and joined: after a test that broke nsB, the wire back and a new worker."""
    if machines.broken:
        machines.link(up=True)
        machines.start_worker()
        machines.wait_for_nodes()
        machines.broken = False
    return machines


class Driver:
    """tests/netns_driver.py in nsA; its NETNS events read by a thread, so a hung driver fails
    the test at a timeout instead of blocking it."""

    def __init__(self, nodes, model, ids, mode, transport, n, out=None):
        args = dict(address=nodes.address, model=str(model), ids=ids, mode=mode, transport=transport, n=n,
                    out=str(out), timeout_s=STEP_TIMEOUT_S, opts=OPTS)
        self.proc = nodes.popen("A", [sys.executable, "-m", "tests.netns_driver", json.dumps(args)])
        self.events, self.other = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("NETNS "):
                self.events.put(json.loads(line[6:]))
            else:
                self.other = (self.other + [line.rstrip()])[-20:]
        self.events.put({"event": "exit", "rc": self.proc.wait()})

    def expect(self, event: str, timeout: float) -> dict:
        try:
            e = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"driver: no {event!r} event within {timeout} s; its last output: {self.other}")
        assert e["event"] == event, f"driver: expected {event!r}, got {e}; its last output: {self.other}"
        return e

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.mark.parametrize("transport", ["compiled", "actor"])
def test_two_machines_give_the_single_process_tokens(cluster, moe4, reference, transport, tmp_path):
    ids, logits, tokens, _ = reference
    d = Driver(cluster, moe4, ids, "tokens", transport, 12, out=tmp_path / "out.npz")
    try:
        loaded = d.expect("loaded", 180)
        d.expect("done", 120)
        assert d.expect("exit", 60)["rc"] == 0
    finally:
        d.close()
    assert loaded["transport"] == transport, loaded["note"]
    assert sorted(loaded["nodes"]) == sorted(cluster.ip.values())  # one stage on each machine
    got = np.load(tmp_path / "out.npz")
    assert np.array_equal(got["logits"], logits)
    assert got["tokens"].tolist() == tokens


def break_mid_generation(cluster, moe4, reference, transport, how) -> tuple[dict, dict]:
    """Three tokens, then `how` breaks the worker machine; the driver's loaded and failed events."""
    ids, _, tokens, _ = reference
    d = Driver(cluster, moe4, ids, "fail", transport, 40)
    try:
        loaded = d.expect("loaded", 180)
        assert d.expect("midway", 60)["tokens"] == tokens[:3]
        cluster.broken = True
        how()
        d.proc.stdin.write("go\n")
        d.proc.stdin.flush()
        failed = d.expect("failed", STEP_TIMEOUT_S + PING_TIMEOUT_S + SLACK_S + 30)
    finally:
        d.close()
    return loaded, failed


def check_failure(loaded: dict, failed: dict) -> None:
    """The error names the stage on the lost machine, its layers and address, within the step
    timeout plus one ping; the engine refuses further use; the surviving stage was shut down."""
    s = loaded["nodes"].index(LOST)
    first, last = (0, 1) if s == 0 else (2, 3)  # layer_ranges [(0, 2), (2, 4)] in the driver
    assert re.match(rf"stage {s} \(layers {first}-{last}\) on node {re.escape(LOST)} \(\w+\) "
                    r"(died: .+|did not answer within \d+ s); cause: ", failed["error"]), failed["error"]
    assert failed["elapsed_s"] <= STEP_TIMEOUT_S + PING_TIMEOUT_S + SLACK_S, failed
    assert "shut down" in failed["after"]
    assert failed["stages"][1 - s] == "dead", failed["stages"]  # the other machine's stage too


@pytest.mark.parametrize("transport", ["compiled", "actor"])
def test_killed_machine_raises_stage_failed_naming_its_stage(cluster, moe4, reference, transport):
    check_failure(*break_mid_generation(cluster, moe4, reference, transport, lambda: cluster.kill("B")))


def test_cut_link_raises_stage_failed_naming_the_unreachable_stage(cluster, moe4, reference):
    """Last in the file: a node cut off takes Ray ~50 s to declare dead, which a test after it
    would wait for. The compiled graph, because its teardown is what waited on the lost node."""
    check_failure(*break_mid_generation(cluster, moe4, reference, "compiled", lambda: cluster.link(up=False)))
