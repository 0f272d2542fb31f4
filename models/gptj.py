"""GPT-J: parallel residual (attention and MLP read the same layer norm),
rotary over the first rotary_dim dims of each head in adjacent pairs,
gelu_new MLP, biased output head. NE keeps the HF names (neural-speed's
convert_gptj), dropping the attention mask buffers.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from netp.models.architecture import RANK0, REPLICATED, Architecture, SplitRule, TensorSpec
from netp.models.checks import refuse
from netp.models.context import ForwardTrace, RankContext
from netp.models.hparams import HParams, token_id
from netp.models.layers import gelu_new, layer_norm, linear, self_attention
from netp.models.registry import register

_L = "transformer.h.{i}."


@register
class GPTJ(Architecture):
    name = "gptj"
    hf_model_types = ("gptj",)
    ns_model_names = ("gptj", "gpt-j")
    # GPTJConfig's defaults (tests hold these against transformers).
    hf_defaults = {
        "vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16,
        "rotary_dim": 64, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": False,
    }
    tensors = (
        TensorSpec("transformer.wte.weight", lambda h: (h.n_vocab, h.n_embd), REPLICATED, "transformer.wte.weight"),
        *(TensorSpec(_L + name, shape, split, _L + name) for name, shape, split in (
            ("ln_1.weight", lambda h: (h.n_embd,), REPLICATED),
            ("ln_1.bias", lambda h: (h.n_embd,), REPLICATED),
            ("attn.q_proj.weight", lambda h: (h.n_embd, h.n_embd), SplitRule("rows", "q_heads")),
            ("attn.k_proj.weight", lambda h: (h.n_embd, h.n_embd), SplitRule("rows", "q_heads")),
            ("attn.v_proj.weight", lambda h: (h.n_embd, h.n_embd), SplitRule("rows", "q_heads")),
            ("attn.out_proj.weight", lambda h: (h.n_embd, h.n_embd), SplitRule("cols", "q_heads")),
            ("mlp.fc_in.weight", lambda h: (h.n_ff, h.n_embd), SplitRule("rows", "ffn")),
            ("mlp.fc_in.bias", lambda h: (h.n_ff,), SplitRule("rows", "ffn")),
            ("mlp.fc_out.weight", lambda h: (h.n_embd, h.n_ff), SplitRule("cols", "ffn")),
            ("mlp.fc_out.bias", lambda h: (h.n_embd,), RANK0),
        )),
        *(TensorSpec(name, shape, split, name) for name, shape, split in (
            ("transformer.ln_f.weight", lambda h: (h.n_embd,), REPLICATED),
            ("transformer.ln_f.bias", lambda h: (h.n_embd,), REPLICATED),
            ("lm_head.weight", lambda h: (h.n_vocab, h.n_embd), SplitRule("rows", "vocab")),
            ("lm_head.bias", lambda h: (h.n_vocab,), SplitRule("rows", "vocab")),
        )),
    )
    hf_dropped = (r"transformer\.h\.\d+\.attn\.(masked_)?bias",)
    recognised_by = ("transformer.wte.weight", "transformer.h.0.attn.q_proj.weight")

    def hparams_from_hf(self, config: Mapping[str, Any], path: str) -> HParams:
        v = lambda key: self.hf_value(config, key)  # noqa: E731
        n_embd, n_head = int(v("n_embd")), int(v("n_head"))
        if v("activation_function") != "gelu_new":
            raise refuse(path, f"activation_function {v('activation_function')!r} (GPT-J uses gelu_new)")
        if v("tie_word_embeddings"):
            raise refuse(path, "tie_word_embeddings true (GPT-J has its own biased output head)")
        if n_embd % n_head:
            raise refuse(path, f"n_embd {n_embd} not divisible by n_head {n_head}")
        rotary_dim = int(v("rotary_dim") or n_embd // n_head)
        return HParams(
            arch=self.name, n_vocab=int(v("vocab_size")), n_embd=n_embd, n_head=n_head, n_head_kv=n_head,
            n_layer=int(v("n_layer")), n_ff=int(config.get("n_inner") or 4 * n_embd), n_rot=rotary_dim,
            norm_eps=float(v("layer_norm_epsilon")), rope_theta=10000.0,
            bos_token_id=token_id(v("bos_token_id")), eos_token_id=token_id(v("eos_token_id")),
            pad_token_id=token_id(config.get("pad_token_id")), parallel_residual=True,
            max_seq_len=int(v("n_positions")),
        )

    def header_fields(self, hp: HParams) -> dict[str, Any]:
        return dict(
            n_vocab=hp.n_vocab, n_embd=hp.n_embd, n_mult=hp.n_embd // hp.n_head, n_head=hp.n_head, n_head_kv=0,
            n_layer=hp.n_layer, n_rot=hp.n_rot, max_seq_len=hp.max_seq_len, norm_eps=hp.norm_eps,
            freq_scale=hp.freq_scale, bos_token_id=hp.bos_token_id, eos_token_id=hp.eos_token_id, pad_token_id=hp.pad_token_id,
        )

    def hparams_from_ne(self, header: Any, shapes: Mapping[str, tuple[int, ...]]) -> HParams:
        return HParams(
            arch=self.name, n_vocab=header.n_vocab, n_embd=header.n_embd, n_head=header.n_head,
            n_head_kv=header.n_head, n_layer=header.n_layer, n_ff=shapes["transformer.h.0.mlp.fc_in.weight"][0],
            n_rot=header.n_rot, norm_eps=header.norm_eps, rope_theta=header.freq_base,
            bos_token_id=header.bos_token_id, eos_token_id=header.eos_token_id,
            pad_token_id=header.pad_token_id, parallel_residual=True, max_seq_len=header.max_seq_len,
        )

    # -- runtime: the rank-local numpy forward ---------------------------------
    embedding_name = "transformer.wte.weight"
    output_name = "lm_head.weight"

    def runtime_tensors(self, layer: int | None, hp: HParams) -> dict[str, tuple[str, ...]]:
        if layer is None:
            return {"ln_f": ("transformer.ln_f.weight",), "ln_f_bias": ("transformer.ln_f.bias",),
                    "output": ("lm_head.weight",), "output_bias": ("lm_head.bias",)}
        p = f"transformer.h.{layer}."
        return {
            "ln_1": (p + "ln_1.weight",), "ln_1_bias": (p + "ln_1.bias",),
            "wqkv": (p + "attn.q_proj.weight", p + "attn.k_proj.weight", p + "attn.v_proj.weight"),
            "out_proj": (p + "attn.out_proj.weight",),
            "fc_in": (p + "mlp.fc_in.weight",), "fc_in_bias": (p + "mlp.fc_in.bias",),
            "fc_out": (p + "mlp.fc_out.weight",),
            "fc_out_bias": (p + "mlp.fc_out.bias",),  # rank 0 only (None elsewhere)
        }

    def forward(self, m: RankContext, tokens: np.ndarray, start: int, all_logits: bool = False,
                trace: ForwardTrace | None = None) -> np.ndarray:
        hp = m.hp
        x = m.weights.embed(tokens)  # (T, n_embd), replicated on every rank
        for i in range(hp.n_layer):
            if trace is not None:
                trace.states.append(x.copy())
            w = m.weights.layer(i)
            h = layer_norm(x, w["ln_1"], w["ln_1_bias"], hp.norm_eps)  # attention and MLP both read h
            attn = self_attention(m, i, linear(h, w["wqkv"]), start)  # (T, nq hd)
            part = linear(attn, w["out_proj"])  # column-split: a partial sum
            part += linear(gelu_new(linear(h, w["fc_in"]) + w["fc_in_bias"]), w["fc_out"])
            if w["fc_out_bias"] is not None:  # rank 0 adds it, so the sum counts it once
                part += w["fc_out_bias"]
            x = x + m.comm.allreduce(part)  # parallel residual: one all-reduce per layer
        if trace is not None:
            trace.states.append(x.copy())
        if not all_logits:
            x = x[-1:]
        g = m.weights.globals
        return linear(layer_norm(x, g["ln_f"], g["ln_f_bias"], hp.norm_eps), g["output"]) + g["output_bias"]
