"""numba-compiled per-step operations of the forwards (docs/design.md §5, "Per-token work").

A decode step's work outside the matrix products is a few hundred tiny
numpy operations per layer (norms, rotary, the KV-cache write, attention
per query head, SiLU), each costing more in Python and numpy's dispatch
than in arithmetic; with the block kernels that was ~25% of a SmolLM2 token
on one rank, and it does not shrink when ranks split the matrices. Here
each step is one compiled call:
- `rms_norm_into`: RMSNorm of every row (sum of squares in f64), optionally
  adding a residual first (x += delta), so the residual stream and the
  normed activations come out of one pass;
- `silu_mul`: silu(gate) * up of the fused gate|up product;
- `attend_one`: one new token's attention: q/k head norms (Qwen3), rotary,
  the KV-cache write and one softmax product per query head.
Every value is computed per row or per query head in one fixed order, so
results do not depend on the thread count or on how heads are grouped over
ranks (a rank whose KV groups straddle computes what one rank does: each
query head names the cached KV head it reads).

Imported by models.layers on first use (numba's import costs ~0.5 s, which
convert and quantize never need); cache=True keeps the compiled code in
numba's cache folder (netp/__init__.py sets it) and
`exercise` compiles or loads all of it once.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


# Reductions may be reassociated (so they run in SIMD lanes: a serial f32 chain
# made attention over a few hundred positions cost more than numpy's): the
# order is still fixed by the code and the CPU, not by threads or ranks.
_SUMS = {"reassoc", "contract"}


@njit(cache=True, fastmath=_SUMS)
def _dot(a, b):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(cache=True, fastmath=_SUMS)
def _sum_squares(x):  # in f64
    ss = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        ss += v * v
    return ss


@njit(cache=True, nogil=True)
def rms_norm_into(x, delta, weight, eps, out):
    """out[t] = RMSNorm(x[t]) * weight for each row t of x (T, n); with delta (same shape, not empty)
    x += delta first, in place. Sums of squares in f64, the rest in f32 as transformers."""
    n = x.shape[1]
    add = delta.shape[0] > 0
    for t in range(x.shape[0]):
        if add:
            for i in range(n):
                x[t, i] += delta[t, i]
        var = np.float32(_sum_squares(x[t]) / n)
        scale = np.float32(1.0) / np.float32(math.sqrt(var + np.float32(eps)))
        for i in range(n):
            out[t, i] = x[t, i] * scale * weight[i]


@njit(cache=True, nogil=True)
def silu_mul(gate_up, out):
    """out (T, f) = silu(gate) * up, from gate_up (T, 2f) = gate | up."""
    f = out.shape[1]
    for t in range(out.shape[0]):
        for i in range(f):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * gate_up[t, f + i]


@njit(cache=True)
def _head_norm(x, weight, eps):  # Qwen3's per-head RMSNorm, in place, on one (hd,) head
    scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(_sum_squares(x) / x.shape[0]) + np.float32(eps)))
    for i in range(x.shape[0]):
        x[i] = x[i] * scale * weight[i]


@njit(cache=True)
def _rotate(x, cos, sin, halves):  # rotary on one (hd,) head: pairs (2i, 2i+1) or halves (i, i + n_rot/2)
    half = cos.shape[0]
    for i in range(half):
        if halves:
            a, b = x[i], x[i + half]
        else:
            a, b = x[2 * i], x[2 * i + 1]
        c, s = cos[i], sin[i]
        r0, r1 = a * c - b * s, a * s + b * c
        if halves:
            x[i], x[i + half] = r0, r1
        else:
            x[2 * i], x[2 * i + 1] = r0, r1


@njit(cache=True, nogil=True)
def attend_one(heads, k_cache, v_cache, pos, cos, sin, halves, cache_of_q, window, q_norm, k_norm, eps, scores, out):
    """One token at position pos: heads (nq + 2 nkv, hd) = this rank's q heads, k heads, v heads
    (modified in place: normed and rotated); k_cache, v_cache (nkv, n_ctx, hd) get the new k and v
    at pos; out (nq, hd) = softmax(q k^T / sqrt(hd)) v per query head h, against cached head
    cache_of_q[h], over positions max(0, pos - window + 1)..pos (window 0: all). q_norm / k_norm
    empty: none. scores: (n_ctx,) f32 scratch."""
    hd = heads.shape[1]
    nkv = k_cache.shape[0]
    nq = out.shape[0]
    normed = q_norm.shape[0] > 0
    for h in range(nq + nkv):
        if normed:
            _head_norm(heads[h], q_norm if h < nq else k_norm, eps)
        _rotate(heads[h], cos, sin, halves)
    for c in range(nkv):
        for i in range(hd):
            k_cache[c, pos, i] = heads[nq + c, i]
            v_cache[c, pos, i] = heads[nq + nkv + c, i]
    lo = pos - window + 1 if 0 < window <= pos else 0
    scale = np.float32(1.0 / math.sqrt(hd))
    for h in range(nq):
        c = cache_of_q[h]
        top = -np.inf
        for j in range(lo, pos + 1):
            s = _dot(heads[h], k_cache[c, j]) * scale
            scores[j] = s
            if s > top:
                top = s
        total = np.float32(0.0)
        for j in range(lo, pos + 1):
            e = np.float32(math.exp(scores[j] - top))
            scores[j] = e
            total += e
        for i in range(hd):
            out[h, i] = 0.0
        for j in range(lo, pos + 1):
            p = scores[j] / total
            for i in range(hd):
                out[h, i] += p * v_cache[c, j, i]


def exercise() -> None:
    """Compile (or load from numba's cache) every function here with the types the forwards pass."""
    f32 = np.float32
    x = np.ones((2, 4), f32)
    rms_norm_into(x, np.ones((2, 4), f32), np.ones(4, f32), 1e-5, np.empty_like(x))
    rms_norm_into(x, np.empty((0, 0), f32), np.ones(4, f32), 1e-5, np.empty_like(x))
    silu_mul(np.ones((2, 8), f32), np.empty((2, 4), f32))
    heads, cache = np.ones((3, 4), f32), np.zeros((1, 2, 4), f32)
    for norm in (np.ones(4, f32), np.empty(0, f32)):
        for halves in (False, True):
            attend_one(heads, cache, cache.copy(), 1, np.ones(2, f32), np.zeros(2, f32), halves,
                       np.zeros(1, np.intp), 0, norm, norm, 1e-5, np.empty(2, f32), np.empty((1, 4), f32))
