"""One model's hyper-parameters, in the units the forward uses, and the token-id rule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of one model, in the units the forward uses."""

    arch: str
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_layer: int
    n_ff: int  # MLP inner width
    n_rot: int  # rotary dims per head
    norm_eps: float
    rope_theta: float
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int = -1
    parallel_residual: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 0
    n_embd_head: int = 0  # an explicit head_dim (Qwen3, Mistral-Nemo); 0: n_embd / n_head
    freq_scale: float = 1.0  # linear rope scaling: positions times this (1 / factor)
    rope_freqs: bool = False  # the file carries rope_freqs.weight (Llama 3 per-pair frequency divisors)
    rope_freq_factors: tuple[float, ...] = ()  # its values, when computed from config.json
    sliding_window: int = 0  # a position attends to the last sliding_window keys, itself included; 0: all
    # Mixtures of experts (docs/design.md §2 "Mixtures of experts"); n_expert 0: a dense model.
    n_expert: int = 0  # experts per MoE layer
    n_expert_used: int = 0  # experts each token is routed to (top-k)
    n_ff_expert: int = 0  # one expert's MLP width
    n_ff_shared: int = 0  # the shared expert's MLP width (Qwen2-MoE); 0: none
    norm_topk_prob: bool = False  # the k chosen probabilities renormalised to sum 1
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP of width n_ff (mlp_only_layers)
    moe_step: int = 1  # Qwen's decoder_sparse_step: only layers i with (i + 1) % moe_step == 0 route

    @property
    def head_dim(self) -> int:
        return self.n_embd_head or self.n_embd // self.n_head

    @property
    def n_embd_q(self) -> int:
        """Rows of the query projection (and columns of the output one)."""
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` routes each token to experts (else its MLP is dense)."""
        return self.n_expert > 0 and layer not in self.dense_layers and (layer + 1) % self.moe_step == 0




def token_id(value: Any) -> int:
    if isinstance(value, (list, tuple)):  # some configs list several EOS ids: the first is the main one
        value = value[0] if value else None
    return -1 if value is None else int(value)
