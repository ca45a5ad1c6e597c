"""Choosing the next token from logits: greedy, or temperature with top-k / top-p / min-p filters,
plus a repetition penalty, in llama.cpp's order (penalties, top-k, top-p, min-p, temperature)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def is_int(value) -> bool:
    """An int or NumPy integer, not a bool (True is an int to Python, never a count to us)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # <= 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at (0: off, -1: all, as llama.cpp)
    seed: int | None = None  # None or -1 (llama.cpp's default): a random seed

    def __post_init__(self):
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return value

        def integer(name):
            value = getattr(self, name)
            if not is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            return value

        number("temperature")  # <= 0: greedy
        if integer("top_k") < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < number("top_p") <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if number("repeat_penalty") <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if integer("repeat_last_n") < -1:
            raise ValueError(f"repeat_last_n must be >= -1 (0: off, -1: the whole history), got {self.repeat_last_n}")
        if self.seed is not None and (integer("seed") < -1 or self.seed >= 2**64):
            raise ValueError(f"seed must be an integer in 0..2^64-1, or -1 / None for a random one, got {self.seed}")
        if self.seed == -1:
            self.seed = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        """logits: float32[n_vocab] for the next position; history: tokens so far."""
        p = self.p
        logits = np.asarray(logits, dtype=np.float32)
        if p.repeat_penalty != 1.0 and history and p.repeat_last_n != 0:
            recent = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
            logits = apply_repeat_penalty(logits, recent, p.repeat_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        ids = np.arange(len(logits))
        if p.top_k and p.top_k < len(logits):
            keep = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
            ids, logits = ids[keep], logits[keep]
        order = np.argsort(-logits, kind="stable")
        ids, logits = ids[order], logits[order]  # descending
        probs = _softmax64(logits)
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1  # smallest prefix with mass >= top_p
            ids, logits, probs = ids[:cut], logits[:cut], probs[:cut]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            ids, logits = ids[keep], logits[keep]
        probs = _softmax64(logits / p.temperature)
        return int(ids[self.rng.choice(len(ids), p=probs)])


def apply_repeat_penalty(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """llama.cpp's penalty: a seen token's positive logit is divided by it, a negative one multiplied."""
    out = logits.copy()
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - np.max(x))
    return e / e.sum()
