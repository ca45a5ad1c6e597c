"""The memory budget: what a model needs held in memory, and how many expert slots are left.

    plan = plan_memory(gguf_file, cfg, budget="3GiB", stream="experts")
    plan.n_slots, plan.n_ctx, plan.prefill_batch, plan.describe()

The budget covers everything the engine allocates for the model:
    resident  every weight that does not stream, copied into our memory (norms, attention,
              routers, embeddings, the output head; dense FFNs too unless stream="ffn")
    kv_cache  every layer's state (engine/model/state.py: a layer's float32 K and V for n_ctx
              positions), sized by the function the Model allocates it with
    work      per-step buffers at the largest prompt batch (activations, attention scores, logits):
              engine/model/workspace.py's work_buffers, the list the Model's Workspace allocates
    cache     expert slots: whatever is left, in whole slots
    host      what the file's metadata and the tokenizer keep once loaded (host_bytes: measured per
              vocabulary entry), counted for the process that holds the ends (embedding, head)
It does not cover the Python interpreter and its libraries (NumPy, Numba, our kernels: ~100-200 MB
measured as the process's RSS before loading). tests/test_memory_budget.py holds the whole process
to it: peak RSS minus RSS before loading <= budget + 16 MiB (SmolLM2 at 80 MiB).

Parsing the metadata costs far more than what stays: gguf's reader keeps every element of an
array field as its own NumPy views (~45 MiB for a 49k-token vocabulary with its merges), and the
tokens and merges as Python lists (~8 MiB more). Engine.load drops the first as soon as the file is
open (release_parsed_fields) and the second once the tokenizer has its own copy
(release_metadata_arrays), both before any weight is allocated, and gives the freed heap back to
the operating system.

With a budget and no n_ctx, the context is halved from min(train, 4096) until the KV cache takes
(the layers' states) at most a quarter of what the resident weights leave (never below 256), and the prompt batch is
halved from 256 until the work buffers take at most a tenth, so a small budget still leaves room
for experts. A budget that cannot hold the resident part, the KV cache, the work buffers and one
layer's worth of routed experts is refused with the figures.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from ...kernels import backends

from ..model.config import ModelConfig
from ..model.state import state_bytes
from ..model.workspace import work_buffers
from .layout import expert_layouts
from ..formats.gguf_file import GGUFFile
from ..errors import BudgetError

MIN_N_CTX = 256
# Measured (tests/test_memory_budget.py's child, SmolLM2-135M: 49152 tokens, 48900 merges): RSS
# the metadata and the tokenizer keep after release_metadata_arrays, per vocabulary entry (the
# tokenizers library's BPE tables and our token strings, with the heap they fragment).
HOST_BYTES_PER_TOKEN = 600
HOST_BYTES_FIXED = 2 << 20  # scalars, the chat template, the jinja environment
MAX_PREFILL_BATCH = 256
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(size) -> int:
    """Bytes from 3221225472, "3GiB", "3G" (= GiB, as llama.cpp and dd use it), "3GB" (10**9), "512MiB"."""
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {size!r} not understood: use e.g. 3GiB, 512MiB, 1.5GB or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryPlan:
    budget: int | None
    resident: int
    kv_cache: int  # the per-layer states (KV caches) of the layers held
    work: int
    slot_bytes: int  # one expert slot (page-rounded; O_DIRECT heads included)
    n_slots: int
    n_ctx: int
    prefill_batch: int
    streamed: int  # bytes of weights left on disk
    host: int = 0  # the metadata and tokenizer kept (host_bytes), with the ends only

    @property
    def cache(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def total(self) -> int:
        return self.host + self.resident + self.kv_cache + self.work + self.cache

    def summary(self) -> dict:
        """The plan's figures in bytes, as Engine.stats() and a pipeline stage report them."""
        return {"budget": self.budget, "host": self.host, "resident": self.resident, "kv_cache": self.kv_cache,
                "work": self.work,
                "expert_cache": self.cache, "total": self.total, "n_ctx": self.n_ctx, "streamed": self.streamed}

    def describe(self) -> str:
        return (f"metadata and tokenizer {fmt_bytes(self.host)} + resident weights {fmt_bytes(self.resident)} "
                f"+ KV cache {fmt_bytes(self.kv_cache)} "
                f"(n_ctx {self.n_ctx}) + work buffers {fmt_bytes(self.work)} (batch {self.prefill_batch}) "
                f"+ expert cache {fmt_bytes(self.cache)} ({self.n_slots} slots of {fmt_bytes(self.slot_bytes)}) "
                f"= {fmt_bytes(self.total)}" + (f" of a {fmt_bytes(self.budget)} budget" if self.budget else "")
                + f"; {fmt_bytes(self.streamed)} stays on disk")


def resident_bytes(f: GGUFFile, streamed_names: set[str], dequantize_resident: bool | None = None) -> int:
    """Bytes the non-streamed weights take once copied in (types without a fused kernel, or all with
    dequantize_resident=True, are expanded to float32)."""
    total = 0
    for name, info in f.tensors.items():
        if name in streamed_names:
            continue
        expand = info.qtype != GGMLQuantizationType.F32 and len(info.shape) == 2 and (
            dequantize_resident or (dequantize_resident is None and not backends.has_fused_kernel(info.qtype, "auto")))
        n_elements = 1
        for d in info.shape:
            n_elements *= d
        total += 4 * n_elements if expand else info.nbytes
    return total


def host_bytes(cfg: ModelConfig) -> int:
    """Bytes the file's metadata and the tokenizer keep once an Engine is loaded (after
    release_metadata_arrays): a fixed part and a part per vocabulary entry, measured."""
    return HOST_BYTES_FIXED + HOST_BYTES_PER_TOKEN * cfg.n_vocab


def release_parsed_fields(f: GGUFFile) -> None:
    """Free the largest part of the parse (GGUFFile.release_parse: gguf's per-element views of
    every array and its tensor records) before the tokenizer's build allocates on top of it, and
    hand the heap back to the operating system."""
    f.release_parse()
    gc.collect()  # the parts hold reference cycles through their fields
    _malloc_trim()


def release_metadata_arrays(f: GGUFFile, keep: int = 256) -> int:
    """Drop f.metadata's arrays longer than `keep` (the vocabulary, scores, token types, merges:
    the tokenizer holds its own copy) and hand the freed heap back to the operating system. Call it
    once the tokenizer is built and before weights are allocated (Engine.load). Returns how many
    arrays were dropped."""
    dropped = [k for k, v in f.metadata.items() if isinstance(v, (list, tuple)) and len(v) > keep]
    for k in dropped:
        del f.metadata[k]
    gc.collect()
    _malloc_trim()
    return len(dropped)


def _malloc_trim() -> None:
    """Return free heap pages to the OS (glibc only; elsewhere nothing to do)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return
    trim(0)


def work_bytes(cfg: ModelConfig, n_ctx: int, batch: int) -> int:
    """Per-step buffers at a prompt batch of `batch` tokens: those the Model's Workspace holds
    and those a prefill call allocates (engine/model/workspace.py's work_buffers, both)."""
    return sum(b.nbytes for b in work_buffers(cfg, batch, n_ctx))


def plan_memory(f: GGUFFile, cfg: ModelConfig, *, budget=None, stream: str = "experts", n_ctx: int | None = None,
                cache_slots: int | None = None, dequantize_resident: bool | None = None,
                direct_io: bool = True, default_n_ctx: int = 4096, n_batch: int | None = None,
                layers: range | None = None, ends: bool = True) -> MemoryPlan:
    """Size the KV cache, the prompt batch and the expert cache to fit `budget` (None: no limit;
    cache_slots then defaults to one layer's experts). Raises BudgetError when it cannot fit.
    layers, ends: plan for a process holding only these layers (None: all) and, with ends, the
    embedding and head (a pipeline stage, engine/runtime/distributed.py: its layers, no ends)."""
    layers = range(cfg.n_layer) if layers is None else layers
    layouts = expert_layouts(f, dense_ffn=stream == "ffn") if stream != "none" else {}
    layouts = {i: lay for i, lay in layouts.items() if i in layers}
    streamed_names = {info.name for lay in layouts.values() for info in lay.parts}
    not_held = {name for name in f.tensors  # another stage's layers, or the driver's ends
                if (int(name.split(".")[1]) not in layers if name.startswith("blk.")
                    else not ends and name != "rope_freqs.weight")}
    resident = resident_bytes(f, streamed_names | not_held, dequantize_resident)
    streamed = sum(f.tensors[n].nbytes for n in streamed_names)
    slot_bytes = -(-max((lay.slot_bytes(direct_io) for lay in layouts.values()), default=0) // 4096) * 4096
    per_layer = max((min(lay.n_expert, max(1, cfg.n_expert_used)) for lay in layouts.values()), default=0)
    limit = parse_size(budget) if budget is not None else None
    host = host_bytes(cfg) if ends else 0

    ctx = n_ctx or min(cfg.n_ctx_train, default_n_ctx)
    batch = n_batch or MAX_PREFILL_BATCH
    if limit is not None:
        spare = limit - host - resident
        while n_ctx is None and ctx > MIN_N_CTX and state_bytes(cfg, ctx, layers) > spare / 4:
            ctx //= 2
        while n_batch is None and batch > 1 and work_bytes(cfg, ctx, batch) > spare / 10:
            batch //= 2
    batch = min(batch, ctx)
    kv, work = state_bytes(cfg, ctx, layers), work_bytes(cfg, ctx, batch)

    if cache_slots is not None:
        n_slots = cache_slots
    elif limit is None:
        n_slots = max((lay.n_expert for lay in layouts.values()), default=0)
    else:
        n_slots = max(0, (limit - host - resident - kv - work) // slot_bytes) if slot_bytes else 0
        n_slots = min(n_slots, sum(lay.n_expert for lay in layouts.values()))  # more would stay empty
    plan = MemoryPlan(limit, resident, kv, work, slot_bytes, n_slots if layouts else 0, ctx, batch, streamed, host)
    if limit is not None:
        need = host + resident + kv + work + per_layer * slot_bytes
        what = "metadata and tokenizer, resident weights, KV cache and work buffers" + (
            f" and one layer's {per_layer} expert slot(s)" if layouts else "")
        if need > limit or (layouts and plan.n_slots < per_layer) or plan.total > limit:
            hint = "" if stream == "ffn" else " (stream='ffn' also leaves dense FFN weights on disk)"
            raise BudgetError(f"{f.path}: memory budget {fmt_bytes(limit)} is too small: the {what} need "
                              f"{fmt_bytes(need)} (metadata and tokenizer {fmt_bytes(host)}, resident {fmt_bytes(resident)}, KV {fmt_bytes(kv)} at n_ctx {ctx}, "
                              f"work {fmt_bytes(work)}, slots {fmt_bytes(per_layer * slot_bytes)}){hint}")
    return plan
