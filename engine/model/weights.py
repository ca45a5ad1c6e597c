"""Loading weights by llama.cpp tensor name, with every shape asserted against the config.

This is the one place that knows GGUF tensor names. Weights stay as QTensors over the file's
memory map and are multiplied by the fused kernels straight from their blocks. A resident matrix
is expanded to float32 once at load only where no fused kernel handles its type
(`dequantize_resident=None`, the default), or for all of them with True (4 bytes per weight).
F32 matrices are used in place. Routed experts are never expanded here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from ... import kernels
from ...kernels import QTensor

from .config import LINEAR_ATTENTION, ModelConfig
from ..formats.gguf_file import GGUFError, GGUFFile


class Linear:
    """y = x @ W.T (+ bias) for x: float32[n, cols]; W a QTensor of shape (rows, cols).

    The kernel for each batch size is looked up once (weightstream.kernels.backends.KernelCache) and then
    called directly: at decode a step makes ~4 calls per layer, and kernels.matmul's checks and
    table lookup would cost as much as a small layer's arithmetic.
    """

    def __init__(self, qt: QTensor, bias: np.ndarray | None = None, dense: bool | None = None,
                 threads: int | None = None, backend: str = "auto", names: tuple[str, ...] = (),
                 kernel: kernels.backends.KernelCache | None = None):
        self.qt, self.bias, self.threads, self.backend = qt, bias, threads, backend
        self.names = names  # the GGUF tensors whose rows this matrix holds (several when concatenated)
        # a hook told (names, x) before each product, x: float32[n, cols] (the importance-matrix
        # collector, engine/tools/imatrix.py); None: nothing to tell
        self.observe = None
        self._threads = threads or kernels.default_threads()
        # (qtype, n) -> fused kernel (None: NumPy): the model's one dispatch object, shared by every
        # Linear and the experts (load_weights passes it), or this Linear's own
        self._kernel = kernel if kernel is not None else kernels.backends.KernelCache(backend)
        if qt.qtype == GGMLQuantizationType.F32:  # already float: a view of the file, no copy
            self.dense = qt.data.view(np.float32).reshape(qt.shape)
        elif dense or (dense is None and not kernels.backends.has_fused_kernel(qt.qtype, backend)):
            self.dense = kernels.dequantize(qt, threads)  # float32[rows, cols]
        else:
            self.dense = None
        # F32 matrices (routers, some heads) go through the threaded float kernel too where there is
        # one: NumPy's product runs on one BLAS thread inside the forward pass (kernels/blas.py),
        # and a 128-expert router read on one core was ~6% of a 16-thread MoE decode step
        self.numpy_product = self.dense is not None and not (
            qt.qtype == GGMLQuantizationType.F32 and not dense
            and kernels.backends.has_fused_kernel(qt.qtype, backend))

    @property
    def shape(self) -> tuple[int, int]:
        return self.qt.shape

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """out: a C-contiguous float32[n, rows] to write into (None: allocated)."""
        if self.observe is not None:
            self.observe(self.names, x)
        if self.numpy_product:
            y = x @ self.dense.T if out is None else np.matmul(x, self.dense.T, out=out)
        else:
            y = self._kernel.matmul(x, self.qt, self._threads, out)
        if self.bias is not None:
            y += self.bias
        return y


class LinearGroup:
    """Matrices applied to one input: returns [x @ A.T, x @ B.T, ...].

    When all share a type (the usual case: Q/K/V, gate/up) their rows are concatenated once at
    load, so a step pays one kernel call and one activation quantization instead of several; a
    mixed-type group (llama.cpp's Q4_K_M keeps attn_v in Q6_K) calls each matrix in turn.
    The concatenation copies those weights into memory once (their size; the file's pages are
    then no longer touched).
    """

    def __init__(self, parts: list[Linear]):
        self.sizes = [p.shape[0] for p in parts]
        ends = np.cumsum(self.sizes).tolist()
        self.slices = [slice(a, b) for a, b in zip([0] + ends[:-1], ends)]  # columns of each output
        first = parts[0]
        # parts that multiply alike (same type, width, and NumPy product or kernel) concatenate; the
        # group keeps their way: an F32 part always holds a dense view, but multiplies through the
        # float kernel, and a NumPy product of the concatenation would be another sum (OpenBLAS
        # sums a row differently for another number of rows: a prompt split in two calls gave
        # other logits, seen on Zen 3)
        if len({(p.qt.qtype, p.shape[1], p.numpy_product) for p in parts}) == 1 and len(parts) > 1:
            qt = QTensor(first.qt.qtype, (sum(self.sizes), first.shape[1]),
                         np.concatenate([p.qt.data for p in parts]))
            bias = None
            if any(p.bias is not None for p in parts):
                bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.shape[0], np.float32)
                                       for p in parts])
            self.parts = [Linear(qt, bias, first.numpy_product, first.threads, first.backend,
                                 tuple(name for p in parts for name in p.names), first._kernel)]
        else:
            self.parts = parts

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> list[np.ndarray]:
        """out: a C-contiguous float32 buffer of len(x) * sum(sizes) elements to write into (None:
        allocated): one [n, sum(sizes)] matrix for a concatenated group, else one [n, size]
        block after the other."""
        n = len(x)
        if len(self.parts) == 1:
            y = self.parts[0](x, None if out is None else out.reshape(n, -1))
            return [y[:, s] for s in self.slices]
        if out is None:
            return [p(x) for p in self.parts]
        flat = out.reshape(-1)
        return [p(x, flat[n * s.start:n * s.stop].reshape(n, -1)) for p, s in zip(self.parts, self.slices)]


@dataclass
class FFN:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); gate_up holds [gate, up]."""

    gate_up: LinearGroup
    down: Linear


@dataclass
class MoEWeights:
    router: Linear  # ffn_gate_inp: [n_expert, n_embd], always F32 in llama.cpp files
    gate_exps: list[QTensor]  # per expert [n_ff_exp, n_embd] (views into the file)
    up_exps: list[QTensor]  # per expert [n_ff_exp, n_embd]
    down_exps: list[QTensor]  # per expert [n_embd, n_ff_exp]
    shared: FFN | None = None  # qwen2moe shared expert
    shared_gate: np.ndarray | None = None  # ffn_gate_inp_shexp: float32[n_embd], sigmoid gate
    # the same experts as the file's stacked tensors, gate / up / down uint8[n_expert, bytes of one
    # expert] (views of the memory map): a decode step's whole MoE block in one kernel call takes
    # these and the chosen ids (Model.routed_decode) instead of a list of views per expert
    stacked: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class GatedDeltaNetWeights:
    """A linear-attention layer (qwen35/qwen3next), by llama.cpp's names. Sizes: LinearAttentionDims."""

    # attn_qkv [conv_dim, n_embd], attn_gate (z) [value_dim, n_embd], ssm_beta and ssm_alpha
    # [n_v_heads, n_embd]: one call where their types allow (qwen3next's ssm_in / ssm_ba are split
    # into these by rows at load)
    in_proj: LinearGroup
    conv: np.ndarray  # ssm_conv1d: float32[conv_dim, conv_kernel]
    dt_bias: np.ndarray  # ssm_dt.bias: float32[n_v_heads]
    a: np.ndarray  # ssm_a: float32[n_v_heads], -exp(A_log)
    norm: np.ndarray  # ssm_norm: float32[v_head_dim], the gated RMSNorm's weight
    out: Linear  # ssm_out: [n_embd, value_dim]


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # float32[n_embd]
    # attention layers: q [n_head*head_dim (x2 with gated attention: each head's [q; gate]), n_embd],
    # k and v [n_head_kv*head_dim, n_embd]; None on linear-attention layers
    wqkv: LinearGroup | None
    wo: Linear | None  # [n_embd, n_head * head_dim]
    q_norm: np.ndarray | None  # [head_dim] (per head) or [n_head*head_dim] (full), per arch flags
    k_norm: np.ndarray | None
    ffn_norm: np.ndarray  # float32[n_embd] (post_attention_norm in hybrids)
    ffn: FFN | None  # dense layers
    moe: MoEWeights | None  # MoE layers
    linear: GatedDeltaNetWeights | None = None  # linear-attention layers (hybrids)


@dataclass
class ModelWeights:
    token_embd: QTensor | None  # [n_vocab, n_embd] (None: not loaded, ends=False)
    token_embd_dense: np.ndarray | None  # float32 copy when the head is tied and dequantized
    output_norm: np.ndarray | None  # [n_embd]
    output: Linear | None  # [n_vocab, n_embd] (token_embd when tied)
    rope_freqs: np.ndarray | None  # llama3-style per-dimension frequency factors [n_rot/2]
    layers: list[LayerWeights | None]  # by layer index; None outside layer_range
    layer_range: range | None = None  # the layers loaded (None: all of them)
    kernel: kernels.backends.KernelCache | None = None  # the dispatch object every Linear here shares

    def __post_init__(self):
        if self.layer_range is None:
            self.layer_range = range(len(self.layers))

    def linears(self, with_output: bool = True):
        """Every Linear of the layers held (attention, dense FFN, router, shared expert), then
        the output head (with_output): what a hook like the imatrix collector attaches to."""
        for L in self.layers:
            if L is None:  # outside a pipeline stage's layers
                continue
            if L.wqkv is not None:
                yield from L.wqkv.parts
                yield L.wo
            if L.linear is not None:
                yield from L.linear.in_proj.parts
                yield L.linear.out
            for ffn in (L.ffn, L.moe.shared if L.moe is not None else None):
                if ffn is not None:
                    yield from ffn.gate_up.parts
                    yield ffn.down
            if L.moe is not None:
                yield L.moe.router
        if with_output and self.output is not None:
            yield self.output


def expected_tensors(f: GGUFFile, cfg: ModelConfig) -> dict[str, tuple[bool, tuple[tuple[int, ...], ...]]]:
    """name -> (required, the shapes it may have, NumPy order) of every tensor the loader below
    reads for cfg, by llama.cpp's names. A layer's variant (routed experts or a dense FFN; a
    hybrid's attn_qkv or legacy ssm_in, ssm_beta or ssm_ba) follows what the file holds, as
    load_weights does; widths the metadata leaves at 0 come from the file's own tensors."""
    E, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim
    want: dict[str, tuple[bool, tuple[tuple[int, ...], ...]]] = {}

    def need(name, *shapes, required=True):
        want[name] = (required, shapes)

    def rows(name, configured):  # a width: the metadata's, else the tensor's own (0 when absent)
        return configured or (f.info(name).shape[-2] if name in f and len(f.info(name).shape) >= 2 else 0)

    need("token_embd.weight", (cfg.n_vocab, E))
    need("output_norm.weight", (E,))
    # absent: the head is token_embd (tied), where llama.cpp allows it (ArchFlags.tied_output)
    need("output.weight", (cfg.n_vocab, E), required=not cfg.flags.tied_output)
    need("rope_freqs.weight", (cfg.n_rot // 2,), required=False)
    q_rows = 2 * H * D if cfg.flags.gated_attention else H * D
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        need(p + "attn_norm.weight", (E,))
        need(p + ("post_attention_norm.weight" if cfg.flags.hybrid else "ffn_norm.weight"), (E,))
        if cfg.layer_types[i] == LINEAR_ATTENTION:
            _expect_gated_delta_net(f, cfg, p, need)
        else:
            for part, n in (("attn_q", q_rows), ("attn_k", Hkv * D), ("attn_v", Hkv * D)):
                need(p + part + ".weight", (n, E))
                if cfg.flags.qkv_bias:
                    need(p + part + ".bias", (n,), required=False)
            need(p + "attn_output.weight", (E, H * D))
            if cfg.flags.qk_norm:
                full = cfg.flags.qk_norm == "full"
                need(p + "attn_q_norm.weight", (H * D if full else D,))
                need(p + "attn_k_norm.weight", (Hkv * D if full else D,))
        if p + "ffn_gate_inp.weight" in f or cfg.flags.requires_moe:
            X, n_exp = cfg.n_expert, rows(p + "ffn_gate_exps.weight", cfg.n_ff_exp)
            need(p + "ffn_gate_inp.weight", (X, E))
            need(p + "ffn_gate_exps.weight", (X, n_exp, E))
            need(p + "ffn_up_exps.weight", (X, n_exp, E))
            need(p + "ffn_down_exps.weight", (X, E, n_exp))
            if cfg.flags.shared_expert:
                n_sh = rows(p + "ffn_gate_shexp.weight", cfg.n_ff_shexp)
                need(p + "ffn_gate_shexp.weight", (n_sh, E))
                need(p + "ffn_up_shexp.weight", (n_sh, E))
                need(p + "ffn_down_shexp.weight", (E, n_sh))
                need(p + "ffn_gate_inp_shexp.weight", (E,), (1, E), required=False)
        else:
            n_ff = rows(p + "ffn_gate.weight", cfg.n_ff)
            need(p + "ffn_gate.weight", (n_ff, E))
            need(p + "ffn_up.weight", (n_ff, E))
            need(p + "ffn_down.weight", (E, n_ff))
    return want


def _expect_gated_delta_net(f: GGUFFile, cfg: ModelConfig, p: str, need) -> None:
    """A linear-attention layer's tensors for expected_tensors (see _load_gated_delta_net)."""
    d, E = cfg.linear, cfg.n_embd
    if p + "ssm_in.weight" in f and p + "attn_qkv.weight" not in f:  # older qwen3next files
        need(p + "ssm_in.weight", (d.n_k_heads * (2 * d.k_head_dim) + 2 * d.value_dim, E))
    else:
        need(p + "attn_qkv.weight", (d.conv_dim, E))
        need(p + "attn_gate.weight", (d.value_dim, E))
    if p + "ssm_ba.weight" in f and p + "ssm_beta.weight" not in f:
        need(p + "ssm_ba.weight", (2 * d.n_v_heads, E))
    else:
        need(p + "ssm_beta.weight", (d.n_v_heads, E))
        need(p + "ssm_alpha.weight", (d.n_v_heads, E))
    need(p + "ssm_conv1d.weight", (d.conv_dim, d.conv_kernel))
    need(p + "ssm_dt.bias", (d.n_v_heads,))
    need(p + "ssm_a", (d.n_v_heads,))
    need(p + "ssm_norm.weight", (d.v_head_dim,))
    need(p + "ssm_out.weight", (E, d.value_dim))


def check_tensor_set(f: GGUFFile, cfg: ModelConfig) -> None:
    """The file's tensors are exactly what the architecture reads, each of the shape the metadata
    gives, or a GGUFError naming the tensor and expected vs found. llama.cpp refuses a file with
    tensors it did not use too (llama_model_loader::done_getting_tensors: "wrong number of
    tensors"): an extra tensor means the metadata (block_count) or the names (a renamed
    output.weight, which would otherwise fall back to the tied embedding) are not what the file
    was written with. MTP blocks (nextn_predict_layers, after the trunk) are not run: any tensor
    of theirs is allowed."""
    want = expected_tensors(f, cfg)
    n_blocks = cfg.n_layer + cfg.n_nextn
    mtp = tuple(f"blk.{i}." for i in range(cfg.n_layer, n_blocks))
    extra = sorted(n for n in f.tensors if n not in want and not n.startswith(mtp))
    beyond = [n for n in extra if _block_index(n) is not None and _block_index(n) >= n_blocks]
    if beyond:
        raise GGUFError(f"{f.path}: metadata {cfg.arch}.block_count is {n_blocks} (blocks 0..{n_blocks - 1}), "
                        f"but the file holds tensors of block {max(map(_block_index, beyond))} "
                        f"({len(beyond)} beyond the count, e.g. {beyond[0]})")
    missing = [n for n, (required, _) in want.items() if required and n not in f]
    if missing:
        last = max((_block_index(n) for n in f.tensors if _block_index(n) is not None), default=-1)
        hint = (f"; metadata block_count is {n_blocks} but the file's blocks end at {last}"
                if last < cfg.n_layer - 1 else "")
        raise GGUFError(f"{f.path}: tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                        f"not found ({len(missing)} missing, needed by {cfg.arch}){hint}")
    if extra:
        raise GGUFError(f"{f.path}: unexpected tensor(s) {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} "
                        f"({len(extra)}): {cfg.arch} with this metadata does not use them (llama.cpp refuses "
                        f"files with unused tensors too)")
    for name, (_, shapes) in want.items():
        if name in f and f.info(name).shape not in shapes:
            raise GGUFError(f"{f.path}: tensor {name} has shape {list(f.info(name).shape)}, expected "
                            f"{' or '.join(str(list(s)) for s in shapes)} from the model's metadata")


def _block_index(name: str) -> int | None:
    """N of a blk.N.* tensor name (None: not a block tensor, or N is not a number)."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None


def load_weights(f: GGUFFile, cfg: ModelConfig, dequantize_resident: bool | None = None,
                 threads: int | None = None, backend: str = "auto", copy: bool = False,
                 stream_ffn: bool = False, layers: range | None = None, ends: bool = True) -> ModelWeights:
    """copy: read every resident weight into our own memory (a memory budget needs them held, not
    left to the page cache). stream_ffn: leave dense FFNs on disk (LayerWeights.ffn is None; the
    expert store reads them). layers: load only these layers (a pipeline stage's; None: all);
    ends: load the embedding, output norm and head too (a stage leaves them to the driver)."""
    layers = range(cfg.n_layer) if layers is None else layers
    if layers.step != 1 or not 0 <= layers.start <= layers.stop <= cfg.n_layer:
        raise ValueError(f"load_weights: layers {layers} is not a contiguous range within 0..{cfg.n_layer}")
    E, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim
    dispatch = kernels.backends.KernelCache(backend)  # one kernel choice per (type, batch) for the model

    def linear(name, shape, bias_name=None, required=True, qt=None, names=None):
        """The Linear of tensor `name` checked against shape, or of a QTensor made from rows of
        one (qt, with the GGUF names it came from)."""
        if qt is None and name not in f and not required:
            return None
        bias = f.array(bias_name, (shape[0],), copy) if bias_name and bias_name in f else None
        if qt is None:
            qt = f.qtensor(name, shape, copy)
        return Linear(qt, bias, dequantize_resident, threads, backend, names or (name,), dispatch)

    def vec(name, n, required=True):
        if name not in f:
            if required:
                raise GGUFError(f"{f.path}: tensor {name} not found (needed by {cfg.arch})")
            return None
        return f.array(name, (n,), copy).astype(np.float32)

    loaded: list[LayerWeights | None] = [None] * cfg.n_layer
    for i in layers:
        p = f"blk.{i}."
        bias = cfg.flags.qkv_bias
        linear_layer = cfg.layer_types[i] == LINEAR_ATTENTION
        if cfg.flags.qk_norm == "head" and not linear_layer:
            qn, kn = vec(p + "attn_q_norm.weight", D), vec(p + "attn_k_norm.weight", D)
        elif cfg.flags.qk_norm == "full":
            qn, kn = vec(p + "attn_q_norm.weight", H * D), vec(p + "attn_k_norm.weight", Hkv * D)
        else:
            qn = kn = None
        q_rows = 2 * H * D if cfg.flags.gated_attention else H * D  # gated: each head's [q; gate]
        attention = None if linear_layer else (
            LinearGroup([linear(p + "attn_q.weight", (q_rows, E), p + "attn_q.bias" if bias else None),
                         linear(p + "attn_k.weight", (Hkv * D, E), p + "attn_k.bias" if bias else None),
                         linear(p + "attn_v.weight", (Hkv * D, E), p + "attn_v.bias" if bias else None)]),
            linear(p + "attn_output.weight", (E, H * D)))
        ffn_norm = "post_attention_norm.weight" if cfg.flags.hybrid else "ffn_norm.weight"
        loaded[i] = LayerWeights(
            attn_norm=vec(p + "attn_norm.weight", E),
            wqkv=attention[0] if attention else None,
            wo=attention[1] if attention else None,
            q_norm=qn, k_norm=kn,
            ffn_norm=vec(p + ffn_norm, E),
            ffn=_load_dense_ffn(f, cfg, p, linear) if p + "ffn_gate_inp.weight" not in f and not stream_ffn else None,
            moe=_load_moe(f, cfg, p, linear) if p + "ffn_gate_inp.weight" in f else None,
            linear=_load_gated_delta_net(f, cfg, p, linear, vec, copy) if linear_layer else None,
        )

    freqs = vec("rope_freqs.weight", cfg.n_rot // 2, required=False)
    if not ends:
        return ModelWeights(None, None, None, None, freqs, loaded, layers, dispatch)
    token_embd = f.qtensor("token_embd.weight", (cfg.n_vocab, E), copy)
    if "output.weight" in f:
        output = linear("output.weight", (cfg.n_vocab, E))
        embd_dense = None
    else:  # tied embeddings: the head multiplies by token_embd (llama.cpp does the same)
        output = Linear(token_embd, None, dequantize_resident, threads, backend, ("output.weight",), dispatch)
        embd_dense = output.dense
    return ModelWeights(token_embd, embd_dense, vec("output_norm.weight", E), output, freqs, loaded, layers, dispatch)


def _load_dense_ffn(f: GGUFFile, cfg: ModelConfig, p: str, linear) -> FFN:
    if cfg.flags.requires_moe:
        raise GGUFError(f"{f.path}: {cfg.arch} layer {p[:-1]} has no ffn_gate_inp (router)")
    n_ff = f.info(p + "ffn_gate.weight").shape[0]
    if cfg.n_ff and cfg.n_ff != n_ff:
        raise GGUFError(f"{f.path}: {p}ffn_gate.weight has {n_ff} rows, metadata feed_forward_length is {cfg.n_ff}")
    E = cfg.n_embd
    return FFN(LinearGroup([linear(p + "ffn_gate.weight", (n_ff, E)), linear(p + "ffn_up.weight", (n_ff, E))]),
               linear(p + "ffn_down.weight", (E, n_ff)))


def _load_moe(f: GGUFFile, cfg: ModelConfig, p: str, linear) -> MoEWeights:
    E, X = cfg.n_embd, cfg.n_expert
    if X == 0 or cfg.n_expert_used == 0:
        raise GGUFError(f"{f.path}: {p}ffn_gate_inp.weight present but expert_count/expert_used_count missing")
    n_ff_exp = f.info(p + "ffn_gate_exps.weight").shape[1]
    if cfg.n_ff_exp and cfg.n_ff_exp != n_ff_exp:
        raise GGUFError(f"{f.path}: {p}ffn_gate_exps.weight has {n_ff_exp} rows per expert, "
                        f"metadata expert_feed_forward_length is {cfg.n_ff_exp}")
    moe = MoEWeights(
        router=linear(p + "ffn_gate_inp.weight", (X, E)),
        gate_exps=f.expert_qtensors(p + "ffn_gate_exps.weight", (X, n_ff_exp, E)),
        up_exps=f.expert_qtensors(p + "ffn_up_exps.weight", (X, n_ff_exp, E)),
        down_exps=f.expert_qtensors(p + "ffn_down_exps.weight", (X, E, n_ff_exp)),
        stacked=tuple(f.raw(p + f"ffn_{part}_exps.weight").reshape(X, -1) for part in ("gate", "up", "down")),
    )
    if cfg.flags.shared_expert:
        n_sh = f.info(p + "ffn_gate_shexp.weight").shape[0]
        moe.shared = FFN(LinearGroup([linear(p + "ffn_gate_shexp.weight", (n_sh, E)),
                                      linear(p + "ffn_up_shexp.weight", (n_sh, E))]),
                         linear(p + "ffn_down_shexp.weight", (E, n_sh)))
        if p + "ffn_gate_inp_shexp.weight" in f:
            moe.shared_gate = f.array(p + "ffn_gate_inp_shexp.weight", copy=True).reshape(E).astype(np.float32)
    return moe


def _rows(qt: QTensor, rows: np.ndarray) -> QTensor:
    """The QTensor of qt's rows `rows`, in that order (a copy: rows are quantized independently)."""
    return QTensor(qt.qtype, (len(rows), qt.shape[1]), np.ascontiguousarray(qt.data[rows]))


def _grouped_rows(n_groups: int, sizes: list[int], part: int) -> np.ndarray:
    """Row numbers of part `part` of every group, for a matrix whose rows are n_groups groups of
    parts of `sizes` rows each (qwen3next's per-K-head interleaving of ssm_in and ssm_ba)."""
    group, start = sum(sizes), sum(sizes[:part])
    return (np.arange(n_groups)[:, None] * group + start + np.arange(sizes[part])[None, :]).reshape(-1)


def _load_gated_delta_net(f: GGUFFile, cfg: ModelConfig, p: str, linear, vec, copy: bool) -> GatedDeltaNetWeights:
    """A linear-attention layer's weights. llama.cpp's converter writes attn_qkv + attn_gate and
    ssm_beta + ssm_alpha; older qwen3next files hold ssm_in ([q, k, v, z] per K head) and ssm_ba
    ([b, a] per K head) instead, whose rows are regrouped here into the same four matrices."""
    d, E = cfg.linear, cfg.n_embd
    hk, r = d.n_k_heads, d.n_v_heads // d.n_k_heads
    if p + "attn_qkv.weight" in f:
        qkv = linear(p + "attn_qkv.weight", (d.conv_dim, E))
        z = linear(p + "attn_gate.weight", (d.value_dim, E))
    elif p + "ssm_in.weight" in f:
        sizes = [d.k_head_dim, d.k_head_dim, r * d.v_head_dim, r * d.v_head_dim]
        w = f.qtensor(p + "ssm_in.weight", (hk * sum(sizes), E), copy)
        qkv_rows = np.concatenate([_grouped_rows(hk, sizes, part) for part in range(3)])
        qkv = linear(None, None, qt=_rows(w, qkv_rows), names=(p + "ssm_in.weight",))
        z = linear(None, None, qt=_rows(w, _grouped_rows(hk, sizes, 3)), names=(p + "ssm_in.weight",))
    else:
        raise GGUFError(f"{f.path}: linear-attention layer {p[:-1]} has neither attn_qkv.weight nor ssm_in.weight")
    if p + "ssm_beta.weight" in f:
        beta = linear(p + "ssm_beta.weight", (d.n_v_heads, E))
        alpha = linear(p + "ssm_alpha.weight", (d.n_v_heads, E))
    elif p + "ssm_ba.weight" in f:
        w = f.qtensor(p + "ssm_ba.weight", (2 * d.n_v_heads, E), copy)
        beta = linear(None, None, qt=_rows(w, _grouped_rows(hk, [r, r], 0)), names=(p + "ssm_ba.weight",))
        alpha = linear(None, None, qt=_rows(w, _grouped_rows(hk, [r, r], 1)), names=(p + "ssm_ba.weight",))
    else:
        raise GGUFError(f"{f.path}: linear-attention layer {p[:-1]} has neither ssm_beta.weight nor ssm_ba.weight")
    return GatedDeltaNetWeights(
        in_proj=LinearGroup([qkv, z, beta, alpha]),
        conv=np.ascontiguousarray(f.array(p + "ssm_conv1d.weight", (d.conv_dim, d.conv_kernel), copy), np.float32),
        dt_bias=vec(p + "ssm_dt.bias", d.n_v_heads),
        a=vec(p + "ssm_a", d.n_v_heads),
        norm=vec(p + "ssm_norm.weight", d.v_head_dim),
        out=linear(p + "ssm_out.weight", (E, d.value_dim)),
    )
