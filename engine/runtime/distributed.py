"""Pipeline stages on Ray: the model's layers split into contiguous ranges, one Ray actor per stage.

    eng = Engine.load(path, distributed=DistributedConfig(address="auto", stages=2, budgets=["1GiB", "1GiB"]))

Each stage actor opens the GGUF itself (the same path on its node: its own copy of the file) and
loads only its own layers' tensors (load_weights(layers=..., ends=False)); it streams its routed
experts through its own ExpertStore (cache, prefetcher, reader threads) sized by plan_memory
under its own budget, and holds the KV cache of its layers only. The driver holds the token
embedding, the output norm and head, the tokenizer and the sampler. Per forward call the residual
float32[n, n_embd] (a few KB at decode) flows driver -> stage 0 -> ... -> stage N-1 -> driver.

PipelineModel has Model.forward's signature, so Engine uses it unchanged: generate, stream,
logits and perplexity work as in one process and give the same bits (each stage runs the same
Model.run_layers code on the same residual).

Transports (DistributedConfig.transport): "compiled" runs the chain as a Ray Compiled Graph
(ray.dag InputNode + experimental_compile: the actors loop on preallocated shared-memory or gRPC
channels, no per-call task submission); "actor" chains plain `.remote()` calls; "auto" tries
compiled and falls back to actor calls when compiling fails (the reason is kept in stats()).

Placement (place_layers): with layer_ranges given they are checked and used; otherwise a small
dynamic programme over contiguous splits minimises the slowest stage's estimated time per token:

    stage time(a, b) = miss bytes(a, b) / its disk bandwidth + (b - a) * per-layer compute
    miss bytes(a, b) = (b - a) * top_k * expert_bytes * max(0, 1 - slots / experts in a..b)

where slots is what plan_memory leaves for the expert cache under that stage's budget once its
resident weights, KV cache and work buffers are held (uniform routing: the chance that a used
expert is cached is slots / experts), the disk bandwidth is measured by each stage on its own
node (engine/bench_io.disk_bandwidth, expert-sized reads of the model file) unless given, and
per-layer compute is the bytes a token touches in a layer over MEMORY_BPS. A split that does
not fit some stage's budget costs infinity; when none fits, the error names the stage.

Failure: every remote wait has a timeout (timeout_s per step, load_timeout_s for loading and the
warm-up). When a stage actor dies or its node leaves or is cut off, the driver finds which stage
(a ping to each at once, PING_TIMEOUT_S), kills the actors without waiting on the lost node and
raises StageFailedError naming the stage, its layers and its node: within timeout_s +
PING_TIMEOUT_S and a few seconds (tests/test_distributed_netns.py: two network namespaces). Ray stays optional: only this module imports it, inside functions.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ...kernels.blas import one_blas_thread
from ..stream.budget import BudgetError, parse_size, plan_memory
from ..model.config import ModelConfig
from ..stream.layout import expert_layouts
from ..errors import StageFailedError

TRANSPORTS = ("compiled", "actor", "auto")
MEMORY_BPS = 20e9  # bytes/s one core streams through a layer's weights (DESIGN.md: ~30 GB/s peak)
PING_TIMEOUT_S = 5.0  # to tell a dead stage from a slow one after a failed step
DISK_PROBE_READS = 32  # expert-sized reads per stage for the bandwidth the placement uses


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("distributed inference needs Ray: pip install -e .[distributed]") from e
    return ray


@dataclass
class DistributedConfig:
    address: str | None = None  # None: the running Ray (ray.init'ed) or a new local one; "auto"; "ray://host:port"
    stages: int = 2
    budgets: list | None = None  # per stage: bytes or "1GiB" (None: Engine.load's memory_budget for each)
    layer_ranges: list | None = None  # [(start, stop), ...] per stage, contiguous from 0 (None: placed)
    num_cpus: float | None = None  # CPUs each stage actor reserves (default 1)
    timeout_s: float = 60.0  # per forward step (and per stats call)
    load_timeout_s: float = 600.0  # actors starting, probing and loading their layers
    transport: str = "auto"  # "compiled" | "actor" | "auto"
    disk_bps: list | None = None  # per stage disk bandwidth (bytes/s) for the placement (None: measured)

    def check(self, n_layer: int) -> None:
        if not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"DistributedConfig: stages must be a positive integer, got {self.stages!r}")
        if self.stages > n_layer:
            raise ValueError(f"DistributedConfig: {self.stages} stages but the model has only {n_layer} layers "
                             f"(each stage needs at least one)")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"DistributedConfig: transport must be one of {TRANSPORTS}, got {self.transport!r}")
        for name in ("budgets", "disk_bps"):
            v = getattr(self, name)
            if v is not None and len(v) != self.stages:
                raise ValueError(f"DistributedConfig: {name} has {len(v)} entries for {self.stages} stages")
        if self.timeout_s <= 0 or self.load_timeout_s <= 0:
            raise ValueError("DistributedConfig: timeouts must be positive")
        if self.layer_ranges is not None:
            check_layer_ranges(self.layer_ranges, self.stages, n_layer)


def check_layer_ranges(ranges, stages: int, n_layer: int) -> list[range]:
    """The (start, stop) pairs as ranges, after checking they tile 0..n_layer in order."""
    if len(ranges) != stages:
        raise ValueError(f"DistributedConfig: layer_ranges has {len(ranges)} entries for {stages} stages")
    out, expect = [], 0
    for s, r in enumerate(ranges):
        start, stop = (r.start, r.stop) if isinstance(r, range) else tuple(r)
        if start != expect or stop <= start:
            raise ValueError(f"DistributedConfig: layer_ranges {list(map(tuple, ranges))} do not cover layers "
                             f"0..{n_layer - 1} contiguously: stage {s} is ({start}, {stop}), expected to start "
                             f"at {expect} and hold at least one layer")
        out.append(range(start, stop))
        expect = stop
    if expect != n_layer:
        raise ValueError(f"DistributedConfig: layer_ranges end at layer {expect}, the model has {n_layer} layers")
    return out


# ---- placement ----------------------------------------------------------------------------------
@dataclass
class StageCost:
    """What the placement needs to know of one stage's node."""

    budget: int | str | None
    disk_bps: float
    direct_io: bool = True


def place_layers(f, cfg: ModelConfig, costs: list[StageCost], plan_kwargs: dict) -> tuple[list[range], list[float]]:
    """Contiguous layer ranges, one per stage, minimising the largest estimated stage time (see
    the module docstring), and those times (seconds per decode token). plan_kwargs: plan_memory's
    stream, n_ctx, cache_slots, dequantize_resident, default_n_ctx, n_batch."""
    L, S = cfg.n_layer, len(costs)
    layouts = expert_layouts(f, dense_ffn=plan_kwargs.get("stream") == "ffn")
    k = max(1, cfg.n_expert_used)
    streamed = {info.name for lay in layouts.values() for info in lay.parts}
    touched = np.zeros(L)  # bytes a decode token reads in each layer: resident weights + its experts
    for name, info in f.tensors.items():
        if name.startswith("blk.") and name not in streamed:
            touched[int(name.split(".")[1])] += info.nbytes
    miss = np.zeros(L)  # expert bytes a token uses per layer (all misses when nothing is cached)
    n_exp = np.zeros(L)
    for i, lay in layouts.items():
        used = min(k, lay.n_expert)
        miss[i], n_exp[i] = used * lay.expert_bytes, lay.n_expert
        touched[i] += used * lay.expert_bytes

    def cost(s: int, a: int, b: int) -> float:
        try:
            plan = plan_memory(f, cfg, budget=costs[s].budget, direct_io=costs[s].direct_io, layers=range(a, b),
                               ends=False, **plan_kwargs)
        except BudgetError:
            return math.inf
        experts = n_exp[a:b].sum()
        hit = min(1.0, plan.n_slots / experts) if experts else 1.0
        return miss[a:b].sum() * (1 - hit) / costs[s].disk_bps + touched[a:b].sum() / MEMORY_BPS

    # best[s][b]: the smallest max stage time of stages 0..s holding layers 0..b-1; cut[s][b]: stage s's start
    best = np.full((S, L + 1), math.inf)
    cut = np.zeros((S, L + 1), dtype=np.int64)
    for b in range(1, L - S + 2):
        best[0, b] = cost(0, 0, b)
    for s in range(1, S):
        for b in range(s + 1, L - S + s + 2):
            for a in range(s, b):
                if best[s - 1, a] == math.inf:
                    continue
                t = max(best[s - 1, a], cost(s, a, b))
                if t < best[s, b]:
                    best[s, b], cut[s, b] = t, a
    if best[S - 1, L] == math.inf:
        raise BudgetError(f"{f.path}: no split of {L} layers over {S} stages fits the stage budgets "
                          f"{[c.budget for c in costs]}")
    ranges, b = [], L
    for s in range(S - 1, -1, -1):
        a = int(cut[s, b]) if s else 0
        ranges.append(range(a, b))
        b = a
    ranges.reverse()
    return ranges, [cost(s, r.start, r.stop) for s, r in enumerate(ranges)]


# ---- one stage (a Ray actor) --------------------------------------------------------------------
class _Stage:
    """One pipeline stage: its layers' weights, expert store and KV cache. Runs in a Ray actor."""

    def __init__(self, index: int, path: str, threads: int | None, backend: str):
        self.index, self.path, self.threads, self.backend = index, path, threads, backend
        self.file = self.store = self.model = self.plan = self.profiler = None
        self.layers, self.budget = None, None
        self.compute_s, self.steps = 0.0, 0

    def ping(self) -> int:
        return self.index

    def probe(self, measure_disk: bool, io_threads: int) -> dict:
        """Where this stage runs, whether O_DIRECT works on its copy of the file (the driver's
        LoadOptions.io_mode decides whether to use it), and (measure_disk) its disk's bandwidth
        for expert-sized reads."""
        ray = _ray()
        from ..stream.disk import disk_bandwidth
        from ..stream.reader import direct_io_supported
        from ..formats.gguf_file import GGUFFile

        out = {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
               "pid": os.getpid(), "direct_io_supported": direct_io_supported(self.path)}
        if measure_disk:
            with GGUFFile(self.path) as f:  # one expert's bytes per read, as the store reads them
                chunk = max((lay.expert_bytes for lay in expert_layouts(f).values()), default=1 << 20)
            chunk = min(chunk, os.path.getsize(self.path) // 2)
            out["disk"] = disk_bandwidth(self.path, chunk, max(1, io_threads), DISK_PROBE_READS)
        return out

    def load(self, layers: range, opts, budget, n_ctx: int, n_batch: int, direct: bool) -> dict:
        from ..formats.gguf_file import GGUFFile
        from .build import build_model

        t0 = time.perf_counter()
        self.file = f = GGUFFile(self.path)
        cfg = opts.model_config(ModelConfig.from_metadata(f.metadata, source=self.path))
        self.layers, self.budget = layers, budget
        self.plan = plan_memory(f, cfg, budget=budget, stream=opts.stream, n_ctx=n_ctx, cache_slots=opts.cache_slots,
                                dequantize_resident=opts.dequantize_resident, direct_io=direct, default_n_ctx=n_ctx,
                                n_batch=n_batch, layers=layers, ends=False)
        # a stage always streams (Engine.load resolves its options with always_stream), so it has a store
        self.model = build_model(f, cfg, opts, self.plan, direct, self.threads, self.backend, layers=layers,
                                 ends=False)
        self.store, self.profiler = self.model.experts, self.model.profiler  # this stage's: in stats()
        return {"load_s": time.perf_counter() - t0, "n_ctx": self.plan.n_ctx}

    def step(self, msg):
        """msg: (x float32[n, n_embd], pos, compute seconds of the stages before) -> the same after
        this stage's layers. pos < 0: a warm-up, passed on untouched."""
        x, pos, times = msg
        if pos < 0:
            return msg
        t0 = time.perf_counter()
        if not (x.flags.writeable and x.flags.c_contiguous):  # Ray hands out read-only views
            x = np.array(x, dtype=np.float32, order="C")
        prof = self.profiler
        t_forward = prof.begin_forward(len(x)) if prof is not None else 0.0
        with one_blas_thread():  # as Model.forward does (kernels/blas.py)
            self.model.run_layers(x, np.arange(pos, pos + len(x), dtype=np.int64))
        if prof is not None:
            prof.end_forward(len(x), t_forward)
        dt = time.perf_counter() - t0
        self.compute_s += dt
        self.steps += 1
        return x, pos, times + [dt]

    def echo(self, msg):  # the benchmark's empty hop: what the transport alone costs
        return msg

    def stats(self) -> dict:
        out = {"stage": self.index, "layers": [self.layers.start, self.layers.stop], "budget": self.plan.budget,
               "memory": self.plan.summary(), "experts": self.store.summary(),
               "steps": self.steps, "compute_s": self.compute_s}
        if self.profiler is not None:
            out["profile"] = self.profiler.summary(self.store.n_slots, with_sweep=False)
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.file is not None:
            self.file.close()
            self.file = None
        self.model = None


# ---- the driver's side ----------------------------------------------------------------------------
@dataclass
class _HopStats:
    calls: int = 0
    tokens: int = 0
    total_s: float = 0.0  # driver: from sending the residual to having it back
    compute_s: list = field(default_factory=list)  # per stage


class PipelineModel:
    """Model.forward over the stages: the driver embeds, the stages run their layers, the driver
    applies the head. Engine uses it as its model."""

    def __init__(self, driver, stages: list, infos: list[dict], ranges: list[range], config: DistributedConfig,
                 placement_group=None, owns_ray: bool = False, estimates: list[float] | None = None):
        self.driver, self.cfg, self.n_ctx = driver, driver.cfg, driver.n_ctx
        self.stages, self.infos, self.ranges, self.config = stages, infos, ranges, config
        self.pg, self.owns_ray, self.estimates = placement_group, owns_ray, estimates
        self.dag, self.transport, self.transport_note = None, "actor", None
        self.hops = {"prefill": _HopStats(compute_s=[0.0] * len(stages)),
                     "decode": _HopStats(compute_s=[0.0] * len(stages))}
        self.closed = False

    # ---- transports -------------------------------------------------------------------------
    def compile(self) -> None:
        """The per-token chain as a Compiled Graph (raises what Ray raises when it cannot)."""
        from ray.dag import InputNode

        with InputNode() as inp:
            node = inp
            for a in self.stages:
                node = a.step.bind(node)
        self.dag = node.experimental_compile(_submit_timeout=self.config.timeout_s)
        self.transport = "compiled"

    def warm_up(self, n: int = 3) -> None:
        """A few pass-through round trips (pos -1: the stages compute nothing): a compiled graph's
        first execution takes seconds (measured: 2 s), which must not land on the first token.
        Part of loading, so they wait up to load_timeout_s: across two nodes on a busy machine the
        first one took more than an 8 s step timeout (tests/test_distributed_netns.py)."""
        x = np.zeros((1, self.cfg.n_embd), dtype=np.float32)
        for _ in range(n):
            self._run(x, -1, self.config.load_timeout_s)

    def _run(self, x: np.ndarray, pos: int, timeout: float | None = None):
        ray = _ray()
        msg = (x, int(pos), [])
        timeout = timeout or self.config.timeout_s
        try:
            if self.dag is not None:
                return ray.get(self.dag.execute(msg), timeout=timeout)
            ref = msg
            for a in self.stages:
                ref = a.step.remote(ref)
            return ray.get(ref, timeout=timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError, ray.exceptions.GetTimeoutError,
                ray.exceptions.ObjectLostError) as e:
            raise self._failed(e) from e

    def _failed(self, cause: BaseException) -> StageFailedError:
        """The stage that died (or, failing that, the first that does not answer a ping), with
        every actor then shut down. The pings go out together (a live stage answers even while
        its compiled-graph loop runs: Ray runs that loop in its _ray_system concurrency group), so
        the error comes within one PING_TIMEOUT_S of the failed step however many stages there are."""
        ray = _ray()
        culprit, how = None, None
        wait = min(PING_TIMEOUT_S, self.config.timeout_s)
        pings = [a.ping.remote() for a in self.stages]
        ray.wait(pings, num_returns=len(pings), timeout=wait)
        for s, ref in enumerate(pings):
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as e:
                culprit, how = s, f"died: {str(e).splitlines()[0]}"
                break
            except ray.exceptions.GetTimeoutError:
                if culprit is None:
                    culprit, how = s, f"did not answer within {wait:.0f} s"
        self.close(failed=True)
        if culprit is None:
            return StageFailedError(f"pipeline step failed and every stage still answers: {cause}")
        r, info = self.ranges[culprit], self.infos[culprit]
        return StageFailedError(f"stage {culprit} (layers {r.start}-{r.stop - 1}) on node {info.get('ip')} "
                                f"({info.get('node_id', '?')[:12]}) {how}; cause: {type(cause).__name__}: "
                                f"{str(cause).splitlines()[0] if str(cause) else ''}; the other stages were shut down")

    # ---- Model's interface -------------------------------------------------------------------
    def forward(self, tokens, pos: int, all_logits: bool = False) -> np.ndarray:
        if self.closed:
            raise StageFailedError("the pipeline is shut down (a stage failed, or the engine was closed)")
        tokens, _ = self.driver.check_tokens(tokens, pos)
        x = np.ascontiguousarray(self.driver.embed(tokens), dtype=np.float32)  # [n, n_embd]
        t0 = time.perf_counter()
        x, _, times = self._run(x, pos)
        hs = self.hops["decode" if len(tokens) == 1 else "prefill"]
        hs.total_s += time.perf_counter() - t0
        hs.calls += 1
        hs.tokens += len(tokens)
        for s, t in enumerate(times):
            hs.compute_s[s] += t
        if not x.flags.writeable:
            x = np.array(x)
        return self.driver.head(x, all_logits)

    # ---- figures -----------------------------------------------------------------------------
    def pipeline_stats(self) -> dict:
        ray = _ray()
        stages = []
        if not self.closed:
            stages = ray.get([a.stats.remote() for a in self.stages], timeout=self.config.timeout_s)
        for s, st in enumerate(stages):
            st["node"] = {k: self.infos[s].get(k) for k in ("ip", "node_id", "pid")}
            if "disk" in self.infos[s]:
                st["disk_bps"] = self.infos[s]["disk"]["bytes_per_s"]
            if self.estimates:
                st["estimated_s_per_token"] = self.estimates[s]
        hops = {}
        n_hops = len(self.stages) + 1  # driver -> stage 0 -> ... -> stage N-1 -> driver
        for name, hs in self.hops.items():
            if hs.calls:
                overhead = hs.total_s - sum(hs.compute_s)
                hops[name] = {"calls": hs.calls, "tokens": hs.tokens, "round_trip_ms": 1e3 * hs.total_s / hs.calls,
                              "stage_compute_ms": [1e3 * c / hs.calls for c in hs.compute_s],
                              "overhead_ms": 1e3 * overhead / hs.calls,
                              "per_hop_ms": 1e3 * overhead / hs.calls / n_hops}
        return {"transport": self.transport, "transport_note": self.transport_note, "hops": n_hops,
                "stages": stages, "latency": hops}

    def close(self, failed: bool = False) -> None:
        """Tear the graph down, close and kill the actors. failed (from _failed): a stage may be
        dead or cut off, and both Ray's graph teardown (30 s per actor to cancel its loop, then
        as long again to wait for it) and a graceful close() would wait on it: measured 50 s after
        a cut link (tests/test_distributed_netns.py). So the actors are killed first and nothing
        waits longer than PING_TIMEOUT_S."""
        if self.closed:
            return
        self.closed = True
        ray = _ray()
        if failed:
            self._kill_actors(ray)
        if self.dag is not None:
            _bounded(self.dag.teardown, PING_TIMEOUT_S)  # a dead actor's channels: nothing left to tear down
            self.dag = None
        if not failed:
            closing = [a.close.remote() for a in self.stages]
            try:
                ray.wait(closing, num_returns=len(closing), timeout=PING_TIMEOUT_S)
            except Exception:
                pass
            self._kill_actors(ray)
        if self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
        if self.owns_ray:
            ray.shutdown()

    def _kill_actors(self, ray) -> None:
        for a in self.stages:
            try:
                ray.kill(a)  # a request to the GCS: returns without waiting on the actor's node
            except Exception:
                pass


def _bounded(fn, timeout: float) -> None:
    """fn() in a daemon thread, waited for at most timeout seconds (then left to finish, or not,
    on its own); its errors are dropped: it is clean-up after the error that counts."""
    def run():
        try:
            fn()
        except Exception:
            pass

    t = threading.Thread(target=run, name="weightstream-teardown", daemon=True)
    t.start()
    t.join(timeout)


def load_distributed(path, f, cfg: ModelConfig, opts, threads: int | None, backend: str,
                     config: DistributedConfig) -> tuple[PipelineModel, int]:
    """The driver's model (embedding and head) and the stage actors, placed and loaded; returns
    (pipeline, prompt batch). f: the driver's open GGUFFile; opts: Engine.load's LoadOptions, resolved for a stage (it always streams)."""
    from ..model.forward import Model
    from ..model.weights import load_weights

    config.check(cfg.n_layer)
    if opts.record_routing:
        raise ValueError("Engine.load: record_routing is not supported with distributed= (each stage routes "
                         "its own layers); profile=True gives each stage's profile in stats()['pipeline']")
    ray = _ray()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    budgets = list(config.budgets) if config.budgets is not None else [opts.memory_budget] * config.stages
    for b in budgets:
        if b is not None:
            parse_size(b)  # a bad size fails here, before any actor starts
    owns_ray = False
    if not ray.is_initialized():
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
        owns_ray = config.address is None
    cpus = config.num_cpus or 1
    pg = placement_group([{"CPU": cpus}] * config.stages, strategy="SPREAD")  # one node each where there are
    pipeline, actors = None, []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=config.load_timeout_s)
        if not ready:
            raise StageFailedError(f"the Ray cluster cannot place {config.stages} stages of {cpus} CPU(s) each "
                                   f"within {config.load_timeout_s:.0f} s (ray.cluster_resources(): "
                                   f"{ray.cluster_resources()})")
        stage_cls = ray.remote(_Stage)
        stage_threads = threads or max(1, int(cpus))
        actors = [stage_cls.options(num_cpus=cpus, max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=s)).remote(s, str(path), stage_threads, backend)
            for s in range(config.stages)]
        measure = config.layer_ranges is None and config.disk_bps is None
        infos = _get(ray, [a.probe.remote(measure, opts.io_threads) for a in actors], config.load_timeout_s,
                     "probing the stages")
        direct = [opts.io_mode(i["direct_io_supported"]) == "direct" for i in infos]
        plan_kwargs = dict(stream=opts.stream, n_ctx=opts.n_ctx, cache_slots=opts.cache_slots,
                           dequantize_resident=opts.dequantize_resident, default_n_ctx=opts.default_n_ctx(cfg),
                           n_batch=opts.n_batch)
        estimates = None
        if config.layer_ranges is not None:
            ranges = check_layer_ranges(config.layer_ranges, config.stages, cfg.n_layer)
        else:
            bps = config.disk_bps or [i["disk"]["bytes_per_s"] for i in infos]
            ranges, estimates = place_layers(f, cfg, [StageCost(b, d, io) for b, d, io in zip(budgets, bps, direct)],
                                             plan_kwargs)
        plans = []
        for s, r in enumerate(ranges):
            try:
                plans.append(plan_memory(f, cfg, budget=budgets[s], direct_io=direct[s], layers=r, ends=False, **plan_kwargs))
            except BudgetError as e:
                raise BudgetError(f"stage {s} (layers {r.start}-{r.stop - 1}): {e}") from None
        # every stage at the same context and prompt batch: the smallest any budget allows
        n_ctx, n_batch = min(p.n_ctx for p in plans), min(p.prefill_batch for p in plans)
        _get(ray, [a.load.remote(r, opts, budgets[s], n_ctx, n_batch, direct[s]) for s, (a, r) in
                   enumerate(zip(actors, ranges))], config.load_timeout_s, "loading the stages")
        weights = load_weights(f, cfg, opts.dequantize_resident, threads, backend, copy=True, layers=range(0))
        f.release_pages()
        driver = Model(cfg, weights, n_ctx, threads, backend, n_batch=n_batch)
        pipeline = PipelineModel(driver, actors, infos, ranges, config, pg, owns_ray, estimates)
        if config.transport != "actor":
            try:
                pipeline.compile()
            except Exception as e:
                if config.transport == "compiled":
                    raise
                pipeline.transport_note = f"compiled graph unavailable ({type(e).__name__}: {e}); actor calls"
        pipeline.warm_up()
        return pipeline, n_batch
    except BaseException:
        if pipeline is not None:
            pipeline.close()
        else:
            for a in actors:
                ray.kill(a)
            ray.util.remove_placement_group(pg)
            if owns_ray:
                ray.shutdown()
        raise


def _get(ray, refs, timeout: float, what: str):
    """ray.get with a timeout whose error says what was being waited for; a stage's own error
    (a bad file, a budget too small) comes through as itself."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise StageFailedError(f"{what}: no answer within {timeout:.0f} s") from e
    except ray.exceptions.RayTaskError as e:
        raise e.as_instanceof_cause() from None
