"""What a rank-local forward may read of its rank: a typed contract.

The forwards in models/ run inside the runtime (netp.runtime.model.RankModel
implements RankContext), a layer models/ may not import. These Protocols are
the whole of what they read, so renaming a field on either side is a type
error (`make test` runs mypy), not a forward that breaks at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from netp.models.hparams import HParams

# The weights of one layer (or the model-level ones) by the forward's names
# (Architecture.runtime_tensors): an f32 vector (a norm, a bias), a matrix
# models.layers.linear applies (f32 stored transposed, or a runtime block
# matrix), or None (a rank-0-only bias on another rank). Each forward knows
# which of its names holds which, hence Any.
Tensors = Mapping[str, Any]


class ContextWeights(Protocol):
    """This rank's weights."""

    @property
    def globals(self) -> Tensors:
        """The model-level weights (final norm, output head: this rank's vocab rows)."""
        ...

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """The embedding rows of token ids (T,), as f32 (T, n_embd), replicated on every rank."""
        ...

    def layer(self, i: int) -> Tensors:
        """Layer i's weights: this rank's heads and MLP slice."""
        ...


class ContextComm(Protocol):
    """The collectives a forward calls."""

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """Sum of x over ranks, as f32 (partials may come as f64)."""
        ...


class ContextCache(Protocol):
    """The KV cache: k[layer], v[layer] of (cached heads, n_ctx, head_dim) f32, written at [start, start + T)."""

    @property
    def k(self) -> Sequence[np.ndarray]: ...

    @property
    def v(self) -> Sequence[np.ndarray]: ...


class RankContext(Protocol):
    """One rank as its forward sees it.

    n_q / n_kv: this rank's query / KV heads. The cache holds one head per
    local KV head; query head h reads cached head cache_of_q[h]. cache_group:
    query heads per KV head when this rank holds whole groups (then
    cache_of_q[h] == h // cache_group), 0 when a group straddles two ranks.
    rope_cos / rope_sin: (n_ctx, n_rot / 2) rotary tables.
    """

    @property
    def hp(self) -> HParams: ...

    @property
    def comm(self) -> ContextComm: ...

    @property
    def weights(self) -> ContextWeights: ...

    @property
    def cache(self) -> ContextCache: ...

    @property
    def n_q(self) -> int: ...

    @property
    def n_kv(self) -> int: ...

    @property
    def cache_group(self) -> int: ...

    @property
    def cache_of_q(self) -> np.ndarray: ...

    @property
    def rope_cos(self) -> np.ndarray: ...

    @property
    def rope_sin(self) -> np.ndarray: ...

    def decode_layers(self, x: np.ndarray, pos: int) -> bool:
        """Run every layer of a plain decoder (models.decoder) on one token at pos, x (1, n_embd) f32 in
        place, as one compiled call when this rank's weights allow (the runtime's compiled decode step);
        False, x untouched, when they do not: the forward then runs its layers itself."""
        ...


@dataclass
class ForwardTrace:
    """What a forward records for verify, when handed one.

    states: the residual stream (T, n_embd) entering each layer, then the one
    leaving the last (n_layer + 1 entries).
    experts: per layer, the expert ids each token was routed to, (T, k); None
    for a dense layer. Dense models leave it empty.
    """

    states: list[np.ndarray] = field(default_factory=list)
    experts: list[np.ndarray | None] = field(default_factory=list)

    @property
    def routed(self) -> list[np.ndarray] | None:
        """The MoE layers' expert ids, in layer order; None for a dense model."""
        return [ids for ids in self.experts if ids is not None] or None
