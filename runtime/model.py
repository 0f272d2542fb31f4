"""A rank's model: what the per-architecture forward is handed (models.context.RankContext)."""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from netp.errors import NetpError
from netp.models.context import ForwardTrace
from netp.models.layers import rotary_tables
from netp.runtime import kernels
from netp.runtime.blas import set_blas_threads
from netp.runtime.comm import Comm
from netp.runtime.fused import CompiledDecode
from netp.runtime.kvcache import KVCache
from netp.runtime.sources import RankSource, ResolvedModel, open_rank_source
from netp.runtime.weights import RankWeights


class RankModel:
    """One rank: hparams, communicator, weights, KV cache and the head layout
    (models.context.RankContext, what the forward reads).

    n_q / n_kv: this rank's query / KV heads. The KV cache holds one head per
    local KV head; query head h reads cached head cache_of_q[h]. When a KV
    group straddles two ranks (9 heads / 3 KV heads over 2 ranks: rank 0 holds
    query heads 0-4 and KV heads 0-1, rank 1 query heads 5-8 and KV heads 1-2)
    the KV head is held, and cached, by both; cache_group (query heads per KV
    head) is then 0. One cached head per KV head, never per query head: a
    straddling rank's decode reads each cached head once (5 copies on rank 0
    made its attention read more than one rank's).
    """

    def __init__(self, source: RankSource, comm: Comm, weights: RankWeights, n_ctx: int,
                 compiled_decode: bool = False):
        self.source, self.comm, self.weights = source, comm, weights
        self.arch, self.hp, self.mapping = source.arch, source.hp, source.mapping
        hp, mp = self.hp, self.mapping
        if n_ctx < 1:
            raise NetpError(None, f"context size -c must be positive, got {n_ctx}")
        self.n_ctx = n_ctx
        q0, q1 = mp.q_heads()
        k0, k1 = mp.kv_heads()
        group = hp.n_head // hp.n_head_kv
        self.n_q, self.n_kv = q1 - q0, k1 - k0
        self.cache_of_q = np.array([h // group - k0 for h in range(q0, q1)], dtype=np.intp)
        self.cache_group = group if q0 % group == 0 and q1 % group == 0 else 0
        factors = None  # Llama 3's per-pair frequency divisors, replicated on every rank
        if hp.rope_freqs and self.arch.rope_freqs_name:
            factors = source.part(self.arch.rope_freqs_name, mapped=False)
        self.rope_cos, self.rope_sin = rotary_tables(n_ctx, hp.n_rot, hp.rope_theta, hp.freq_scale, factors)
        self.cache = KVCache(hp.n_layer, self.n_kv, n_ctx, hp.head_dim)
        self.vocab_widths = [b - a for a, b in (mp.vocab(r) for r in range(mp.world_size))]
        warm_forward_ops()
        self.compiled: CompiledDecode | None = None
        if compiled_decode and CompiledDecode.possible(self, self.arch, weights.layers, weights.nthread,
                                                       weights.exact):
            self.compiled = CompiledDecode(self, self.arch, self.cache, weights.layers, comm, weights.nthread)

    def decode_layers(self, x: np.ndarray, pos: int) -> bool:
        if self.compiled is None:
            return False
        self.compiled.run(x, pos)
        return True

    def forward(self, tokens: Any, start: int, all_logits: bool = False,
                trace: ForwardTrace | None = None) -> np.ndarray | None:
        """Logits (T', n_vocab) on rank 0 (None on other ranks) of tokens at
        positions [start, start + T), the last one only unless all_logits."""
        tokens = np.asarray(tokens, dtype=np.intp).reshape(-1)
        if start + tokens.size > self.n_ctx:
            raise NetpError(None, f"{start + tokens.size} tokens do not fit the context of {self.n_ctx} (-c)")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.hp.n_vocab):
            raise NetpError(None, f"token id {int(tokens.max() if tokens.max() >= self.hp.n_vocab else tokens.min())} "
                                  f"outside the vocabulary of {self.hp.n_vocab}")
        local = self.arch.forward(self, tokens, start, all_logits, trace)
        logits = self.comm.gather_cols(local, self.vocab_widths)
        self.comm.warm()  # loaded and compiled: from now on collectives get the short deadline
        return logits

    def close(self) -> None:
        self.source.close()


_ops_lock = threading.Lock()
_ops_ready = False


def warm_forward_ops() -> None:
    """Compile (first start) or load the forwards' compiled steps (models/compiled.py) once per
    process, under the file lock the kernels take in numba's cache folder, so ranks starting at
    once never write the same cache files (docs/design.md §5)."""
    global _ops_ready
    with _ops_lock:
        if _ops_ready:
            return
        from netp.models import compiled

        with kernels.cache_lock():
            compiled.exercise()
        _ops_ready = True


def load_rank_model(model: str | os.PathLike | ResolvedModel, comm: Comm, n_ctx: int, use_mmap: bool = True,
                    nthread: int = 1, check_sha256: bool = True, exact: bool = False,
                    compiled_decode: bool = True) -> RankModel:
    """Open this rank's file of a resolved model (runtime.sources.resolve_model; a path is
    resolved here) and load its weights (the caller wraps this in comm.agreeing()).
    nthread: kernel (and BLAS) threads of this rank; exact: f32 activations in the block kernels;
    compiled_decode False: decode steps take the forward's Python layers even where runtime/fused.py could
    (tests and benches compare the two)."""
    source = open_rank_source(model, comm.rank, comm.size, check_sha256, use_mmap)
    try:
        try:
            weights = RankWeights(source, use_mmap=use_mmap, nthread=nthread, exact=exact)
            if nthread > 1 and weights.matrix_types and not weights.matrix_types & {"f32", "f16"}:
                set_blas_threads(1)  # BLAS only runs prefill attention here (docs/design.md §5, -t)
            rank_model = RankModel(source, comm, weights, n_ctx, compiled_decode)
        except Exception:
            source.confirm()  # a file that is not the expected one explains any failure first
            raise
        source.confirm()  # its sha256, computed while the weights loaded
        return rank_model
    except BaseException:
        source.close()
        raise
