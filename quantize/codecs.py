"""ggml block codecs (q4_0, q4_1, q8_0) as vectorised numpy, bit-exact with gguf-py.

gguf-py's shape: one codec per GGMLType in `CODECS`, each a pair of functions
(n_blocks, 32) float32 <-> (n_blocks, bytes_per_block) uint8 that write into a
caller's buffer, so a row chunk goes straight into the output file's layout.
`quantize_rows` / `dequantize_rows` are what other stages call; F32 and F16
pass through them too, so callers never special-case a type.

The oracle is gguf 0.19.0's gguf/quants.py (pinned in pyproject). Its
arithmetic is reproduced step for step in float32 (docs/design.md §3):
- d is stored as f16, but the codes use the unrounded f32 d through
  id = 1/d (0 when d == 0); dividing by d instead flips exact .5 ties.
- q4_0: mx = the first value with the largest |x| (sign kept), d = mx / -8,
  q = min(15, trunc(x*id + 8.5)), the product and the sum each rounded to f32.
- q4_1: d = (max - min) / 15, q = min(15, trunc((x - min)*id + 0.5)).
- q8_0: d = max|x| / 127, q = x*id rounded half away from zero.
- 4-bit codes: byte j holds q[j] (low nibble) and q[j + 16] (high nibble).

Speed: the oracle makes ~10 full-size temporaries per call and reduces 32
values per inner-loop call. Here each chunk of CHUNK_BLOCKS blocks is
transposed once into a (8 units, n blocks x 4 values) scratch layout (see
_transposed), so reductions and arithmetic are long contiguous loops in
reused buffers; the only slow paths (ties between +a and -a for the largest
|x|, which include all-zero blocks; zero extremes in q4_1; subnormal scales)
touch just those blocks. Dequantize of 4-bit types works in the same layout;
nothing is float64. Chunks are independent,
so `nthread > 1` spreads them over a thread pool (numpy releases the GIL
inside its loops).
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from netp.formats.constants import BLOCK_SIZE, GGMLType, block_geometry

__all__ = [
    "BlockCodec", "CODECS", "NonFiniteError", "quantize_blocks", "dequantize_blocks",
    "quantize_rows", "dequantize_rows", "CHUNK_BLOCKS",
]

QK = BLOCK_SIZE  # 32 values per block
HALF = QK // 2
# Blocks per work unit (2 MB of f32 in). Each numpy call is a GIL hand-off
# between threads, which on this VM costs tens of microseconds: with 4096-block
# chunks two threads gained next to nothing, with 16384 up to 1.9x (q4_0,
# 128 MB). At 32768 the scratch outgrows the 2 MB L2 and one thread runs 2x
# slower per block.
CHUNK_BLOCKS = 16384


class NonFiniteError(ValueError):
    """A block holds NaN or inf; `block` is its index in the array given."""

    def __init__(self, block: int):
        self.block = block
        super().__init__(f"NaN or inf in block {block}")


# -- scratch buffers (per thread, reused across chunks) ------------------------

_tls = threading.local()


def _scratch(key: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A per-thread buffer reused across chunks (grown when a chunk is larger)."""
    n = math.prod(shape)
    buf = getattr(_tls, key, None)
    if buf is None or buf.size < n or buf.dtype != dtype:
        buf = np.empty(n, dtype=dtype)
        setattr(_tls, key, buf)
    return buf[:n].reshape(shape)


def _check_finite(lo: np.ndarray, hi: np.ndarray) -> None:
    """lo/hi are per-block min/max (NaN propagates through them, inf shows in them)."""
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if bad.any():
        raise NonFiniteError(int(np.flatnonzero(bad)[0]))


def _reciprocal(d: np.ndarray) -> np.ndarray:
    """id = 1/d in float32, 0 where d == 0 (the oracle's np.where(d == 0, 0, 1 / d))."""
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.divide(np.float32(1), d, dtype=np.float32)
    inv[d == 0] = 0
    return inv


# The work layout. Reducing 32 contiguous values per block makes numpy call
# its inner loop once per block (~10x slower than a long loop), so each chunk
# is first transposed to (8, n, 4): unit g of every block in one contiguous
# row, 4 floats (16 bytes) per unit. The transpose moves 16-byte units (4x
# fewer than floats), every later step is a long contiguous SIMD loop, and
# the packed codes go back to the row layout as 4-byte units.
UNIT = 4  # floats per 16-byte unit
N_UNITS = QK // UNIT


def _transposed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, 32) C-contiguous -> (xt, hi, lo): xt (8, n*4) in scratch, per-block max/min (n,)."""
    n = x.shape[0]
    xt = _scratch("xt", (N_UNITS, n * UNIT), np.float32)
    np.copyto(xt.view(np.complex128), x.view(np.complex128).reshape(n, N_UNITS).T)
    hi4 = xt.max(axis=0).reshape(n, UNIT)
    lo4 = xt.min(axis=0).reshape(n, UNIT)
    hi = np.maximum(np.maximum(hi4[:, 0], hi4[:, 1]), np.maximum(hi4[:, 2], hi4[:, 3]))
    lo = np.minimum(np.minimum(lo4[:, 0], lo4[:, 1]), np.minimum(lo4[:, 2], lo4[:, 3]))
    _check_finite(lo, hi)
    return xt, hi, lo


def _per_value(v: np.ndarray) -> np.ndarray:
    """A per-block (n,) vector laid out to broadcast over xt's rows: (n*4,)."""
    return np.repeat(v, UNIT)


def _oracle_max_min(x: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> None:
    """Recompute hi/lo with the oracle's own reduction where an extreme is a zero.

    max/min of +0 and -0 depend on the order of comparisons, and the sign of
    the zero reaches the f16 bytes; the oracle reduces along each block.
    """
    fix = np.flatnonzero((hi == 0) | (lo == 0))
    if fix.size:
        sub = x[fix]
        hi[fix] = sub.max(axis=-1)
        lo[fix] = sub.min(axis=-1)


def _codes_t(yt: np.ndarray, offset: float) -> np.ndarray:
    """trunc(yt + offset) as uint8 codes clamped to 15 (yt (8, n*4) f32, yt + offset in [0, 16.5]).

    The add writes straight into uint8 (numpy casts each result, truncating:
    the oracle's np.trunc + astype), and min(15, q) is done on four codes at
    a time as uint32: q - (q >> 4 & 1) per byte maps 16 to 15 and leaves 0..15.
    """
    qt = _scratch("qt", yt.shape, np.uint8)
    np.add(yt, np.float32(offset), out=qt, casting="unsafe")
    q32 = qt.view(np.uint32)
    sixteen = _scratch("q16", q32.shape, np.uint32)
    np.right_shift(q32, 4, out=sixteen)
    np.bitwise_and(sixteen, np.uint32(0x01010101), out=sixteen)
    np.subtract(q32, sixteen, out=q32)
    return qt


def _pack_nibbles_t(qt: np.ndarray, out: np.ndarray) -> None:
    """qt (8, n*4) uint8 codes 0..15 -> out (n, 16) row bytes: q[j] | q[j + 16] << 4.

    Worked on as uint32 (4 codes at a time: a code <= 15 shifted by 4 stays in
    its byte); unit g < 4 pairs with unit g + 4, as value j with j + 16.
    """
    n = qt.shape[1] // UNIT
    q32 = qt.view(np.uint32)  # (8, n): 4 codes of one unit of one block
    half = N_UNITS // 2
    packed = _scratch("packed", (half, n), np.uint32)
    np.left_shift(q32[half:], 4, out=packed)
    np.bitwise_or(packed, q32[:half], out=packed)
    np.copyto(out.view(np.uint32), packed.T)


def _store_f16(values: np.ndarray, out: np.ndarray) -> None:
    """values (n,) f32 -> out (n, 2) uint8 as little-endian f16 (round to nearest even)."""
    np.copyto(out.view("<f2"), values[:, None], casting="same_kind")


def _load_f16(raw: np.ndarray) -> np.ndarray:
    """raw (n, 2) uint8 -> (n, 1) float32."""
    return raw.view("<f2").astype(np.float32)


def _pack_rows(q: np.ndarray) -> np.ndarray:
    """q (n, 32) uint8 -> (n, 16): the oracle's nibble packing, for fix-up rows."""
    return q[:, :HALF] | (q[:, HALF:] << np.uint8(4))


# -- quantize --------------------------------------------------------------------
# Blocks whose 1/d overflows (|d| below ~3e-39, values near
# FLT_MIN) make the oracle cast inf/NaN; those few rows are redone with the
# oracle's own expression so even they match.

def _q4_0_quantize(x: np.ndarray, out: np.ndarray) -> None:
    xt, hi, lo = _transposed(x)
    # The value with the largest |x|, sign kept. Where |min| == |max| (which
    # includes all-zero blocks, where the sign of the zero reaches d's bytes)
    # the oracle takes the first such value: resolve those with its argmax.
    neg_lo = -lo
    mx = np.where(neg_lo > hi, lo, hi)
    tie = np.flatnonzero(neg_lo == hi)
    if tie.size:
        sub = x[tie]
        mx[tie] = np.take_along_axis(sub, np.abs(sub).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = mx / np.float32(-8)
    inv = _reciprocal(d)
    np.multiply(xt, _per_value(inv), out=xt)
    _pack_nibbles_t(_codes_t(xt, 8.5), out[:, 2:])
    _store_f16(d, out[:, 0:2])
    odd = np.flatnonzero(~np.isfinite(inv))
    if odd.size:
        y = np.trunc(x[odd] * inv[odd, None] + np.float32(8.5), dtype=np.float32)
        out[odd, 2:] = _pack_rows(y.astype(np.uint8).clip(0, 15))


def _q4_1_quantize(x: np.ndarray, out: np.ndarray) -> None:
    xt, hi, lo = _transposed(x)
    _oracle_max_min(x, hi, lo)
    d = (hi - lo) / np.float32(15)
    inv = _reciprocal(d)
    np.subtract(xt, _per_value(lo), out=xt)
    np.multiply(xt, _per_value(inv), out=xt)
    _pack_nibbles_t(_codes_t(xt, 0.5), out[:, 4:])
    _store_f16(d, out[:, 0:2])
    _store_f16(lo, out[:, 2:4])
    odd = np.flatnonzero(~(np.isfinite(inv) & np.isfinite(d)))
    if odd.size:
        y = np.trunc((x[odd] - lo[odd, None]) * inv[odd, None] + np.float32(0.5), dtype=np.float32)
        out[odd, 4:] = _pack_rows(y.astype(np.uint8).clip(0, 15))


def _q8_0_quantize(x: np.ndarray, out: np.ndarray) -> None:
    n = x.shape[0]
    xt, hi, lo = _transposed(x)
    amax = np.maximum(np.abs(hi), np.abs(lo))  # abs: a zero block gives +0, as the oracle
    d = amax / np.float32(127)
    inv = _reciprocal(d)
    np.multiply(xt, _per_value(inv), out=xt)
    # Round half away from zero, exactly: t = trunc(y); q = t + trunc(2*(y - t)).
    # (y - t and its doubling are exact in f32; trunc(y + copysign(0.5, y))
    # would round some values just below .5 up.) The last two steps write
    # int8 directly: 2*(y - t) is in (-2, 2), and the cast truncates.
    t = _scratch("t", xt.shape, np.float32)
    np.trunc(xt, out=t)
    np.subtract(xt, t, out=xt)
    half_up = _scratch("q8_up", xt.shape, np.int8)
    np.add(xt, xt, out=half_up, casting="unsafe")
    qt = _scratch("q8", xt.shape, np.int8)
    np.add(t, half_up, out=qt, casting="unsafe")  # a whole number in [-127, 127]: exact
    np.copyto(out[:, 2:].view(np.uint32), qt.view(np.uint32).reshape(N_UNITS, n).T)
    _store_f16(d, out[:, 0:2])


# -- dequantize ----------------------------------------------------------------

# 4-bit types work in the quantizer's (8, n*4) unit layout: the 16 code bytes
# of every block are transposed as four uint32 words, split into nibbles four
# codes at a time, widened and scaled in long loops, and moved back to row
# order as 16-byte units (3x faster than nibble lookups in row order).

def _nibbles_t(qs: np.ndarray) -> np.ndarray:
    """qs (n, 16) code bytes -> (8, n*4) uint8 codes in unit layout (unit g: values 4g..4g+3)."""
    n = qs.shape[0]
    half = N_UNITS // 2
    packed = _scratch("dq_packed", (half, n), np.uint32)
    np.copyto(packed, qs.view(np.uint32).T)
    codes = _scratch("dq_codes", (N_UNITS, n), np.uint32)
    np.bitwise_and(packed, np.uint32(0x0F0F0F0F), out=codes[:half])  # values j
    np.right_shift(packed, 4, out=codes[half:])  # values j + 16
    np.bitwise_and(codes[half:], np.uint32(0x0F0F0F0F), out=codes[half:])
    return codes.view(np.uint8)


def _rows_from_t(yt: np.ndarray, out: np.ndarray) -> None:
    """yt (8, n*4) f32 unit layout -> out (n, 32) row order, moved as 16-byte units."""
    n = out.shape[0]
    np.copyto(out.view(np.complex128), yt.view(np.complex128).reshape(N_UNITS, n).T)


def _q4_0_dequantize(raw: np.ndarray, out: np.ndarray) -> None:
    # The oracle: d * (q - 8) in f32; q - 8 is exact, so widening first changes nothing.
    d = _load_f16(raw[:, 0:2])[:, 0]
    codes = _nibbles_t(raw[:, 2:])
    yt = _scratch("dq_y", codes.shape, np.float32)
    np.subtract(codes, np.float32(8), out=yt)  # uint8 - f32 computes in f32: widen and shift in one pass
    np.multiply(yt, _per_value(d), out=yt)
    _rows_from_t(yt, out)


def _q4_1_dequantize(raw: np.ndarray, out: np.ndarray) -> None:
    # The oracle: (d * q) + m, two f32 roundings, in that order.
    d = _load_f16(raw[:, 0:2])[:, 0]
    m = _load_f16(raw[:, 2:4])[:, 0]
    codes = _nibbles_t(raw[:, 4:])
    yt = _scratch("dq_y", codes.shape, np.float32)
    np.multiply(codes, _per_value(d), out=yt)  # widened to f32 on the way
    np.add(yt, _per_value(m), out=yt)
    _rows_from_t(yt, out)


def _q8_0_dequantize(raw: np.ndarray, out: np.ndarray) -> None:
    # Row order wins here: int8 codes widen straight into place (the unit
    # layout measured 1.3x slower for this type).
    d = _load_f16(raw[:, 0:2])
    np.copyto(out, raw[:, 2:].view(np.int8), casting="unsafe")
    np.multiply(out, d, out=out)


# -- registry ------------------------------------------------------------------

@dataclass(frozen=True)
class BlockCodec:
    """One ggml block type: (n, 32) float32 <-> (n, bytes_per_block) uint8.

    Both functions write into the `out` they are given and raise
    NonFiniteError (quantize) for a block holding NaN or inf.
    """

    ggml_type: GGMLType
    bytes_per_block: int
    quantize: Callable[[np.ndarray, np.ndarray], None]
    dequantize: Callable[[np.ndarray, np.ndarray], None]


def _codec(t: GGMLType, q: Callable, dq: Callable) -> BlockCodec:
    values, nbytes = block_geometry(t)
    assert values == QK
    return BlockCodec(t, nbytes, q, dq)


CODECS: dict[GGMLType, BlockCodec] = {
    GGMLType.Q4_0: _codec(GGMLType.Q4_0, _q4_0_quantize, _q4_0_dequantize),
    GGMLType.Q4_1: _codec(GGMLType.Q4_1, _q4_1_quantize, _q4_1_dequantize),
    GGMLType.Q8_0: _codec(GGMLType.Q8_0, _q8_0_quantize, _q8_0_dequantize),
}


def _get(t: GGMLType) -> BlockCodec:
    try:
        return CODECS[GGMLType(t)]
    except (KeyError, ValueError) as e:
        raise ValueError(f"no block codec for {GGMLType(t).name}") from e


# -- chunked drivers -----------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor(nthread: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < nthread:  # noqa: SLF001
            _pool = ThreadPoolExecutor(max_workers=nthread, thread_name_prefix="netp-codec")
        return _pool


def _run_chunks(work: Callable[[int, int], None], n_blocks: int, nthread: int) -> None:
    """Call work(a, b) over [0, n_blocks) in CHUNK_BLOCKS pieces, on nthread threads."""
    starts = range(0, n_blocks, CHUNK_BLOCKS)
    if nthread <= 1 or n_blocks <= CHUNK_BLOCKS:
        for a in starts:
            work(a, min(a + CHUNK_BLOCKS, n_blocks))
        return
    # Contiguous spans per thread (one task each) keep the hand-offs few.
    per = -(-len(starts) // nthread) * CHUNK_BLOCKS

    def span(a0: int) -> None:
        for a in range(a0, min(a0 + per, n_blocks), CHUNK_BLOCKS):
            work(a, min(a + CHUNK_BLOCKS, n_blocks))

    futures = [_executor(nthread).submit(span, a0) for a0 in range(0, n_blocks, per)]
    for f in futures:
        f.result()


def quantize_blocks(blocks: np.ndarray, t: GGMLType, out: np.ndarray | None = None,
                    nthread: int = 1) -> np.ndarray:
    """(n, 32) float32/float16 -> (n, bytes_per_block) uint8 for a block type."""
    codec = _get(t)
    if blocks.ndim != 2 or blocks.shape[1] != QK:
        raise ValueError(f"blocks must have shape (n, {QK}), got {blocks.shape}")
    n = blocks.shape[0]
    if out is None:
        out = np.empty((n, codec.bytes_per_block), dtype=np.uint8)
    convert = blocks.dtype != np.float32 or not blocks.flags.c_contiguous

    def work(a: int, b: int) -> None:
        x = blocks[a:b]
        if convert:
            tmp = _scratch("in", (b - a, QK), np.float32)
            np.copyto(tmp, x, casting="same_kind")
            x = tmp
        try:
            # Inputs are checked finite per block first; what numpy could still
            # warn about is the oracle's own edge arithmetic (subnormal or huge
            # scales), reproduced on purpose.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                codec.quantize(x, out[a:b])
        except NonFiniteError as e:
            raise NonFiniteError(a + e.block) from e

    _run_chunks(work, n, nthread)
    return out


def dequantize_blocks(raw: np.ndarray, t: GGMLType, out: np.ndarray | None = None,
                      nthread: int = 1) -> np.ndarray:
    """(n, bytes_per_block) uint8 -> (n, 32) float32 for a block type."""
    codec = _get(t)
    if raw.ndim != 2 or raw.shape[1] != codec.bytes_per_block:
        raise ValueError(f"raw blocks must have shape (n, {codec.bytes_per_block}), got {raw.shape}")
    n = raw.shape[0]
    if out is None:
        out = np.empty((n, QK), dtype=np.float32)
    _run_chunks(lambda a, b: codec.dequantize(raw[a:b], out[a:b]), n, nthread)
    return out


def quantize_rows(x: np.ndarray, t: GGMLType, out: np.ndarray | None = None,
                  nthread: int = 1) -> np.ndarray:
    """float32/float16 (..., n) -> uint8 (..., row_nbytes) in type t's file layout.

    Quantized types need n % 32 == 0. F32 and F16 pass through (F16 rounds to
    nearest even, as numpy and gguf do). Raises NonFiniteError for NaN/inf in a
    quantized block (`.block` counts blocks from the start of x).
    """
    t = GGMLType(t)
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("quantize_rows needs at least one dimension")
    if t in (GGMLType.F32, GGMLType.F16):
        res = np.ascontiguousarray(x, dtype="<f4" if t == GGMLType.F32 else "<f2")
        res = res.view(np.uint8)
        if out is not None:
            np.copyto(out, res.reshape(out.shape))
            return out
        return res
    values, nbytes = block_geometry(t)
    if x.shape[-1] % values:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of the {t.name} block ({values})")
    shape = (*x.shape[:-1], x.shape[-1] // values * nbytes)
    if x.dtype not in (np.float32, np.float16):
        x = x.astype(np.float32)
    blocks = np.ascontiguousarray(x).reshape(-1, values)
    if out is None or not _is_dense(out, shape, np.uint8):
        res = quantize_blocks(blocks, t, None, nthread).reshape(shape)
        if out is None:
            return res
        np.copyto(out, res)
        return out
    quantize_blocks(blocks, t, out.reshape(-1, nbytes), nthread)
    return out


def _is_dense(a: np.ndarray, shape: tuple[int, ...], dtype: type) -> bool:
    """Whether `a` can be written through a reshape (C-contiguous, exact shape and dtype)."""
    if a.shape != shape:
        raise ValueError(f"out has shape {a.shape}, expected {shape}")
    return a.dtype == dtype and a.flags.c_contiguous


def dequantize_rows(raw: np.ndarray, t: GGMLType, out: np.ndarray | None = None,
                    nthread: int = 1) -> np.ndarray:
    """uint8 (..., row_nbytes) in type t's layout -> float32 (..., n).

    F32/F16 pass through: raw may be uint8 bytes or already typed (as
    NEReader.view gives them); F32 without `out` returns a view of raw, no copy.
    `out` (any strides) receives the values; a C-contiguous float32 `out` is
    written in place with no temporary. Raw rows may be strided (e.g. a column
    slice of a memory-mapped tensor): they are gathered once (1/7 of the f32
    size for q4_0).
    """
    t = GGMLType(t)
    raw = np.asarray(raw)
    if t in (GGMLType.F32, GGMLType.F16):
        dtype = np.dtype("<f4" if t == GGMLType.F32 else "<f2")
        typed = raw if raw.dtype == dtype else np.ascontiguousarray(raw).view(dtype)
        if out is None:
            return typed if t == GGMLType.F32 else typed.astype(np.float32)
        np.copyto(out, typed.reshape(out.shape), casting="same_kind")
        return out
    values, nbytes = block_geometry(t)
    if raw.dtype != np.uint8:
        raise ValueError(f"{t.name} rows must be uint8 bytes, got {raw.dtype}")
    if raw.shape[-1] % nbytes:
        raise ValueError(f"row of {raw.shape[-1]} bytes is not whole {t.name} blocks of {nbytes}")
    shape = (*raw.shape[:-1], raw.shape[-1] // nbytes * values)
    blocks = np.ascontiguousarray(raw).reshape(-1, nbytes)
    if out is None or not _is_dense(out, shape, np.float32):
        res = dequantize_blocks(blocks, t, None, nthread).reshape(shape)
        if out is None:
            return res
        np.copyto(out, res)  # a strided or f16/f64 destination: one extra copy
        return out
    dequantize_blocks(blocks, t, out.reshape(-1, values), nthread)
    return out
