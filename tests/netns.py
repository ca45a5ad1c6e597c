"""Two machines on one host for the multi-node Ray test (tests/test_distributed_netns.py): two
network namespaces joined by a veth pair, each with its own address, a Ray node in each.

    nsA 10.77.0.1/24  <-- veth (netem delay where the kernel has it) -->  10.77.0.2/24 nsB
    Ray head (+ the driver, run in nsA)                                   Ray worker node

The namespaces share the host's file system and process table, so each node's stage opens the
same model path, and every process of a "machine" is found with `ip netns pids` (the kernel's
view of who lives in that namespace). That is also how they are stopped: `ray stop` would kill
every Ray process on the host by name, other sessions' clusters included, so it is never used.

Token authentication is turned off for the cluster and the driver (RAY_AUTH_MODE=disabled): a
~/.ray/auth_token left by another local Ray makes `ray start --head` require it, and the worker
node and driver would then be refused.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.77.0"
HEAD_PORT = 6379  # inside nsA: no clash with anything on the host
DELAY = "5ms"  # netem delay on each end: 10 ms round trip
OBJECT_STORE = 100 * 1024 * 1024  # bytes per node: the residuals are a few KB
REPO = Path(__file__).resolve().parents[1]


def _sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


def unavailable() -> str | None:
    """Why two namespaces with a Ray node each cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (running as uid %d)" % os.geteuid()
    missing = [b for b in ("ip", "tc") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2 (apt-get install -y iproute2)"
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install -e .[distributed])"
    probe = f"wsprobe{os.getpid()}"
    p = _sh("ip", "netns", "add", probe, check=False)
    if p.returncode:
        return f"cannot create a network namespace (`ip netns add` exited {p.returncode}: {p.stderr.strip()})"
    _sh("ip", "netns", "del", probe, check=False)
    return None


class TwoNodes:
    """nsA and nsB, the veth between them, and a Ray node in each. Call destroy() in a finalizer:
    it works from any state, also after a half-finished create()."""

    def __init__(self, tag: str):
        self.ns = {"A": f"wsn{tag}a", "B": f"wsn{tag}b"}
        self.dev = {"A": f"wsv{tag}a", "B": f"wsv{tag}b"}  # interface names: at most 15 characters
        self.ip = {"A": f"{SUBNET}.1", "B": f"{SUBNET}.2"}
        self.tmp = {k: Path(f"/tmp/wsn{tag}{k.lower()}") for k in "AB"}  # short: Ray's socket paths
        self.address = f"{self.ip['A']}:{HEAD_PORT}"
        self.shaping = None  # what `tc` put on the link, for the test's report
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")

    # ---- the network -------------------------------------------------------------------------
    def create(self) -> None:
        a, b = self.ns["A"], self.ns["B"]
        _sh("ip", "netns", "add", a)
        _sh("ip", "netns", "add", b)
        _sh("ip", "link", "add", self.dev["A"], "type", "veth", "peer", "name", self.dev["B"])
        for k in "AB":
            ns, dev = self.ns[k], self.dev[k]
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{self.ip[k]}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            # a default route over the veth: Ray finds a node's own address by the route out
            _sh("ip", "-n", ns, "route", "add", "default", "dev", dev)
        self.shaping = self._shape()

    def _shape(self) -> str:
        """netem delay on both ends; a kernel built without sch_netem (this one: 'Specified qdisc
        kind is unknown') gets none, and the caller reports which."""
        for k in "AB":
            p = _sh("tc", "-n", self.ns[k], "qdisc", "add", "dev", self.dev[k], "root", "netem", "delay", DELAY,
                    check=False)
            if p.returncode:
                return f"no added latency (tc netem: {p.stderr.strip()})"
        return f"netem delay {DELAY} each way"

    def link(self, up: bool) -> None:
        """Cut (or restore) the wire: nsA's end down, so nothing passes either way. Down drops
        nsA's default route, which up puts back."""
        _sh("ip", "-n", self.ns["A"], "link", "set", self.dev["A"], "up" if up else "down")
        if up:
            _sh("ip", "-n", self.ns["A"], "route", "replace", "default", "dev", self.dev["A"])

    def pids(self, k: str) -> list[int]:
        p = _sh("ip", "netns", "pids", self.ns[k], check=False)
        return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []

    # ---- Ray -----------------------------------------------------------------------------------
    def _ray_start(self, k: str, *args: str) -> None:
        argv = ["ip", "netns", "exec", self.ns[k], sys.executable, "-m", "ray.scripts.scripts", "start",
                "--node-ip-address", self.ip[k], "--num-cpus", "1", "--object-store-memory", str(OBJECT_STORE),
                "--temp-dir", str(self.tmp[k]), "--disable-usage-stats", *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=self.env, cwd=REPO)
        if p.returncode:
            tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"ray start in {self.ns[k]} ({self.ip[k]}) exited {p.returncode}:\n{tail}")

    def start_head(self) -> None:
        self._ray_start("A", "--head", "--port", str(HEAD_PORT), "--include-dashboard", "false")

    def start_worker(self) -> None:
        """The worker node in nsB, after a previous one (killed, or cut off) is gone for good."""
        self.kill("B")
        self._ray_start("B", "--address", self.address)

    def wait_for_nodes(self, timeout: float = 90.0) -> None:
        """Until the head sees exactly one live node at each address: a replaced worker node's
        predecessor must be marked dead first, or a stage could be placed on it. Ray's default
        health checks (kept: they are what real clusters run) take ~15 s to declare a killed node
        dead, ~50 s for one cut off."""
        code = (f"import ray, sys, time\nray.init(address={self.address!r}, log_to_driver=False)\n"
                f"want, t = sorted({list(self.ip.values())!r}), time.monotonic() + {timeout}\n"
                "while time.monotonic() < t:\n"
                "    live = sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])\n"
                "    if live == want: sys.exit(0)\n"
                "    time.sleep(0.5)\n"
                "sys.exit(f'live nodes {live}, expected {want} within {timeout} s')\n")
        argv = ["ip", "netns", "exec", self.ns["A"], sys.executable, "-c", code]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60, env=self.env, cwd=REPO)
        if p.returncode:
            raise RuntimeError(f"Ray cluster at {self.address}: {p.stderr.strip().splitlines()[-1]}")

    def kill(self, k: str, sig: int = signal.SIGKILL, wait_s: float = 10.0) -> None:
        """Every process in namespace k (all started by this module): the machine's power cut."""
        deadline = time.monotonic() + wait_s
        while (pids := self.pids(k)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if self.pids(k):
            raise RuntimeError(f"processes {self.pids(k)} in {self.ns[k]} survive signal {sig} after {wait_s} s")

    def popen(self, k: str, argv: list[str], **kw) -> subprocess.Popen:
        """A process on machine k (the driver): stdin/stdout pipes, text."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns[k], *argv], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=kw.pop("stderr", None), text=True, env=self.env,
                                cwd=REPO, **kw)

    def destroy(self) -> None:
        """Ray stopped on both machines (SIGTERM, then SIGKILL), namespaces deleted (the veth goes
        with them), Ray's temporary folders removed. Never raises: it runs in a finalizer."""
        for k in "AB":
            try:
                self.kill(k, signal.SIGTERM, wait_s=3.0)
            except Exception:
                pass
            try:
                self.kill(k, signal.SIGKILL, wait_s=10.0)
            except Exception as e:
                print(f"netns cleanup: {e}", file=sys.stderr)
        for k in "AB":
            _sh("ip", "netns", "del", self.ns[k], check=False)
            shutil.rmtree(self.tmp[k], ignore_errors=True)
        _sh("ip", "link", "del", self.dev["A"], check=False)  # only left when create() stopped half way
