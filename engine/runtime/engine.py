"""The Python API: Engine.load(path) -> generate / stream / chat / logits / perplexity."""
from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ...kernels import check_threads
from ...kernels.backends import BACKENDS
from ..errors import ContextFullError
from ..formats.gguf_file import GGUFFile
from ..formats.tokenizer import Tokenizer
from ..model.config import ModelConfig
from ..model.forward import PREFILL_BATCH, Model
from ..model.weights import check_tensor_set
from ..observe.profiler import Profiler
from ..observe.routing import parse_routing
from ..stream.budget import MemoryPlan, plan_memory, release_metadata_arrays, release_parsed_fields
from ..stream.reader import direct_io_supported
from ..stream.store import ExpertStore
from ..stream.verify import FileIdentity
from .build import build_model
from .options import LoadOptions
from .sampling import Sampler, SamplingParams, is_int

CLOSE_WAIT_S = 30.0  # close() waits this long for a forward pass running in another thread


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0  # forward calls after the prefill (one per generated token but the last)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    run: str = "generate"  # or "perplexity": every token was a prompt token, nothing was generated
    perplexity: dict | None = None  # Engine.perplexity's figures (see there)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


def _fits_in_memory(f: GGUFFile) -> bool:
    """Whether the whole file fits in the memory available now (with a tenth to spare): only then
    is mapping all of it at load what running resident does anyway."""
    import psutil

    size = sum(p.stat().st_size for p in f.paths)
    return size <= 0.9 * psutil.virtual_memory().available


class Engine:
    """A loaded GGUF model with its tokenizer and KV cache. Use as a context manager or call close().

    The model file must not change while the engine uses it: each forward call checks its size,
    modification time and inode (ModelFileChangedError), and streamed expert reads check them and
    the block scales too (engine/stream/verify.py). A resident model is used from a memory map, so a
    file truncated *during* a forward call still ends the process with SIGBUS, as in llama.cpp."""

    def __init__(self, path, file: GGUFFile, cfg: ModelConfig, model: Model, tokenizer: Tokenizer,
                 load_s: float, store: ExpertStore | None = None, plan: MemoryPlan | None = None,
                 profiler: Profiler | None = None, n_batch: int | None = None):
        self.path, self.file, self.config, self.model, self.tokenizer = Path(path), file, cfg, model, tokenizer
        self.load_s, self.store, self.plan, self.profiler = load_s, store, plan, profiler
        self.prefill_batch = plan.prefill_batch if plan is not None else (n_batch or PREFILL_BATCH)
        self.last_stats = GenerationStats()
        # The model holds one sequence's state (KV caches, recurrent states): evaluations take
        # turns. A generation holds the lock while it lives, so another thread's waits for it
        # (they used to interleave and corrupt each other's text); `sequence` counts evaluations
        # from position 0, so a generator resumed after a newer one started on this thread stops
        # with an error instead of continuing from the other sequence's state.
        self._turn = threading.RLock()
        self._sequence = 0
        # what each shard is now; every forward call checks it is still so (engine/stream/verify.py):
        # a file replaced, rewritten or truncated under the engine is an error, not wrong text or
        # (resident, memory-mapped) a SIGBUS at the first page past a truncation
        self._identities = [FileIdentity.of(p) for p in file.paths]
        self._active: dict[int, str] = {}  # thread id -> name of each forward pass running now
        self._idle = threading.Condition()  # notified when a forward pass ends

    @classmethod
    def load(cls, path, threads: int | None = None, backend: str = "auto", distributed=None,
             **options) -> "Engine":
        """Open a GGUF model (any shard of a split one).

        n_ctx: context length (default min(train ctx, 4096); under a budget, see engine/stream/budget.py).
        n_batch: prompt tokens per forward pass (default 256; under a budget, see engine/stream/budget.py).
            The kernels round per batch, so logits compare bit for bit only at equal n_batch.
        dequantize_resident: expand resident matrices to float32 at load (None, the default: only
            types no fused kernel handles; True: all; False: none).
        stream: "none" (all weights used from the file's memory map), "experts" (routed experts
            are read from the file into an expert cache as they are needed; the rest is copied
            into memory), "ffn" (dense FFNs stream too, as one always-chosen expert per layer),
            "auto" ("experts" for a MoE model, "ffn" for a dense one).
        memory_budget: bytes or "3GiB": resident weights + KV cache + work buffers + expert cache
            must fit; the cache gets what is left, and a budget too small is refused (BudgetError).
        cache_slots: the cache's size in experts, instead of what the budget leaves.
        cache_policy: "decay" (default: frequency with recency decay), "lfu" (both keep the counts
            of evicted experts), "lru", or "page-cache" (no cache of our own: buffered preads, the
            OS caches). LRU cycles to 0% hits when the cache is smaller than one token's experts.
        prefetch: "routing" (a layer's misses are all queued as soon as its routing is known and
            computed as they land), "lookahead" (also: layer i+1's router applied after layer i's
            attention queues its likely experts; `lookahead` of them, default top-k), "none" (one
            read at a time, computed before the next is asked: the baseline).
        io: "direct" (O_DIRECT), "buffered", or "auto" (direct where the filesystem allows);
        io_threads: reader threads. profile: record events for Engine.profile_summary() etc.
        routing: for benchmarks only (generated text means nothing): where MoE layers' experts come
            from, "model" (the router), "trace:FILE" or "synthetic[:zipf=Z,reuse=R,seed=S]" (engine/observe/routing.py).
        record_routing: record the experts chosen into engine.model.routing_trace (a RoutingTrace).
        progress: a progress bar on the terminal while the resident weights are copied in (streaming).
        experts_per_token: route each token to its top K experts instead of the model's count
            (renormalised over the K where the architecture renormalises), 1 <= K <= expert count.
        distributed: a DistributedConfig (weightstream.engine.runtime.distributed): the layers run as
            pipeline stages on Ray actors, each streaming its own experts under its own budget (needs ray).
        Streamed output is bit-identical to stream="none" whatever these options are."""
        opts = LoadOptions.from_kwargs(**options)
        threads = check_threads(threads, "Engine.load: threads")
        if backend not in BACKENDS:
            raise ValueError(f"Engine.load: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        t0 = time.perf_counter()
        f = GGUFFile(path)
        try:
            release_parsed_fields(f)  # the largest part of the parse goes first (engine/stream/budget.py)
            # the vocabulary first: the config's n_vocab is its token count, so a malformed
            # tokenizer.ggml.tokens is named as that, not as a missing vocab_size
            tokenizer = Tokenizer.from_metadata(f.metadata, source=str(path))
            cfg = opts.model_config(ModelConfig.from_metadata(f.metadata, source=str(path)))
            release_metadata_arrays(f)  # the tokenizer has the vocabulary: the parse's arrays go (budget.py)
            check_tensor_set(f, cfg)  # before anything sizes memory or reads by these names
            if distributed is not None:  # pipeline stages on Ray: engine/runtime/distributed.py
                from .distributed import load_distributed

                parse_routing(opts.routing, cfg)  # a bad source fails here, before any actor starts
                model, n_batch = load_distributed(path, f, cfg, opts.resolved(cfg, always_stream=True), threads,
                                                  backend, distributed)
                return cls(path, f, cfg, model, tokenizer, time.perf_counter() - t0, n_batch=n_batch)
            opts = opts.resolved(cfg)
            direct = opts.streaming and opts.io_mode(direct_io_supported(str(f.path))) == "direct"
            plan = None
            if opts.streaming or opts.memory_budget is not None:
                plan = plan_memory(f, cfg, budget=opts.memory_budget, stream=opts.stream, n_ctx=opts.n_ctx,
                                   cache_slots=opts.cache_slots, dequantize_resident=opts.dequantize_resident,
                                   direct_io=direct, default_n_ctx=opts.default_n_ctx(cfg), n_batch=opts.n_batch)
            model = build_model(f, cfg, opts, plan, direct, threads, backend)
            if not opts.streaming and _fits_in_memory(f):
                f.populate()  # the weights are used from the map: fault its pages in now, in one call
        except BaseException:  # build_model closes the store it made if the model cannot be built
            f.close()
            raise
        store = model.experts if opts.streaming else None
        return cls(path, f, cfg, model, tokenizer, time.perf_counter() - t0, store, plan, model.profiler, opts.n_batch)

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Free the model: the expert store's threads and slots, the file's memory map. A forward
        pass running in another thread is waited for up to `timeout` seconds (its memory must not
        be unmapped under it); if it is still running then, close() warns naming the thread and
        leaves the file and the store open for it (they go at exit), never blocking for ever. A
        stuck reader thread is left behind the same way (engine/stream/reader.py). Generators
        resumed after close() raise RuntimeError."""
        with self._idle:
            if self.file is None:
                return
            model, self.model = self.model, None  # new forward passes refuse from here on
            if not self._idle.wait_for(lambda: not self._active, timeout):
                warnings.warn(f"{self.path}: Engine.close(): a forward pass in thread(s) "
                              f"{', '.join(sorted(self._active.values()))} still runs after {timeout:.0f} s; the model "
                              f"file and expert store stay open for it", RuntimeWarning, stacklevel=2)
                return
        if hasattr(model, "pipeline_stats"):  # a PipelineModel: its stage actors
            model.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        self.file.close()
        self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _require_open(self) -> Model:
        if self.model is None:
            raise RuntimeError("Engine is closed")
        return self.model

    def _forward(self, model: Model, ids, pos: int, **kw) -> np.ndarray:
        """model.forward once the files are known unchanged (a stat each, ~1 us: see _identities),
        counted in _active so that close() does not unmap the weights under it."""
        for ident in self._identities:
            ident.check(when="(before a forward pass)")
        me = threading.get_ident()
        with self._idle:
            if self.model is None:  # closed (from another thread) since this evaluation began
                raise RuntimeError("Engine is closed")
            self._active[me] = threading.current_thread().name
        try:
            return model.forward(ids, pos, **kw)
        finally:
            with self._idle:
                del self._active[me]
                self._idle.notify_all()

    # ---- scoring ------------------------------------------------------------------------------
    def _forward_all(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of ids, evaluated from an empty cache in prefill batches."""
        with self._turn:
            model = self._require_open()
            self._sequence += 1
            out = np.empty((len(ids), self.config.n_vocab), dtype=np.float32)
            b = self.prefill_batch
            for s in range(0, len(ids), b):
                out[s:s + b] = self._forward(model, ids[s:s + b], s, all_logits=True)
            return out

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32[n, n_vocab]: the logits after each of token_ids (a fresh sequence)."""
        if not isinstance(token_ids, (list, tuple, np.ndarray)) or np.ndim(token_ids) != 1 or len(token_ids) == 0:
            raise ValueError("logits: token_ids must be a non-empty 1-D sequence")
        return self._forward_all(np.asarray(self._checked_ids(token_ids, "logits"), dtype=np.int64))

    def perplexity(self, text: str, n_ctx: int = 512, progress=None) -> float:
        """Perplexity as llama-perplexity computes it: the text's tokens cut into non-overlapping
        chunks of n_ctx (BOS put in each chunk's first place when the model adds BOS), and in each
        chunk only the second half's predictions scored. progress(chunk, running_ppl) is called
        after each chunk (chunk from 1), as llama-perplexity prints [1]12.3,[2]...

        Afterwards stats() describes this run: tokens evaluated and their speed, and "perplexity":
        {ppl, ppl_err, chunks, n_ctx, scored}, where ppl_err is llama-perplexity's standard error,
        ppl * sqrt((mean(nll^2) - mean(nll)^2) / (scored - 1)) over the scored tokens' negative
        log-likelihoods (tools/perplexity/perplexity.cpp: "PPL = x +/- err")."""
        if not is_int(n_ctx) or n_ctx < 2:
            raise ValueError(f"perplexity: n_ctx must be an integer >= 2 (a chunk scores its second half), got {n_ctx!r}")
        chunks, n_tokens = self.tokenizer.chunks(text, n_ctx)
        if not chunks:
            raise ValueError(f"perplexity: text has {n_tokens} tokens, fewer than n_ctx={n_ctx}")
        first = n_ctx // 2
        nll, nll2, count = 0.0, 0.0, 0
        t0 = time.perf_counter()
        for i, chunk in enumerate(chunks):
            logits = self._forward_all(chunk).astype(np.float64)
            pred = logits[first:n_ctx - 1]  # position j predicts token j + 1
            target = np.asarray(chunk[first + 1:n_ctx])  # the text's own tokens: BOS only replaces place 0
            m = pred.max(axis=1)
            logz = m + np.log(np.exp(pred - m[:, None]).sum(axis=1))
            token_nll = logz - pred[np.arange(len(target)), target]
            nll += float(token_nll.sum())
            nll2 += float(np.square(token_nll).sum())
            count += len(target)
            if progress is not None:
                progress(i + 1, math.exp(nll / count))
        ppl = math.exp(nll / count)
        var = nll2 / count - (nll / count) ** 2  # of one token's nll; the mean's is var / (count - 1)
        err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
        self.last_stats = GenerationStats(prompt_tokens=len(chunks) * n_ctx, prefill_s=time.perf_counter() - t0,
                                          run="perplexity",
                                          perplexity={"ppl": ppl, "ppl_err": err, "chunks": len(chunks),
                                                      "n_ctx": n_ctx, "scored": count})
        return ppl

    # ---- generation ---------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int], add_special: bool) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special=add_special)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = self._checked_ids(prompt, "generate")
        else:
            raise TypeError(f"generate: the prompt must be a string or a sequence of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("generate: empty prompt")
        return ids

    def _checked_ids(self, token_ids: Sequence, what: str) -> list[int]:
        """token_ids as ints, each checked to be an integer id of the model's vocabulary (a float
        or an id out of range used to be truncated or index past the embedding)."""
        bad = next((t for t in token_ids if not is_int(t) or not 0 <= t < self.config.n_vocab), None)
        if bad is not None:
            raise ValueError(f"{what}: token ids must be integers in [0, {self.config.n_vocab}), got {bad!r}")
        return [int(t) for t in token_ids]

    def generate_tokens(self, prompt: str | Sequence[int], max_new_tokens: int = 128, add_special: bool = True,
                        **sampling) -> Iterator[int]:
        """Yield generated token ids until an end-of-generation token or max_new_tokens.
        sampling: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed."""
        with self._turn:  # held until this generator ends: another thread's evaluation waits
            yield from self._generate(prompt, max_new_tokens, add_special, sampling)

    def _generate(self, prompt, max_new_tokens: int, add_special: bool, sampling: dict) -> Iterator[int]:
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        model = self._require_open()
        sampler = Sampler(SamplingParams(**sampling))
        ids = self._prompt_ids(prompt, add_special)
        if len(ids) + max_new_tokens > model.n_ctx:
            raise ContextFullError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                                   f"exceed n_ctx={model.n_ctx}")
        self._sequence += 1
        sequence = self._sequence
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        b = self.prefill_batch
        for s in range(0, len(ids), b):
            logits = self._forward(model, ids[s:s + b], s)
        stats.prefill_s = time.perf_counter() - t0
        history = list(ids)
        for step in range(max_new_tokens):
            next_id = sampler(logits[-1], history)
            if next_id in self.tokenizer.eog_ids:
                return
            history.append(next_id)
            stats.generated_tokens += 1
            yield next_id
            if step + 1 < max_new_tokens:  # the last token needs no forward pass
                # resumed after close(): the weights' memory is gone, a forward pass would crash
                model = self._require_open()
                if self._sequence != sequence:
                    raise RuntimeError("this generation was superseded: another evaluation ran on the Engine "
                                       "since (it holds one sequence; finish or close a generator first)")
                t1 = time.perf_counter()
                logits = self._forward(model, [next_id], len(history) - 1)
                stats.decode_s += time.perf_counter() - t1
                stats.decode_steps += 1

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: Sequence[str] = (),
               add_special: bool = True, **sampling) -> Iterator[str]:
        """Yield text pieces as tokens are produced (whole UTF-8 characters only). Stops at an
        end-of-generation token, a stop string (not included in the text), or max_new_tokens."""
        stop = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"generate: stop strings must be non-empty strings, got {stop!r}")
        decoder = self.tokenizer.decoder()
        held = ""  # text not yet yielded because it may be the start of a stop string
        hold = max((len(s) for s in stop), default=1) - 1
        for token in self.generate_tokens(prompt, max_new_tokens, add_special, **sampling):
            held += decoder.push(token)
            cut = min((held.find(s) for s in stop if s in held), default=-1)
            if cut >= 0:  # a stop string: drop it and everything after it
                held = held[:cut]
                break
            if len(held) > hold:
                yield held[:len(held) - hold]
                held = held[len(held) - hold:]
        else:
            held += decoder.flush()
        if held:
            yield held

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **kwargs) -> str:
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The token ids of messages rendered with the model's chat template, ready for the
        assistant's reply (what chat() generates from; the server checks their length first)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special=False, parse_special=True)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, stream: bool = False, **kwargs):
        """Render messages with the model's chat template and generate the assistant's reply."""
        pieces = self.stream(self.chat_ids(messages), max_new_tokens, **kwargs)
        return pieces if stream else "".join(pieces)

    def stats(self) -> dict:
        s = self.last_stats
        out = {"run": s.run, "load_s": self.load_s, "prompt_tokens": s.prompt_tokens,
               "generated_tokens": s.generated_tokens, "decode_passes": s.decode_steps, "prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s}
        if s.perplexity is not None:
            out["perplexity"] = s.perplexity
        if self.plan is not None:
            out["memory"] = self.plan.summary()
        if self.store is not None:  # cumulative since load
            out["experts"] = self.store.summary()
        if self.profiler is not None:
            out["profile"] = self.profile_summary(with_sweep=False)
        if hasattr(self.model, "pipeline_stats"):  # distributed: per-stage figures, per-hop latency
            out["pipeline"] = self.model.pipeline_stats()
        return out

    def profile_summary(self, disk_gbps: float | None = None, with_sweep: bool = True) -> dict:
        """The profiler's figures (Engine.load(..., profile=True)): see engine/observe/profiler.py."""
        if self.profiler is None:
            raise RuntimeError("profile_summary: load the engine with profile=True")
        out = self.profiler.summary(self.store.n_slots if self.store else None, disk_gbps, with_sweep=with_sweep)
        if self.store is not None:  # what format_summary explains figures with (no prefetch; reads above the disk)
            lookahead = getattr(self.model, "prefetcher", None) is not None
            out["prefetch_mode"] = "lookahead" if lookahead else "none" if self.store.sync else "routing"
            out["direct_io"] = self.store.direct
        return out
