"""Mixtures of experts on the LLaMA-style decoder: what the Mixtral, Qwen3-MoE and
Qwen2-MoE modules share (docs/design.md §2 "Mixtures of experts", §5 routing).

An MoE layer replaces the dense MLP with a router (E x n_embd, replicated,
f32 even in quantized files) and E SiLU-gated experts, each cut over the
ranks like a dense MLP (gate/up rows, down columns, 32-value blocks);
Qwen2-MoE adds a shared expert, cut alike, weighted by
sigmoid(shared_expert_gate . x) (a replicated vector). Every rank routes from
the same replicated hidden state with the same code, so every rank chooses
the same experts and runs its slice of each: one all-reduce per MoE block,
as for a dense MLP.

Routing is transformers': probabilities = softmax of the router logits over
all E experts in f32; the k largest as torch.topk chooses them (ties
included: models/topk.py); renormalised to sum 1 when norm_topk_prob
(Mixtral always: softmax over the k chosen logits is the same thing).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np

from netp.models.architecture import REPLICATED, SplitRule, TensorSpec
from netp.models.checks import refuse
from netp.models.context import ForwardTrace, RankContext, Tensors
from netp.models.decoder import Decoder
from netp.models.gguf_meta import GGUFMeta
from netp.models.hparams import HParams
from netp.models.layers import linear, swiglu
from netp.models.topk import top_k

FFN_ROWS, FFN_COLS = SplitRule("rows", "ffn"), SplitRule("cols", "ffn")


def moe_layer(hp: HParams, layer: int) -> bool:
    return hp.is_moe_layer(layer)


def dense_layer(hp: HParams, layer: int) -> bool:
    return not hp.is_moe_layer(layer)


def router_spec(ne: str, hf: str | tuple[str, ...], gguf: str | tuple[str, ...]) -> TensorSpec:
    """The router of an MoE layer: (experts, n_embd), replicated, never in blocks."""
    return TensorSpec(ne, lambda h: (h.n_expert, h.n_embd), REPLICATED, hf, gguf, in_layer=moe_layer, blocks=False)


def expert_specs(gate: str, up: str, down: str, hf: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
                 gguf: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
                 order: str = "gud") -> tuple[TensorSpec, ...]:
    """One expert's gate, up and down ("{e}" templates), in the file order `order`
    (letters g, u, d); each cut like a dense MLP of width n_ff_expert."""
    specs = {
        "g": TensorSpec(gate, lambda h: (h.n_ff_expert, h.n_embd), FFN_ROWS, hf[0], gguf[0], in_layer=moe_layer),
        "u": TensorSpec(up, lambda h: (h.n_ff_expert, h.n_embd), FFN_ROWS, hf[1], gguf[1], in_layer=moe_layer),
        "d": TensorSpec(down, lambda h: (h.n_embd, h.n_ff_expert), FFN_COLS, hf[2], gguf[2], in_layer=moe_layer),
    }
    return tuple(specs[c] for c in order)


def only_in_dense_layers(specs: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
    """A dense MLP's specs, present only in the layers without experts."""
    return tuple(dataclasses.replace(s, in_layer=dense_layer) for s in specs)


def routed(logits: np.ndarray, k: int, normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    """transformers' router on logits (T, E): softmax over all experts in f32, the k
    largest probabilities as torch.topk picks them, renormalised to sum 1 when
    `normalise`. Returns expert ids (T, k) and their weights (T, k) f32."""
    p = logits.astype(np.float32, copy=True)
    p -= p.max(axis=-1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    ids = top_k(p, k)
    weights = np.take_along_axis(p, ids, axis=1)
    if normalise:
        weights /= weights.sum(axis=-1, keepdims=True)
    return ids, weights


def experts_partial(h: np.ndarray, ids: np.ndarray, weights: np.ndarray, w: Tensors) -> np.ndarray:
    """Sum over each token's chosen experts of weight x expert(h), on this rank's slice
    of every expert: (T, n_embd) f64 partial sums. Only the chosen experts' weights
    are read; the tokens routed to one expert go through it in one product each."""
    T = h.shape[0]
    out = np.zeros((T, h.shape[1]), dtype=np.float64)
    if T == 1:  # decode: the k chosen experts, one after the other
        for e, p in zip(ids[0].tolist(), weights[0]):
            out += p * swiglu(h, w[f"expert.{e}.w13"], w[f"expert.{e}.w2"])
        return out
    for e in np.unique(ids).tolist():  # prefill: the tokens of each expert as one batch
        tokens, slots = np.nonzero(ids == e)
        y = swiglu(h[tokens], w[f"expert.{e}.w13"], w[f"expert.{e}.w2"])
        out[tokens] += weights[tokens, slots, None] * y  # a token chooses an expert at most once
    return out


class MixtureOfExperts(Decoder):
    """The MoE part of a LLaMA-style family, mixed in before its dense class
    (`class Mixtral(MixtureOfExperts, Llama)`): hparams, header fields, the
    runtime's weights of an MoE layer and its feed-forward. Subclasses name their
    tensors (templates with "{i}" and "{e}")."""

    compiled_decode: ClassVar[bool] = False  # the expert layers run in Python (runtime/fused.py is dense only)
    router: ClassVar[str]
    expert_w13: ClassVar[tuple[str, str]]  # gate, up
    expert_w2: ClassVar[str]  # down
    shared_w13: ClassVar[tuple[str, str] | None] = None  # the shared expert (Qwen2-MoE)
    shared_w2: ClassVar[str | None] = None
    shared_gate: ClassVar[str | None] = None  # its sigmoid gate, a vector over n_embd
    dense_gate: ClassVar[str | None] = None  # a dense layer's gate projection (Qwen's mlp_only_layers)
    norm_field: ClassVar[str | None] = None  # the header slot of norm_topk_prob; None: always renormalised
    gguf_norm_topk_prob: ClassVar[bool] = True  # what llama.cpp does for this GGUF architecture

    # -- hparams ---------------------------------------------------------------------
    def moe_from_hf(self, config: Mapping[str, Any], hp: HParams, path: str) -> HParams:
        """The MoE hparams of a config.json; the family's own keys."""
        raise NotImplementedError

    def hparams_from_hf(self, config: Mapping[str, Any], path: str) -> HParams:
        hp = self.moe_from_hf(config, super().hparams_from_hf(config, path), path)
        n_expert, k = hp.n_expert, hp.n_expert_used
        if not 1 <= k <= n_expert:
            raise refuse(path, f"{k} experts per token out of {n_expert} ({self.name} routes to 1 .. all of them)")
        return hp

    def hparams_from_gguf(self, meta: Mapping[str, Any], path: str, tensor_names: Iterable[str] = ()) -> HParams:
        hp = super().hparams_from_gguf(meta, path, tensor_names)
        g = GGUFMeta(meta, path)
        names = list(tensor_names)
        dense = _layers_with(names, r"blk\.(\d+)\.ffn_gate\.weight") if self.dense_gate else ()
        return dataclasses.replace(
            hp, n_expert=int(g.need("expert_count")), n_expert_used=int(g.need("expert_used_count")),
            n_ff_expert=int(g.get("expert_feed_forward_length", 0)) or hp.n_ff,
            n_ff_shared=int(g.get("expert_shared_feed_forward_length", 0)) if self.shared_w2 else 0,
            norm_topk_prob=self.gguf_norm_topk_prob, dense_layers=tuple(sorted(dense)))

    def header_fields(self, hp: HParams) -> dict[str, Any]:
        out = super().header_fields(hp) | {"n_experts": hp.n_expert, "n_experts_used": hp.n_expert_used}
        if self.norm_field:
            out[self.norm_field] = int(hp.norm_topk_prob)
        return out

    def hparams_from_ne(self, header: Any, shapes: Mapping[str, tuple[int, ...]]) -> HParams:
        hp = super().hparams_from_ne(header, shapes)
        names = list(shapes)
        dense = _layers_with(names, _layer_regex(self.dense_gate)) if self.dense_gate else ()
        moe = sorted(_layers_with(names, _layer_regex(self.router)))
        first = moe[0] if moe else 0
        shared = self.shared_w2.format(i=first) if self.shared_w2 else None
        return dataclasses.replace(
            hp, n_expert=header.n_experts, n_expert_used=header.n_experts_used,
            n_ff_expert=shapes[self.expert_w2.format(i=first, e=0)][1],
            n_ff_shared=shapes[shared][1] if shared else 0,
            norm_topk_prob=bool(getattr(header, self.norm_field)) if self.norm_field else True,
            dense_layers=tuple(sorted(dense)))

    # -- runtime ---------------------------------------------------------------------
    def runtime_tensors(self, layer: int | None, hp: HParams) -> dict[str, tuple[str, ...]]:
        out = super().runtime_tensors(layer, hp)
        if layer is None or not hp.is_moe_layer(layer):
            return out
        del out["w13"], out["w2"]
        out["router"] = (self.router.format(i=layer),)
        for e in range(hp.n_expert):
            out[f"expert.{e}.w13"] = tuple(t.format(i=layer, e=e) for t in self.expert_w13)  # gate | up
            out[f"expert.{e}.w2"] = (self.expert_w2.format(i=layer, e=e),)
        if self.shared_w13 and self.shared_w2 and self.shared_gate:
            out["shared.w13"] = tuple(t.format(i=layer) for t in self.shared_w13)
            out["shared.w2"] = (self.shared_w2.format(i=layer),)
            out["shared.gate"] = (self.shared_gate.format(i=layer),)
        return out

    def feed_forward(self, m: RankContext, layer: int, h: np.ndarray, w: Tensors,
                     trace: ForwardTrace | None) -> np.ndarray:
        hp = m.hp
        if not hp.is_moe_layer(layer):
            if trace is not None:
                trace.experts.append(None)
            return super().feed_forward(m, layer, h, w, trace)
        ids, weights = routed(linear(h, w["router"]), hp.n_expert_used, hp.norm_topk_prob)  # (T, k) each
        if trace is not None:
            trace.experts.append(ids)
        out = experts_partial(h, ids, weights, w)  # (T, n_embd) f64
        if "shared.w13" in w:  # sigmoid(gate . h) x shared expert(h), on this rank's slice of it
            gate = 1.0 / (1.0 + np.exp(-(h @ w["shared.gate"])))  # (T,)
            out += gate[:, None] * swiglu(h, w["shared.w13"], w["shared.w2"])
        return out

    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        out = super().ns_loader_caveats(hp)
        dense = [i for i in range(hp.n_layer) if not hp.is_moe_layer(i)]
        if dense:
            out.append(f"dense MLP layers {dense} between the MoE ones: only netp's runtime reads them")
        return out


def _layer_regex(template: str) -> str:
    """A per-layer NE name template as a regex capturing the layer (expert 0 where it has one)."""
    return re.escape(template.replace("{e}", "0")).replace(re.escape("{i}"), r"(\d+)")


def _layers_with(names: Iterable[str], regex: str) -> set[int]:
    """The layers whose tensor names match `regex` (one group: the layer)."""
    pattern = re.compile(regex)
    return {int(m.group(1)) for n in names if (m := pattern.fullmatch(n))}
