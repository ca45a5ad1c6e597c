"""Where a MoE layer's expert choices come from, besides the model's router: for benchmarks.

A random-init synthetic model's routers spread tokens over experts unlike a trained model's, so
cache and prefetch figures measured on it say little. A routing source replaces the router's
choice of experts (the weights still come from the router's probabilities at the chosen ids, so
the output stays finite and deterministic, but text generated this way means nothing):

    parse_routing("model" | "trace:FILE" | "synthetic[:zipf=Z,reuse=R,seed=S]", cfg) -> None | source
    source.choose(layer, token_index) -> int64[top_k]    the experts of one token at one layer
    SyntheticRouting(n_layer, n_expert, top_k, ...)      Zipf popularity + temporal reuse
    RoutingTrace: record(layer, ids) while a model runs, save(path), RoutingTrace.load(path)
    calibrate(...) -> (zipf, reuse)                      offline: fit SyntheticRouting to a measured
                                                         per-layer LRU curve (FLASH_MOE_QWEN35)

A source answers by token position: Model.route asks choose(layer, p) for the token at position p.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..stream.policies import simulate
from ..errors import RoutingTraceError

# flash-moe's routing profile of Qwen3.5-397B-A17B (512 experts a layer), 200 generated tokens
# (paper/flash_moe.tex, "Expert Routing Statistics"; ../shared/notes/flash-moe-and-llm-in-a-flash.md):
# per-layer LRU hit rate by capacity (a separate LRU per layer), and the consecutive-token overlap
# range across layers. The paper states the overlap "with K=4", the top-k flash-moe runs with.
FLASH_MOE_LRU = {16: 0.49, 32: 0.59, 64: 0.68, 128: 0.71}
FLASH_MOE_OVERLAP = (0.08, 0.34)
FLASH_MOE_TOP_K = 4
FLASH_MOE_TOKENS = 200

# calibrate(n_layer=48, overlap=(0.085, 0.335)) (otherwise its defaults: 512 experts, top-4, 200
# tokens, seed 0; the overlap range narrowed by 0.005 so that other seeds stay inside it), run once
# offline (7 min). Measured over 96 layers, seed 0, against FLASH_MOE_LRU:
#   capacity             16     32     64     128    consecutive overlap
#   top-4 (calibrated)   0.466  0.566  0.658  0.731  0.309   (max abs error 0.025)
#   flash-moe            0.49   0.59   0.68   0.71   0.08-0.34
#   top-10, same params  0.396  0.516  0.630  0.738  0.364
# No (zipf, reuse) fits the curve at top-10 with the overlap in range: at 16 slots an LRU holds 1.6
# tokens' experts, so its hit rate barely exceeds the consecutive overlap, while the profile has
# 49% against at most 34%. The profile's "43-57% of experts touched over 30 tokens" is left out: at
# top-4, 30 x 4 ids touch at most 23%; at top-10 it takes near-uniform routing, which the LRU curve
# rules out. This model touches 11% (top-4) / 23% (top-10).
FLASH_MOE_QWEN35 = {"zipf": 1.0469, "reuse": 0.2263}

_EMPTY = np.empty(0, dtype=np.int64)


class SyntheticRouting:
    """Expert choices with a trained router's statistics, drawn independently for each layer.

    zipf: each layer's popularity of experts: the expert of rank r (over a random permutation of
        the experts, its own for each layer) is drawn with weight r**-zipf (0: uniform).
    reuse: temporal locality: a token keeps each of the previous token's experts (at that layer)
        with probability `reuse`; the rest of its top_k are drawn without replacement from the
        popularity, excluding those kept.
    seed: the random draws of token t at layer l come from a generator keyed by (seed, l, t), and a
        token depends only on its draws and the previous token's choice: the choices are the same
        whatever order they are asked in (tokens before the one asked are computed and kept).

    Layers share nothing, so the cross-layer correlation is ~0, as measured on Qwen3.5.
    """

    def __init__(self, n_layer: int, n_expert: int, top_k: int, zipf: float = FLASH_MOE_QWEN35["zipf"],
                 reuse: float = FLASH_MOE_QWEN35["reuse"], seed: int = 0):
        if not 0 < top_k <= n_expert:
            raise ValueError(f"SyntheticRouting: top_k must be in 1..n_expert={n_expert}, got {top_k}")
        if zipf < 0 or not 0.0 <= reuse <= 1.0 or seed < 0:
            raise ValueError(f"SyntheticRouting: need zipf >= 0, 0 <= reuse <= 1, seed >= 0; "
                             f"got zipf={zipf}, reuse={reuse}, seed={seed}")
        self.n_layer, self.n_expert, self.top_k = n_layer, n_expert, top_k
        self.zipf, self.reuse, self.seed = float(zipf), float(reuse), int(seed)
        self._popularity: dict[int, np.ndarray] = {}  # layer -> float64[n_expert], drawn on first use
        self._chosen: list[list[np.ndarray]] = [[] for _ in range(n_layer)]  # layer -> int64[top_k] per token

    def choose(self, layer: int, token_index: int) -> np.ndarray:
        """int64[top_k]: the distinct experts of token `token_index` at `layer`."""
        if not 0 <= layer < self.n_layer or token_index < 0:
            raise IndexError(f"SyntheticRouting: no layer {layer} of {self.n_layer} or token {token_index}")
        chosen = self._chosen[layer]
        while len(chosen) <= token_index:  # each token depends on the one before
            chosen.append(self._draw(layer, len(chosen), chosen[-1] if chosen else _EMPTY))
        return chosen[token_index].copy()

    def _draw(self, layer: int, token_index: int, previous: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng((self.seed, 1, layer, token_index))
        keep = rng.random(self.top_k) < self.reuse  # [top_k], one coin per previous expert
        # weighted sampling without replacement: every expert draws an exponential time scaled by
        # 1/popularity, and the m earliest win (the order a sequential weighted draw gives)
        race = rng.exponential(size=self.n_expert) / self._popularity_of(layer)  # [n_expert]
        kept = previous[keep[:len(previous)]]
        race[kept] = np.inf
        m = self.top_k - len(kept)
        drawn = np.argpartition(race, m - 1)[:m] if m else _EMPTY
        return np.concatenate([kept, drawn[np.argsort(race[drawn])]])

    def _popularity_of(self, layer: int) -> np.ndarray:
        if layer not in self._popularity:
            rank_of = np.random.default_rng((self.seed, 0, layer)).permutation(self.n_expert)  # expert -> rank - 1
            self._popularity[layer] = (rank_of + 1.0) ** -self.zipf
        return self._popularity[layer]


class RoutingTrace:
    """The experts chosen per forward pass and layer, recorded while a model runs and replayed.

    Replay: the i-th token recorded at a layer (over the passes, in order) is the token at position
    i. So record one sequence per trace (a fresh engine: its prompt, then what it generates) and
    replay it over the same positions.
    """

    FORMAT = "weightstream-routing-trace"
    VERSION = 1

    def __init__(self, n_layer: int, n_expert: int, top_k: int, source: str = "(recorded in memory)"):
        self.n_layer, self.n_expert, self.top_k = n_layer, n_expert, top_k
        self.source = source  # the file it came from, named in errors
        # per forward pass, per layer: int64[n_tokens, top_k], or None where nothing was routed
        self.passes: list[list[np.ndarray | None]] = []
        self._last_layer = -1  # the layer recorded last: a layer not above it starts a new pass
        self._by_layer: dict[int, np.ndarray] = {}  # layer -> int64[tokens recorded, top_k], for replay

    def record(self, layer: int, ids) -> None:
        """Append the experts of a pass's tokens at `layer`: int[n_tokens, top_k]."""
        if not self.passes or layer <= self._last_layer:
            self.passes.append([None] * self.n_layer)
        self.passes[-1][layer] = np.array(ids, dtype=np.int64).reshape(-1, self.top_k)  # a copy
        self._last_layer = layer
        self._by_layer.pop(layer, None)

    def choose(self, layer: int, token_index: int) -> np.ndarray:
        """int64[top_k]: the experts recorded for the token at position token_index of `layer`."""
        if layer not in self._by_layer:
            recorded = [p[layer] for p in self.passes if p[layer] is not None]
            self._by_layer[layer] = np.concatenate(recorded) if recorded else np.empty((0, self.top_k), np.int64)
        table = self._by_layer[layer]
        if not 0 <= token_index < len(table):
            raise RoutingTraceError(f"routing trace {self.source}: layer {layer} has {len(table)} recorded "
                                    f"tokens, position {token_index} asked")
        return table[token_index].copy()

    def check_model(self, cfg) -> None:
        """Refuse a trace recorded with another shape than the model's (cfg: ModelConfig)."""
        for what, found, expected in (("layers", self.n_layer, cfg.n_layer),
                                      ("experts per layer", self.n_expert, cfg.n_expert),
                                      ("experts per token (top-k)", self.top_k, cfg.n_expert_used)):
            if found != expected:
                raise RoutingTraceError(f"routing trace {self.source}: recorded with {found} {what}, "
                                        f"the model has {expected}")

    # ---- files --------------------------------------------------------------------------------
    def save(self, path) -> None:
        """JSON: the shape, then per pass a list per layer (null: nothing routed) of the tokens'
        expert ids. Written to a temporary name and renamed: a reader never sees half a file."""
        path = Path(path)
        doc = {"format": self.FORMAT, "version": self.VERSION, "n_layer": self.n_layer,
               "n_expert": self.n_expert, "top_k": self.top_k,
               "passes": [[None if ids is None else ids.tolist() for ids in p] for p in self.passes]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("format") != cls.FORMAT or doc.get("version") != cls.VERSION:
                raise ValueError(f"not a {cls.FORMAT} version {cls.VERSION} file")
            trace = cls(int(doc["n_layer"]), int(doc["n_expert"]), int(doc["top_k"]), source=str(path))
            trace.passes = [trace._pass_from_json(i, p) for i, p in enumerate(doc["passes"])]
        except RoutingTraceError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RoutingTraceError(f"routing trace {path}: cannot read it: {e}") from e
        return trace

    def _pass_from_json(self, index: int, layers: list) -> list[np.ndarray | None]:
        if len(layers) != self.n_layer:
            raise RoutingTraceError(f"routing trace {self.source}: pass {index} has {len(layers)} layers, "
                                    f"expected {self.n_layer}")
        out = []
        for layer, rows in enumerate(layers):
            ids = None if rows is None else np.array(rows, dtype=np.int64).reshape(-1, self.top_k)
            if ids is not None and ids.size and not (0 <= ids.min() and ids.max() < self.n_expert):
                raise RoutingTraceError(f"routing trace {self.source}: pass {index}, layer {layer}: expert ids "
                                        f"{ids.min()}..{ids.max()} outside the {self.n_expert} experts expected")
            out.append(ids)
        return out


# ---- the Engine.load option -------------------------------------------------------------------
ROUTING_FORMS = ("model", "trace:FILE", "synthetic", "synthetic:zipf=Z,reuse=R,seed=S")
_SYNTHETIC_KEYS = {"zipf": float, "reuse": float, "seed": int}


def parse_routing(spec: str, cfg):
    """None for "model" (the router decides), else the routing source `spec` names, checked
    against cfg (ModelConfig)."""
    kind, _, arg = spec.partition(":")
    if spec == "model":
        return None
    if not ((kind == "trace" and arg) or kind == "synthetic"):
        raise ValueError(f"routing must be one of {', '.join(ROUTING_FORMS)}; got {spec!r}")
    if not cfg.is_moe:
        raise ValueError(f"routing={spec!r}: the model has no routed experts")
    if kind == "trace":
        trace = RoutingTrace.load(arg)
        trace.check_model(cfg)
        return trace
    return SyntheticRouting(cfg.n_layer, cfg.n_expert, cfg.n_expert_used, **_synthetic_options(spec, arg))


def _synthetic_options(spec: str, arg: str) -> dict:
    """"zipf=1.1,reuse=0.3" -> FLASH_MOE_QWEN35 with those replaced."""
    options = dict(FLASH_MOE_QWEN35)
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = _SYNTHETIC_KEYS[key.strip()](value)
        except (KeyError, ValueError):
            raise ValueError(f"routing={spec!r}: {item!r} is not one of "
                             f"{', '.join(k + '=' + t.__name__ for k, t in _SYNTHETIC_KEYS.items())}") from None
    return options


# ---- statistics and calibration ---------------------------------------------------------------
def layer_choices(source, layer: int, n_tokens: int) -> np.ndarray:
    """int64[n_tokens, top_k]: the source's experts for positions 0..n_tokens-1 of `layer`."""
    return np.stack([source.choose(layer, t) for t in range(n_tokens)])


def lru_curve(source, n_tokens: int, capacities) -> dict[int, float]:
    """Per-layer LRU hit rate at each capacity (each layer its own LRU of that many experts, cold
    at the start), averaged over the layers, over the first n_tokens positions."""
    traces = [layer_choices(source, layer, n_tokens).ravel().tolist() for layer in range(source.n_layer)]
    return {c: float(np.mean([simulate(t, c, "lru") / len(t) for t in traces])) for c in capacities}


def consecutive_overlap(source, n_tokens: int) -> float:
    """Mean fraction of a token's experts that the previous token at the same layer also used."""
    shared = []
    for layer in range(source.n_layer):
        rows = layer_choices(source, layer, n_tokens)  # [n_tokens, top_k]
        shared += [len(np.intersect1d(a, b)) for a, b in zip(rows[1:], rows[:-1])]
    return float(np.mean(shared)) / source.top_k


def calibrate(n_expert: int = 512, top_k: int = FLASH_MOE_TOP_K, targets: dict[int, float] = FLASH_MOE_LRU,
              overlap: tuple[float, float] = FLASH_MOE_OVERLAP, n_layer: int = 24, n_tokens: int = FLASH_MOE_TOKENS,
              seed: int = 0, zipfs=np.arange(0.5, 1.61, 0.05),
              reuses=np.arange(0.0, 0.61, 0.02)) -> tuple[float, float]:
    """(zipf, reuse) whose per-layer LRU curve over n_tokens is closest to `targets` (capacity ->
    hit rate) in max abs error, among those whose consecutive-token overlap lies within `overlap`
    (outside it, a candidate ranks after every one inside, the nearer the better): the grid
    zipfs x reuses, then a pattern search with halving steps from its best point. The error is not
    smooth (the draws change with the parameters) and the good fits lie along a narrow valley
    (more skew trades for less reuse), hence the fine grid in reuse. Offline only (minutes at 24
    layers): FLASH_MOE_QWEN35 holds its result."""
    memo: dict[tuple[float, float], float] = {}

    def misfit(zipf: float, reuse: float) -> float:
        key = (round(zipf, 6), round(reuse, 6))
        if key not in memo:
            source = SyntheticRouting(n_layer, n_expert, top_k, zipf, reuse, seed)
            curve = lru_curve(source, n_tokens, targets)
            ov = consecutive_overlap(source, n_tokens)
            outside = max(overlap[0] - ov, ov - overlap[1], 0.0)
            memo[key] = max(abs(curve[c] - t) for c, t in targets.items()) + (1.0 + outside if outside else 0.0)
        return memo[key]

    best = min(((float(z), float(r)) for z in zipfs for r in reuses), key=lambda p: misfit(*p))
    dz, dr = 0.025, 0.01
    while dz > 0.003:
        moves = [(best[0] + a * dz, best[1] + b * dr) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b]
        moves = [(z, r) for z, r in moves if z >= 0 and 0 <= r <= 1]
        step = min(moves, key=lambda p: misfit(*p))
        if misfit(*step) < misfit(*best):
            best = step
        else:
            dz, dr = dz / 2, dr / 2
    return round(float(best[0]), 4), round(float(best[1]), 4)
