"""numpy building blocks the per-architecture forwards share.

Everything is float32 and rank-local: a forward sees only its rank's heads
and slices (models/context.py: what it is handed). Shapes
in comments: T = tokens in this step, S = positions attended to, nq / nkv =
this rank's query / KV heads, hd = head dim.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import numpy as np

from netp.models.context import RankContext


class Matrix(Protocol):
    """A weight matrix kept in another form than a dense array (the runtime's quantized blocks)."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (T, in) times the matrix: (T, out)."""
        ...


def linear(x: np.ndarray, w: np.ndarray | Matrix) -> np.ndarray:
    """x (T, in) times a weight of out rows: a dense f32 array stored
    transposed, (in, out) C-contiguous, or anything with .apply(x) (the
    runtime's quantized matrices in block form, docs/design.md §5). Returns (T, out).

    Why transposed: for one token, numpy's x @ W on an (in, out) array runs
    OpenBLAS's gemv "N" kernel, which streams the weights at ~1.5x the
    bandwidth of x @ W.T on (out, in) rows (measured: 21 vs 15 GB/s on one
    core) - and decode is bandwidth-bound."""
    if isinstance(w, np.ndarray):
        return x @ w
    return w.apply(x)


_COMPILED: Any = None


def _compiled() -> Any:
    """models.compiled, imported on first use: numba's import is for the forwards only."""
    global _COMPILED
    if _COMPILED is None:
        from netp.models import compiled

        _COMPILED = compiled
    return _COMPILED


_NO_ROWS = np.empty((0, 0), dtype=np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """LLaMA's RMSNorm over the last axis of (T, n) rows (one compiled pass, models/compiled.py)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _compiled().rms_norm_into(x, _NO_ROWS, weight, eps, out)
    return out


def add_rms_norm(x: np.ndarray, delta: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """The residual step and the next norm in one pass: x += delta (in place; x (T, n) f32 and
    C-contiguous), then RMSNorm(x) * weight, returned."""
    out = np.empty_like(x)
    _compiled().rms_norm_into(x, np.ascontiguousarray(delta, dtype=np.float32), weight, eps, out)
    return out


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = np.mean(np.square(xc), axis=-1, keepdims=True)
    return xc * (1.0 / np.sqrt(var + np.float32(eps))) * weight + bias


_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def gelu_new(x: np.ndarray) -> np.ndarray:
    """GPT-2/GPT-J's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + np.float32(0.044715) * x * x * x)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) * up of a fused (T, 2f) gate|up product, (T, f), in one compiled pass."""
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=np.float32)
    _compiled().silu_mul(np.ascontiguousarray(gate_up, dtype=np.float32), out)
    return out


def swiglu(x: np.ndarray, w13: np.ndarray | Matrix, w2: np.ndarray | Matrix) -> np.ndarray:
    """LLaMA's SiLU-gated MLP, down(silu(gate x) * up x), on this rank's slice of its
    width: w13 holds the gate rows then the up rows (one product), w2 the matching
    columns of down, so the result is this rank's partial sum (f64 from block
    kernels, for the all-reduce to round once). x (T, in) -> (T, out)."""
    return linear(silu_mul(linear(x, w13)), w2)


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (+-1 beyond, in f32): Eigen's rational
# approximation of float erf, within 5e-7 of the true erf over the reals.
_ERF_P = tuple(np.float32(c) for c in (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02))
_ERF_Q = tuple(np.float32(c) for c in (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
    -1.42647390514189e-02))


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, vectorised in float32 (numpy has none)."""
    x = np.clip(x, np.float32(-4.0), np.float32(4.0))
    x2 = x * x
    p = np.full_like(x, _ERF_P[0])
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = np.full_like(x, _ERF_Q[0])
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


_SQRT_HALF = np.float32(math.sqrt(0.5))


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU: transformers' "gelu" (GPT-NeoX, BERT)."""
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


def rotary_tables(n_ctx: int, n_rot: int, theta: float, freq_scale: float = 1.0,
                  freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (n_ctx, n_rot/2) for position p and pair i:
    angle p * theta^(-2i/n_rot) * freq_scale / freq_factors[i], computed as
    transformers does (f32 inverse frequencies times f32 positions). freq_scale:
    linear rope scaling (1 / factor); freq_factors: Llama 3's rope_freqs.weight."""
    inv_freq = (1.0 / (theta ** (np.arange(0, n_rot, 2, dtype=np.int64).astype(np.float32) / n_rot))).astype(
        np.float32)
    if freq_factors is not None:
        inv_freq = (inv_freq / np.asarray(freq_factors, dtype=np.float32)).astype(np.float32)
    if freq_scale != 1.0:
        inv_freq = (inv_freq * np.float32(freq_scale)).astype(np.float32)
    angles = np.arange(n_ctx, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first n_rot dims, in place.

    x: (T, heads, hd); cos, sin: (T, n_rot/2). GPT-J does this natively;
    LLaMA does it on its permuted wq/wk rows, equal to transformers'
    rotate-half on the unpermuted ones.
    """
    # A pair is a complex number a + ib; rotating it is one complex product,
    # (a c - b s) + i (a s + b c): a single vectorised op instead of eight.
    half = cos.shape[-1]
    rot = np.empty(cos.shape, dtype=np.complex64)
    rot.real, rot.imag = cos, sin
    pairs = x[..., : 2 * half].view(np.complex64)  # (T, heads, half), a view: x changes in place
    pairs *= rot[:, None, :]


def rotate_halves(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate halves (x[i], x[i + n_rot/2]) of the first n_rot dims, in place:
    transformers' rotate_half on HF's own row order (GPT-NeoX).

    x: (T, heads, hd); cos, sin: (T, n_rot/2).
    """
    half = cos.shape[-1]
    a, b = x[..., :half].copy(), x[..., half:2 * half].copy()  # (T, heads, half)
    c, s = cos[:, None, :], sin[:, None, :]
    x[..., :half] = a * c - b * s
    x[..., half:2 * half] = b * c + a * s


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, group: int,
                     window: int = 0) -> np.ndarray:
    """Scaled dot-product attention of T new positions over S = start + T cached ones.

    q: (T, nq, hd); k, v: (n_cache, S, hd), the cache up to this step, where
    each cached head serves `group` consecutive query heads (nq = n_cache x
    group), so the matmuls read the cache in place (broadcast over the group).
    Every query head gets its own (T, hd) @ (hd, S) product, whatever the
    grouping: a rank whose KV groups straddle ranks (group 1) then computes
    bit for bit what one rank does (group 3), and the block kernels' q8_0
    activations cannot round differently (docs/design.md §5).
    window > 0: position p sees keys p - window < j <= p only (transformers'
    sliding-window mask: the window counts p itself). Returns (T, nq * hd).
    """
    T, nq, hd = q.shape
    S, n_cache = k.shape[1], k.shape[0]
    scale = np.float32(1.0 / math.sqrt(hd))
    if T == 1 and 0 < window < S:  # decode: only the last `window` keys, a view of the cache
        k, v = k[:, S - window:], v[:, S - window:]
    qh = q.reshape(T, n_cache, group, hd).transpose(1, 2, 0, 3)  # (n_cache, group, T, hd)
    scores = qh @ k.transpose(0, 2, 1)[:, None]  # (n_cache, group, T, S)
    scores *= scale
    if T > 1:
        pos = start + np.arange(T)[:, None]
        mask = np.arange(S)[None, :] > pos  # position start+t sees <= start+t
        if window > 0:
            mask |= np.arange(S)[None, :] <= pos - window
        scores[..., mask] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ v[:, None]  # (n_cache, group, T, hd)
    return out.transpose(2, 0, 1, 3).reshape(T, nq * hd)  # cache-head-major, group-minor = query-head order


def head_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis of (T, heads, hd), the same hd weights for every head (Qwen3's q/k norms)."""
    var = (x * x).mean(axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(var + np.float32(eps))) * weight


def self_attention(m: RankContext, layer: int, qkv: np.ndarray, start: int,
                   rotate: Callable[[np.ndarray, np.ndarray, np.ndarray], None] = rotate_pairs,
                   q_norm: np.ndarray | None = None, k_norm: np.ndarray | None = None) -> np.ndarray:
    """The attention of one layer from the fused q|k|v projection of this rank.

    qkv: (T, (nq + 2 nkv) hd) = this rank's query heads, then its KV heads'
    keys and values. Normalises each q and k head when q_norm/k_norm are
    given (before rotary, as Qwen3 does), rotates q and k (`rotate`:
    rotate_pairs or rotate_halves), appends k and v to the cache at
    [start, start + T), attends (within hp.sliding_window when set). Returns
    (T, nq hd), the input of the column-split output projection.
    """
    T = qkv.shape[0]
    nq, nkv, hd = m.n_q, m.n_kv, m.hp.head_dim
    heads = qkv.reshape(T, nq + 2 * nkv, hd)
    k_cache, v_cache = m.cache.k[layer], m.cache.v[layer]
    if T == 1:  # decode: norms, rotary, cache write and attention in one compiled call
        return _attend_one(m, heads[0], k_cache, v_cache, start, rotate is rotate_halves, q_norm, k_norm)
    if q_norm is not None and k_norm is not None:
        heads[:, :nq] = head_rms_norm(heads[:, :nq], q_norm, m.hp.norm_eps)
        heads[:, nq:nq + nkv] = head_rms_norm(heads[:, nq:nq + nkv], k_norm, m.hp.norm_eps)
    cos, sin = m.rope_cos[start:start + T], m.rope_sin[start:start + T]
    rotate(heads[:, : nq + nkv], cos, sin)
    k_cache[:, start:start + T] = heads[:, nq:nq + nkv].transpose(1, 0, 2)
    v_cache[:, start:start + T] = heads[:, nq + nkv:].transpose(1, 0, 2)
    S = start + T
    k, v, group = k_cache[:, :S], v_cache[:, :S], m.cache_group
    if not group:  # a KV group straddles ranks: each query head's cached head, gathered for this step
        k, v, group = k[m.cache_of_q], v[m.cache_of_q], 1
    return causal_attention(heads[:, :nq], k, v, start, group, m.hp.sliding_window)


_NO_NORM = np.empty(0, dtype=np.float32)


def _attend_one(m: RankContext, heads: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int,
                halves: bool, q_norm: np.ndarray | None, k_norm: np.ndarray | None) -> np.ndarray:
    """self_attention of one token at pos (heads (nq + 2 nkv, hd), C-contiguous): (1, nq hd)."""
    out = np.empty((1, m.n_q * heads.shape[1]), dtype=np.float32)
    scores = np.empty(pos + 1, dtype=np.float32)
    normed = q_norm is not None and k_norm is not None
    _compiled().attend_one(heads, k_cache, v_cache, pos, m.rope_cos[pos], m.rope_sin[pos], halves, m.cache_of_q,
                           m.hp.sliding_window, q_norm if normed else _NO_NORM,
                           k_norm if normed else _NO_NORM, m.hp.norm_eps, scores,
                           out.reshape(m.n_q, heads.shape[1]))
    return out
