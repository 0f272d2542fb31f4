"""Mixtral (8x7B, 8x22B): Mistral's attention (GQA, sliding window when set)
with every MLP a mixture of experts: top-k of num_local_experts SiLU-gated
experts, weighted by the softmax over the k chosen router logits.

The NE file is exactly what neural-speed's convert_mixtral writes, so an
unsharded one loads in its run_mixtral: the LLaMA layout (wq/wk permuted),
per layer wq, wk, wv, wo, attention_norm, ffn_norm, then the router
`layers.N.ffn_gate_inp.weight` and per expert J `layers.N.ffn_gate.J.weight`,
`ffn_down.J`, `ffn_up.J`; header n_experts / n_experts_used, ffn_hidden_size
the expert width. Checkpoints: transformers' per-expert names
(`block_sparse_moe.experts.J.w1/w2/w3`), transformers 5's fused
`mlp.experts.gate_up_proj` / `down_proj`, or a GGUF of architecture `llama`
with llama.cpp's merged `ffn_{gate,up,down}_exps` (or older per-expert
`ffn_gate.J`) tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from netp.models.architecture import TensorSpec
from netp.models.hparams import HParams
from netp.models.llama import Llama, llama_tensors
from netp.models.moe import MixtureOfExperts, expert_specs, router_spec
from netp.models.registry import register

_HF, _L = "model.layers.{i}.", "layers.{i}."


def mixtral_tensors() -> tuple[TensorSpec, ...]:
    """neural-speed's convert_mixtral order: the model-level tensors, then per layer the
    attention, its norms, the router and the experts (gate, down, up of each)."""
    llama = {s.ne: s for s in llama_tensors()}
    first = [llama[n] for n in ("tok_embeddings.weight", "norm.weight", "output.weight", "rope_freqs.weight")]
    attention = [llama[_L + n] for n in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                                         "attention.wo.weight", "attention_norm.weight", "ffn_norm.weight")]
    moe = (_HF + "block_sparse_moe.", _HF + "mlp.")  # transformers 4 names, transformers 5's own
    return (
        *first, *attention,
        router_spec(_L + "ffn_gate_inp.weight", tuple(p + "gate.weight" for p in moe), "blk.{i}.ffn_gate_inp.weight"),
        *expert_specs(
            _L + "ffn_gate.{e}.weight", _L + "ffn_up.{e}.weight", _L + "ffn_down.{e}.weight",
            hf=(tuple(p + "experts.{e}.w1.weight" for p in moe) + (_HF + "mlp.experts.gate_up_proj",),
                tuple(p + "experts.{e}.w3.weight" for p in moe) + (_HF + "mlp.experts.gate_up_proj",),
                tuple(p + "experts.{e}.w2.weight" for p in moe) + (_HF + "mlp.experts.down_proj",)),
            gguf=(("blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_gate.{e}.weight"),
                  ("blk.{i}.ffn_up_exps.weight", "blk.{i}.ffn_up.{e}.weight"),
                  ("blk.{i}.ffn_down_exps.weight", "blk.{i}.ffn_down.{e}.weight")),
            order="gdu"),
    )


@register
class Mixtral(MixtureOfExperts, Llama):
    name = "mixtral"
    hf_model_types = ("mixtral",)
    gguf_architectures = ("llama",)  # llama.cpp writes Mixtral as `llama` with expert tensors
    gguf_recognised_with = (r"blk\.\d+\.ffn_gate_inp\.weight",)
    ns_model_names = ("mixtral",)
    expert_keys = ("num_local_experts", "num_experts_per_tok")
    # MixtralConfig's defaults (tests hold these against transformers).
    hf_defaults = {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "rope_theta": 1000000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
    }
    tensors = mixtral_tensors()
    hf_dropped = Llama.hf_dropped
    recognised_by = ("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.ffn_gate_inp.weight")
    windowed = True

    router = _L + "ffn_gate_inp.weight"
    expert_w13: ClassVar[tuple[str, str]] = (_L + "ffn_gate.{e}.weight", _L + "ffn_up.{e}.weight")
    expert_w2 = _L + "ffn_down.{e}.weight"

    def moe_from_hf(self, config: Mapping[str, Any], hp: HParams, path: str) -> HParams:
        # every layer routes; the expert width is intermediate_size; the k weights always sum to 1
        return dataclasses.replace(hp, n_expert=int(self.hf_value(config, "num_local_experts")),
                                   n_expert_used=int(self.hf_value(config, "num_experts_per_tok")),
                                   n_ff_expert=hp.n_ff, norm_topk_prob=True)

    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        out = super().ns_loader_caveats(hp)
        if (hp.n_expert, hp.n_expert_used) != (8, 2):
            out.append(f"{hp.n_expert} experts, top-{hp.n_expert_used}: neural-speed's convert_mixtral and "
                       "run_mixtral are made for 8 experts, top-2")
        return out
