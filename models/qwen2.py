"""Qwen2 / Qwen2.5: LLaMA's math plus q/k/v biases, rotary on HF's own row
order (rotate_half; llama.cpp's qwen2 GGUF is unpermuted too), often tied
embeddings.

NE names are the HF state-dict names, as neural-speed's convert_qwen2
writes them and its qwen loader ("qwen2 bin") asks for. Its header values
follow that converter (n_mult = ffn_hidden_size = intermediate_size) except
where it would compute wrong: netp writes the real n_head_kv and rope theta
(neural-speed writes 0 and 10000), and convert warns that neural-speed's
loader takes no grouped KV heads.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from netp.models.architecture import REPLICATED, SplitRule, TensorSpec
from netp.models.checks import refuse
from netp.models.decoder import Decoder
from netp.models.hparams import HParams
from netp.models.layers import rotate_halves
from netp.models.registry import register

_L = "model.layers.{i}."
Q_HEADS, KV_HEADS, FFN = SplitRule("rows", "q_heads"), SplitRule("rows", "kv_heads"), SplitRule("rows", "ffn")


def qwen_tensors(biases: bool, qk_norms: bool) -> tuple[TensorSpec, ...]:
    """The table of the Qwen family; HF names are the NE names."""
    def spec(ne: str, shape, split, gguf: str) -> TensorSpec:
        return TensorSpec(ne, shape, split, ne, gguf)

    attn = [
        spec(_L + "self_attn.q_proj.weight", lambda h: (h.n_embd_q, h.n_embd), Q_HEADS, "blk.{i}.attn_q.weight"),
        spec(_L + "self_attn.k_proj.weight", lambda h: (h.n_embd_kv, h.n_embd), KV_HEADS, "blk.{i}.attn_k.weight"),
        spec(_L + "self_attn.v_proj.weight", lambda h: (h.n_embd_kv, h.n_embd), KV_HEADS, "blk.{i}.attn_v.weight"),
    ]
    if biases:  # split with their projection's rows, by heads
        attn += [
            spec(_L + "self_attn.q_proj.bias", lambda h: (h.n_embd_q,), Q_HEADS, "blk.{i}.attn_q.bias"),
            spec(_L + "self_attn.k_proj.bias", lambda h: (h.n_embd_kv,), KV_HEADS, "blk.{i}.attn_k.bias"),
            spec(_L + "self_attn.v_proj.bias", lambda h: (h.n_embd_kv,), KV_HEADS, "blk.{i}.attn_v.bias"),
        ]
    if qk_norms:  # one head_dim vector each, applied to every head: replicated
        attn += [
            spec(_L + "self_attn.q_norm.weight", lambda h: (h.head_dim,), REPLICATED, "blk.{i}.attn_q_norm.weight"),
            spec(_L + "self_attn.k_norm.weight", lambda h: (h.head_dim,), REPLICATED, "blk.{i}.attn_k_norm.weight"),
        ]
    return (
        spec("model.embed_tokens.weight", lambda h: (h.n_vocab, h.n_embd), REPLICATED, "token_embd.weight"),
        *attn,
        spec(_L + "self_attn.o_proj.weight", lambda h: (h.n_embd, h.n_embd_q), SplitRule("cols", "q_heads"),
             "blk.{i}.attn_output.weight"),
        spec(_L + "mlp.gate_proj.weight", lambda h: (h.n_ff, h.n_embd), FFN, "blk.{i}.ffn_gate.weight"),
        spec(_L + "mlp.up_proj.weight", lambda h: (h.n_ff, h.n_embd), FFN, "blk.{i}.ffn_up.weight"),
        spec(_L + "mlp.down_proj.weight", lambda h: (h.n_embd, h.n_ff), SplitRule("cols", "ffn"),
             "blk.{i}.ffn_down.weight"),
        spec(_L + "input_layernorm.weight", lambda h: (h.n_embd,), REPLICATED, "blk.{i}.attn_norm.weight"),
        spec(_L + "post_attention_layernorm.weight", lambda h: (h.n_embd,), REPLICATED, "blk.{i}.ffn_norm.weight"),
        spec("model.norm.weight", lambda h: (h.n_embd,), REPLICATED, "output_norm.weight"),
        spec("lm_head.weight", lambda h: (h.n_vocab, h.n_embd), SplitRule("rows", "vocab"), "output.weight"),
    )


@register
class Qwen2(Decoder):
    name = "qwen2"
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen2",)
    gguf_architectures: ClassVar[tuple[str, ...]] = ("qwen2",)
    ns_model_names: ClassVar[tuple[str, ...]] = ("qwen2", "qwen")
    # Qwen2Config's defaults (tests hold these against transformers).
    hf_defaults = {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "use_sliding_window": False,
    }
    tensors = qwen_tensors(biases=True, qk_norms=False)
    hf_dropped = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    recognised_by: ClassVar[tuple[str, ...]] = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias")
    rotate = staticmethod(rotate_halves)
    n_mult = None

    def check_hf(self, config: Mapping[str, Any], path: str) -> None:
        if config.get("use_sliding_window"):
            raise refuse(path, f"use_sliding_window true (a window on layers from max_window_layers on); netp's "
                               f"{self.name} implements full attention, Mistral and Phi-3 a window on every layer")

    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        out = super().ns_loader_caveats(hp)
        if hp.n_head_kv != hp.n_head:
            out.append(f"{hp.n_head_kv} KV heads for {hp.n_head} query heads: neural-speed's qwen loader takes "
                       "no grouped KV heads, so only netp's runtime will run this file")
        return out

    # -- runtime: the rank-local numpy forward is Decoder.forward -----------------
    embedding_name = "model.embed_tokens.weight"
    output_name = "lm_head.weight"

    def runtime_tensors(self, layer: int | None, hp: HParams) -> dict[str, tuple[str, ...]]:
        if layer is None:
            return {"norm": ("model.norm.weight",), "output": ("lm_head.weight",)}
        p = f"model.layers.{layer}."
        out = {
            "attention_norm": (p + "input_layernorm.weight",),
            "wqkv": tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
            "wo": (p + "self_attn.o_proj.weight",),
            "ffn_norm": (p + "post_attention_layernorm.weight",),
            "w13": (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),  # gate | up
            "w2": (p + "mlp.down_proj.weight",),
        }
        names = set(self.tensor_names_of_layer(layer))
        if p + "self_attn.q_proj.bias" in names:
            out["bqkv"] = tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv")
        if p + "self_attn.q_norm.weight" in names:
            out |= {"q_norm": (p + "self_attn.q_norm.weight",), "k_norm": (p + "self_attn.k_norm.weight",)}
        return out

    def tensor_names_of_layer(self, layer: int) -> list[str]:
        return [s.name(layer) for s in self.tensors if s.per_layer]
