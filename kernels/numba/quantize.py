"""Numba cores of the weight quantizers (``kernels/quantize_weights.py`` is the public wrapper).

Transcribed from llama.cpp's ``ggml/src/ggml-quants.c`` (our own code, same algorithms):

* ``_qkx_many`` = ``make_qkx2_quants`` / ``make_qkx3_quants`` on many groups at once:
  x ~ scale * L - the_min, L in 0..nmax; tries nstep + 1 trial scales, refits (scale, min) by
  weighted least squares, keeps the best.
* ``_qx``   = ``make_qx_quants`` (rmse_type 1 with explicit weights): x ~ scale * L, L signed.
* ``_q3``   = ``make_q3_quants`` (do_rmse): weights x^2, then coordinate descent (``_refine``).
* ``_qp``   = ``make_qp_quants``: the positive sub-block scales/mins -> 4- or 6-bit codes.

Every kernel trusts its inputs (the wrapper checks them) and works on float32 (levels ``L`` are
kept as float32 small integers inside the searches so that the 16/32-element loops vectorise).
Outputs are written straight into the fields of a structured array of ``weightstream.kernels.formats``
blocks (uint8 fields, possibly strided); fp16 scales come back as float32 values already
rounded to binary16 (``round_f16``), which the wrapper stores with an exact ``astype``.

Kernel arguments: ``x`` float32[n_blocks, block] (the rows, cut into blocks, row-major);
``qw`` float32[blocks_per_row, block]: importance of each column (block b of x uses row
``b % blocks_per_row`` of it) and ``use_qw`` whether to use it (without, the reference
weighting of each type applies).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .legacy import F32, FASTMATH, JIT, round_f16

GROUP_MAX_EPS = F32(1e-15)  # ggml: a group whose largest |x| is below this is all zero
ZERO = F32(0.0)
ONE = F32(1.0)

# make_qkx2 parameters of the reference (no imatrix) paths, make_qkx3's of the imatrix paths.
Q2_RMIN, Q2_RDELTA, Q2_NSTEP = F32(-0.5), F32(0.1), 15
Q4_RMIN, Q4_RDELTA, Q4_NSTEP = F32(-1.0), F32(0.1), 20
Q5_RMIN, Q5_RDELTA, Q5_NSTEP = F32(-0.5), F32(0.1), 15
X3_RMIN, X3_RDELTA, X3_NSTEP = F32(-0.9), F32(0.05), 36
TENTH = F32(0.1)


# ---------------------------------------------------------------------------
# Searches on one group of n values (n = 16 or 32; sub-block scales: n = 8 or 16)
# ---------------------------------------------------------------------------


@njit(fastmath=FASTMATH, **JIT)
def _qkx_many(xt, wt, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min):
    """make_qkx2/3_quants on G groups of n values at once: x ~ scale * L - the_min, L in 0..nmax.

    Transposed: xt, wt (weights), L (levels out, float32 small integers) are float32[n, G],
    element i of group g at [i, g]; scale, the_min (>= 0) float32[G] out. Each group makes the
    decisions ggml makes for it; the inner loops run across groups, so they vectorise without
    horizontal sums (a loop over one 16-value group ran 2x slower). Trial levels use make_qkx3's
    guarded rounding (v <= 0 -> 0, clamp before rounding), equal to make_qkx2's round-then-clamp
    wherever that is defined."""
    n, G = xt.shape
    fmax = F32(nmax)
    mn = np.empty(G, F32)
    mx = np.empty(G, F32)
    sum_w = np.zeros(G, F32)
    sum_x = np.zeros(G, F32)
    best = np.zeros(G, F32)
    iscale = np.empty(G, F32)
    sum_l = np.empty(G, F32)
    sum_l2 = np.empty(G, F32)
    sum_xl = np.empty(G, F32)
    ts = np.empty(G, F32)
    tm = np.empty(G, F32)
    cur = np.empty(G, F32)
    Laux = np.empty((n, G), F32)
    for g in range(G):
        mn[g] = xt[0, g]
        mx[g] = xt[0, g]
    for i in range(n):
        for g in range(G):
            v = xt[i, g]
            mn[g] = min(mn[g], v)
            mx[g] = max(mx[g], v)
            sum_w[g] += wt[i, g]
            sum_x[g] += wt[i, g] * v
    for g in range(G):
        mn[g] = min(mn[g], ZERO)
        # a constant group (mx == mn) gets scale 0 and L = 0: iscale 0 below does exactly that
        iscale[g] = fmax / (mx[g] - mn[g]) if mx[g] > mn[g] else ZERO
        scale[g] = ONE / iscale[g] if mx[g] > mn[g] else ZERO
    for i in range(n):
        for g in range(G):
            l = min(max(np.rint(iscale[g] * (xt[i, g] - mn[g])), ZERO), fmax)
            L[i, g] = l
            diff = scale[g] * l + mn[g] - xt[i, g]
            best[g] += wt[i, g] * (abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        for g in range(G):
            rng_ = mx[g] - mn[g]
            iscale[g] = (rmin + rdelta * F32(step) + fmax) / rng_ if rng_ > ZERO else ZERO
            sum_l[g] = ZERO
            sum_l2[g] = ZERO
            sum_xl[g] = ZERO
        for i in range(n):
            for g in range(G):
                v = min(iscale[g] * (xt[i, g] - mn[g]), fmax)
                l = np.rint(v) if v > ZERO else ZERO
                Laux[i, g] = l
                wl = wt[i, g] * l
                sum_l[g] += wl
                sum_l2[g] += wl * l
                sum_xl[g] += wl * xt[i, g]
        for g in range(G):
            D = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g]
            if D > ZERO:
                a = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / D
                b = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / D
                if b > ZERO:
                    b = ZERO
                    a = sum_xl[g] / sum_l2[g]
                ts[g] = a
                tm[g] = b
            else:  # no fit: make this trial lose
                ts[g] = ZERO
                tm[g] = ZERO
            cur[g] = ZERO if D > ZERO else np.inf
        for i in range(n):
            for g in range(G):
                diff = ts[g] * Laux[i, g] + tm[g] - xt[i, g]
                cur[g] += wt[i, g] * (abs(diff) if use_mad else diff * diff)
        for i in range(n):
            for g in range(G):
                if cur[g] < best[g]:
                    L[i, g] = Laux[i, g]
        for g in range(G):
            if cur[g] < best[g]:
                best[g] = cur[g]
                scale[g] = ts[g]
                mn[g] = tm[g]
    for g in range(G):
        the_min[g] = -mn[g]


@njit(fastmath=FASTMATH, **JIT)
def _qx_sums(x, w, L, iscale, lo, hi):
    sumlx = ZERO
    suml2 = ZERO
    for i in range(x.shape[0]):
        l = min(max(np.rint(iscale * x[i]), lo), hi)
        L[i] = l
        wl = w[i] * l
        sumlx += wl * x[i]
        suml2 += wl * l
    return sumlx, suml2


@njit(fastmath=FASTMATH, **JIT)
def _signed_max(x):
    """The value of largest magnitude (the first of ties), sign kept."""
    amax = ZERO
    vmax = ZERO
    for i in range(x.shape[0]):
        if abs(x[i]) > amax:
            amax = abs(x[i])
            vmax = x[i]
    return vmax


@njit(fastmath=FASTMATH, **JIT)
def _qx(x, w, L, Laux, nmax, lo, hi):
    """make_qx_quants (rmse_type 1, weights w): x ~ scale * L, L[:n] signed levels in lo..hi.

    The value of largest magnitude starts at level -nmax; 18 more trial scales around it are
    refitted by weighted least squares. ggml uses lo, hi = -nmax, nmax - 1; Q8_0 here uses the
    symmetric -127..127 of its reference."""
    n = x.shape[0]
    flo = F32(lo)
    fhi = F32(hi)
    vmax = _signed_max(x)
    if abs(vmax) < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = ZERO
        return ZERO
    sumlx, suml2 = _qx_sums(x, w, L, F32(-nmax) / vmax, flo, fhi)
    scale = sumlx / suml2 if suml2 != ZERO else ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = _qx_sums(x, w, Laux, -(F32(nmax) + TENTH * F32(step)) / vmax, flo, fhi)
        if suml2 > ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = Laux[i]
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(fastmath=FASTMATH, **JIT)
def _refine(x, w, L, lo, hi, sumlx, suml2):
    """make_q3_quants' / make_qp_quants' coordinate descent for x ~ scale * L (scale = sumlx /
    suml2, weights w): up to 5 rounds that move one level at a time to its best value given the
    others, kept when that raises sumlx^2 / suml2. Returns the new scale."""
    for _ in range(5):
        n_changed = 0
        for i in range(x.shape[0]):
            wx = w[i] * x[i]
            slx = sumlx - wx * L[i]
            sl2 = suml2 - w[i] * L[i] * L[i]
            if slx > ZERO and sl2 > ZERO:
                new_l = min(max(np.rint(x[i] * sl2 / slx), lo), hi)
                if new_l != L[i]:
                    slx += wx * new_l
                    sl2 += w[i] * new_l * new_l
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > ZERO else ZERO


@njit(fastmath=FASTMATH, **JIT)
def _q3(x, w, L, nmax):
    """make_q3_quants (do_rmse): levels -nmax..nmax-1 from the largest |x|, weights x^2 (w is
    scratch for them), then _refine."""
    n = x.shape[0]
    fmax = F32(nmax)
    vmax = _signed_max(x)
    if abs(vmax) < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = ZERO
        return ZERO
    iscale = -fmax / vmax
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        w[i] = x[i] * x[i]
        l = min(max(np.rint(iscale * x[i]), -fmax), fmax - ONE)
        L[i] = l
        sumlx += w[i] * x[i] * l
        suml2 += w[i] * l * l
    return _refine(x, w, L, -fmax, fmax - ONE, sumlx, suml2)


@njit(fastmath=FASTMATH, **JIT)
def _qp(x, w, L, nmax):
    """make_qp_quants: positive x ~ scale * L, L[:n] in 0..nmax (the codes of sub-block scales):
    the best of 9 trial scales by weighted error, then _refine."""
    n = x.shape[0]
    fmax = F32(nmax)
    mx = ZERO
    for i in range(n):
        mx = max(mx, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = ZERO
        return ZERO
    iscale = fmax / mx
    scale = ONE / iscale
    best = ZERO
    for i in range(n):
        diff = x[i] - scale * np.rint(iscale * x[i])
        best += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (TENTH * F32(step) + fmax) / mx
        scale_is = ONE / iscale_is
        mse = ZERO
        for i in range(n):
            diff = x[i] - scale_is * min(fmax, np.rint(iscale_is * x[i]))
            mse += w[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_is
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        l = min(fmax, np.rint(iscale * x[i]))
        L[i] = l
        sumlx += w[i] * x[i] * l
        suml2 += w[i] * l * l
    return _refine(x, w, L, ZERO, fmax, sumlx, suml2)


# ---------------------------------------------------------------------------
# Small shared steps
# ---------------------------------------------------------------------------


@njit(fastmath=FASTMATH, **JIT)
def _importance(xb, qb, sigma2, w):
    """w = qw * sqrt(sigma2 + x^2): ggml's per-weight weighting when an imatrix is given."""
    for i in range(xb.shape[0]):
        w[i] = qb[i] * np.sqrt(sigma2 + xb[i] * xb[i])


@njit(fastmath=FASTMATH, **JIT)
def _sum_sq(x):
    s = ZERO
    for i in range(x.shape[0]):
        s += x[i] * x[i]
    return s


@njit(fastmath=FASTMATH, **JIT)
def _code(v, top):
    """nearest_int(v) clamped to 0..top, as a small integer (a 4- or 6-bit scale code)."""
    return np.int64(min(max(np.rint(v), ZERO), F32(top)))


@njit(**JIT)
def _pack_2bit(L, qs):
    """Levels 0..3 of 256 elements -> 64 bytes: element 128h + 32j + l is bits 2j of qs[32h + l]."""
    for h in range(2):
        for l in range(32):
            o = 128 * h + l
            qs[32 * h + l] = np.uint8(np.int64(L[o]) | (np.int64(L[o + 32]) << 2)
                                      | (np.int64(L[o + 64]) << 4) | (np.int64(L[o + 96]) << 6))


@njit(**JIT)
def _pack_k4_scales(ls, lm, out):
    """8 six-bit scales and mins -> 12 bytes (ggml's get_scale_min_k4 layout)."""
    for j in range(12):
        out[j] = 0
    for j in range(8):
        if j < 4:
            out[j] = ls[j]
            out[j + 4] = lm[j]
        else:
            out[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            out[j - 4] |= (ls[j] >> 4) << 6
            out[j] |= (lm[j] >> 4) << 6


# ---------------------------------------------------------------------------
# k-quants: x float32[n_blocks, 256]
# ---------------------------------------------------------------------------


CHUNK = 16  # super-blocks whose sub-block searches run as one batch (256 or 128 groups)


@njit(fastmath=FASTMATH, **JIT)
def _search_chunk(x, qw, use_qw, b0, b1, n, nmax, rmin, rdelta, nstep, use_mad, sigma_mul):
    """The make_qkx2/3 searches of super-blocks b0..b1 of x, batched: sub-block j of block b is
    group g = (b - b0) * S + j (S = 256 // n sub-blocks per block). Returns Lt float32[n, G]
    (levels) and sc, mins, sw float32[G] (scale, min, sum of weights of each group).

    Weights: with an imatrix qw * sqrt(sigma2 + x^2), sigma2 = sigma_mul * mean x^2 of the
    super-block; without, |x| (Q2_K, sigma_mul 0) or sqrt(mean x^2 of the sub-block) + |x|
    (Q4_K, Q5_K, sigma_mul 1)."""
    S = 256 // n
    G = (b1 - b0) * S
    xt = np.empty((n, G), F32)
    wt = np.empty((n, G), F32)
    Lt = np.empty((n, G), F32)
    sc = np.empty(G, F32)
    mins = np.empty(G, F32)
    sw = np.empty(G, F32)
    nq = qw.shape[0]
    for b in range(b0, b1):
        xb = x[b]
        if use_qw:
            qb = qw[b % nq]
            sigma2 = sigma_mul * _sum_sq(xb) / F32(256)
        for j in range(S):
            g = (b - b0) * S + j
            av = ZERO if use_qw or sigma_mul == ZERO else np.sqrt(_sum_sq(xb[n * j:n * j + n]) / F32(n))
            s = ZERO
            for i in range(n):
                v = xb[n * j + i]
                xt[i, g] = v
                if use_qw:
                    wv = qb[n * j + i] * np.sqrt(sigma2 + v * v)
                else:
                    wv = av + abs(v)
                wt[i, g] = wv
                s += wv
            sw[g] = s
    _qkx_many(xt, wt, Lt, nmax, rmin, rdelta, nstep, use_mad, sc, mins)
    return Lt, sc, mins, sw


@njit(fastmath=FASTMATH, **JIT)
def _codes_vs_max(v, top, L):
    """The reference paths' sub-block codes: L = nearest_int(top / max(v) * v) (v >= 0), and the
    fp16 super-block scale max(v) / top; all 0 when max(v) is not positive."""
    mx = ZERO
    for j in range(v.shape[0]):
        mx = max(mx, v[j])
    inv = F32(top) / mx if mx > ZERO else ZERO
    for j in range(v.shape[0]):
        L[j] = _code(inv * v[j], top)
    return round_f16(mx / F32(top))


@njit(fastmath=FASTMATH, **JIT)
def _block_codes(sc, mins, sw, use_qw, top, Ls, Lm):
    """Codes Ls, Lm (float32, 0..top) of one super-block's sub-block scales and mins and its
    fp16 (d, dmin): make_qp_quants weighted by sw with an imatrix, _codes_vs_max without."""
    if use_qw:
        return round_f16(_qp(sc, sw, Ls, top)), round_f16(_qp(mins, sw, Lm, top))
    return _codes_vs_max(sc, top, Ls), _codes_vs_max(mins, top, Lm)


@njit(fastmath=FASTMATH, **JIT)
def _gather_levels(Lt, g0, n_sub, sub, L):
    """L[sub * j + i] = Lt[i, g0 + j]: one super-block's levels out of _search_chunk's
    transposed layout (Lt f32[sub, sub-blocks of the chunk], g0 the block's first sub-block)."""
    for j in range(n_sub):
        for i in range(sub):
            L[sub * j + i] = Lt[i, g0 + j]


@njit(fastmath=FASTMATH, **JIT)
def _requantize_with_min(xb, dm, mm, Ls, Lm, sub, lmax, L):
    """Re-round each sub-block's levels (0..lmax) against its stored scale dm * Ls[j] and min
    mm * Lm[j], the values the file will hold; a sub-block whose scale is 0 keeps its levels."""
    for j in range(Ls.shape[0]):
        dl = dm * Ls[j]
        if dl == ZERO:
            continue
        ml = mm * Lm[j]
        for i in range(sub):
            L[sub * j + i] = min(max(np.rint((xb[sub * j + i] + ml) / dl), ZERO), lmax)


@njit(fastmath=FASTMATH, **JIT)
def q2_k(x, qw, use_qw, scales, qs, d, dmin):
    """quantize_row_q2_K_ref / quantize_row_q2_K_impl. scales u8[nb, 16], qs u8[nb, 64], d, dmin f32[nb]."""
    L = np.empty(256, F32)
    Ls = np.empty(16, F32)
    Lm = np.empty(16, F32)
    nb = x.shape[0]
    for b0 in range(0, nb, CHUNK):
        b1 = min(nb, b0 + CHUNK)
        if use_qw:
            Lt, sc_all, mins_all, sw_all = _search_chunk(x, qw, True, b0, b1, 16, 3, X3_RMIN, X3_RDELTA,
                                                         X3_NSTEP, False, ONE)
        else:
            Lt, sc_all, mins_all, sw_all = _search_chunk(x, qw, False, b0, b1, 16, 3, Q2_RMIN, Q2_RDELTA,
                                                         Q2_NSTEP, True, ZERO)
        for b in range(b0, b1):
            g0 = (b - b0) * 16
            _gather_levels(Lt, g0, 16, 16, L)
            dm, mm = _block_codes(sc_all[g0:g0 + 16], mins_all[g0:g0 + 16], sw_all[g0:g0 + 16],
                                  use_qw, 15, Ls, Lm)
            for j in range(16):
                scales[b, j] = np.uint8(np.int64(Ls[j]) | (np.int64(Lm[j]) << 4))
            # requantize against the stored (fp16, 4-bit) scale and min of each sub-block
            _requantize_with_min(x[b], dm, mm, Ls, Lm, 16, F32(3), L)
            _pack_2bit(L, qs[b])
            d[b] = dm
            dmin[b] = mm


@njit(fastmath=FASTMATH, **JIT)
def q3_k(x, qw, use_qw, hmask, qs, scales, d):
    """quantize_row_q3_K_ref / _impl. hmask u8[nb, 32], qs u8[nb, 64], scales u8[nb, 12], d f32[nb]."""
    L = np.empty(256, F32)
    Laux = np.empty(16, F32)
    w = np.empty(16, F32)
    sc = np.empty(16, F32)
    sw = np.empty(16, F32)
    Ls = np.empty(16, np.int64)   # stored 6-bit codes: scale = code - 32
    Lf = np.empty(16, F32)
    nq = qw.shape[0]
    for b in range(x.shape[0]):
        xb = x[b]
        if use_qw:
            qb = qw[b % nq]
            sigma2 = F32(2) * _sum_sq(xb) / F32(256)
            for j in range(16):
                _importance(xb[16 * j:16 * j + 16], qb[16 * j:16 * j + 16], sigma2, w)
                s = ZERO
                for l in range(16):
                    s += w[l]
                sw[j] = s
                sc[j] = _qx(xb[16 * j:16 * j + 16], w, L[16 * j:16 * j + 16], Laux, 4, -4, 3)
            dd = round_f16(_qx(sc, sw, Lf, Laux, 32, -32, 31))
            for j in range(16):
                Ls[j] = np.int64(Lf[j]) + 32
        else:
            max_scale = ZERO
            amax = ZERO
            for j in range(16):
                sc[j] = _q3(xb[16 * j:16 * j + 16], w, L[16 * j:16 * j + 16], 4)
                if abs(sc[j]) > amax:
                    amax = abs(sc[j])
                    max_scale = sc[j]
            dd = ZERO
            for j in range(16):
                Ls[j] = 0
            if max_scale != ZERO:
                iscale = F32(-32) / max_scale
                for j in range(16):
                    Ls[j] = np.int64(min(max(np.rint(iscale * sc[j]), F32(-32)), F32(31))) + 32
                dd = round_f16(ONE / iscale)
        for i in range(256):
            L[i] += F32(4)      # search levels -4..3 -> stored 0..7
        for j in range(16):
            dl = dd * F32(Ls[j] - 32)
            if dl == ZERO:
                continue
            for i in range(16):
                L[16 * j + i] = min(max(np.rint(xb[16 * j + i] / dl), F32(-4)), F32(3)) + F32(4)
        # scales: low 4 bits of code j in byte j (j < 8) or the high nibble of byte j - 8; high 2
        # bits in byte 8 + j % 4 at bit 2 * (j // 4)
        sb = scales[b]
        for j in range(12):
            sb[j] = 0
        for j in range(16):
            l = Ls[j]
            if j < 8:
                sb[j] = l & 0xF
            else:
                sb[j - 8] |= (l & 0xF) << 4
            sb[8 + j % 4] |= (l >> 4) << (2 * (j // 4))
        # high bit of element j -> bit j // 32 of hmask[j % 32]; the level keeps its low 2 bits
        hb = hmask[b]
        for m in range(32):
            hb[m] = 0
        for j in range(256):
            if L[j] > F32(3):
                hb[j % 32] |= np.uint8(1 << (j // 32))
                L[j] -= F32(4)
        _pack_2bit(L, qs[b])
        d[b] = dd


@njit(fastmath=FASTMATH, **JIT)
def q45_k(x, qw, use_qw, nmax, scales, qs, qh, d, dmin):
    """quantize_row_q4_K_ref / _impl (nmax 15) and q5_K (nmax 31; qh u8[nb, 32] its fifth bits,
    u8[1, 32] scratch for Q4_K). scales u8[nb, 12], qs u8[nb, 128], d, dmin f32[nb]."""
    L = np.empty(256, F32)
    Ls = np.empty(8, F32)
    Lm = np.empty(8, F32)
    ls = np.empty(8, np.int64)
    lm = np.empty(8, np.int64)
    fmax = F32(nmax)
    rmin, rdelta, nstep = (Q4_RMIN, Q4_RDELTA, Q4_NSTEP) if nmax == 15 else (Q5_RMIN, Q5_RDELTA, Q5_NSTEP)
    nb = x.shape[0]
    for b0 in range(0, nb, CHUNK):
        b1 = min(nb, b0 + CHUNK)
        if use_qw:
            Lt, sc_all, mins_all, sw_all = _search_chunk(x, qw, True, b0, b1, 32, nmax, X3_RMIN, X3_RDELTA,
                                                         X3_NSTEP, False, F32(2))
        else:
            Lt, sc_all, mins_all, sw_all = _search_chunk(x, qw, False, b0, b1, 32, nmax, rmin, rdelta,
                                                         nstep, False, ONE)
        for b in range(b0, b1):
            g0 = (b - b0) * 8
            _gather_levels(Lt, g0, 8, 32, L)
            dm, mm = _block_codes(sc_all[g0:g0 + 8], mins_all[g0:g0 + 8], sw_all[g0:g0 + 8],
                                  use_qw, 63, Ls, Lm)
            for j in range(8):
                ls[j] = np.int64(Ls[j])
                lm[j] = np.int64(Lm[j])
            _pack_k4_scales(ls, lm, scales[b])
            _requantize_with_min(x[b], dm, mm, Ls, Lm, 32, fmax, L)  # the codes are whole numbers
            # element 64c + 32h + l: low (h = 0) / high (h = 1) nibble of qs[32c + l]; Q5_K's
            # fifth bit is bit 2c + h of qh[l]
            qb_out = qs[b]
            hb = qh[b % qh.shape[0]]     # Q4_K passes a one-row scratch qh
            for l in range(32):
                hb[l] = 0
            for c in range(4):
                for l in range(32):
                    l1 = np.int64(L[64 * c + l])
                    l2 = np.int64(L[64 * c + 32 + l])
                    if nmax == 31:
                        hb[l] |= np.uint8(((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1)))
                    qb_out[32 * c + l] = np.uint8((l1 & 0xF) | ((l2 & 0xF) << 4))
            d[b] = dm
            dmin[b] = mm


@njit(fastmath=FASTMATH, **JIT)
def q6_k(x, qw, use_qw, ql, qh, scales, d):
    """quantize_row_q6_K_ref / _impl. ql u8[nb, 128], qh u8[nb, 64], scales i8[nb, 16], d f32[nb].

    ggml's imatrix path weights each element by the raw importance (no sigma2 term)."""
    L = np.empty(256, F32)
    Laux = np.empty(16, F32)
    w = np.empty(16, F32)
    sc = np.empty(16, F32)
    q = np.empty(16, np.int64)
    nq = qw.shape[0]
    for b in range(x.shape[0]):
        xb = x[b]
        max_scale = ZERO
        max_abs = ZERO
        for j in range(16):
            xs = xb[16 * j:16 * j + 16]
            if use_qw:
                qb = qw[b % nq]
                for l in range(16):
                    w[l] = qb[16 * j + l]
            else:
                for l in range(16):
                    w[l] = xs[l] * xs[l]
            sc[j] = _qx(xs, w, L[16 * j:16 * j + 16], Laux, 32, -32, 31)
            if abs(sc[j]) > max_abs:
                max_abs = abs(sc[j])
                max_scale = sc[j]
        if max_abs < GROUP_MAX_EPS:
            for i in range(128):
                ql[b, i] = 0
            for i in range(64):
                qh[b, i] = 0
            for j in range(16):
                scales[b, j] = 0
            d[b] = ZERO
            continue
        iscale = F32(-128) / max_scale
        dd = round_f16(ONE / iscale)
        for j in range(16):
            q[j] = np.int64(min(max(np.rint(iscale * sc[j]), F32(-128)), F32(127)))
            scales[b, j] = np.int8(q[j])
        for i in range(256):
            L[i] += F32(32)     # search levels -32..31 -> stored 0..63
        for j in range(16):
            dl = dd * F32(q[j])
            if dl == ZERO:
                continue
            for i in range(16):
                L[16 * j + i] = min(max(np.rint(xb[16 * j + i] / dl), F32(-32)), F32(31)) + F32(32)
        # element 128h + 32k + l: low nibble in ql[64h + 32(k % 2) + l] (k < 2 low, k >= 2 high
        # half of the byte), top 2 bits at bit 2k of qh[32h + l]
        for h in range(2):
            for l in range(32):
                o = 128 * h + l
                l1 = np.int64(L[o])
                l2 = np.int64(L[o + 32])
                l3 = np.int64(L[o + 64])
                l4 = np.int64(L[o + 96])
                ql[b, 64 * h + l] = np.uint8((l1 & 0xF) | ((l3 & 0xF) << 4))
                ql[b, 64 * h + 32 + l] = np.uint8((l2 & 0xF) | ((l4 & 0xF) << 4))
                qh[b, 32 * h + l] = np.uint8((l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4) | ((l4 >> 4) << 6))
        d[b] = dd


# ---------------------------------------------------------------------------
# Legacy 32-element blocks: x float32[rows, cols], qw float32[cols] (sigma2 is per row, as ggml)
# ---------------------------------------------------------------------------


@njit(fastmath=FASTMATH, **JIT)
def legacy(x, qw, use_qw, nmax, has_min, qs, qh, d, m):
    """Q4_0 (nmax 8), Q5_0 (16), Q8_0 (127, symmetric), Q4_1 (15, has_min), Q5_1 (31, has_min).

    ggml's quantize_row_q4_0_impl & co. (make_qx_quants / make_qkx3_quants with weights
    qw * sqrt(sigma2 + x^2), sigma2 = mean x^2 of the row); without an imatrix qw = 1 (ggml
    falls back to min/max rounding there instead). Unlike ggml the levels are then re-rounded
    against the stored fp16 d (and m), the k-quants' final step, which can only lower the error.
    qs: u8[rows*nb, 16] nibbles (Q4/Q5) or i8[rows*nb, 32] (Q8_0); qh u8[rows*nb, 4] (Q5) or
    unused; d, m: f32[rows*nb] (m unused without has_min)."""
    rows, cols = x.shape
    nb = cols // 32
    fmax = F32(nmax)
    wt = np.empty((32, nb), F32)   # weights, transposed as _qkx_many takes them
    xt = np.empty((32, nb), F32)
    Lt = np.empty((32, nb), F32)
    sc = np.empty(nb, F32)
    mins = np.empty(nb, F32)
    w = np.empty(32, F32)
    L = np.empty(32, F32)
    Laux = np.empty(32, F32)
    for r in range(rows):
        xr = x[r]
        sigma2 = _sum_sq(xr) / F32(cols)
        for ib in range(nb):
            for i in range(32):
                v = xr[32 * ib + i]
                xt[i, ib] = v
                wt[i, ib] = (qw[32 * ib + i] if use_qw else ONE) * np.sqrt(sigma2 + v * v)
        if has_min:
            _qkx_many(xt, wt, Lt, nmax, X3_RMIN, X3_RDELTA, X3_NSTEP, False, sc, mins)
        for ib in range(nb):
            b = r * nb + ib
            xb = xr[32 * ib:32 * ib + 32]
            if has_min:
                dd = round_f16(sc[ib])
                mm = round_f16(-mins[ib])
                m[b] = mm
                for i in range(32):
                    L[i] = Lt[i, ib]
                if dd != ZERO:
                    for i in range(32):
                        L[i] = min(max(np.rint((xb[i] - mm) / dd), ZERO), fmax)
                lo = ZERO
            else:
                for i in range(32):
                    w[i] = wt[i, ib]
                if nmax == 127:
                    dd = round_f16(_qx(xb, w, L, Laux, 127, -127, 127))
                    if dd != ZERO:
                        for i in range(32):
                            L[i] = min(max(np.rint(xb[i] / dd), F32(-127)), F32(127))
                    for i in range(32):
                        qs[b, i] = np.int8(L[i])
                    d[b] = dd
                    continue
                dd = round_f16(_qx(xb, w, L, Laux, nmax, -nmax, nmax - 1))
                if dd != ZERO:
                    for i in range(32):
                        L[i] = min(max(np.rint(xb[i] / dd), -fmax), fmax - ONE)
                lo = fmax       # stored level = signed level + nmax
            d[b] = dd
            bits = np.uint32(0)
            for j in range(16):
                l0 = np.int64(L[j] + lo)
                l1 = np.int64(L[j + 16] + lo)
                qs[b, j] = np.uint8((l0 & 0xF) | ((l1 & 0xF) << 4))
                bits |= np.uint32(((l0 >> 4) & 1) << j) | np.uint32(((l1 >> 4) & 1) << (j + 16))
            if nmax >= 16:      # Q5: fifth bits, a little-endian uint32
                for k in range(4):
                    qh[b, k] = np.uint8((bits >> np.uint32(8 * k)) & np.uint32(0xFF))
