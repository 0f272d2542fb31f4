"""Block kernels: products with q4_0 / q4_1 / q8_0 matrices kept in block form (docs/design.md §5).

A rank's quantized slices are repacked once, at load, into `TiledBlocks`:
tiles of R = 64 output rows, code bytes ordered [tile][block][byte][row] so
the innermost loop runs over 64 contiguous rows (one SIMD-friendly stream),
the f16 block scales (and q4_1 minimums) widened to f32 as
[tile][block][row]; rows that do not fill the last tile are zero blocks.

`matmul(x, w)` computes x (T, n_in) @ w.T in one call for all T rows, each
tile's blocks decoded once and used for every row of x:
- default, as ggml computes it: each row of x is quantized to q8_0 blocks
  (bit-exact with gguf.quants Q8_0: d = max|x| / 127, codes x * (1/d)
  rounded half away from zero, d kept as its f16 value), and each block's
  dot product is an integer sum scaled by the two scales
  (vec_dot_q4_0_q8_0: d_w d_x (sum q_w x_q - 8 sum x_q); q4_1 adds
  m_w d_x sum x_q; q8_0 is int8 x int8);
- exact: the same blocks against f32 activations (the dequantized math up
  to the order of sums).
Each output row sums its blocks' terms in f64 (a q4/q8 block's term
d_w d_x sum is exact in f64: 11 + 11 + 16 bits) and is rounded to f32 once;
a column-split slice hands its partial sum over in f64 (`partial`), so the
all-reduce rounds once too. 1 and N ranks then agree to the last bit
almost always; with f32 sums they drifted by an ulp, which flipped q8_0
rounding of the next activations and grew to 1.4 in SmolLM2's logits.
Threads: numba prange over tiles; each output row is summed by one thread in
one fixed order, so results are identical for any thread count. prange's
index is unsigned (uint64), and numba types uint64 op int64 as float64: the
tile functions take it as int64 (`np.int64(tl)`), or their index arithmetic
runs in floating point and the loops do not vectorise (measured 6x slower
at one thread, which made 2 threads 3x slower than 1).

Compiled functions are cached on disk (`cache=True`) in a per-user folder;
the first start of a process takes a file lock around compiling or loading
them, so ranks starting at once never race the cache (`warm_up`).
"""
from __future__ import annotations

import fcntl
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "netp" / "numba"


# numba reads its cache folder at import: a per-user one, unless the user chose one.
os.environ.setdefault("NUMBA_CACHE_DIR", str(_cache_dir()))

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

from netp.formats.constants import GGMLType, block_geometry  # noqa: E402

R = 64  # output rows per tile (measured best, docs/design.md §5)
QK = 32  # values per block
KERNEL_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
_SCALE_BYTES = {GGMLType.Q4_0: 2, GGMLType.Q4_1: 4, GGMLType.Q8_0: 2}  # header bytes of a block


@dataclass
class TiledBlocks:
    """A (rows, n_in) quantized matrix in the kernels' tiled layout."""

    type: GGMLType
    rows: int
    n_in: int
    qs: np.ndarray  # (tiles, blocks, 16 or 32, R) uint8 (q8_0: int8)
    d: np.ndarray  # (tiles, blocks, R) f32
    m: np.ndarray | None  # (tiles, blocks, R) f32, q4_1 only

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.n_in

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes)


# -- packing ---------------------------------------------------------------------

@njit(cache=True)
def _pack_codes(src, dst, row0):  # src (rows, blocks, k) uint8 -> dst (tiles, blocks, k, R) at row row0
    for i in range(src.shape[0]):
        g = row0 + i
        t, r = g // R, g % R
        for b in range(src.shape[1]):
            for j in range(src.shape[2]):
                dst[t, b, j, r] = src[i, b, j]


@njit(cache=True)
def _pack_scales(src, dst, row0):  # src (rows, blocks) f32 -> dst (tiles, blocks, R) at row row0
    for i in range(src.shape[0]):
        g = row0 + i
        t, r = g // R, g % R
        for b in range(src.shape[1]):
            dst[t, b, r] = src[i, b]


def tile(parts: list[np.ndarray], t: GGMLType) -> TiledBlocks:
    """File-form rows of blocks (each part (rows_i, bytes per row) uint8, all of
    type t and one row length), stacked by rows, repacked into tiles."""
    if t not in KERNEL_TYPES:
        raise ValueError(f"no block kernel for {t.name}")
    block, block_bytes = block_geometry(t)
    nb = parts[0].shape[1] // block_bytes
    rows = sum(p.shape[0] for p in parts)
    n_tiles = -(-rows // R)
    head = _SCALE_BYTES[t]
    k = QK // 2 if t != GGMLType.Q8_0 else QK
    qs = np.zeros((n_tiles, nb, k, R), dtype=np.uint8)
    d = np.zeros((n_tiles, nb, R), dtype=np.float32)
    m = np.zeros((n_tiles, nb, R), dtype=np.float32) if t == GGMLType.Q4_1 else None
    at = 0
    for p in parts:
        blocks = np.asarray(p).reshape(p.shape[0], nb, block_bytes)
        _pack_codes(blocks[:, :, head:], qs, at)
        _pack_scales(np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[:, :, 0].astype(np.float32), d, at)
        if m is not None:
            _pack_scales(np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[:, :, 0].astype(np.float32), m, at)
        at += p.shape[0]
    if t == GGMLType.Q8_0:
        qs = qs.view(np.int8)
    return TiledBlocks(t, rows, nb * block, qs, d, m)


# -- activations to q8_0 -------------------------------------------------------------

@njit(cache=True)
def _f16_value(v):
    """v >= 0 (f32) rounded to the nearest f16 (ties to even), as f32: what
    gguf.quants' d.astype(np.float16) keeps."""
    if v == 0.0:
        return np.float32(0.0)
    if v >= 65520.0:
        return np.float32(np.inf)
    e = math.frexp(np.float64(v))[1] - 1  # v = 1.f x 2^e
    quantum = 2.0 ** (max(e, -14) - 10)  # f16 spacing at v (subnormals below 2^-14)
    return np.float32(np.rint(np.float64(v) / quantum) * quantum)


@njit(cache=True)
def _quantize_q8(x, xq, xd, xs):
    """x (T, n_in) f32 -> codes xq (T, blocks, 32) int8, scales xd (T, blocks)
    f32 (the f16 value), code sums xs (T, blocks) int32: gguf.quants Q8_0."""
    for t in range(x.shape[0]):
        for b in range(xq.shape[1]):
            amax = np.float32(0.0)
            for j in range(QK):
                a = abs(x[t, b * QK + j])
                if a > amax:
                    amax = a
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0.0 else np.float32(0.0)
            s = 0
            for j in range(QK):
                v = x[t, b * QK + j] * inv  # f32 product, as numpy's blocks * id
                a = abs(v)
                fl = np.floor(a)
                q = int(fl + np.floor(np.float32(2.0) * (a - fl)))  # round half away from zero (np_roundf)
                if v < 0:
                    q = -q
                xq[t, b, j] = q
                s += q
            xd[t, b] = _f16_value(d)
            xs[t, b] = s


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of x as q8_0 blocks: (codes (T, blocks, 32) int8, scales (T, blocks) f32, code sums)."""
    T, n = x.shape
    xq = np.empty((T, n // QK, QK), dtype=np.int8)
    xd = np.empty((T, n // QK), dtype=np.float32)
    xs = np.empty((T, n // QK), dtype=np.int32)
    _quantize_q8(x, xq, xd, xs)
    return xq, xd, xs


# -- the products: one tile function per (type, activation), looped serially or by prange ----
# Arrays are indexed flat (measured 2x faster than 4-D indexing in numba's
# loops), and q4 block sums run in int16: with codes q - 8 in [-8, 7] and
# |x_q| <= 127, 32 products stay within 32512, and 16-bit lanes double the
# SIMD width. q4_1 gets sum q x_q back exactly as that sum + 8 sum x_q.

# Each tile function starts with `if tl < 0: return`: it tells LLVM that every
# index is >= 0, so numba's negative-index wraparound drops out and the row
# loops vectorise (measured 10x).


@njit(cache=True)
def _q4_q8_row(qs, d, m, xq, xd, xs, out, tl):
    """Decode (T = 1): tile tl of a q4_0 (m empty) or q4_1 matrix against one q8_0 row; out (zeroed) +=."""
    if tl < 0:
        return
    nb = xq.shape[1]
    q_flat, d_flat, m_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), m.reshape(-1), xq.reshape(-1), \
        out.reshape(-1)
    asym = m_flat.size > 0
    isum = np.empty(R, dtype=np.int16)
    for b in range(nb):
        o = (tl * nb + b) * (QK // 2) * R
        od = (tl * nb + b) * R
        for r in range(R):
            isum[r] = 0
        for j in range(QK // 2):
            xl = np.int16(x_flat[b * QK + j])
            xh = np.int16(x_flat[b * QK + j + QK // 2])
            for r in range(R):
                v = np.int16(q_flat[o + j * R + r])
                isum[r] += np.int16(np.int16(v & 15) - np.int16(8)) * xl + np.int16(np.int16(v >> 4) - np.int16(8)) * xh
        s = xd[0, b]
        ob = tl * R
        if asym:  # d_w d_x sum q x_q + m_w d_x sum x_q, with sum q x_q = isum + 8 sum x_q
            xsum = np.int32(xs[0, b])
            ms = np.float64(s) * np.float64(xsum)
            for r in range(R):
                out_flat[ob + r] += np.float64(d_flat[od + r] * s) * np.float64(np.int32(isum[r]) + 8 * xsum) + \
                    np.float64(m_flat[od + r]) * ms
        else:
            for r in range(R):
                out_flat[ob + r] += np.float64(d_flat[od + r] * s) * np.float64(isum[r])


@njit(cache=True)
def _q4_q8_rows(qs, d, m, xq, xd, xs, out, tl):
    """Prefill (T > 1): as _q4_q8_row, each block decoded once for all T rows."""
    if tl < 0:
        return
    T, nb = xq.shape[0], xq.shape[1]
    q_flat, d_flat, m_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), m.reshape(-1), xq.reshape(-1), \
        out.reshape(-1)
    asym = m_flat.size > 0
    width = out.shape[1]
    isum = np.empty(R, dtype=np.int16)
    w = np.empty(QK * R, dtype=np.int16)
    for b in range(nb):
        o = (tl * nb + b) * (QK // 2) * R
        od = (tl * nb + b) * R
        for j in range(QK // 2):
            for r in range(R):
                v = np.int16(q_flat[o + j * R + r])
                w[j * R + r] = np.int16(v & 15) - np.int16(8)
                w[(j + QK // 2) * R + r] = np.int16(v >> 4) - np.int16(8)
        for t in range(T):
            for r in range(R):
                isum[r] = 0
            xo = (t * nb + b) * QK
            for j in range(QK):
                xj = np.int16(x_flat[xo + j])
                for r in range(R):
                    isum[r] += w[j * R + r] * xj
            s = xd[t, b]
            ob = t * width + tl * R
            if asym:
                xsum = np.int32(xs[t, b])
                ms = np.float64(s) * np.float64(xsum)
                for r in range(R):
                    out_flat[ob + r] += np.float64(d_flat[od + r] * s) * \
                        np.float64(np.int32(isum[r]) + 8 * xsum) + np.float64(m_flat[od + r]) * ms
            else:
                for r in range(R):
                    out_flat[ob + r] += np.float64(d_flat[od + r] * s) * np.float64(isum[r])


@njit(cache=True)
def _q8_q8_tile(qs, d, xq, xd, out, tl):
    """q8_0 weights against q8_0 rows, any T (nothing to decode): int8 x int8 sums in int32."""
    if tl < 0:
        return
    T, nb = xq.shape[0], xq.shape[1]
    q_flat, d_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), xq.reshape(-1), out.reshape(-1)
    width = out.shape[1]
    isum = np.empty(R, dtype=np.int32)
    for b in range(nb):
        o = (tl * nb + b) * QK * R
        od = (tl * nb + b) * R
        for t in range(T):
            for r in range(R):
                isum[r] = 0
            xo = (t * nb + b) * QK
            for j in range(QK):
                xj = np.int32(x_flat[xo + j])
                for r in range(R):
                    isum[r] += np.int32(q_flat[o + j * R + r]) * xj
            s = xd[t, b]
            ob = t * width + tl * R
            for r in range(R):
                out_flat[ob + r] += np.float64(d_flat[od + r] * s) * np.float64(isum[r])


@njit(cache=True)
def _q4_f32_row(qs, d, m, x, xsum, out, tl):
    """Exact mode, decode: q4_0 / q4_1 against one f32 row; xsum (1, blocks) = the blocks' sums of x (q4_1)."""
    if tl < 0:
        return
    nb = qs.shape[1]
    q_flat, d_flat, m_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), m.reshape(-1), x.reshape(-1), \
        out.reshape(-1)
    asym = m_flat.size > 0
    off = np.float32(0.0) if asym else np.float32(8.0)
    fsum = np.empty(R, dtype=np.float32)
    for b in range(nb):
        o = (tl * nb + b) * (QK // 2) * R
        od = (tl * nb + b) * R
        for r in range(R):
            fsum[r] = 0.0
        for j in range(QK // 2):
            xl = x_flat[b * QK + j]
            xh = x_flat[b * QK + j + QK // 2]
            for r in range(R):
                v = np.int32(q_flat[o + j * R + r])
                fsum[r] += (np.float32(v & 15) - off) * xl + (np.float32(v >> 4) - off) * xh
        ob = tl * R
        if asym:
            xb = xsum[0, b]
            for r in range(R):
                out_flat[ob + r] += np.float64(d_flat[od + r]) * np.float64(fsum[r]) + \
                    np.float64(m_flat[od + r]) * np.float64(xb)
        else:
            for r in range(R):
                out_flat[ob + r] += np.float64(d_flat[od + r]) * np.float64(fsum[r])


@njit(cache=True)
def _q4_f32_rows(qs, d, m, x, xsum, out, tl):
    """Exact mode, prefill: each block decoded once to f32 for all T rows."""
    if tl < 0:
        return
    T, nb = x.shape[0], qs.shape[1]
    q_flat, d_flat, m_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), m.reshape(-1), x.reshape(-1), \
        out.reshape(-1)
    asym = m_flat.size > 0
    off = np.float32(0.0) if asym else np.float32(8.0)
    width = out.shape[1]
    fsum = np.empty(R, dtype=np.float32)
    w = np.empty(QK * R, dtype=np.float32)
    for b in range(nb):
        o = (tl * nb + b) * (QK // 2) * R
        od = (tl * nb + b) * R
        for j in range(QK // 2):
            for r in range(R):
                v = np.int32(q_flat[o + j * R + r])
                w[j * R + r] = np.float32(v & 15) - off
                w[(j + QK // 2) * R + r] = np.float32(v >> 4) - off
        for t in range(T):
            for r in range(R):
                fsum[r] = 0.0
            xo = (t * nb + b) * QK
            for j in range(QK // 2):  # the same order of sums as _q4_f32_row: low and high nibble per byte
                xl = x_flat[xo + j]
                xh = x_flat[xo + j + QK // 2]
                for r in range(R):
                    fsum[r] += w[j * R + r] * xl + w[(j + QK // 2) * R + r] * xh
            ob = t * width + tl * R
            if asym:
                xb = xsum[t, b]
                for r in range(R):
                    out_flat[ob + r] += np.float64(d_flat[od + r]) * np.float64(fsum[r]) + \
                        np.float64(m_flat[od + r]) * np.float64(xb)
            else:
                for r in range(R):
                    out_flat[ob + r] += np.float64(d_flat[od + r]) * np.float64(fsum[r])


@njit(cache=True)
def _q8_f32_tile(qs, d, x, out, tl):
    if tl < 0:
        return
    T, nb = x.shape[0], qs.shape[1]
    q_flat, d_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), x.reshape(-1), out.reshape(-1)
    width = out.shape[1]
    fsum = np.empty(R, dtype=np.float32)
    for b in range(nb):
        o = (tl * nb + b) * QK * R
        od = (tl * nb + b) * R
        for t in range(T):
            for r in range(R):
                fsum[r] = 0.0
            xo = (t * nb + b) * QK
            for j in range(QK):
                xj = x_flat[xo + j]
                for r in range(R):
                    fsum[r] += np.float32(q_flat[o + j * R + r]) * xj
            ob = t * width + tl * R
            for r in range(R):
                out_flat[ob + r] += np.float64(d_flat[od + r]) * np.float64(fsum[r])


# Drivers: one serial, one prange, per kind (numba caches each function once,
# so the two loops are two functions around the same tile code).

@njit(cache=True)
def _q4_q8_serial(qs, d, m, xq, xd, xs, out):
    one = xq.shape[0] == 1
    for tl in range(qs.shape[0]):
        if one:
            _q4_q8_row(qs, d, m, xq, xd, xs, out, tl)
        else:
            _q4_q8_rows(qs, d, m, xq, xd, xs, out, tl)


@njit(cache=True, parallel=True)
def _q4_q8_parallel(qs, d, m, xq, xd, xs, out):
    one = xq.shape[0] == 1
    for tl in prange(qs.shape[0]):
        if one:
            _q4_q8_row(qs, d, m, xq, xd, xs, out, np.int64(tl))
        else:
            _q4_q8_rows(qs, d, m, xq, xd, xs, out, np.int64(tl))


@njit(cache=True)
def _q8_q8_serial(qs, d, xq, xd, out):
    for tl in range(qs.shape[0]):
        _q8_q8_tile(qs, d, xq, xd, out, tl)


@njit(cache=True, parallel=True)
def _q8_q8_parallel(qs, d, xq, xd, out):
    for tl in prange(qs.shape[0]):
        _q8_q8_tile(qs, d, xq, xd, out, np.int64(tl))


@njit(cache=True)
def _q4_f32_serial(qs, d, m, x, xsum, out):
    one = x.shape[0] == 1
    for tl in range(qs.shape[0]):
        if one:
            _q4_f32_row(qs, d, m, x, xsum, out, tl)
        else:
            _q4_f32_rows(qs, d, m, x, xsum, out, tl)


@njit(cache=True, parallel=True)
def _q4_f32_parallel(qs, d, m, x, xsum, out):
    one = x.shape[0] == 1
    for tl in prange(qs.shape[0]):
        if one:
            _q4_f32_row(qs, d, m, x, xsum, out, np.int64(tl))
        else:
            _q4_f32_rows(qs, d, m, x, xsum, out, np.int64(tl))


@njit(cache=True)
def _q8_f32_serial(qs, d, x, out):
    for tl in range(qs.shape[0]):
        _q8_f32_tile(qs, d, x, out, tl)


@njit(cache=True, parallel=True)
def _q8_f32_parallel(qs, d, x, out):
    for tl in prange(qs.shape[0]):
        _q8_f32_tile(qs, d, x, out, np.int64(tl))


_NO_MINS = np.zeros((0, 0, R), dtype=np.float32)
_NO_SUMS = np.zeros((0, 0), dtype=np.float32)


def matmul(x: np.ndarray, w: TiledBlocks, exact: bool = False, threads: int = 1,
           partial: bool = False) -> np.ndarray:
    """x (T, n_in) @ w.T -> (T, w.rows), rounded to f32 once at the end (partial: kept in f64, for a
    sum over ranks that rounds once after it)."""
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if xf.ndim != 2 or xf.shape[1] != w.n_in:
        raise ValueError(f"activations of shape {xf.shape} for a matrix of {w.n_in} columns")
    T = xf.shape[0]
    n_tiles = w.qs.shape[0]
    out = np.zeros((T, n_tiles * R), dtype=np.float64)
    par = threads > 1
    if par:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    q8 = w.type == GGMLType.Q8_0
    mins = _NO_MINS if w.m is None else w.m
    if exact:
        if q8:
            (_q8_f32_parallel if par else _q8_f32_serial)(w.qs, w.d, xf, out)
        else:
            xsum = _NO_SUMS if w.m is None else xf.reshape(T, -1, QK).sum(axis=2, dtype=np.float32)
            (_q4_f32_parallel if par else _q4_f32_serial)(w.qs, w.d, mins, xf, np.ascontiguousarray(xsum), out)
    else:
        xq, xd, xs = quantize_q8(xf)
        if q8:
            (_q8_q8_parallel if par else _q8_q8_serial)(w.qs, w.d, xq, xd, out)
        else:
            (_q4_q8_parallel if par else _q4_q8_serial)(w.qs, w.d, mins, xq, xd, xs, out)
    return out[:, : w.rows] if partial else out[:, : w.rows].astype(np.float32)


# -- compiling / loading once per process, safely across processes ----------------------

@dataclass(frozen=True)
class WarmUp:
    seconds: float  # time to compile or load every kernel
    compiled: bool  # True: at least one kernel was compiled (not found in the cache)


_warm_lock = threading.Lock()
_warm: WarmUp | None = None
_DISPATCHERS = (_pack_codes, _pack_scales, _quantize_q8, _q4_q8_serial, _q4_q8_parallel, _q8_q8_serial,
                _q8_q8_parallel, _q4_f32_serial, _q4_f32_parallel, _q8_f32_serial, _q8_f32_parallel)


def warm_up() -> WarmUp:
    """Compile (first start) or load (from the disk cache) every kernel, once per process.

    A file lock in the cache folder serialises this across processes: ranks
    starting at once wait for the first one's compile, then load its cache
    instead of compiling alongside it and writing the same files."""
    global _warm
    with _warm_lock:
        if _warm is not None:
            return _warm
        folder = Path(numba.config.CACHE_DIR or _cache_dir())
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(folder / "netp.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                misses_before = sum(sum(f.stats.cache_misses.values()) for f in _DISPATCHERS)
                _exercise()
                misses = sum(sum(f.stats.cache_misses.values()) for f in _DISPATCHERS) - misses_before
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _warm = WarmUp(time.perf_counter() - t0, misses > 0)
        return _warm


def _exercise() -> None:
    """Call every kernel once on tiny inputs of the types the runtime passes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, QK), dtype=np.float32)
    for t in KERNEL_TYPES:
        _, block_bytes = block_geometry(t)
        raw = rng.integers(0, 256, size=(3, block_bytes), dtype=np.uint8)
        raw[:, :_SCALE_BYTES[t]] = np.frombuffer(np.full(_SCALE_BYTES[t] // 2, 0.01, np.float16).tobytes(), np.uint8)
        w = tile([raw], t)
        for exact in (False, True):
            for threads in (1, 2):
                matmul(x, w, exact=exact, threads=threads)
