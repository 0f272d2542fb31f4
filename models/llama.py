"""The LLaMA family (LLaMA 1-3, Mistral without sliding window, SmolLM2, ...),
with grouped-query and multi-query attention.

NE names follow neural-speed's convert_llama; wq/wk are stored with the
rotary row permutation llama.cpp's converter applies to HF weights, so the
forward rotates adjacent pairs. GGUF files are already permuted.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from netp.errors import NetpError
from netp.models.layers import linear, rms_norm, self_attention, silu
from netp.models.base import (
    REPLICATED, Architecture, HParams, SplitRule, refuse, register, rope_from_hf, token_id,
)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's half-split rotary rows -> interleaved pairs, per head (llama.cpp's permute)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_rotary."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register
class Llama(Architecture):
    name = "llama"
    hf_model_types = ("llama", "mistral")
    gguf_architectures = ("llama",)
    ns_model_names = ("llama", "llama2", "mistral", "llama3")
    # LlamaConfig's defaults (tests hold these against transformers).
    hf_defaults = {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    }
    hf_name_map = (
        (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
        (r"model\.norm\.weight", "norm.weight"),
        (r"lm_head\.weight", "output.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{0}.attention.wq.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{0}.attention.wk.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{0}.attention.wv.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.attention.wo.weight"),
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.feed_forward.w1.weight"),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.feed_forward.w2.weight"),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.feed_forward.w3.weight"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attention_norm.weight"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.ffn_norm.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None),
    )
    gguf_name_map = (
        (r"token_embd\.weight", "tok_embeddings.weight"),
        (r"output_norm\.weight", "norm.weight"),
        (r"output\.weight", "output.weight"),
        (r"blk\.(\d+)\.attn_q\.weight", "layers.{0}.attention.wq.weight"),
        (r"blk\.(\d+)\.attn_k\.weight", "layers.{0}.attention.wk.weight"),
        (r"blk\.(\d+)\.attn_v\.weight", "layers.{0}.attention.wv.weight"),
        (r"blk\.(\d+)\.attn_output\.weight", "layers.{0}.attention.wo.weight"),
        (r"blk\.(\d+)\.ffn_gate\.weight", "layers.{0}.feed_forward.w1.weight"),
        (r"blk\.(\d+)\.ffn_down\.weight", "layers.{0}.feed_forward.w2.weight"),
        (r"blk\.(\d+)\.ffn_up\.weight", "layers.{0}.feed_forward.w3.weight"),
        (r"blk\.(\d+)\.attn_norm\.weight", "layers.{0}.attention_norm.weight"),
        (r"blk\.(\d+)\.ffn_norm\.weight", "layers.{0}.ffn_norm.weight"),
        (r"rope_freqs\.weight", None),
    )
    split_plan = (
        (r"layers\.\d+\.attention\.wq\.weight", SplitRule("rows", "q_heads")),
        (r"layers\.\d+\.attention\.w[kv]\.weight", SplitRule("rows", "kv_heads")),
        (r"layers\.\d+\.attention\.wo\.weight", SplitRule("cols", "q_heads")),
        (r"layers\.\d+\.feed_forward\.w[13]\.weight", SplitRule("rows", "ffn")),
        (r"layers\.\d+\.feed_forward\.w2\.weight", SplitRule("cols", "ffn")),
        (r"output\.weight", SplitRule("rows", "vocab")),
        (r"tok_embeddings\.weight|norm\.weight|layers\.\d+\.(attention|ffn)_norm\.weight", REPLICATED),
    )

    def tensor_shapes(self, hp: HParams) -> dict[str, tuple[int, ...]]:
        kv = hp.n_head_kv * hp.head_dim
        shapes = {"tok_embeddings.weight": (hp.n_vocab, hp.n_embd), "norm.weight": (hp.n_embd,),
                  "output.weight": (hp.n_vocab, hp.n_embd)}
        for i in range(hp.n_layer):
            p = f"layers.{i}."
            shapes |= {
                p + "attention.wq.weight": (hp.n_embd, hp.n_embd),
                p + "attention.wk.weight": (kv, hp.n_embd),
                p + "attention.wv.weight": (kv, hp.n_embd),
                p + "attention.wo.weight": (hp.n_embd, hp.n_embd),
                p + "feed_forward.w1.weight": (hp.n_ff, hp.n_embd),
                p + "feed_forward.w2.weight": (hp.n_embd, hp.n_ff),
                p + "feed_forward.w3.weight": (hp.n_ff, hp.n_embd),
                p + "attention_norm.weight": (hp.n_embd,),
                p + "ffn_norm.weight": (hp.n_embd,),
            }
        return shapes

    def recognises(self, ne_names) -> bool:
        return "tok_embeddings.weight" in ne_names and "layers.0.attention.wq.weight" in ne_names

    def hparams_from_hf(self, config: Mapping[str, Any], path: str) -> HParams:
        v = lambda key: self.hf_value(config, key)  # noqa: E731
        n_embd, n_head = int(v("hidden_size")), int(v("num_attention_heads"))
        n_head_kv = int(config.get("num_key_value_heads") or n_head)
        if config.get("head_dim") not in (None, n_embd // n_head):
            raise refuse(path, f"head_dim {config['head_dim']} != hidden_size/num_attention_heads ({n_embd // n_head})")
        if config.get("sliding_window") not in (None, 0) and config.get("use_sliding_window", True):
            raise refuse(path, f"sliding_window {config['sliding_window']}")
        for key in ("attention_bias", "mlp_bias"):
            if v(key):
                raise refuse(path, f"{key} true (LLaMA has no biases)")
        if v("hidden_act") != "silu":
            raise refuse(path, f"hidden_act {v('hidden_act')!r} (LLaMA uses silu)")
        if n_embd % n_head or n_head % n_head_kv:
            raise refuse(path, f"{n_head} heads / {n_head_kv} KV heads over hidden size {n_embd}")
        theta, partial = rope_from_hf(self, config, path)
        if partial != 1.0:
            raise refuse(path, f"partial rotary factor {partial}")
        pad = config.get("pad_token_id")
        return HParams(
            arch=self.name, n_vocab=int(v("vocab_size")), n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
            n_layer=int(v("num_hidden_layers")), n_ff=int(v("intermediate_size")), n_rot=n_embd // n_head,
            norm_eps=float(v("rms_norm_eps")), rope_theta=theta, bos_token_id=token_id(v("bos_token_id")),
            eos_token_id=token_id(v("eos_token_id")), pad_token_id=token_id(pad),
            tie_embeddings=bool(v("tie_word_embeddings")), max_seq_len=int(v("max_position_embeddings")),
        )

    def hparams_from_gguf(self, meta: Mapping[str, Any], path: str) -> HParams:
        a = meta["general.architecture"]
        need = lambda key: _gguf_required(meta, f"{a}.{key}", path)  # noqa: E731
        n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
        n_rot = int(meta.get(f"{a}.rope.dimension_count", n_embd // n_head))
        if n_rot != n_embd // n_head:
            raise refuse(path, f"rope.dimension_count {n_rot} != head dim {n_embd // n_head}")
        if meta.get(f"{a}.rope.scaling.type", "none") not in ("none", "linear") or \
                float(meta.get(f"{a}.rope.scaling.factor", 1.0)) != 1.0:
            raise refuse(path, "rope scaling")
        n_vocab = int(meta.get(f"{a}.vocab_size", 0)) or len(need_tokens(meta, path))
        return HParams(
            arch=self.name, n_vocab=n_vocab, n_embd=n_embd, n_head=n_head,
            n_head_kv=int(meta.get(f"{a}.attention.head_count_kv", n_head)), n_layer=int(need("block_count")),
            n_ff=int(need("feed_forward_length")), n_rot=n_rot,
            norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
            bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", -1)),
            eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", -1)),
            pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", -1)),
            max_seq_len=int(meta.get(f"{a}.context_length", 0)),
        )

    def header_fields(self, hp: HParams) -> dict[str, Any]:
        return dict(
            n_vocab=hp.n_vocab, n_embd=hp.n_embd, n_mult=256, n_head=hp.n_head, n_head_kv=hp.n_head_kv,
            n_layer=hp.n_layer, n_rot=hp.n_rot, max_seq_len=hp.max_seq_len, ffn_hidden_size=hp.n_ff,
            norm_eps=hp.norm_eps, freq_base=hp.rope_theta, bos_token_id=hp.bos_token_id,
            eos_token_id=hp.eos_token_id, pad_token_id=hp.pad_token_id,
        )

    def hparams_from_ne(self, header: Any, shapes: Mapping[str, tuple[int, ...]]) -> HParams:
        return HParams(
            arch=self.name, n_vocab=header.n_vocab, n_embd=header.n_embd, n_head=header.n_head,
            n_head_kv=header.n_head_kv or header.n_head, n_layer=header.n_layer,
            n_ff=header.ffn_hidden_size or shapes["layers.0.feed_forward.w1.weight"][0], n_rot=header.n_rot,
            norm_eps=header.norm_eps, rope_theta=header.freq_base, bos_token_id=header.bos_token_id,
            eos_token_id=header.eos_token_id, pad_token_id=header.pad_token_id, max_seq_len=header.max_seq_len,
        )

    def transforms_hf(self, ne_name: str) -> bool:
        # llama.cpp's rotary row permutation of wq/wk (GGUF input already has it)
        return ne_name.endswith(("attention.wq.weight", "attention.wk.weight"))

    def transform_hf(self, ne_name: str, data: np.ndarray, hp: HParams) -> np.ndarray:
        if ne_name.endswith("attention.wq.weight"):
            return permute_rotary(data, hp.n_head)
        if ne_name.endswith("attention.wk.weight"):
            return permute_rotary(data, hp.n_head_kv)
        return data

    # -- runtime: the rank-local numpy forward ---------------------------------
    embedding_name = "tok_embeddings.weight"
    output_name = "output.weight"

    def runtime_tensors(self, layer: int | None) -> dict[str, tuple[str, ...]]:
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

    def forward(self, m: Any, tokens: np.ndarray, start: int, all_logits: bool = False,
                states: list | None = None) -> np.ndarray:
        hp, allreduce = m.hp, m.comm.allreduce
        x = m.weights.embed(tokens)  # (T, n_embd), replicated on every rank
        for i in range(hp.n_layer):
            if states is not None:
                states.append(x.copy())
            w = m.weights.layer(i)
            h = rms_norm(x, w["attention_norm"], hp.norm_eps)
            attn = self_attention(m, i, linear(h, w["wqkv"]), start)  # (T, nq hd): this rank's heads
            x = x + allreduce(linear(attn, w["wo"]))  # wo is cut by columns: partial sums over ranks
            h = rms_norm(x, w["ffn_norm"], hp.norm_eps)
            gate_up = linear(h, w["w13"])  # (T, 2 f): this rank's slice of the MLP width
            f = gate_up.shape[1] // 2
            x = x + allreduce(linear(silu(gate_up[:, :f]) * gate_up[:, f:], w["w2"]))
        if states is not None:
            states.append(x.copy())
        if not all_logits:
            x = x[-1:]
        g = m.weights.globals
        return linear(rms_norm(x, g["norm"], hp.norm_eps), g["output"])  # (T', V_local)


def _gguf_required(meta: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in meta:
        raise NetpError(path, f"GGUF metadata lacks {key}")
    return meta[key]


def need_tokens(meta: Mapping[str, Any], path: str) -> Any:
    return _gguf_required(meta, "tokenizer.ggml.tokens", path)
