"""The key/value cache of one rank: its KV heads only, preallocated to the context -c."""
from __future__ import annotations

import numpy as np


class KVCache:
    """k[layer], v[layer]: (n_heads, n_ctx, head_dim) float32, written at [start, start + T).
    n_heads: the rank's KV heads (a KV head whose query heads straddle two ranks is cached by both)."""

    def __init__(self, n_layer: int, n_heads: int, n_ctx: int, head_dim: int):
        # one array per kind, so a compiled decode step takes every layer's (runtime/fused.py)
        self.k_all = np.zeros((n_layer, n_heads, n_ctx, head_dim), dtype=np.float32)
        self.v_all = np.zeros((n_layer, n_heads, n_ctx, head_dim), dtype=np.float32)
        self.k, self.v = list(self.k_all), list(self.v_all)
