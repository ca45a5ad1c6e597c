"""build_model: the one place a Model is put together from an open file and resolved LoadOptions
(weights, expert store, profiler, lookahead prefetcher, routing source), used by Engine.load and by a
pipeline stage (engine/runtime/distributed.py) alike."""
from __future__ import annotations

from contextlib import contextmanager

from ..formats.gguf_file import GGUFFile
from ..model.config import ModelConfig
from ..model.forward import PREFILL_BATCH, Model
from ..model.weights import load_weights
from ..observe.profiler import Profiler
from ..observe.routing import RoutingTrace, parse_routing
from ..stream.budget import MemoryPlan
from ..stream.prefetch import LookaheadPrefetcher
from ..stream.store import ExpertStore
from .options import LoadOptions


def build_model(f: GGUFFile, cfg: ModelConfig, opts: LoadOptions, plan: MemoryPlan | None, direct: bool,
                threads: int | None, backend: str, layers: range | None = None, ends: bool = True) -> Model:
    """The Model of `layers` (all by default; a pipeline stage's slice with ends=False): its
    weights loaded (copied in when streaming), and when opts.stream (resolved: see
    LoadOptions.resolved) is not "none" its ExpertStore (model.experts) with plan.n_slots slots
    reading in the io mode the plan was sized for (direct). The store is closed again if the model
    cannot be built. Its workspace holds buffers for the prompt batch Engine uses (the plan's, else
    opts.n_batch or PREFILL_BATCH)."""
    streaming, ffn = opts.streaming, opts.stream == "ffn"
    routing = parse_routing(opts.routing, cfg)  # a bad routing source fails before any weight is read
    n_ctx = plan.n_ctx if plan is not None else (opts.n_ctx or opts.default_n_ctx(cfg))
    with _copy_progress(f, plan, enabled=opts.progress and streaming):
        weights = load_weights(f, cfg, opts.dequantize_resident, threads, backend, copy=streaming,
                               stream_ffn=ffn, layers=layers, ends=ends)
    profiler = Profiler() if opts.profile else None
    store = None
    if streaming:
        store = ExpertStore(f, plan.n_slots, opts.cache_policy, "direct" if direct else "buffered",
                            opts.io_threads, dense_ffn=ffn, profiler=profiler, sync=opts.prefetch == "none")
        f.release_pages()  # nothing uses the memory map now: its pages leave our RSS
    n_batch = plan.prefill_batch if plan is not None else (opts.n_batch or PREFILL_BATCH)
    k = opts.lookahead_experts(cfg)
    # resident experts need no reads ahead: lookahead only where something streams
    prefetcher = LookaheadPrefetcher(cfg, weights, store, k, stream_ffn=ffn) if streaming and k else None
    try:
        model = Model(cfg, weights, n_ctx, threads, backend, experts=store, stream_ffn=ffn,
                      prefetcher=prefetcher, profiler=profiler, n_batch=n_batch, routing=routing,
                      routing_trace=RoutingTrace(cfg.n_layer, cfg.n_expert, cfg.n_expert_used)
                      if opts.record_routing else None)
    except BaseException:
        if store is not None:
            store.close()
        raise
    return model


@contextmanager
def _copy_progress(f: GGUFFile, plan: MemoryPlan | None, enabled: bool):
    """A byte-count progress bar over the tensors f copies into memory meanwhile (tqdm shows it
    only on a terminal)."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    total = sum(t.nbytes for t in f.tensors.values()) - (plan.streamed if plan is not None else 0)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {f.path.name}", disable=None, leave=False) as bar:
        f.on_copy = bar.update
        try:
            yield
        finally:
            f.on_copy = None
