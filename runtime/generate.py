"""Generation on every rank: the prompt as one batch, then token by token.

Rank 0 samples each token and broadcasts it; every rank then feeds the same
token, so ranks never drift apart even where their sums differ in the last
bit. Stops at EOS, at -n tokens, when the context -c is full, or when rank 0's
caller says so (a server's stop string or a client gone): that decision
travels with the token, so every rank stops at the same step.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from netp.errors import NetpError
from netp.runtime.comm import Traffic
from netp.runtime.model import RankModel
from netp.runtime.sampling import Sampler

STOP_REASONS = {
    "eos": "end of text (EOS token)",
    "context": "context full (-c {n_ctx})",
    "n_predict": "{n} tokens generated (-n)",
    "caller": "stopped by the caller",
}


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # generated
    stop: str = ""  # a STOP_REASONS key
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # one-token forwards
    decode_sent: Traffic = field(default_factory=Traffic)  # this rank's, over the decode steps

    @property
    def prompt_tok_s(self) -> float:
        return len(self.prompt) / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def stop_text(self, n_ctx: int) -> str:
        return STOP_REASONS[self.stop].format(n_ctx=n_ctx, n=len(self.tokens))


def generate(model: RankModel, prompt: Sequence[int], n_predict: int, sampler: Sampler | None,
             on_token: Callable[[int], bool | None] | None = None) -> Generation:
    """Run on every rank. `sampler` and `on_token` matter on rank 0 only.
    n_predict < 0: until EOS or a full context. on_token(token) sees each
    token as it is chosen; a true return stops generation after it."""
    comm, n_ctx = model.comm, model.n_ctx
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise NetpError(None, "the prompt is empty")
    if len(prompt) >= n_ctx:
        raise NetpError(None, f"the prompt has {len(prompt)} tokens, the context -c {n_ctx} leaves no room to "
                              f"generate (raise -c)")
    gen = Generation(prompt)
    if n_predict == 0:
        gen.stop = "n_predict"
        return gen
    t0 = time.perf_counter()
    logits = model.forward(np.array(prompt), 0)
    t1 = time.perf_counter()
    gen.prompt_seconds = t1 - t0
    sent_before = dataclasses.replace(comm.traffic)
    history = list(prompt)
    eos = model.hp.eos_token_id
    while True:
        chosen: tuple[int, bool] | None = None
        if comm.is_root:
            assert sampler is not None and logits is not None  # rank 0 samples from the gathered logits
            token = sampler(logits[-1], history)
            chosen = (token, on_token is not None and bool(on_token(token)))
        token, stopped = comm.bcast(chosen)
        token = int(token)
        gen.tokens.append(token)
        history.append(token)
        if token == eos:
            gen.stop = "eos"
            break
        if stopped:
            gen.stop = "caller"
            break
        if 0 <= n_predict <= len(gen.tokens):
            gen.stop = "n_predict"
            break
        if len(history) >= n_ctx:
            gen.stop = "context"
            break
        logits = model.forward(np.array([token]), len(history) - 1)
        gen.decode_steps += 1
    gen.decode_seconds = time.perf_counter() - t1
    gen.decode_sent = comm.traffic.since(sent_before)
    return gen
