"""Importance matrices: `weightstream imatrix MODEL -f CALIBRATION.txt -o imatrix.dat [-c 512] [--chunks N]`.

For every matrix a token's activations x are multiplied by, the per-column sum of x^2 over the
calibration text and the number of tokens (llama.cpp's tools/imatrix/imatrix.cpp, collect_imatrix):
the quantizers then weight each column's rounding error by its mean x^2. Routed experts are counted
per expert, over the tokens routed to that expert only, and stored expert after expert
(float32[n_expert * cols]), as llama.cpp's MUL_MAT_ID path stores them. The routers (ffn_gate_inp)
are collected too, as llama.cpp does; the output head only with --process-output (same flag).

How the model is observed (zero cost when not collecting):
- the resident matrices (attention, dense and shared-expert FFN, routers) are `Linear`s, each
  with the GGUF names of its rows and an `observe` hook (engine/model/weights.py): attach sets the
  hook to the Collector, which records the input under each name (a group whose rows were
  concatenated, Q/K/V or gate/up, records the one input for each of its names);
- routed experts, and dense FFNs streamed as experts, compute in Model.expert_ffn: Model.observer,
  None by default, is told (layer, expert, x, the SwiGLU output) there. It works the same whether
  the experts are resident or streamed from disk.

The file format is llama.cpp's legacy imatrix.dat (save_imatrix_legacy), which llama-quantize reads:
int32 n_entries; per entry (sorted by name): int32 name length, name bytes, int32 ncall, int32 nval,
float32[nval] = (sum x^2 / count) * ncall with ncall = ceil(max count / chunk size) (an expert never
routed to stores 1 * ncall); then int32 the number of chunks and int32 length + the calibration file
name. Reading divides by ncall (llama-quantize's load_legacy_imatrix), giving the mean x^2.
read_imatrix also reads llama.cpp's newer GGUF imatrix (`NAME.in_sum2` / `NAME.counts` tensors).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats.atomic import replacing


@dataclass
class ImatrixData:
    values: dict[str, np.ndarray]  # name -> float32[n_mat * cols], the mean x^2 of each column
    dataset: str = ""  # the calibration file it was computed on
    chunks: int = 0  # chunks of text it was computed on


# ----------------------------------------------------------------------------------------------
# collecting


@dataclass
class _Stat:
    sums: np.ndarray  # float64[n_mat, cols]: sum of x^2 per column
    counts: np.ndarray  # int64[n_mat]: tokens seen


class Collector:
    """Per-matrix sums of x^2 and token counts, fed by the model while it runs."""

    def __init__(self, n_expert: dict[str, int] | None = None):
        self.stats: dict[str, _Stat] = {}
        self.n_expert = n_expert or {}  # expert tensor name -> number of experts

    def add(self, name: str, x: np.ndarray, expert: int | None = None) -> None:
        """x: float32[n, cols], the rows a matrix multiplies (expert: which slice of a 3-D tensor)."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        st = self.stats.get(name)
        if st is None:
            n_mat = self.n_expert.get(name, 1) if expert is not None else 1
            st = self.stats[name] = _Stat(np.zeros((n_mat, x.shape[1])), np.zeros(n_mat, dtype=np.int64))
        e = 0 if expert is None else expert
        st.sums[e] += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        st.counts[e] += len(x)

    def linear(self, names: list[str], x: np.ndarray) -> None:
        for name in names:
            self.add(name, x)

    def expert(self, layer: int, expert: int | None, h: np.ndarray, act: np.ndarray) -> None:
        """Model.observer: an expert's FFN on h (its tokens) with SwiGLU output act; expert None: a
        dense FFN streamed as expert 0 of its layer."""
        p = f"blk.{layer}."
        suffix = "_exps.weight" if expert is not None else ".weight"
        self.add(p + "ffn_gate" + suffix, h, expert)
        self.add(p + "ffn_up" + suffix, h, expert)
        self.add(p + "ffn_down" + suffix, act, expert)

    def result(self, chunk_size: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(name -> float32[n_mat * cols] mean x^2, with 1 where a matrix saw no token;
        name -> ncall as llama.cpp computes it)."""
        values, ncalls = {}, {}
        for name, st in sorted(self.stats.items()):
            mean = np.ones_like(st.sums)
            seen = st.counts > 0
            mean[seen] = st.sums[seen] / st.counts[seen, None]
            values[name] = mean.astype(np.float32).reshape(-1)
            ncalls[name] = int(-(-int(st.counts.max()) // chunk_size))
        return values, ncalls


def attach(model, collector: Collector, process_output: bool = False) -> None:
    """Make `model` (weightstream.engine.model.forward.Model) report every matrix input to
    `collector`: each Linear's observe hook, and the model's observer for the experts (which the
    model multiplies itself, so it names them: see Collector.expert)."""
    for linear in model.w.linears(with_output=process_output):
        linear.observe = collector.linear
    for i, L in enumerate(model.w.layers):
        if L is not None and L.moe is not None:
            for part in ("gate", "up", "down"):
                collector.n_expert[f"blk.{i}.ffn_{part}_exps.weight"] = len(L.moe.gate_exps)
    model.observer = collector


def collect_imatrix(engine, text: str, n_ctx: int = 512, chunks: int | None = None,
                    process_output: bool = False, progress: bool = False) -> tuple[Collector, int]:
    """Run engine (weightstream.engine.runtime.engine.Engine) over text in chunks of n_ctx tokens (BOS first when the model
    adds one, as llama-imatrix) and collect. Returns (the collector, chunks run)."""
    pieces, n_tokens = engine.tokenizer.chunks(text, n_ctx)
    if not pieces:
        raise ValueError(f"imatrix: the calibration text has {n_tokens} tokens, fewer than one chunk of {n_ctx}")
    pieces = pieces[:chunks] if chunks is not None else pieces
    n_chunks = len(pieces)
    model = engine._require_open()
    if n_ctx > model.n_ctx:
        raise ValueError(f"imatrix: chunk size {n_ctx} exceeds the engine's context {model.n_ctx}")
    collector = Collector()
    attach(model, collector, process_output)
    b = engine.prefill_batch
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_chunks, unit="chunk", desc="imatrix")
    for chunk in pieces:
        for s in range(0, n_ctx, b):
            model.forward(chunk[s:s + b], s, all_logits=process_output)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return collector, n_chunks


# ----------------------------------------------------------------------------------------------
# the file


def save_imatrix(path: str | os.PathLike, collector: Collector, chunk_size: int, chunks: int,
                 dataset: str = "") -> Path:
    """Write llama.cpp's legacy imatrix.dat (see the module docstring), under a temporary name
    renamed into place when complete."""
    path = Path(path)
    values, ncalls = collector.result(chunk_size)
    if not values:
        raise ValueError("imatrix: nothing was collected")
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, v in values.items():
            b = name.encode("utf-8")
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncalls[name], v.size))
            f.write((v * np.float32(ncalls[name])).astype("<f4").tobytes())
        d = dataset.encode("utf-8")
        f.write(struct.pack("<ii", chunks, len(d)) + d)
    return path


def read_imatrix(path: str | os.PathLike) -> ImatrixData:
    """An imatrix in llama.cpp's legacy .dat format or its GGUF format: name -> mean x^2 per column
    (float32[n_mat * cols]), as llama-quantize loads it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"imatrix file not found: {path}")
    data = path.read_bytes()
    if data[:4] == b"GGUF":
        return _read_gguf_imatrix(path)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{path}: truncated imatrix (at byte {pos} of {len(data)})")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError(f"{path}: not an imatrix file (n_entries = {n_entries})")
    values = {}
    for i in range(n_entries):
        (n,) = take("<i")
        if not 0 < n < 4096:
            raise ValueError(f"{path}: entry {i}: bad name length {n}: not an imatrix file?")
        name = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        ncall, nval = take("<ii")
        if nval < 1:
            raise ValueError(f"{path}: entry {name}: bad value count {nval}")
        v = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32) if pos + 4 * nval <= len(data) \
            else None
        if v is None:
            raise ValueError(f"{path}: truncated imatrix inside entry {name}")
        pos += 4 * nval
        values[name] = v / np.float32(ncall) if ncall > 0 else v
    chunks, dataset = 0, ""
    if pos + 8 <= len(data):  # the newer legacy files end with the chunk count and the dataset name
        chunks, n = take("<ii")
        dataset = data[pos:pos + n].decode("utf-8", errors="replace")
    return ImatrixData(values, dataset, chunks)


def _read_gguf_imatrix(path: Path) -> ImatrixData:
    from gguf import GGUFReader

    r = GGUFReader(path)
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[:-len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32)
        elif t.name.endswith(".counts"):
            counts[t.name[:-len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    values = {}
    for name, s in sums.items():
        if name not in counts:
            raise ValueError(f"{path}: {name}.in_sum2 without {name}.counts")
        c = counts[name]
        s = s.reshape(len(c), -1)
        mean = np.ones_like(s)
        mean[c > 0] = s[c > 0] / c[c > 0, None]
        values[name] = mean.reshape(-1)
    field = r.fields.get("imatrix.datasets")
    datasets = field.contents() if field is not None else []
    chunks = r.fields.get("imatrix.chunk_count")
    return ImatrixData(values, datasets[0] if datasets else "", int(chunks.contents()) if chunks is not None else 0)


# ----------------------------------------------------------------------------------------------
# command line


