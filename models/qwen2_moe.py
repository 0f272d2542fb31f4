"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v
biases, rotate-half rotary) with MoE layers: softmax over num_experts router
logits in f32, top num_experts_per_tok, renormalised only when
norm_topk_prob, plus a shared expert weighted by sigmoid(shared_expert_gate . x).
`decoder_sparse_step` / `mlp_only_layers` leave some layers a dense MLP of
intermediate_size. Also the Qwen MoE table Qwen3-MoE uses (models/qwen3_moe.py).

NE layout (neural-speed has no Qwen MoE; docs/design.md §2): the HF names, as
for Qwen2, per expert J `model.layers.N.mlp.experts.J.{gate,up,down}_proj.weight`,
the router `mlp.gate.weight`, the shared expert `mlp.shared_expert.*` and its
gate `mlp.shared_expert_gate.weight` stored as the n_embd vector llama.cpp
keeps (HF holds it as a 1 x n_embd matrix); a dense layer keeps
`mlp.{gate,up,down}_proj.weight`. Header: Qwen2's, plus n_experts,
n_experts_used, and norm_topk_prob in the `do_layer_norm_before` slot (0/1);
the expert and shared widths and the dense layers are read from the tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from netp.models.architecture import REPLICATED, TensorSpec
from netp.models.checks import refuse
from netp.models.hparams import HParams
from netp.models.moe import (
    FFN_COLS, FFN_ROWS, MixtureOfExperts, expert_specs, moe_layer, only_in_dense_layers, router_spec,
)
from netp.models.qwen2 import Qwen2, qwen_tensors
from netp.models.registry import register

_L = "model.layers.{i}."
_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def qwen_moe_tensors(biases: bool, qk_norms: bool, shared: bool) -> tuple[TensorSpec, ...]:
    """The Qwen table with MoE layers: the dense MLP only in dense layers, then the
    router, the experts (gate, up, down of each) and, for Qwen2-MoE, the shared expert."""
    moe = [
        router_spec(_L + "mlp.gate.weight", _L + "mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight"),
        *expert_specs(
            _L + "mlp.experts.{e}.gate_proj.weight", _L + "mlp.experts.{e}.up_proj.weight",
            _L + "mlp.experts.{e}.down_proj.weight",
            hf=((_L + "mlp.experts.{e}.gate_proj.weight", _L + "mlp.experts.gate_up_proj"),
                (_L + "mlp.experts.{e}.up_proj.weight", _L + "mlp.experts.gate_up_proj"),
                (_L + "mlp.experts.{e}.down_proj.weight", _L + "mlp.experts.down_proj")),
            gguf=(("blk.{i}.ffn_gate_exps.weight",), ("blk.{i}.ffn_up_exps.weight",),
                  ("blk.{i}.ffn_down_exps.weight",))),
    ]
    if shared:
        def spec(ne: str, shape: Any, split: Any, gguf: str) -> TensorSpec:
            return TensorSpec(_L + ne, shape, split, _L + ne, gguf, in_layer=moe_layer)

        moe += [
            spec("mlp.shared_expert.gate_proj.weight", lambda h: (h.n_ff_shared, h.n_embd), FFN_ROWS,
                 "blk.{i}.ffn_gate_shexp.weight"),
            spec("mlp.shared_expert.up_proj.weight", lambda h: (h.n_ff_shared, h.n_embd), FFN_ROWS,
                 "blk.{i}.ffn_up_shexp.weight"),
            spec("mlp.shared_expert.down_proj.weight", lambda h: (h.n_embd, h.n_ff_shared), FFN_COLS,
                 "blk.{i}.ffn_down_shexp.weight"),
            spec("mlp.shared_expert_gate.weight", lambda h: (h.n_embd,), REPLICATED, "blk.{i}.ffn_gate_inp_shexp.weight"),
        ]
    out: list[TensorSpec] = []
    for s in qwen_tensors(biases=biases, qk_norms=qk_norms):
        dense = s.ne.endswith(_MLP)
        out += only_in_dense_layers([s]) if dense else [s]
        if s.ne == _L + _MLP[-1]:
            out += moe
    return tuple(out)


class QwenMoE(MixtureOfExperts):
    """What Qwen2-MoE and Qwen3-MoE share: config keys, names, the norm_topk_prob slot."""

    expert_keys = ("num_experts", "num_local_experts", "num_experts_per_tok")
    router = _L + "mlp.gate.weight"
    expert_w13: ClassVar[tuple[str, str]] = (_L + "mlp.experts.{e}.gate_proj.weight",
                                             _L + "mlp.experts.{e}.up_proj.weight")
    expert_w2 = _L + "mlp.experts.{e}.down_proj.weight"
    dense_gate = _L + "mlp.gate_proj.weight"
    norm_field = "do_layer_norm_before"
    hf_moe_defaults: ClassVar[dict[str, Any]] = {"decoder_sparse_step": 1, "mlp_only_layers": [],
                                                 "norm_topk_prob": False}

    def moe_from_hf(self, config: Mapping[str, Any], hp: HParams, path: str) -> HParams:
        v = lambda key: self.hf_value(config, key)  # noqa: E731
        n_expert = config.get("num_experts") or config.get("num_local_experts") or v("num_experts")
        step, only = v("decoder_sparse_step"), v("mlp_only_layers")
        if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
            raise refuse(path, f"mlp_only_layers {only!r:.60} is not a list of layer numbers")
        dense = tuple(sorted({i for i in only if 0 <= i < hp.n_layer}))
        shared = int(v("shared_expert_intermediate_size") or 0) if self.shared_w2 else 0
        return dataclasses.replace(
            hp, n_expert=int(n_expert), n_expert_used=int(v("num_experts_per_tok")),
            n_ff_expert=int(v("moe_intermediate_size")), n_ff_shared=shared,
            norm_topk_prob=bool(v("norm_topk_prob")), dense_layers=dense, moe_step=int(step))

    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        return [f"{self.name}: neural-speed has no Qwen mixture of experts: only netp's runtime will run this "
                "file"] + super().ns_loader_caveats(hp)


@register
class Qwen2Moe(QwenMoE, Qwen2):
    name = "qwen2_moe"
    hf_model_types = ("qwen2_moe",)
    gguf_architectures = ("qwen2moe",)
    ns_model_names: ClassVar[tuple[str, ...]] = ()
    # Qwen2MoeConfig's defaults (tests hold these against transformers).
    hf_defaults = {
        **Qwen2.hf_defaults, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "hidden_size": 2048, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4, "num_experts": 60, "qkv_bias": True, **QwenMoE.hf_moe_defaults,
    }
    tensors = qwen_moe_tensors(biases=True, qk_norms=False, shared=True)
    recognised_with = (r"model\.layers\.\d+\.mlp\.shared_expert_gate\.weight",)
    shared_w13: ClassVar[tuple[str, str] | None] = (_L + "mlp.shared_expert.gate_proj.weight",
                                                    _L + "mlp.shared_expert.up_proj.weight")
    shared_w2 = _L + "mlp.shared_expert.down_proj.weight"
    shared_gate = _L + "mlp.shared_expert_gate.weight"
    gguf_norm_topk_prob = False  # llama.cpp's qwen2moe never renormalises

    def check_hf(self, config: Mapping[str, Any], path: str) -> None:
        super().check_hf(config, path)
        if not self.hf_value(config, "qkv_bias"):
            raise refuse(path, "qkv_bias false (netp's qwen2_moe has q/k/v biases)")
        if not self.hf_value(config, "shared_expert_intermediate_size"):
            raise refuse(path, "shared_expert_intermediate_size 0 (netp's qwen2_moe has a shared expert)")
