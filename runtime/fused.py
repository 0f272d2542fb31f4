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

Used when a rank's layers are all block matrices at one thread
(runtime.weights.BlockMatrix, -t 1, not --exact) and the family's layer is
the plain decoder's (Decoder.compiled_decode); everything else, prefill and
verify's traced runs take the Python path.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit
from numba.typed import List

from netp.models import compiled as ops
from netp.models.architecture import Architecture
from netp.models.context import RankContext
from netp.models.decoder import Decoder
from netp.runtime import kernels
from netp.runtime.comm import Comm
from netp.runtime.kvcache import KVCache
from netp.runtime.shmcomm import SPINS, await_sum, publish

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


@njit(cache=True, nogil=True)
def _stages(first, x, part, h, delta, qkv, heads_out, gate_up, act, scores, outs,
            kinds, words, d16, m16, norms, biases, q_norms, k_norms, eps,
            k_all, v_all, pos, cos, sin, halves, cache_of_q, window,
            mode, counters, stride, rank, payloads0, payloads1, round_box):
    """Stages first.. of a decode step (see the module's docstring); returns the stage whose
    all-reduce the caller must complete, or DONE with x holding the layers' output.

    x (1, n) f32 the residual stream (in place); part (1, n) f64 the stage's partial sum, on
    entry (first > 0) the sum over ranks of stage first - 1. Matrix 4 i + j of layer i: j = 0
    q|k|v, 1 output projection, 2 gate|up, 3 down; norms[2 i], norms[2 i + 1]: attention and
    MLP norm. Scratch: h, delta (1, n) f32; qkv (1, (nq + 2 nkv) hd) f32; heads_out (1, nq hd)
    f32; gate_up (1, 2 f) f32; act (1, f) f32; scores (n_ctx,) f32; outs[j] (1, tiles R) f64."""
    n_stages = len(norms)
    nq = heads_out.shape[1] // k_all.shape[3]
    hd = k_all.shape[3]
    for k in range(first, n_stages):
        if k == 0:
            ops.rms_norm_into(x, _NO_ROWS, norms[0], eps, h)
        else:
            for i in range(x.shape[1]):
                delta[0, i] = np.float32(part[0, i])
            ops.rms_norm_into(x, delta, norms[k], eps, h)
        layer = k // 2
        if k % 2 == 0:  # attention
            j = 4 * layer
            o = outs[0]
            kernels.row_product(kinds[j], words[j], d16[j], m16[j], h, o)
            b = biases[layer]
            for i in range(qkv.shape[1]):
                qkv[0, i] = np.float32(o[0, i])
                if b.shape[0] > 0:
                    qkv[0, i] += b[i]
            heads = qkv.reshape((qkv.shape[1] // hd, hd))
            ops.attend_one(heads, k_all[layer], v_all[layer], pos, cos, sin, halves, cache_of_q, window,
                           q_norms[layer], k_norms[layer], eps, scores, heads_out.reshape((nq, hd)))
            o = outs[1]
            kernels.row_product(kinds[j + 1], words[j + 1], d16[j + 1], m16[j + 1], heads_out, o)
        else:  # MLP
            j = 4 * layer + 2
            o = outs[2]
            kernels.row_product(kinds[j], words[j], d16[j], m16[j], h, o)
            for i in range(gate_up.shape[1]):
                gate_up[0, i] = np.float32(o[0, i])
            ops.silu_mul(gate_up, act)
            o = outs[3]
            kernels.row_product(kinds[j + 1], words[j + 1], d16[j + 1], m16[j + 1], act, o)
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
                 comm: Comm):
        hp = m.hp
        n = hp.n_embd
        self.comm = comm
        mats = [layers[i][key].tiles for i in range(hp.n_layer) for key in ("wqkv", "wo", "w13", "w2")]
        self.kinds = np.array([t.kind for t in mats], dtype=np.int64)
        self.words, self.d16, self.m16 = List([t.words for t in mats]), List([t.d16 for t in mats]), \
            List([t.m16 for t in mats])
        self.norms = List([w[key] for w in layers for key in ("attention_norm", "ffn_norm")])
        vec = lambda v: _NO_VALUES if v is None else np.ascontiguousarray(v, dtype=np.float32)  # noqa: E731
        self.biases = List([vec(w.get("bqkv")) for w in layers])
        normed = all(w.get("q_norm") is not None and w.get("k_norm") is not None for w in layers)
        self.q_norms = List([vec(w.get("q_norm") if normed else None) for w in layers])
        self.k_norms = List([vec(w.get("k_norm") if normed else None) for w in layers])
        hd = hp.head_dim
        width = lambda t: t.qs.shape[0] * kernels.R  # noqa: E731
        self.outs = List([np.empty((1, max(width(mats[4 * i + j]) for i in range(hp.n_layer))), dtype=np.float64)
                          for j in range(4)])
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
            self._stages(len(self.norms), np.zeros((1, n), dtype=np.float32), 0)

    @staticmethod
    def possible(m: RankContext, arch: Architecture, layers: list[dict[str, Any]], nthread: int,
                 exact: bool) -> bool:
        """Whether a rank's layers can take the compiled step: a plain decoder's layers (Decoder.compiled_decode),
        every matrix of every layer in block form
        (runtime.weights.BlockMatrix, whose products run at one thread here), f32 activations not asked."""
        from netp.runtime.weights import BlockMatrix

        if not isinstance(arch, Decoder) or not arch.compiled_decode:
            return False
        if nthread > 1 or exact or not layers or m.n_q < 1:
            return False
        return all(isinstance(w.get(key), BlockMatrix) for w in layers for key in ("wqkv", "wo", "w13", "w2"))

    def run(self, x: np.ndarray, pos: int) -> None:
        """Every layer of one token at position pos on x (1, n_embd) f32, in place."""
        if self.mode == SHARED:  # what comm.allreduce would count (the CALLER mode's go through it)
            self.comm.traffic.allreduce += len(self.norms) * self.x_part.nbytes
        stage = 0
        while True:
            stage = self._stages(stage, x, pos)
            if stage == DONE:
                return
            if self.mode == SHARED:  # the peers were late: wait under the communicator's deadline
                self.comm.wait_shm(self.x_part)
            else:
                self.x_part[:] = self.comm.allreduce(self.x_part)
            stage += 1

    def _stages(self, first: int, x: np.ndarray, pos: int) -> int:
        m = self.m
        counters, stride, rank, p0, p1, box = self.shm_args or (_NO_COUNTERS, 0, 0, _NO_PAYLOADS, _NO_PAYLOADS,
                                                                 _NO_COUNTERS)
        return _stages(first, x, self.x_part, self.h, self.delta, self.qkv, self.heads_out, self.gate_up, self.act,
                       self.scores, self.outs, self.kinds, self.words, self.d16, self.m16, self.norms, self.biases,
                       self.q_norms, self.k_norms, m.hp.norm_eps, self.cache.k_all, self.cache.v_all, pos, m.rope_cos[pos],
                       m.rope_sin[pos], self.halves, m.cache_of_q, m.hp.sliding_window, self.mode,
                       counters, stride, rank, p0, p1, box)
