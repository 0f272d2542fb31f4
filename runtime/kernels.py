"""Block kernels: products with q4_0 / q4_1 / q8_0 matrices kept in block form (docs/design.md §5).

A rank's quantized slices are repacked once, at load, into `TiledBlocks`:
tiles of R = 64 output rows; each block's code bytes as 32-bit words of 4
bytes per row, ordered [tile][block][word][row][4] (q4: 4 words, byte j of
the file's 16 holding codes j and j + 16; q8_0: 8 words, each code stored
+ 128 as an unsigned byte), so one 512-bit load holds 16 rows' words side by
side; the f16 block scales (and q4_1 minimums) as they are in the file,
[tile][block][row]. Rows that do not fill the last tile are zero blocks.
The tiles are exactly as large as the file's blocks.

`matmul(x, w)` computes x (T, n_in) @ w.T in one call for all T rows:
- default, as ggml computes it: each row of x is quantized to q8_0 blocks
  (bit-exact with gguf.quants Q8_0: d = max|x| / 127, codes x * (1/d)
  rounded half away from zero, d kept as its f16 value), and each block's
  dot product is an integer sum scaled by the two scales
  (vec_dot_q4_0_q8_0: d_w d_x (sum q_w x_q - 8 sum x_q); q4_1 adds
  m_w d_x sum x_q; q8_0 is int8 x int8). Two implementations give the same
  bits: netp.runtime.simd's AVX-512 VNNI or AVX2 code where the CPU has
  either, and the portable loops below otherwise;
- exact: the same blocks against f32 activations (the dequantized math up
  to the order of sums), portable loops only.
Each output row sums its blocks' terms in f64 (a q4/q8 block's term
d_w d_x sum is exact in f64: 11 + 11 + 21 bits) and is rounded to f32 once;
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

Compiled functions are cached on disk (`cache=True`) in a per-user folder (netp/__init__.py);
the first start of a process takes a file lock around compiling or loading
them, so ranks starting at once never race the cache (`warm_up`).
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numba
import numpy as np
from numba import njit, prange

from netp.formats.constants import GGMLType, block_geometry
from netp.runtime import simd
from netp.typenames import QK

R = simd.R  # output rows per tile (docs/design.md §5)
KERNEL_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
_KIND = {GGMLType.Q4_0: 0, GGMLType.Q4_1: 1, GGMLType.Q8_0: 2}  # the compiled code's type switch
_WORDS = {GGMLType.Q4_0: 4, GGMLType.Q4_1: 4, GGMLType.Q8_0: 8}  # 32-bit words of codes per row and block
_SCALES = {GGMLType.Q4_0: 1, GGMLType.Q4_1: 2, GGMLType.Q8_0: 1}  # f16 values heading a block (d, m)


@dataclass
class TiledBlocks:
    """A (rows, n_in) quantized matrix in the kernels' tiled layout."""

    type: GGMLType
    rows: int
    n_in: int
    qs: np.ndarray  # (tiles, blocks, 4 or 8, R, 4) uint8
    d: np.ndarray  # (tiles, blocks, R) f16
    m: np.ndarray | None  # (tiles, blocks, R) f16, q4_1 only

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.n_in

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes)

    def __post_init__(self) -> None:
        # The compiled loops' views, made once: a decode step calls matmul ~120 times (SmolLM2).
        self.kind = _KIND[self.type]
        self.words = self.qs.view(np.uint32).reshape(self.qs.shape[:4])  # a row's 4 bytes as one word
        self.d16 = self.d.view(np.uint16)
        self.m16 = (_NO_SCALES if self.m is None else self.m).view(np.uint16)


# -- packing ---------------------------------------------------------------------

_pack_q4_0, _pack_q4_1, _pack_q8_0 = simd.pack_rows(4, 1, False), simd.pack_rows(4, 2, False), \
    simd.pack_rows(8, 1, True)


@njit(cache=True)
def _pack_few(src, qs, d, m, row0, t, lo, hi):
    """Rows lo .. hi-1 of tile t (a group that a part's edge cuts) one byte at a time, as simd.pack_rows
    does 16 rows: file rows src (rows, bytes; the first is row row0) -> qs (tiles, blocks, words, R, 4)
    uint8, d and m (tiles, blocks, R; m without tiles unless q4_1) uint16."""
    nb, words = qs.shape[1], qs.shape[2]
    heads = 2 if m.shape[0] > 0 else 1
    per_block = 2 * heads + 4 * words
    flip = 0x80 if words == 8 else 0
    for r in range(lo, hi):
        s = t * R + r - row0
        for b in range(nb):
            o = b * per_block
            d[t, b, r] = np.uint16(src[s, o]) | (np.uint16(src[s, o + 1]) << 8)
            if heads == 2:
                m[t, b, r] = np.uint16(src[s, o + 2]) | (np.uint16(src[s, o + 3]) << 8)
            for w in range(words):
                for c in range(4):
                    qs[t, b, w, r, c] = src[s, o + 2 * heads + 4 * w + c] ^ flip


@njit(cache=True)
def _pack_tile(kind, src, qs, d, m, row0, t):
    """Tile t's rows held by src (file rows, the first being row row0), 16 at a time where whole."""
    if t < 0:
        return
    lo = max(row0, t * R) - t * R
    hi = min(row0 + src.shape[0], (t + 1) * R) - t * R
    for g in range(R // simd.PACK_ROWS):
        a, z = max(lo, g * simd.PACK_ROWS), min(hi, (g + 1) * simd.PACK_ROWS)
        if z - a == simd.PACK_ROWS:
            if kind == 0:
                _pack_q4_0(src, t * R + a - row0, qs, d, m, t, g)
            elif kind == 1:
                _pack_q4_1(src, t * R + a - row0, qs, d, m, t, g)
            else:
                _pack_q8_0(src, t * R + a - row0, qs, d, m, t, g)
        elif a < z:
            _pack_few(src, qs, d, m, row0, t, a, z)


@njit(cache=True, nogil=True)
def _pack_serial(kind, src, qs, d, m, row0):
    for t in range(row0 // R, (row0 + src.shape[0] - 1) // R + 1):
        _pack_tile(kind, src, qs, d, m, row0, t)


@njit(cache=True, parallel=True)
def _pack_parallel(kind, src, qs, d, m, row0):
    first = row0 // R
    for i in prange((row0 + src.shape[0] - 1) // R - first + 1):
        _pack_tile(kind, src, qs, d, m, row0, first + np.int64(i))


def tile(parts: list[np.ndarray], t: GGMLType, threads: int = 1) -> TiledBlocks:
    """File-form rows of blocks (each part (rows_i, bytes per row) uint8, all of
    type t and one row length), stacked by rows, repacked into tiles."""
    if t not in KERNEL_TYPES:
        raise ValueError(f"no block kernel for {t.name}")
    block, block_bytes = block_geometry(t)
    nb = parts[0].shape[1] // block_bytes
    rows = sum(p.shape[0] for p in parts)
    n_tiles = -(-rows // R)
    words = _WORDS[t]
    qs = np.zeros((n_tiles, nb, words, R, 4), dtype=np.uint8)
    d = np.zeros((n_tiles, nb, R), dtype=np.float16)
    m = np.zeros((n_tiles, nb, R), dtype=np.float16) if t == GGMLType.Q4_1 else None
    par = set_threads(threads)
    at = 0
    for p in parts:
        if p.shape[0] and nb:  # (the compiled loops take at least one block)
            (_pack_parallel if par else _pack_serial)(_KIND[t], np.ascontiguousarray(p), qs, d.view(np.uint16),
                                                      (_NO_SCALES if m is None else m).view(np.uint16), at)
        at += p.shape[0]
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


@njit(cache=True, nogil=True)
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


@njit(cache=True)
def _q8_scratch(x):
    """_quantize_q8 of x into arrays it allocates."""
    nb = x.shape[1] // QK
    xq = np.empty((x.shape[0], nb, QK), dtype=np.int8)
    xd = np.empty((x.shape[0], nb), dtype=np.float32)
    xs = np.empty((x.shape[0], nb), dtype=np.int32)
    _quantize_q8(x, xq, xd, xs)
    return xq, xd, xs


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of x as q8_0 blocks: (codes (T, blocks, 32) int8, scales (T, blocks) f32, code sums)."""
    T, n = x.shape
    xq = np.empty((T, n // QK, QK), dtype=np.int8)
    xd = np.empty((T, n // QK), dtype=np.float32)
    xs = np.empty((T, n // QK), dtype=np.int32)
    _quantize_q8(x, xq, xd, xs)
    return xq, xd, xs


# -- the products, portable loops: one tile function per (activation, T = 1 or more), looped serially
# or by prange. Arrays are indexed flat (measured 2x faster than 4-D indexing in numba's loops); codes
# are read as the tiles' uint32 words, contiguous over rows, byte c of a word being (w >> 8c) & 255.
# q4 block sums run in int16 on codes q - 8 in [-8, 7]: with |x_q| <= 127, 32 products stay within
# 32512, and 16-bit lanes double the SIMD width. The f16 scales are read through F16, a table of all
# 65536 values as f32 (numba has no f16 type).

# Each tile function starts with `if tl < 0: return`: it tells LLVM that every
# index is >= 0, so numba's negative-index wraparound drops out and the row
# loops vectorise (measured 10x).

F16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True)
def _add_terms(kind, d_flat, m_flat, f16, od, s, xsum, isum, out_flat, ob):
    """out[ob + r] += row r's block term from its integer sum isum[r] (q4: sum (q - 8) x_q; q8_0: sum
    q x_q), s = d_x, xsum = sum x_q: the same f64 values and order as netp.runtime.simd's."""
    if kind == 1:  # q4_1: d_w d_x sum q x_q + m_w (d_x sum x_q), with sum q x_q = isum + 8 sum x_q
        ms = np.float64(s) * np.float64(xsum)
        for r in range(R):
            out_flat[ob + r] += np.float64(f16[d_flat[od + r]] * s) * np.float64(np.int32(isum[r]) + 8 * xsum) + \
                np.float64(f16[m_flat[od + r]]) * ms
    else:
        for r in range(R):
            out_flat[ob + r] += np.float64(f16[d_flat[od + r]] * s) * np.float64(isum[r])


@njit(cache=True)
def _q8_row(kind, qs, d, m, f16, xq, xd, xs, out, tl):
    """Decode (T = 1): tile tl against one q8_0 row; out (zeroed) +=."""
    if tl < 0:
        return
    nb, words = qs.shape[1], qs.shape[2]
    q_flat, d_flat, m_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), m.reshape(-1), xq.reshape(-1), \
        out.reshape(-1)
    isum16 = np.empty(R, dtype=np.int16)
    isum32 = np.empty(R, dtype=np.int32)
    for b in range(nb):
        o = (tl * nb + b) * words * R
        od = (tl * nb + b) * R
        if kind == 2:
            for r in range(R):
                isum32[r] = 0
            for w in range(words):
                for c in range(4):
                    xj = np.int32(x_flat[b * QK + 4 * w + c])
                    for r in range(R):
                        isum32[r] += (np.int32((q_flat[o + w * R + r] >> (8 * c)) & 255) - 128) * xj
            _add_terms(kind, d_flat, m_flat, f16, od, xd[0, b], np.int32(xs[0, b]), isum32, out_flat, tl * R)
        else:
            for r in range(R):
                isum16[r] = 0
            for w in range(words):
                for c in range(4):
                    xl = np.int16(x_flat[b * QK + 4 * w + c])
                    xh = np.int16(x_flat[b * QK + 16 + 4 * w + c])
                    for r in range(R):
                        v = q_flat[o + w * R + r] >> (8 * c)
                        isum16[r] += (np.int16(v & 15) - np.int16(8)) * xl + \
                            (np.int16((v >> 4) & 15) - np.int16(8)) * xh
            _add_terms(kind, d_flat, m_flat, f16, od, xd[0, b], np.int32(xs[0, b]), isum16, out_flat, tl * R)


@njit(cache=True)
def _q8_rows(kind, qs, d, m, f16, xq, xd, xs, out, tl):
    """Prefill (T > 1): as _q8_row, each block decoded once for all T rows."""
    if tl < 0:
        return
    T, nb, words = xq.shape[0], qs.shape[1], qs.shape[2]
    q_flat, d_flat, m_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), m.reshape(-1), xq.reshape(-1), \
        out.reshape(-1)
    width = out.shape[1]
    isum16 = np.empty(R, dtype=np.int16)
    isum32 = np.empty(R, dtype=np.int32)
    w16 = np.empty(QK * R, dtype=np.int16)
    w32 = np.empty(QK * R, dtype=np.int32)
    for b in range(nb):
        o = (tl * nb + b) * words * R
        od = (tl * nb + b) * R
        if kind == 2:
            for w in range(words):
                for c in range(4):
                    for r in range(R):
                        w32[(4 * w + c) * R + r] = np.int32((q_flat[o + w * R + r] >> (8 * c)) & 255) - 128
            for t in range(T):
                xo = (t * nb + b) * QK
                for r in range(R):
                    isum32[r] = 0
                for j in range(QK):
                    x32 = np.int32(x_flat[xo + j])
                    for r in range(R):
                        isum32[r] += w32[j * R + r] * x32
                _add_terms(kind, d_flat, m_flat, f16, od, xd[t, b], np.int32(xs[t, b]), isum32, out_flat,
                           t * width + tl * R)
        else:
            for w in range(words):
                for c in range(4):
                    for r in range(R):
                        v = q_flat[o + w * R + r] >> (8 * c)
                        w16[(4 * w + c) * R + r] = np.int16(v & 15) - np.int16(8)
                        w16[(4 * w + c + 16) * R + r] = np.int16((v >> 4) & 15) - np.int16(8)
            for t in range(T):
                xo = (t * nb + b) * QK
                for r in range(R):
                    isum16[r] = 0
                for j in range(QK):
                    xj = np.int16(x_flat[xo + j])
                    for r in range(R):
                        isum16[r] += w16[j * R + r] * xj
                _add_terms(kind, d_flat, m_flat, f16, od, xd[t, b], np.int32(xs[t, b]), isum16, out_flat,
                           t * width + tl * R)


@njit(cache=True)
def _f32_tile(kind, qs, d, m, f16, x, xsum, out, tl):
    """Exact mode: tile tl against T f32 rows, each block decoded to f32 once for all of them;
    xsum (T, blocks) = the blocks' sums of x (q4_1)."""
    if tl < 0:
        return
    T, nb, words = x.shape[0], qs.shape[1], qs.shape[2]
    q_flat, d_flat, m_flat, x_flat, out_flat = qs.reshape(-1), d.reshape(-1), m.reshape(-1), x.reshape(-1), \
        out.reshape(-1)
    off = np.float32(0.0) if kind == 1 else np.float32(8.0)
    width = out.shape[1]
    fsum = np.empty(R, dtype=np.float32)
    w = np.empty(QK * R, dtype=np.float32)
    for b in range(nb):
        o = (tl * nb + b) * words * R
        od = (tl * nb + b) * R
        for k in range(words):
            for c in range(4):
                j = 4 * k + c
                for r in range(R):
                    v = q_flat[o + k * R + r] >> (8 * c)
                    if kind == 2:
                        w[j * R + r] = np.float32(np.int32(v & 255) - 128)
                    else:
                        w[j * R + r] = np.float32(v & 15) - off
                        w[(j + 16) * R + r] = np.float32((v >> 4) & 15) - off
        for t in range(T):
            for r in range(R):
                fsum[r] = 0.0
            xo = (t * nb + b) * QK
            if kind == 2:
                for j in range(QK):
                    xj = x_flat[xo + j]
                    for r in range(R):
                        fsum[r] += w[j * R + r] * xj
            else:
                for j in range(QK // 2):  # low and high nibble of a byte together, whatever T
                    xl = x_flat[xo + j]
                    xh = x_flat[xo + j + QK // 2]
                    for r in range(R):
                        fsum[r] += w[j * R + r] * xl + w[(j + QK // 2) * R + r] * xh
            ob = t * width + tl * R
            if kind == 1:
                xb = xsum[t, b]
                for r in range(R):
                    out_flat[ob + r] += np.float64(f16[d_flat[od + r]]) * np.float64(fsum[r]) + \
                        np.float64(f16[m_flat[od + r]]) * np.float64(xb)
            else:
                for r in range(R):
                    out_flat[ob + r] += np.float64(f16[d_flat[od + r]]) * np.float64(fsum[r])


# -- the products on SIMD (netp.runtime.simd): per ISA, the groups of LANES rows per decode pass and the
# (groups, tokens) block of a prefill pass, the tokens left over run as decode does (measured best here).
# Prefill takes a tile's blocks PREFILL_BLOCKS at a time, every token passing over each slice (64 rows x
# 16 blocks, 9-18 KB, stays in L1) before the next: one pass over all of a tile's blocks per token pair
# streamed the tile from L3 again and again where the tile and the activations outgrow L2 (w2's 14336
# inputs), and 2 threads, sharing L3, scaled 1.4x.

_DECODE_GROUPS = {"avx512vnni": 4, "avx2": 8, None: 4}[simd.ISA]
_PREFILL_GROUPS, _PREFILL_TOKENS = {"avx512vnni": (2, 4), "avx2": (2, 2), None: (2, 4)}[simd.ISA]
_PREFILL_BLOCKS = 16
_simd_q4_0_d, _simd_q4_1_d, _simd_q8_0_d = (simd.block_products(k, _DECODE_GROUPS, 1) for k in simd.KINDS)
_simd_q4_0_p, _simd_q4_1_p, _simd_q8_0_p = (simd.block_products(k, _PREFILL_GROUPS, _PREFILL_TOKENS)
                                            for k in simd.KINDS)


@njit(cache=True)
def _simd_pass(kind, wide, qs, d, m, xq, xd, xs, out, tl, g, t, b0, b1):
    """One intrinsic call: the prefill block (wide) or the decode one, of the matrix's type."""
    if wide:
        if kind == 0:
            _simd_q4_0_p(qs, d, m, xq, xd, xs, out, tl, g, t, b0, b1)
        elif kind == 1:
            _simd_q4_1_p(qs, d, m, xq, xd, xs, out, tl, g, t, b0, b1)
        else:
            _simd_q8_0_p(qs, d, m, xq, xd, xs, out, tl, g, t, b0, b1)
    elif kind == 0:
        _simd_q4_0_d(qs, d, m, xq, xd, xs, out, tl, g, t, b0, b1)
    elif kind == 1:
        _simd_q4_1_d(qs, d, m, xq, xd, xs, out, tl, g, t, b0, b1)
    else:
        _simd_q8_0_d(qs, d, m, xq, xd, xs, out, tl, g, t, b0, b1)


@njit(cache=True)
def _simd_tile(kind, qs, d, m, xq, xd, xs, out, tl):
    """Tile tl against all T rows (out written, not added)."""
    T, nb = xq.shape[0], xq.shape[1]
    step = nb if T == 1 else _PREFILL_BLOCKS
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        t = 0
        while t < T:
            wide = t + _PREFILL_TOKENS <= T
            for g in range(0, R // simd.LANES, _PREFILL_GROUPS if wide else _DECODE_GROUPS):
                _simd_pass(kind, wide, qs, d, m, xq, xd, xs, out, tl, g, t, b0, b1)
            t += _PREFILL_TOKENS if wide else 1


# -- drivers: one serial, one prange, per path (numba caches each function once, so the two loops are
# two functions around the same tile code). The serial ones, packing and the q8_0 quantizer release the
# GIL (nogil): a load's sha256 thread and the ranks simulated as threads run beside them.

@njit(cache=True, nogil=True)
def _q8_serial(kind, qs, d, m, f16, xq, xd, xs, out):
    one = xq.shape[0] == 1
    for tl in range(qs.shape[0]):
        if one:
            _q8_row(kind, qs, d, m, f16, xq, xd, xs, out, tl)
        else:
            _q8_rows(kind, qs, d, m, f16, xq, xd, xs, out, tl)


@njit(cache=True, parallel=True)
def _q8_parallel(kind, qs, d, m, f16, xq, xd, xs, out):
    one = xq.shape[0] == 1
    for tl in prange(qs.shape[0]):
        if one:
            _q8_row(kind, qs, d, m, f16, xq, xd, xs, out, np.int64(tl))
        else:
            _q8_rows(kind, qs, d, m, f16, xq, xd, xs, out, np.int64(tl))


@njit(cache=True, nogil=True)
def _simd_serial(kind, qs, d, m, xq, xd, xs, out):
    for tl in range(qs.shape[0]):
        _simd_tile(kind, qs, d, m, xq, xd, xs, out, tl)


@njit(cache=True, parallel=True)
def _simd_parallel(kind, qs, d, m, xq, xd, xs, out):
    for tl in prange(qs.shape[0]):
        _simd_tile(kind, qs, d, m, xq, xd, xs, out, np.int64(tl))


# Decode at one thread (x (1, n_in)): x quantized to q8_0 and the serial product in one compiled call,
# instead of four Python-level steps (a SmolLM2 token makes ~120 products, each ~8 µs of Python before).

@njit(cache=True, nogil=True)
def _q8_one_row(kind, qs, d, m, f16, x, out):
    xq, xd, xs = _q8_scratch(x)
    out[:] = 0.0
    for tl in range(qs.shape[0]):
        _q8_row(kind, qs, d, m, f16, xq, xd, xs, out, tl)


@njit(cache=True, nogil=True)
def _simd_one_row(kind, qs, d, m, x, out):
    xq, xd, xs = _q8_scratch(x)
    for tl in range(qs.shape[0]):
        _simd_tile(kind, qs, d, m, xq, xd, xs, out, tl)


# The decode products of this CPU, for compiled callers (runtime/fused.py): chosen at import, as matmul
# chooses per call, so numba never compiles SIMD intrinsics for a CPU without them. The threaded one
# splits the tiles among the calling thread's numba threads (set_threads), each row summed by one
# thread as in the serial one: the same bits.
if simd.ISA is not None:
    @njit(cache=True, nogil=True)
    def row_product(kind, qs, d, m, x, out):
        """x (1, n_in) f32 -> out (1, tiles R) f64, written: _simd_one_row."""
        _simd_one_row(kind, qs, d, m, x, out)

    @njit(cache=True, nogil=True)
    def row_product_threaded(kind, qs, d, m, x, out):
        """row_product on the threads set_threads gave the calling thread."""
        xq, xd, xs = _q8_scratch(x)
        _simd_parallel(kind, qs, d, m, xq, xd, xs, out)
else:
    @njit(cache=True, nogil=True)
    def row_product(kind, qs, d, m, x, out):
        """x (1, n_in) f32 -> out (1, tiles R) f64, written: _q8_one_row."""
        _q8_one_row(kind, qs, d, m, F16, x, out)

    @njit(cache=True, nogil=True)
    def row_product_threaded(kind, qs, d, m, x, out):
        """row_product on the threads set_threads gave the calling thread."""
        xq, xd, xs = _q8_scratch(x)
        out[:] = 0.0
        _q8_parallel(kind, qs, d, m, F16, xq, xd, xs, out)


@njit(cache=True, nogil=True)
def _f32_serial(kind, qs, d, m, f16, x, xsum, out):
    for tl in range(qs.shape[0]):
        _f32_tile(kind, qs, d, m, f16, x, xsum, out, tl)


@njit(cache=True, parallel=True)
def _f32_parallel(kind, qs, d, m, f16, x, xsum, out):
    for tl in prange(qs.shape[0]):
        _f32_tile(kind, qs, d, m, f16, x, xsum, out, np.int64(tl))


_NO_SCALES = np.zeros((0, 0, R), dtype=np.float16)
_NO_SUMS = np.zeros((0, 0), dtype=np.float32)


def set_threads(threads: int) -> bool:
    """numba's threads for this Python thread's next parallel loops; True: use the prange drivers."""
    if threads <= 1:
        return False
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return True


def matmul(x: np.ndarray, w: TiledBlocks, exact: bool = False, threads: int = 1,
           partial: bool = False) -> np.ndarray:
    """x (T, n_in) @ w.T -> (T, w.rows), rounded to f32 once at the end (partial: kept in f64, for a
    sum over ranks that rounds once after it)."""
    return _matmul(x, w, exact, threads, partial, simd.ISA is not None)


def _matmul(x: np.ndarray, w: TiledBlocks, exact: bool, threads: int, partial: bool,
            use_simd: bool) -> np.ndarray:
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if xf.ndim != 2 or xf.shape[1] != w.n_in:
        raise ValueError(f"activations of shape {xf.shape} for a matrix of {w.n_in} columns")
    T = xf.shape[0]
    n_tiles = w.qs.shape[0]
    kind, qs, d, m = w.kind, w.words, w.d16, w.m16
    if T == 1 and threads <= 1 and not exact and w.qs.shape[1]:
        out = np.empty((1, n_tiles * R), dtype=np.float64)
        if use_simd:
            _simd_one_row(kind, qs, d, m, xf, out)
        else:
            _q8_one_row(kind, qs, d, m, F16, xf, out)
        return out[:, : w.rows] if partial else out[:, : w.rows].astype(np.float32)
    par = set_threads(threads)
    if w.qs.shape[1] == 0:  # no blocks: the compiled loops take at least one
        out = np.zeros((T, n_tiles * R), dtype=np.float64)
    elif exact:
        out = np.zeros((T, n_tiles * R), dtype=np.float64)
        xsum = _NO_SUMS if w.m is None else np.ascontiguousarray(xf.reshape(T, -1, QK).sum(axis=2, dtype=np.float32))
        (_f32_parallel if par else _f32_serial)(kind, qs, d, m, F16, xf, xsum, out)
    elif use_simd:
        out = np.empty((T, n_tiles * R), dtype=np.float64)
        (_simd_parallel if par else _simd_serial)(kind, qs, d, m, *quantize_q8(xf), out)
    else:
        out = np.zeros((T, n_tiles * R), dtype=np.float64)
        (_q8_parallel if par else _q8_serial)(kind, qs, d, m, F16, *quantize_q8(xf), out)
    return out[:, : w.rows] if partial else out[:, : w.rows].astype(np.float32)


# -- compiling / loading once per process, safely across processes ----------------------

@dataclass(frozen=True)
class WarmUp:
    seconds: float  # time to compile or load every kernel
    compiled: bool  # True: at least one kernel was compiled (not found in the cache)


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Held while compiling or loading compiled code: a file lock in numba's cache folder, so ranks
    starting at once wait for the first one's compile, then load its cache instead of compiling
    alongside it and writing the same files."""
    folder = Path(numba.config.CACHE_DIR or os.environ["NUMBA_CACHE_DIR"])  # (netp/__init__.py sets it)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "netp.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_warm_lock = threading.Lock()
_warm: WarmUp | None = None
_DISPATCHERS = (_pack_serial, _pack_parallel, _quantize_q8, _q8_one_row, _simd_one_row, _q8_serial, _q8_parallel,
                _simd_serial, _simd_parallel, _f32_serial, _f32_parallel)


def warm_up() -> WarmUp:
    """Compile (first start) or load (from the disk cache) every kernel, once per process.

    A file lock in the cache folder serialises this across processes: ranks
    starting at once wait for the first one's compile, then load its cache
    instead of compiling alongside it and writing the same files."""
    global _warm
    with _warm_lock:
        if _warm is not None:
            return _warm
        t0 = time.perf_counter()
        with cache_lock():
            misses_before = sum(sum(f.stats.cache_misses.values()) for f in _DISPATCHERS)
            _exercise()
            misses = sum(sum(f.stats.cache_misses.values()) for f in _DISPATCHERS) - misses_before
        _warm = WarmUp(time.perf_counter() - t0, misses > 0)
        return _warm


def _exercise() -> None:
    """Call every kernel once on tiny inputs of the types the runtime passes (file rows from a read-only
    mapping or read into memory)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, QK), dtype=np.float32)
    for t in KERNEL_TYPES:
        _, block_bytes = block_geometry(t)
        raw = rng.integers(0, 256, size=(3, block_bytes), dtype=np.uint8)
        raw[:, :2 * _SCALES[t]] = np.frombuffer(np.full(_SCALES[t], 0.01, np.float16).tobytes(), np.uint8)
        mapped = raw.copy()
        mapped.flags.writeable = False
        for threads in (1, 2):
            tile([mapped], t, threads=threads)
            w = tile([raw], t, threads=threads)
            for exact in (False, True):
                matmul(x, w, exact=exact, threads=threads)
            matmul(x[:1], w, threads=threads)  # decode: one row
