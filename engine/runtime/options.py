"""LoadOptions: every choice Engine.load takes beyond the file, threads and backend, checked when
made and resolved against the model in one place (`resolved`), so that Engine.load, a pipeline
stage and the CLI mean the same thing by the same option."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ..model.config import ModelConfig
from ..stream.budget import parse_size
from ..stream.policies import CACHE_POLICIES, PAGE_CACHE

STREAM_MODES = ("none", "experts", "ffn", "auto")
PREFETCH_MODES = ("none", "routing", "lookahead")
IO_MODES = ("auto", "direct", "buffered")
DEFAULT_N_CTX = 4096


@dataclass(frozen=True)
class LoadOptions:
    """What Engine.load accepts as keyword options (see Engine.load for each one's meaning)."""

    n_ctx: int | None = None  # None: min(training context, 4096), or what a budget allows
    n_batch: int | None = None  # prompt tokens per forward pass (default 256, less under a small budget)
    dequantize_resident: bool | None = None  # None: only types without a fused kernel
    stream: str | None = None  # None: "auto" under a memory_budget, else "none"
    memory_budget: int | str | None = None  # "3GiB": resident + per-layer state + work buffers + expert cache
    cache_slots: int | None = None  # experts the cache holds (default: what the budget leaves)
    cache_policy: str = "decay"  # lru, lfu, decay (engine/stream/policies.py) or page-cache
    prefetch: str = "routing"  # none | routing | lookahead
    lookahead: int | None = None  # experts guessed per layer with prefetch="lookahead" (default top-k)
    io: str = "auto"  # auto | direct | buffered
    io_threads: int = 4
    profile: bool = False
    routing: str = "model"  # benchmarks only: "model", "trace:FILE", "synthetic[:...]" (engine/observe/routing.py)
    record_routing: bool = False  # record the experts chosen into Model.routing_trace
    progress: bool = False  # a progress bar while resident weights are copied in (on a terminal only)
    experts_per_token: int | None = None  # route to the top K experts instead of the model's count

    def __post_init__(self):
        for name, allowed in (("stream", STREAM_MODES), ("prefetch", PREFETCH_MODES), ("io", IO_MODES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"Engine.load: {name} must be one of {allowed}, got {value!r}")
        if self.cache_policy not in CACHE_POLICIES:
            raise ValueError(f"Engine.load: unknown cache policy {self.cache_policy!r}; "
                             f"expected one of {', '.join(CACHE_POLICIES)}")
        for name in ("n_ctx", "n_batch", "cache_slots", "lookahead", "experts_per_token"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Engine.load: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.io_threads, int) or self.io_threads < 1:
            raise ValueError(f"Engine.load: io_threads must be a positive integer, got {self.io_threads!r}")
        if self.memory_budget is not None:
            _check_budget(self.memory_budget)

    @classmethod
    def from_kwargs(cls, **options) -> "LoadOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"Engine.load: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**options)

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """The file's config as these options run it: experts_per_token replaces the number of
        experts each token is routed to (checked against the model's expert count)."""
        return cfg.with_experts_per_token(self.experts_per_token)

    def resolved(self, cfg: ModelConfig, always_stream: bool = False) -> "LoadOptions":
        """These options for the model cfg: stream is "none", "experts" or "ffn" ("auto", or no
        stream under a memory budget, becomes what a budget needs: the experts of a MoE, a dense
        model's FFNs). always_stream: a pipeline stage, which streams whatever it is told."""
        stream = self.stream if self.stream is not None else ("auto" if self.memory_budget is not None else "none")
        if stream == "auto" or (always_stream and stream == "none"):
            stream = "experts" if cfg.is_moe else "ffn"
        return replace(self, stream=stream)

    @property
    def streaming(self) -> bool:
        return self.stream not in (None, "none")

    def default_n_ctx(self, cfg: ModelConfig) -> int:
        """The context when neither n_ctx nor a budget sets it."""
        return min(cfg.n_ctx_train, DEFAULT_N_CTX)

    def lookahead_experts(self, cfg: ModelConfig) -> int:
        """Experts guessed per layer ahead of its routing (0: prefetch is not "lookahead")."""
        return (self.lookahead or max(1, cfg.n_expert_used)) if self.prefetch == "lookahead" else 0

    def io_mode(self, direct_possible: bool) -> str:
        """"direct" or "buffered": O_DIRECT where asked for, or where "auto" finds the file
        system allows it; never for the page-cache policy, whose point is the OS cache."""
        if self.cache_policy == PAGE_CACHE or self.io == "buffered":
            return "buffered"
        return "direct" if self.io == "direct" or direct_possible else "buffered"


def _check_budget(budget) -> None:
    """A memory budget is a positive byte count (an int, a finite float) or a size string ("3GiB");
    inf, NaN, 0 or a negative count used to fail deep inside the planner (OverflowError) or be
    planned with."""
    bad = isinstance(budget, bool) or (isinstance(budget, float) and not math.isfinite(budget))
    if not bad:
        try:
            bad = parse_size(budget) <= 0
        except (TypeError, ValueError):
            bad = True
    if bad:
        raise ValueError(f"Engine.load: memory_budget must be a positive size (bytes, or e.g. \"3GiB\"), "
                         f"got {budget!r}")
