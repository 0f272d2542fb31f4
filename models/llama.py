"""The LLaMA family (LLaMA 1-3.x, SmolLM2, ...), with grouped-query and
multi-query attention, Llama 3's rope scaling (rope_freqs.weight) and an
explicit head_dim. Mistral and Phi-3 write this same layout (models/mistral.py,
models/phi3.py).

NE names follow neural-speed's convert_llama; wq/wk are stored with the
rotary row permutation llama.cpp's converter applies to HF weights, so the
forward rotates adjacent pairs. GGUF files are already permuted.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np

from netp.models.architecture import REPLICATED, SplitRule, TensorSpec
from netp.models.checks import refuse
from netp.models.decoder import ROPE_FREQS, Decoder
from netp.models.hparams import HParams
from netp.models.registry import register


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's half-split rotary rows -> interleaved pairs, per head (llama.cpp's permute)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_rotary."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF, _L = "model.layers.{i}.", "layers.{i}."
Q_HEADS, KV_HEADS, FFN = SplitRule("rows", "q_heads"), SplitRule("rows", "kv_heads"), SplitRule("rows", "ffn")


def llama_tensors(qkv: tuple[str, str, str] | None = None, gate_up: str | None = None) -> tuple[TensorSpec, ...]:
    """The LLaMA-layout table; `qkv` / `gate_up` name fused HF tensors that hold
    (wq, wk, wv) / (w1, w3) (Phi-3), cut apart by the architecture's hf_tensors."""
    q, k, v = qkv or (_HF + "self_attn.q_proj.weight", _HF + "self_attn.k_proj.weight", _HF + "self_attn.v_proj.weight")
    return (
        TensorSpec("tok_embeddings.weight", lambda h: (h.n_vocab, h.n_embd), REPLICATED,
                   "model.embed_tokens.weight", "token_embd.weight"),
        TensorSpec("norm.weight", lambda h: (h.n_embd,), REPLICATED, "model.norm.weight", "output_norm.weight"),
        TensorSpec("output.weight", lambda h: (h.n_vocab, h.n_embd), SplitRule("rows", "vocab"),
                   "lm_head.weight", "output.weight"),
        TensorSpec(ROPE_FREQS, lambda h: (h.n_rot // 2,), REPLICATED, None, ROPE_FREQS, when=lambda h: h.rope_freqs),
        TensorSpec(_L + "attention.wq.weight", lambda h: (h.n_embd_q, h.n_embd), Q_HEADS, q, "blk.{i}.attn_q.weight"),
        TensorSpec(_L + "attention.wk.weight", lambda h: (h.n_embd_kv, h.n_embd), KV_HEADS, k,
                   "blk.{i}.attn_k.weight"),
        TensorSpec(_L + "attention.wv.weight", lambda h: (h.n_embd_kv, h.n_embd), KV_HEADS, v,
                   "blk.{i}.attn_v.weight"),
        TensorSpec(_L + "attention.wo.weight", lambda h: (h.n_embd, h.n_embd_q), SplitRule("cols", "q_heads"),
                   _HF + "self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
        TensorSpec(_L + "feed_forward.w1.weight", lambda h: (h.n_ff, h.n_embd), FFN,
                   gate_up or _HF + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
        TensorSpec(_L + "feed_forward.w2.weight", lambda h: (h.n_embd, h.n_ff), SplitRule("cols", "ffn"),
                   _HF + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
        TensorSpec(_L + "feed_forward.w3.weight", lambda h: (h.n_ff, h.n_embd), FFN,
                   gate_up or _HF + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
        TensorSpec(_L + "attention_norm.weight", lambda h: (h.n_embd,), REPLICATED,
                   _HF + "input_layernorm.weight", "blk.{i}.attn_norm.weight"),
        TensorSpec(_L + "ffn_norm.weight", lambda h: (h.n_embd,), REPLICATED,
                   _HF + "post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    )


@register
class Llama(Decoder):
    name = "llama"
    hf_model_types: ClassVar[tuple[str, ...]] = ("llama",)
    gguf_architectures: ClassVar[tuple[str, ...]] = ("llama",)
    ns_model_names: ClassVar[tuple[str, ...]] = ("llama", "llama2", "llama3", "mistral", "phi3")  # Mistral and Phi-3 convert to this layout
    # LlamaConfig's defaults (tests hold these against transformers).
    hf_defaults = {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    }
    tensors = llama_tensors()
    hf_dropped = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    recognised_by: ClassVar[tuple[str, ...]] = ("tok_embeddings.weight", "layers.0.attention.wq.weight")
    rope_scalings: ClassVar[tuple[str, ...]] = ("linear", "llama3")
    rope_freqs_name = ROPE_FREQS

    def check_hf(self, config: Mapping[str, Any], path: str) -> None:
        for key in ("attention_bias", "mlp_bias"):
            if self.hf_value(config, key):
                raise refuse(path, f"{key} true ({self.name}'s layout has no biases; Qwen2 has: model_type qwen2)")

    def transforms_hf(self, ne_name: str) -> bool:
        # llama.cpp's rotary row permutation of wq/wk (GGUF input already has it)
        return ne_name.endswith(("attention.wq.weight", "attention.wk.weight"))

    def hf_tensor(self, ne_name: str, data: np.ndarray, hp: HParams) -> np.ndarray:
        if ne_name.endswith("attention.wq.weight"):
            return permute_rotary(data, hp.n_head)
        if ne_name.endswith("attention.wk.weight"):
            return permute_rotary(data, hp.n_head_kv)
        return data

    # -- runtime: the rank-local numpy forward is Decoder.forward -----------------
    embedding_name = "tok_embeddings.weight"
    output_name = "output.weight"

    def runtime_tensors(self, layer: int | None, hp: HParams) -> dict[str, tuple[str, ...]]:
        if layer is None:
            return {"norm": ("norm.weight",), "output": ("output.weight",)}
        p = f"layers.{layer}."
        return {
            "attention_norm": (p + "attention_norm.weight",),
            "wqkv": (p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"),
            "wo": (p + "attention.wo.weight",),
            "ffn_norm": (p + "ffn_norm.weight",),
            "w13": (p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"),  # gate | up
            "w2": (p + "feed_forward.w2.weight",),
        }
