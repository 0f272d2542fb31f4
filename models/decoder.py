"""The LLaMA-style decoder the LLaMA, Mistral, Phi-3, Qwen2 and Qwen3 modules share:
RMSNorm, rotary attention with grouped KV heads, a SiLU-gated MLP. What
differs per family is data on the class (its tensor table, rotary layout,
rope scalings, whether config.json's sliding window applies) plus the
tensors only some have (q/k/v biases, per-head q/k norms), each found in
the forward by its runtime name.

Hparams come from config.json (as JSON, with the class's transformers
defaults), from GGUF metadata (llama.cpp's keys) or from an NE header;
the header fields follow neural-speed's converters (docs/design.md §2).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Mapping

import numpy as np

from netp.models.architecture import Architecture
from netp.models.checks import refuse
from netp.models.context import ForwardTrace, RankContext, Tensors
from netp.models.gguf_meta import GGUFMeta
from netp.models.hparams import HParams, token_id
from netp.models.rope import rope_from_hf, rope_scaling_from_hf
from netp.models.layers import add_rms_norm, rms_norm, linear, rotate_halves, rotate_pairs, self_attention, swiglu

ROPE_FREQS = "rope_freqs.weight"


class Decoder(Architecture):
    """A LLaMA-style decoder; subclasses give the table and the family's facts."""

    rotate: ClassVar[Callable[..., None]] = staticmethod(rotate_pairs)
    rope_scalings: ClassVar[tuple[str, ...]] = ("linear",)  # beyond none; "llama3" needs rope_freqs.weight
    windowed: ClassVar[bool] = False  # transformers applies config.json's sliding_window to this family
    has_biases: ClassVar[bool] = False  # q/k/v projections carry biases (Qwen2)
    # The header's otherwise unused slot that carries the sliding window (neural-speed's
    # LLaMA-family loaders ignore it; docs/design.md §2).
    window_field: ClassVar[str] = "inner_hidden_size"
    n_mult: ClassVar[int | None] = 256  # neural-speed's header value; None: the MLP width (convert_qwen2)
    rope_freqs_name: ClassVar[str | None] = None
    # A decode step's layers may run as one compiled call (runtime/fused.py, the same steps in the
    # same order as forward's loop below); a family whose layer differs (mixtures of experts) says no.
    compiled_decode: ClassVar[bool] = True

    @property
    def rotates_halves(self) -> bool:
        return type(self).rotate is rotate_halves

    # -- hparams -----------------------------------------------------------------
    def check_hf(self, config: Mapping[str, Any], path: str) -> None:
        """Family-specific refusals, before the shared ones."""

    def hparams_from_hf(self, config: Mapping[str, Any], path: str) -> HParams:
        self.check_hf(config, path)
        v = lambda key: self.hf_value(config, key)  # noqa: E731
        n_embd, n_head = int(v("hidden_size")), int(v("num_attention_heads"))
        n_head_kv = int(config.get("num_key_value_heads") or n_head)
        if v("hidden_act") != "silu":
            raise refuse(path, f"hidden_act {v('hidden_act')!r} ({self.name} implements silu)")
        head_dim = int(config.get("head_dim") or 0) or (n_embd // n_head if n_embd % n_head == 0 else 0)
        if head_dim < 1 or n_head % n_head_kv:
            raise refuse(path, f"{n_head} heads / {n_head_kv} KV heads over hidden size {n_embd} "
                               "(netp needs whole heads per KV group and a head_dim)")
        theta, partial = rope_from_hf(self, config, path, self.rope_scalings)
        if partial != 1.0:
            raise refuse(path, f"partial rotary factor {partial} (netp's {self.name} rotates whole heads)")
        freq_scale, factors = rope_scaling_from_hf(config, head_dim, theta)
        window = int(config.get("sliding_window") or 0) if self.windowed else 0
        return HParams(
            arch=self.name, n_vocab=int(v("vocab_size")), n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
            n_layer=int(v("num_hidden_layers")), n_ff=int(v("intermediate_size")), n_rot=head_dim,
            norm_eps=float(v("rms_norm_eps")), rope_theta=theta, bos_token_id=token_id(v("bos_token_id")),
            eos_token_id=token_id(v("eos_token_id")), pad_token_id=token_id(config.get("pad_token_id")),
            tie_embeddings=bool(v("tie_word_embeddings")), max_seq_len=int(v("max_position_embeddings")),
            n_embd_head=head_dim if head_dim * n_head != n_embd else 0, freq_scale=freq_scale,
            rope_freqs=bool(factors), rope_freq_factors=factors, sliding_window=window,
        )

    def hparams_from_gguf(self, meta: Mapping[str, Any], path: str, tensor_names: Iterable[str] = ()) -> HParams:
        g = GGUFMeta(meta, path)
        n_embd, n_head = int(g.need("embedding_length")), int(g.need("attention.head_count"))
        head_dim = int(g.get("attention.key_length", 0)) or n_embd // n_head
        n_rot = int(g.get("rope.dimension_count", head_dim))
        if n_rot != head_dim:
            raise refuse(path, f"rope.dimension_count {n_rot} != head dim {head_dim} "
                               f"(netp's {self.name} rotates whole heads)")
        scaling, factor = g.get("rope.scaling.type", "none"), float(g.get("rope.scaling.factor", 1.0))
        if scaling not in ("none", "linear"):
            raise refuse(path, f"rope scaling {scaling!r}; netp implements: none, linear, llama3 (rope_freqs.weight)")
        rope_freqs = self.rope_freqs_name is not None and self.rope_freqs_name in set(tensor_names)
        return HParams(
            arch=self.name, n_vocab=g.n_vocab(), n_embd=n_embd, n_head=n_head,
            n_head_kv=int(g.get("attention.head_count_kv", n_head)), n_layer=int(g.need("block_count")),
            n_ff=int(g.need("feed_forward_length")), n_rot=n_rot,
            norm_eps=float(g.need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(g.get("rope.freq_base", 10000.0)),
            bos_token_id=g.token("bos_token_id"), eos_token_id=g.token("eos_token_id"),
            pad_token_id=g.token("padding_token_id"), max_seq_len=int(g.get("context_length", 0)),
            n_embd_head=head_dim if head_dim * n_head != n_embd else 0,
            freq_scale=1.0 / factor if scaling == "linear" else 1.0, rope_freqs=rope_freqs,
            sliding_window=int(g.get("attention.sliding_window", 0)) if self.windowed else 0,
        )

    def header_fields(self, hp: HParams) -> dict[str, Any]:
        return {
            "n_vocab": hp.n_vocab, "n_embd": hp.n_embd, "n_mult": self.n_mult or hp.n_ff, "n_head": hp.n_head,
            "n_head_kv": hp.n_head_kv, "n_layer": hp.n_layer, "n_rot": hp.n_rot, "max_seq_len": hp.max_seq_len,
            "ffn_hidden_size": hp.n_ff, "n_embd_head_k": hp.n_embd_head, "norm_eps": hp.norm_eps,
            "freq_base": hp.rope_theta, "freq_scale": hp.freq_scale, self.window_field: hp.sliding_window,
            "bos_token_id": hp.bos_token_id, "eos_token_id": hp.eos_token_id, "pad_token_id": hp.pad_token_id,
        }

    def hparams_from_ne(self, header: Any, shapes: Mapping[str, tuple[int, ...]]) -> HParams:
        n_ff = header.ffn_hidden_size or shapes[
            next(s.name(0) for s in self.tensors if s.ne.endswith(("w1.weight", "gate_proj.weight")))][0]
        return HParams(
            arch=self.name, n_vocab=header.n_vocab, n_embd=header.n_embd, n_head=header.n_head,
            n_head_kv=header.n_head_kv or header.n_head, n_layer=header.n_layer,
            n_ff=n_ff, n_rot=header.n_rot,
            norm_eps=header.norm_eps, rope_theta=header.freq_base, bos_token_id=header.bos_token_id,
            eos_token_id=header.eos_token_id, pad_token_id=header.pad_token_id, max_seq_len=header.max_seq_len,
            n_embd_head=header.n_embd_head_k, freq_scale=header.freq_scale,
            rope_freqs=self.rope_freqs_name is not None and self.rope_freqs_name in shapes,
            sliding_window=getattr(header, self.window_field),
        )

    def generated_tensors(self, hp: HParams) -> dict[str, np.ndarray]:
        if self.rope_freqs_name and hp.rope_freq_factors:
            return {self.rope_freqs_name: np.array(hp.rope_freq_factors, dtype=np.float32)}
        return {}

    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        out = []
        if hp.rope_freqs:
            out.append("llama3 rope scaling (rope_freqs.weight): neural-speed's loader does not expect the "
                       "tensor, so only netp's runtime will run this file")
        if hp.sliding_window:
            out.append(f"sliding_window {hp.sliding_window}: neural-speed attends to every position, so "
                       f"its runtime computes this model right only up to {hp.sliding_window} tokens")
        if hp.n_embd_head:
            out.append(f"head_dim {hp.head_dim} != hidden_size/num_attention_heads: only netp's runtime and "
                       "neural-speed's Gemma loader read n_embd_head_k")
        return out

    # -- runtime -------------------------------------------------------------------
    def feed_forward(self, m: RankContext, layer: int, h: np.ndarray, w: Tensors,
                     trace: ForwardTrace | None) -> np.ndarray:
        """This rank's partial sum of layer `layer`'s MLP on the normed h (T, n_embd),
        for the all-reduce: the SiLU-gated MLP on this rank's slice of its width.
        A mixture of experts overrides it (models/moe.py)."""
        return swiglu(h, w["w13"], w["w2"])

    def forward(self, m: RankContext, tokens: np.ndarray, start: int, all_logits: bool = False,
                trace: ForwardTrace | None = None) -> np.ndarray:
        hp, allreduce, rotate = m.hp, m.comm.allreduce, type(self).rotate
        x = np.ascontiguousarray(m.weights.embed(tokens), dtype=np.float32)  # (T, n_embd), on every rank
        compiled = trace is None and x.shape[0] == 1 and self.compiled_decode and m.decode_layers(x, start)
        h = rms_norm(x, m.weights.layer(0)["attention_norm"], hp.norm_eps) if hp.n_layer and not compiled else x
        for i in range(0 if compiled else hp.n_layer):
            if trace is not None:
                trace.states.append(x.copy())
            w = m.weights.layer(i)
            qkv = linear(h, w["wqkv"])  # (T, (nq + 2 nkv) hd): this rank's heads
            if w.get("bqkv") is not None:
                qkv += w["bqkv"]
            attn = self_attention(m, i, qkv, start, rotate, w.get("q_norm"), w.get("k_norm"))  # (T, nq hd)
            # wo and the MLP's down are cut by columns: partial sums over ranks. Each residual step
            # is fused with the norm after it (x changes in place).
            h = add_rms_norm(x, allreduce(linear(attn, w["wo"])), w["ffn_norm"], hp.norm_eps)
            delta = allreduce(self.feed_forward(m, i, h, w, trace))  # one all-reduce, dense or MoE
            if i + 1 < hp.n_layer:
                h = add_rms_norm(x, delta, m.weights.layer(i + 1)["attention_norm"], hp.norm_eps)
            else:
                x += delta
        if trace is not None:
            trace.states.append(x.copy())
        if not all_logits:
            x = x[-1:]
        g = m.weights.globals
        return linear(rms_norm(x, g["norm"], hp.norm_eps), g["output"])  # (T', V_local)

