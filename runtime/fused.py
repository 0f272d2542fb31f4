"""A one-token decode step's layers in one compiled call (docs/design.md §5, "Compiled decode").

models.decoder.Decoder.forward runs a layer as ~10 Python-level steps: 4
block products, 3 compiled ops, 2 all-reduces and the bookkeeping between.
For SmolLM2 (30 layers, 4 ms a token) that is ~1 ms of Python a token which
does not shrink when ranks split the matrices, so 2 ranks could not reach
1.7x one. Here every layer of a decode step runs inside one numba call, out
of the very functions the Python path calls (models.compiled's norm,
attention and SiLU steps, runtime.kernels' q8_0 quantizer and products), in
the same order, so both paths give the same bits (tests compare them).

A step is 2 stages per layer, each ending in an all-reduce of its f64
partial sum: the attention half (norm, q|k|v product and bias, attention,
the output projection) and the MLP half (norm, gate|up, SiLU, down). The
all-reduce happens inside the call when the communicator allows
(one rank: nothing to add; ranks of one host: runtime.shmcomm's atomics);
otherwise, or when the peers are not there within a bounded spin, the call
returns the stage whose sum is due and the caller completes it (MPI, or
runtime.shmcomm under the communicator's deadline) and calls again from
the next stage.

Used when a rank's layers are all block matrices (runtime.weights.BlockMatrix,
not --exact) and the family's layer is the plain decoder's
(Decoder.compiled_decode); at -t > 1 the products inside the step run on the
rank's threads (kernels.row_product_threaded), the rest on one. Everything
else, prefill and verify's traced runs take the Python path.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import carray, njit
from numba.core import types
from numba.extending import intrinsic

from netp.models import compiled as ops
from netp.models.architecture import Architecture
from netp.models.context import RankContext
from netp.models.decoder import Decoder
from netp.runtime import kernels
from netp.runtime.comm import Comm
from netp.runtime.kvcache import KVCache
from netp.runtime.shmcomm import SPINS, await_sum, publish
from netp.runtime.weights import BlockMatrix

DONE = -1
# reduce modes: how a stage's partial sum becomes the sum over ranks
SOLO, SHARED, CALLER = 0, 1, 2


@njit(cache=True, nogil=True)
def _reduce(mode, part, counters, stride, rank, payloads0, payloads1, round_box):
    """True when part holds the sum over ranks (SOLO: it does; SHARED: published and every peer
    seen within SPINS reads); False: the caller completes it."""
    if mode == SOLO:
        return True
    if mode == CALLER:
        return False
    s = round_box[0] + 1
    round_box[0] = s
    payloads = payloads0 if s % 2 == 0 else payloads1
    publish(counters, stride, rank, payloads[rank], part[0], s)
    return await_sum(counters, stride, payloads, s, SPINS, part[0])


# Where a rank's arrays are, for the compiled step: tables of addresses, not numba typed lists (building
# those costs ~0.2 s per element type at every start, compiling their methods: 0.8 s of a 1.8 s load).
# CompiledDecode keeps every array it lists alive for as long as it lives.
_MAT_FIELDS = 8  # a matrix's row: kind, tiles, blocks, words per block row, rows, codes, scales, q4_1 minimums


def _pointer_to(t: Any) -> Any:
    @intrinsic
    def pointer(typingctx, addr):  # an int64 address as a typed pointer
        sig = types.misc.CPointer(t)(types.int64)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
        return sig, codegen
    return pointer


_u32_at, _u16_at, _f32_at = _pointer_to(types.uint32), _pointer_to(types.uint16), _pointer_to(types.float32)


@njit(cache=True, nogil=True)
def _product(mats, j, x, out, threaded):
    """out (1, tiles R) f64 = x (1, n_in) times matrix j of the table (kernels.row_product, or its
    threaded form)."""
    kind, tiles, nb, words, rows = mats[j, 0], mats[j, 1], mats[j, 2], mats[j, 3], mats[j, 4]
    qs = carray(_u32_at(mats[j, 5]), (tiles, nb, words, kernels.R))
    d = carray(_u16_at(mats[j, 6]), (tiles, nb, kernels.R))
    m = carray(_u16_at(mats[j, 7]), (tiles if kind == 1 else 0, nb if kind == 1 else 0, kernels.R))
    if threaded:
        kernels.row_product_threaded(kind, qs, d, m, x, out)
    else:
        kernels.row_product(kind, qs, d, m, x, out)


@njit(cache=True, nogil=True)
def _vector(vecs, i):
    """Vector i of the table (address, length) as an f32 array (length 0: none)."""
    return carray(_f32_at(vecs[i, 0]), (vecs[i, 1],))


@njit(cache=True, nogil=True)
def _stages(first, x, part, h, delta, qkv, heads_out, gate_up, act, scores, out0, out1, out2, out3,
            mats, vecs, eps, k_all, v_all, pos, cos, sin, halves, cache_of_q, window, threaded,
            mode, counters, stride, rank, payloads0, payloads1, round_box):
    """Stages first.. of a decode step (see the module's docstring); returns the stage whose
    all-reduce the caller must complete, or DONE with x holding the layers' output.

    x (1, n) f32 the residual stream (in place); part (1, n) f64 the stage's partial sum, on
    entry (first > 0) the sum over ranks of stage first - 1. mats: one row per matrix
    (_MAT_FIELDS), matrix 4 i + j of layer i: j = 0 q|k|v, 1 output projection, 2 gate|up,
    3 down. vecs: (address, length) of f32 vectors, 5 per layer i from 5 i: attention norm, MLP
    norm, q|k|v bias, q norm, k norm (length 0: none). Scratch: h, delta (1, n) f32; qkv
    (1, (nq + 2 nkv) hd) f32; heads_out (1, nq hd) f32; gate_up (1, 2 f) f32; act (1, f) f32;
    scores (n_ctx,) f32; out0..out3 (1, tiles R) f64 of the 4 matrices. threaded: the products on the
    calling thread's numba threads (kernels.set_threads)."""
    n_stages = 2 * (mats.shape[0] // 4)
    nq = heads_out.shape[1] // k_all.shape[3]
    hd = k_all.shape[3]
    for k in range(first, n_stages):
        layer = k // 2
        norm = _vector(vecs, 5 * layer + k % 2)
        if k == 0:
            ops.rms_norm_into(x, _NO_ROWS, norm, eps, h)
        else:
            for i in range(x.shape[1]):
                delta[0, i] = np.float32(part[0, i])
            ops.rms_norm_into(x, delta, norm, eps, h)
        if k % 2 == 0:  # attention
            j = 4 * layer
            _product(mats, j, h, out0, threaded)
            b = _vector(vecs, 5 * layer + 2)
            for i in range(qkv.shape[1]):
                qkv[0, i] = np.float32(out0[0, i])
                if b.shape[0] > 0:
                    qkv[0, i] += b[i]
            heads = qkv.reshape((qkv.shape[1] // hd, hd))
            ops.attend_one(heads, k_all[layer], v_all[layer], pos, cos, sin, halves, cache_of_q, window,
                           _vector(vecs, 5 * layer + 3), _vector(vecs, 5 * layer + 4), eps, scores,
                           heads_out.reshape((nq, hd)))
            _product(mats, j + 1, heads_out, out1, threaded)
            o = out1
        else:  # MLP
            j = 4 * layer + 2
            _product(mats, j, h, out2, threaded)
            for i in range(gate_up.shape[1]):
                gate_up[0, i] = np.float32(out2[0, i])
            ops.silu_mul(gate_up, act)
            _product(mats, j + 1, act, out3, threaded)
            o = out3
        for i in range(part.shape[1]):
            part[0, i] = o[0, i]
        if not _reduce(mode, part, counters, stride, rank, payloads0, payloads1, round_box):
            return k
    for i in range(x.shape[1]):
        x[0, i] += np.float32(part[0, i])
    return DONE


_NO_ROWS = np.empty((0, 0), dtype=np.float32)
_NO_VALUES = np.empty(0, dtype=np.float32)
_NO_PAYLOADS = np.zeros((2, 2), dtype=np.float64)[:, :1]  # not contiguous, as the shared window's (one compile)
_NO_COUNTERS = np.zeros(1, dtype=np.int64)


class CompiledDecode:
    """One rank's compiled decode step: its layers' block matrices and scratch, made once at load.

    layers: every layer's weights by the forward's names (Architecture.runtime_tensors), each matrix a
    runtime.weights.BlockMatrix."""

    def __init__(self, m: RankContext, arch: Architecture, cache: KVCache, layers: list[dict[str, Any]],
                 comm: Comm, nthread: int):
        hp = m.hp
        n = hp.n_embd
        self.comm, self.nthread = comm, nthread
        mats = [layers[i][key].tiles for i in range(hp.n_layer) for key in ("wqkv", "wo", "w13", "w2")]
        self.mats = np.array([[t.kind, t.words.shape[0], t.words.shape[1], t.words.shape[2], t.rows,
                               t.words.ctypes.data, t.d16.ctypes.data, t.m16.ctypes.data] for t in mats],
                             dtype=np.int64)
        vec = lambda v: _NO_VALUES if v is None else np.ascontiguousarray(v, dtype=np.float32)  # noqa: E731
        normed = all(w.get("q_norm") is not None and w.get("k_norm") is not None for w in layers)
        vectors = [vec(v) for w in layers for v in (w["attention_norm"], w["ffn_norm"], w.get("bqkv"),
                                                     w.get("q_norm") if normed else None,
                                                     w.get("k_norm") if normed else None)]
        self.vecs = np.array([[v.ctypes.data, v.shape[0]] for v in vectors], dtype=np.int64)
        self._held = (mats, vectors)  # what the tables point into: alive as long as this step
        hd = hp.head_dim
        width = lambda t: t.qs.shape[0] * kernels.R  # noqa: E731
        self.outs = [np.empty((1, max(width(mats[4 * i + j]) for i in range(hp.n_layer))), dtype=np.float64)
                     for j in range(4)]
        self.x_part = np.empty((1, n), dtype=np.float64)
        self.h, self.delta = np.empty((1, n), dtype=np.float32), np.empty((1, n), dtype=np.float32)
        self.qkv = np.empty((1, mats[0].rows), dtype=np.float32)
        self.heads_out = np.empty((1, m.n_q * hd), dtype=np.float32)
        self.gate_up = np.empty((1, mats[2].rows), dtype=np.float32)
        self.act = np.empty((1, mats[2].rows // 2), dtype=np.float32)
        self.scores = np.empty(cache.k_all.shape[2], dtype=np.float32)  # n_ctx
        self.m, self.cache = m, cache
        assert isinstance(arch, Decoder)  # possible() said so
        self.halves = arch.rotates_halves
        shm = comm.shm
        if comm.size == 1:
            self.mode, self.shm_args = SOLO, None
        elif shm is not None and shm.fits(self.x_part.nbytes):
            self.mode, self.shm_args = SHARED, shm.fused_args(n)
        else:
            self.mode, self.shm_args = CALLER, None
        # Compiled (first start) or loaded from numba's cache now, with this rank's very argument types, not
        # in the first decode step (measured: 30-70 ms there). From the last stage: no layer runs.
        with kernels.cache_lock():
            self._stages(2 * hp.n_layer, np.zeros((1, n), dtype=np.float32), 0, nthread > 1)

    @staticmethod
    def possible(m: RankContext, arch: Architecture, layers: list[dict[str, Any]], nthread: int,
                 exact: bool) -> bool:
        """Whether a rank's layers can take the compiled step: a plain decoder's layers (Decoder.compiled_decode),
        every matrix of every layer in block form (runtime.weights.BlockMatrix), f32 activations not asked."""
        if not isinstance(arch, Decoder) or not arch.compiled_decode:
            return False
        if exact or not layers or m.n_q < 1:
            return False
        return all(isinstance(w.get(key), BlockMatrix) for w in layers for key in ("wqkv", "wo", "w13", "w2"))

    def run(self, x: np.ndarray, pos: int) -> None:
        """Every layer of one token at position pos on x (1, n_embd) f32, in place."""
        if self.mode == SHARED:  # what comm.allreduce would count (the CALLER mode's go through it)
            self.comm.traffic.allreduce += self.mats.shape[0] // 2 * self.x_part.nbytes
        threaded = kernels.set_threads(self.nthread)  # (per calling thread: numba's setting is)
        stage = 0
        while True:
            stage = self._stages(stage, x, pos, threaded)
            if stage == DONE:
                return
            if self.mode == SHARED:  # the peers were late: wait under the communicator's deadline
                self.comm.wait_shm(self.x_part)
            else:
                self.x_part[:] = self.comm.allreduce(self.x_part)
            stage += 1

    def _stages(self, first: int, x: np.ndarray, pos: int, threaded: bool) -> int:
        m = self.m
        counters, stride, rank, p0, p1, box = self.shm_args or (_NO_COUNTERS, 0, 0, _NO_PAYLOADS, _NO_PAYLOADS,
                                                                 _NO_COUNTERS)
        return _stages(first, x, self.x_part, self.h, self.delta, self.qkv, self.heads_out, self.gate_up, self.act,
                       self.scores, *self.outs, self.mats, self.vecs, m.hp.norm_eps, self.cache.k_all,
                       self.cache.v_all, pos, m.rope_cos[pos],
                       m.rope_sin[pos], self.halves, m.cache_of_q, m.hp.sliding_window, threaded, self.mode,
                       counters, stride, rank, p0, p1, box)
