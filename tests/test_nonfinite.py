"""Non-finite values through every matmul path (issue 16, item 5; docs/DESIGN.md, kernels).

The contract: the result's NaNs are where the float reference (dequantize, then x @ W.T) has
them, whichever backend and path runs. A NaN or Inf in an activation row gives that output row
all NaN (the reference gives NaN, or +/-Inf for an Inf: the int8 kernels give NaN there) and
leaves the other rows bit for bit as they are without it; a NaN block scale in the weights gives
the reference's NaN pattern; an Inf block scale too (NaN wherever the reference's 0 * Inf made
NaN, non-finite wherever it is).
"""
import contextlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import weightstream.kernels as kernels
from weightstream.kernels import backends, formats, reference, traits

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ALL_TYPES = sorted(formats.SUPPORTED_TYPES, key=int)
ROWS = 19
POISONED_WEIGHT_ROW = 7


def _cols(qtype) -> int:
    elements = formats.block_size(qtype)[0]
    return 2 * elements if elements > 1 else 96


def _make(qtype, rng) -> np.ndarray:
    """Random finite weights uint8[ROWS, row_bytes] (normal values for the float types)."""
    cols = _cols(qtype)
    if qtype == T.F32:
        return rng.normal(size=(ROWS, cols)).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.normal(size=(ROWS, cols)).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        bits = rng.normal(size=(ROWS, cols)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    return np.ascontiguousarray(reference.random_raw(qtype, ROWS, cols, rng))


def _poison_weights(raw: np.ndarray, qtype, field: str, value: float) -> np.ndarray:
    """A copy of raw with `value` in the fp16 scale `field` of block 1 of POISONED_WEIGHT_ROW
    (for the float types, `field` is ignored: element 3 of that row)."""
    raw = raw.copy()
    row = raw[POISONED_WEIGHT_ROW]
    if qtype == T.F32:
        row.view(np.float32)[3] = value
    elif qtype == T.F16:
        row.view(np.float16)[3] = value
    elif qtype == T.BF16:
        row.view(np.uint16)[3] = np.float32(value).view(np.uint32) >> 16
    else:
        row.view(formats.BLOCK_DTYPES[qtype])[1][field] = value
    return raw


def _scale_fields(qtype) -> list[str]:
    """The fp16 fields of a block (d, and m / dmin where the type has one); 'value' for floats."""
    if traits.of(qtype).family == traits.FLOAT:
        return ["value"]
    dt = formats.BLOCK_DTYPES[qtype]
    return [name for name in dt.names if dt.fields[name][0] == np.dtype("<f2")]


@contextlib.contextmanager
def _amx_off(module):
    """The module's AMX path turned off (its AVX-512 / scalar prefill runs instead)."""
    old_min, _ = module._amx_tuning()
    module._amx_tuning(min_n=2**31 - 1)
    try:
        yield
    finally:
        module._amx_tuning(min_n=old_min)


def _cython_module(qtype):
    return backends.kernel_for("cython", qtype)


def run_path(path: str, x: np.ndarray, raw: np.ndarray, qtype) -> np.ndarray:
    """x @ W.T through one matmul path (see PATHS)."""
    shape = (raw.shape[0], x.shape[1])
    out = np.empty((x.shape[0], shape[0]), np.float32)
    if path in ("numpy", "cython", "numba", "amx"):
        return kernels.matmul(x, kernels.QTensor(qtype, shape, raw), threads=1, backend=path, out=out)
    if path == "cython-no-amx":
        with _amx_off(_cython_module(qtype)):
            _cython_module(qtype).matmul_into(x, raw, int(qtype), out, 1)
        return out
    if path == "cython-many":   # a decode step's routed experts at once: row t through ws[t]
        _cython_module(qtype).matvec_many_into(x, [raw] * x.shape[0], int(qtype), out, 1)
        return out
    if path == "numba-portable":
        backends.kernel_for("numba", qtype).matmul_into(x, raw, int(qtype), out, 1, _simd=False)
        return out
    raise AssertionError(path)


def _has_path(path: str, qtype) -> bool:
    if path == "numpy":
        return True
    if path in ("cython", "cython-no-amx", "cython-many"):
        module = _cython_module(qtype)
        if module is None:
            return False
        if path == "cython-no-amx":
            return getattr(module, "AMX", False)
        if path == "cython-many":
            return hasattr(module, "matvec_many_into") and module.matvec_many_supported(int(qtype))
        return True
    if path == "amx":
        return backends.kernel_for("amx", qtype) is not None
    return backends.kernel_for("numba", qtype) is not None


# every path a matmul can take: each backend, Cython with and without its AMX prefill, the batched
# decode kernel, Numba's portable tier beside its SIMD one, the k-quants on AMX-BF16 tiles (where
# the CPU has them). n = 1 is the decode path; n = 9 is prefill (Cython legacy and Q2_K take AMX
# tiles there where built).
PATHS = ("numpy", "cython", "cython-no-amx", "cython-many", "numba", "numba-portable", "amx")
CASES = [pytest.param(p, q, n, id=f"{p}-{q.name}-n{n}")
         for q in ALL_TYPES for p in PATHS for n in (1, 9) if _has_path(p, q)]


def _activations(qtype, n, seed):
    return np.random.default_rng(seed).normal(size=(n, _cols(qtype))).astype(np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("path,qtype,n", CASES)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_activation_makes_its_row_nan_and_leaves_the_others(path, qtype, n, value):
    rng = np.random.default_rng(int(qtype))
    raw = _make(qtype, rng)
    x = _activations(qtype, n, 1)
    bad_row = n // 2
    poisoned = x.copy()
    poisoned[bad_row, 5] = value
    clean = run_path(path, x, raw, qtype)
    got = run_path(path, poisoned, raw, qtype)
    ref = run_path("numpy", poisoned, raw, qtype)
    assert np.isfinite(clean).all()
    others = np.arange(n) != bad_row
    assert _same_bits(got[others], clean[others]), f"{path}: rows without the {value} changed"
    assert not np.isfinite(got[bad_row]).any(), f"{path}: finite outputs from a row holding {value}: {got[bad_row]}"
    assert np.isnan(got[bad_row])[np.isnan(ref[bad_row])].all(), f"{path}: fewer NaNs than the reference"
    if np.isnan(value):
        assert np.isnan(got[bad_row]).all()


@pytest.mark.parametrize("path,qtype,n", CASES)
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_weight_scale_gives_the_reference_nan_pattern(path, qtype, n, value):
    """Non-finite exactly where the reference is, and NaN wherever it has NaN (an Inf scale gives
    NaN where the reference's 0 * Inf did, and may give NaN where the reference has +/-Inf)."""
    rng = np.random.default_rng(int(qtype))
    clean = _make(qtype, rng)
    x = _activations(qtype, n, 2)
    for field in _scale_fields(qtype):
        raw = _poison_weights(clean, qtype, field, value)
        got = run_path(path, x, raw, qtype)
        ref = run_path("numpy", x, raw, qtype)
        where = f"{path}: {value} {field} of {qtype.name} weight row {POISONED_WEIGHT_ROW}"
        assert not np.isfinite(ref[:, POISONED_WEIGHT_ROW]).any()  # the poison reached the reference
        assert np.array_equal(np.isfinite(got), np.isfinite(ref)), \
            f"{where}: non-finite at {np.argwhere(~np.isfinite(got)).tolist()}, " \
            f"reference {np.argwhere(~np.isfinite(ref)).tolist()}"
        assert np.isnan(got)[np.isnan(ref)].all(), \
            f"{where}: NaN at {np.argwhere(np.isnan(got)).tolist()}, reference {np.argwhere(np.isnan(ref)).tolist()}"


def test_every_type_and_backend_is_covered():
    """The cases above reach every type with every backend built here (a new backend or type
    with no case would pass the NaN contract untested)."""
    for qtype in ALL_TYPES:
        for backend in backends.available(qtype):
            assert any(p.values[0].startswith(backend) and p.values[1] == qtype for p in CASES), (backend, qtype)
