"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k
RMSNorm, no biases, head_dim from config.json or hidden / heads) with the Qwen
MoE layers of models/qwen2_moe.py without a shared expert: softmax over
num_experts in f32, top num_experts_per_tok, renormalised when norm_topk_prob
(llama.cpp's qwen3moe always renormalises: a GGUF converts so), dense layers
where decoder_sparse_step / mlp_only_layers say. Same NE layout as Qwen2-MoE
(docs/design.md §2)."""
from __future__ import annotations

from typing import ClassVar

from netp.models.qwen2_moe import QwenMoE, qwen_moe_tensors
from netp.models.qwen3 import Qwen3
from netp.models.registry import register


@register
class Qwen3Moe(QwenMoE, Qwen3):
    name = "qwen3_moe"
    hf_model_types = ("qwen3_moe",)
    gguf_architectures = ("qwen3moe",)
    ns_model_names: ClassVar[tuple[str, ...]] = ()
    # Qwen3MoeConfig's defaults (tests hold these against transformers); no head_dim
    # default: transformers takes hidden_size / num_attention_heads when it is absent.
    hf_defaults = {
        **{k: v for k, v in Qwen3.hf_defaults.items() if k != "head_dim"}, "hidden_size": 2048,
        "intermediate_size": 6144, "num_hidden_layers": 24, "num_key_value_heads": 4,
        "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128, **QwenMoE.hf_moe_defaults,
    }
    tensors = qwen_moe_tensors(biases=False, qk_norms=True, shared=False)
    recognised_with = (r"model\.layers\.\d+\.mlp\.gate\.weight",)
