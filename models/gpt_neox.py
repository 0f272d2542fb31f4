"""GPT-NeoX (Pythia, Dolly v2, StableLM-alpha, ...): LayerNorm with biases,
one fused query_key_value projection laid out per head as [q, k, v] rows,
rotary over the first n_rot = head_dim x rotary_pct dims of each head in
halves (transformers' rotate_half, neural-speed's rope mode 2), exact (erf)
GELU MLP, and a parallel residual (x + attn(ln1 x) + mlp(ln2 x)) or, with
use_parallel_residual false, a sequential one.

NE names are the HF state-dict names, as neural-speed's convert_gptneox
writes them (its loader asks for exactly these), dropping the attention
mask and inv_freq buffers; transformers 5's `lm_head.weight` is stored under
the older `embed_out.weight` neural-speed expects.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from netp.models.architecture import RANK0, REPLICATED, Architecture, SplitRule, TensorSpec
from netp.models.checks import refuse
from netp.models.context import ForwardTrace, RankContext, Tensors
from netp.models.hparams import HParams, token_id
from netp.models.layers import gelu, layer_norm, linear, rotate_halves, self_attention
from netp.models.registry import register
from netp.models.rope import rope_from_hf

_L = "gpt_neox.layers.{i}."


@register
class GPTNeoX(Architecture):
    name = "gpt_neox"
    hf_model_types = ("gpt_neox",)
    ns_model_names = ("gpt_neox", "gptneox", "dolly")
    # GPTNeoXConfig's defaults (tests hold these against transformers). Older
    # config.json files write rotary_pct / rotary_emb_base for the rope ones.
    hf_defaults = {
        "vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
        "intermediate_size": 24576, "hidden_act": "gelu", "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "tie_word_embeddings": False,
        "use_parallel_residual": True, "attention_bias": True, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
    }
    tensors = (
        TensorSpec("gpt_neox.embed_in.weight", lambda h: (h.n_vocab, h.n_embd), REPLICATED,
                   "gpt_neox.embed_in.weight"),
        *(TensorSpec(_L + name, shape, split, _L + name) for name, shape, split in (
            ("input_layernorm.weight", lambda h: (h.n_embd,), REPLICATED),
            ("input_layernorm.bias", lambda h: (h.n_embd,), REPLICATED),
            ("post_attention_layernorm.weight", lambda h: (h.n_embd,), REPLICATED),
            ("post_attention_layernorm.bias", lambda h: (h.n_embd,), REPLICATED),
            # whole heads' q|k|v rows
            ("attention.query_key_value.weight", lambda h: (3 * h.n_embd, h.n_embd), SplitRule("rows", "qkv_heads")),
            ("attention.query_key_value.bias", lambda h: (3 * h.n_embd,), SplitRule("rows", "qkv_heads")),
            ("attention.dense.weight", lambda h: (h.n_embd, h.n_embd), SplitRule("cols", "q_heads")),
            ("attention.dense.bias", lambda h: (h.n_embd,), RANK0),
            ("mlp.dense_h_to_4h.weight", lambda h: (h.n_ff, h.n_embd), SplitRule("rows", "ffn")),
            ("mlp.dense_h_to_4h.bias", lambda h: (h.n_ff,), SplitRule("rows", "ffn")),
            ("mlp.dense_4h_to_h.weight", lambda h: (h.n_embd, h.n_ff), SplitRule("cols", "ffn")),
            ("mlp.dense_4h_to_h.bias", lambda h: (h.n_embd,), RANK0),
        )),
        TensorSpec("gpt_neox.final_layer_norm.weight", lambda h: (h.n_embd,), REPLICATED,
                   "gpt_neox.final_layer_norm.weight"),
        TensorSpec("gpt_neox.final_layer_norm.bias", lambda h: (h.n_embd,), REPLICATED,
                   "gpt_neox.final_layer_norm.bias"),
        TensorSpec("embed_out.weight", lambda h: (h.n_vocab, h.n_embd), SplitRule("rows", "vocab"),
                   ("lm_head.weight", "embed_out.weight")),
    )
    hf_dropped = (r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
                  r"gpt_neox\.rotary_emb\.inv_freq")
    recognised_by = ("gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.query_key_value.weight")

    def hparams_from_hf(self, config: Mapping[str, Any], path: str) -> HParams:
        v = lambda key: self.hf_value(config, key)  # noqa: E731
        n_embd, n_head = int(v("hidden_size")), int(v("num_attention_heads"))
        if n_embd % n_head:
            raise refuse(path, f"hidden_size {n_embd} not divisible by num_attention_heads {n_head}")
        head_dim = n_embd // n_head
        if config.get("head_dim") not in (None, head_dim):
            raise refuse(path, f"head_dim {config['head_dim']} != hidden_size/num_attention_heads ({head_dim})")
        if v("hidden_act") != "gelu":
            raise refuse(path, f"hidden_act {v('hidden_act')!r} (netp's GPT-NeoX implements the exact gelu)")
        if not v("attention_bias"):
            raise refuse(path, "attention_bias false (netp's GPT-NeoX forward adds the attention biases)")
        if config.get("rotary_emb_base") is not None and config.get("rope_theta") is None:
            config = {**config, "rope_theta": config["rotary_emb_base"]}  # the pre-transformers-5 key
        theta, partial = rope_from_hf(self, config, path)
        n_rot = int(head_dim * partial)  # transformers truncates the same way
        if n_rot % 2:
            raise refuse(path, f"rotary dims {n_rot} (head_dim {head_dim} x rotary_pct {partial}) is odd")
        return HParams(
            arch=self.name, n_vocab=int(v("vocab_size")), n_embd=n_embd, n_head=n_head, n_head_kv=n_head,
            n_layer=int(v("num_hidden_layers")), n_ff=int(v("intermediate_size")), n_rot=n_rot,
            norm_eps=float(v("layer_norm_eps")), rope_theta=theta,
            bos_token_id=token_id(v("bos_token_id")), eos_token_id=token_id(v("eos_token_id")),
            pad_token_id=token_id(config.get("pad_token_id")), parallel_residual=bool(v("use_parallel_residual")),
            tie_embeddings=bool(v("tie_word_embeddings")), max_seq_len=int(v("max_position_embeddings")),
        )

    def header_fields(self, hp: HParams) -> dict[str, Any]:
        # neural-speed's convert_gptneox: n_mult 0, n_head_kv 0 (no grouping), par_res; its
        # loader takes the MLP width as 4 n_embd (ffn_hidden_size stays 0, as it writes it).
        return dict(
            n_vocab=hp.n_vocab, n_embd=hp.n_embd, n_mult=0, n_head=hp.n_head, n_head_kv=0,
            n_layer=hp.n_layer, n_rot=hp.n_rot, max_seq_len=hp.max_seq_len, par_res=int(hp.parallel_residual),
            norm_eps=hp.norm_eps, freq_base=hp.rope_theta, bos_token_id=hp.bos_token_id,
            eos_token_id=hp.eos_token_id, pad_token_id=hp.pad_token_id,
        )

    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        if hp.n_ff == 4 * hp.n_embd:
            return []
        # The NE header has no MLP width for GPT-NeoX: netp's runtime takes it from the tensor shapes.
        return [f"intermediate_size {hp.n_ff} is not 4 x hidden_size ({4 * hp.n_embd}); neural-speed's own "
                "loader assumes 4 x hidden_size, so only netp's runtime will run this file"]

    def hparams_from_ne(self, header: Any, shapes: Mapping[str, tuple[int, ...]]) -> HParams:
        return HParams(
            arch=self.name, n_vocab=header.n_vocab, n_embd=header.n_embd, n_head=header.n_head,
            n_head_kv=header.n_head, n_layer=header.n_layer,
            n_ff=shapes["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][0], n_rot=header.n_rot,
            norm_eps=header.norm_eps, rope_theta=header.freq_base, bos_token_id=header.bos_token_id,
            eos_token_id=header.eos_token_id, pad_token_id=header.pad_token_id,
            parallel_residual=bool(header.par_res), max_seq_len=header.max_seq_len,
        )

    # -- runtime: the rank-local numpy forward ---------------------------------
    embedding_name = "gpt_neox.embed_in.weight"
    output_name = "embed_out.weight"

    def runtime_tensors(self, layer: int | None, hp: HParams) -> dict[str, tuple[str, ...]]:
        if layer is None:
            return {"ln_f": ("gpt_neox.final_layer_norm.weight",), "ln_f_bias": ("gpt_neox.final_layer_norm.bias",),
                    "output": ("embed_out.weight",)}
        p = f"gpt_neox.layers.{layer}."
        return {
            "ln_1": (p + "input_layernorm.weight",), "ln_1_bias": (p + "input_layernorm.bias",),
            "ln_2": (p + "post_attention_layernorm.weight",), "ln_2_bias": (p + "post_attention_layernorm.bias",),
            "wqkv": (p + "attention.query_key_value.weight",), "wqkv_bias": (p + "attention.query_key_value.bias",),
            "dense": (p + "attention.dense.weight",),
            "dense_bias": (p + "attention.dense.bias",),  # rank 0 only (None elsewhere)
            "fc_in": (p + "mlp.dense_h_to_4h.weight",), "fc_in_bias": (p + "mlp.dense_h_to_4h.bias",),
            "fc_out": (p + "mlp.dense_4h_to_h.weight",),
            "fc_out_bias": (p + "mlp.dense_4h_to_h.bias",),  # rank 0 only (None elsewhere)
        }

    def forward(self, m: RankContext, tokens: np.ndarray, start: int, all_logits: bool = False,
                trace: ForwardTrace | None = None) -> np.ndarray:
        hp, allreduce = m.hp, m.comm.allreduce
        hd, eps = hp.head_dim, hp.norm_eps
        x = m.weights.embed(tokens)  # (T, n_embd), replicated on every rank
        T = x.shape[0]
        for i in range(hp.n_layer):
            if trace is not None:
                trace.states.append(x.copy())
            w = m.weights.layer(i)
            qkv = linear(layer_norm(x, w["ln_1"], w["ln_1_bias"], eps), w["wqkv"]) + w["wqkv_bias"]
            # (T, nq [q|k|v] hd) per head -> (T, [nq q | nq k | nq v] hd), the shared helper's layout
            qkv = qkv.reshape(T, m.n_q, 3, hd).transpose(0, 2, 1, 3).reshape(T, 3 * m.n_q * hd)
            attn = self_attention(m, i, qkv, start, rotate=rotate_halves)  # (T, nq hd)
            part = _plus_rank0_bias(linear(attn, w["dense"]), w["dense_bias"])  # column-split: a partial sum
            if hp.parallel_residual:  # x + attn(ln1 x) + mlp(ln2 x): one all-reduce
                part += _mlp(layer_norm(x, w["ln_2"], w["ln_2_bias"], eps), w)
                x = x + allreduce(part)
            else:  # x += attn(ln1 x); x += mlp(ln2 x): two
                x = x + allreduce(part)
                x = x + allreduce(_mlp(layer_norm(x, w["ln_2"], w["ln_2_bias"], eps), w))
        if trace is not None:
            trace.states.append(x.copy())
        if not all_logits:
            x = x[-1:]
        g = m.weights.globals
        return linear(layer_norm(x, g["ln_f"], g["ln_f_bias"], eps), g["output"])  # (T', V_local)


def _plus_rank0_bias(part: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Rank 0 adds a column-split matrix's bias to its partial sum, so the all-reduce counts it once."""
    if bias is not None:
        part += bias
    return part


def _mlp(h: np.ndarray, w: Tensors) -> np.ndarray:
    """This rank's partial sum of the MLP: its slice of the width, gelu, its columns of dense_4h_to_h."""
    return _plus_rank0_bias(linear(gelu(linear(h, w["fc_in"]) + w["fc_in_bias"]), w["fc_out"]), w["fc_out_bias"])
