"""Choosing the next token from logits, llama.cpp's way.

Order: repetition penalty over the last `repeat_last_n` tokens, then greedy
(`top_k` 1 or `temp` 0) or top-k, top-p (on the untempered distribution),
temperature, and a draw from a numpy Generator seeded by --seed. Only rank
0 samples; the token is broadcast, so every rank feeds the same one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from netp.errors import NetpError


@dataclass(frozen=True)
class SamplingParams:
    # neural-speed's / llama.cpp's defaults
    top_k: int = 40
    top_p: float = 0.95
    temp: float = 0.8
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int = -1  # < 0: a fresh seed from the OS

    def __post_init__(self) -> None:
        # Refused by name: a NaN temperature or a zero penalty would sample garbage (docs/design.md §8).
        for option, value, ok, want in (
                ("--temp", self.temp, math.isfinite(self.temp) and self.temp >= 0, "a finite number >= 0"),
                ("--top_p", self.top_p, 0 <= self.top_p <= 1, "in [0, 1]"),
                ("--repeat_penalty", self.repeat_penalty,
                 math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0, "a finite number > 0"),
                ("--top_k", self.top_k, self.top_k >= 0, "0 (all) or more"),
                ("repeat_last_n", self.repeat_last_n, self.repeat_last_n >= 0, "0 or more")):
            if not ok:
                raise NetpError(None, f"{option} {value}: must be {want}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temp <= 0


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, most likely first.

    argpartition over a whole 50k vocabulary costs ~0.4 ms a token; the k-th
    largest of every 16th logit is a lower bound of the k-th largest of all
    (a subset's order statistic cannot exceed the set's), so partitioning
    only the logits at or above it gives the same ids for a fraction.
    """
    if k >= logits.size:
        candidates = np.arange(logits.size)
    else:
        sample = logits[::16]
        floor = np.partition(sample, -k)[-k] if sample.size >= k else logits.min()
        candidates = np.flatnonzero(logits >= floor)
        if candidates.size > k:
            candidates = candidates[np.argpartition(logits[candidates], -k)[-k:]]
    return candidates[np.argsort(-logits[candidates], kind="stable")]


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(None if params.seed < 0 else params.seed)

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """llama.cpp's repetition penalty: a seen token's logit is divided by the
        penalty when positive, multiplied when negative."""
        p = self.params
        if p.repeat_penalty == 1.0 or p.repeat_last_n == 0 or not history:
            return logits
        recent = np.unique(np.asarray(history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history))
        logits = logits.copy()
        seen = logits[recent]
        logits[recent] = np.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        return logits

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.greedy and p.repeat_penalty >= 1.0:
            # A penalty >= 1 only lowers seen tokens: an unseen first maximum stays the answer, found without
            # the penalized copy (rank 0 samples while the other ranks wait: ~35 -> ~10 µs a token).
            best = int(np.argmax(logits))
            if p.repeat_last_n == 0 or best not in history[-p.repeat_last_n:]:
                return best
        logits = self.penalize(logits, history)
        if p.greedy:
            return int(np.argmax(logits))
        ids = top_k_ids(logits, p.top_k if p.top_k > 0 else logits.size)  # most likely first
        top = logits[ids].astype(np.float64)
        if p.top_p < 1.0:
            probs = np.exp(top - top[0])
            probs /= probs.sum()
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1  # smallest set reaching top_p
            ids, top = ids[:keep], top[:keep]
        z = top / p.temp
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return int(ids[self.rng.choice(ids.size, p=probs)])
