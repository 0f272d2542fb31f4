"""Config, GGUF metadata and hparams value checks (docs/design.md §8): a value of the
wrong type or out of bounds is refused by name before anything is built from it;
a config whose math netp does not implement is refused by name (`refuse`)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from netp.errors import NetpError
from netp.models.architecture import Architecture
from netp.models.hparams import HParams


_INT32_MAX = (1 << 31) - 1
# config.json keys read as counts that may be absent from an architecture's hf_defaults.
_HF_EXTRA_COUNTS = ("num_key_value_heads", "head_dim", "n_inner", "rotary_dim", "max_position_embeddings",
                    "n_positions")
# GGUF metadata read as numbers (llama.cpp's key names, after "<arch>.").
_GGUF_COUNTS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
                "attention.head_count", "attention.head_count_kv", "rope.dimension_count", "expert_count",
                "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length")
_GGUF_REALS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
               "rope.scaling.factor")
_GGUF_TOKEN_IDS = ("bos_token_id", "eos_token_id", "padding_token_id")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_value(key: str, value: Any, kind: str, path: str) -> None:
    if value is None:
        return
    if kind == "count":  # a size: a positive whole number (a zero head count would divide by zero)
        ok = (_is_int(value) or (isinstance(value, float) and value.is_integer())) and 1 <= value <= _INT32_MAX
    elif kind == "token":  # an id, or a list of them (several EOS ids)
        ok = _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
    elif kind == "real":
        ok = _is_real(value) and math.isfinite(value)
    elif kind == "bool":
        ok = isinstance(value, (bool, np.bool_))
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {"count": f"a whole number 1 .. {_INT32_MAX}", "token": "a token id", "real": "a finite number",
                "bool": "true or false", "str": "a string"}[kind]
        raise NetpError(path, f"{key} is {value!r:.60}, expected {want}")


def check_source_values(arch: Architecture, values: Mapping[str, Any], path: str, gguf: bool = False) -> None:
    """Refuse a config.json or GGUF metadata value of the wrong type (a string, a list,
    128.5 for a count, "false" for a flag) by name, before hparams are built from it
    (docs/design.md §8). config.json kinds come from the architecture's hf_defaults."""
    if gguf:
        a = values.get("general.architecture")
        kinds = {f"{a}.{k}": "count" for k in _GGUF_COUNTS} | {f"{a}.{k}": "real" for k in _GGUF_REALS} | \
            {f"tokenizer.ggml.{k}": "token" for k in _GGUF_TOKEN_IDS}
    else:
        kinds = {k: "count" for k in _HF_EXTRA_COUNTS}
        for key, default in arch.hf_defaults.items():
            kinds[key] = ("bool" if isinstance(default, bool) else "token" if key.endswith("_token_id")
                          else "count" if isinstance(default, int) else "real" if isinstance(default, float)
                          else "str" if isinstance(default, str) else "any")
        kinds |= {k: "token" for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    for key, kind in kinds.items():
        if kind != "any" and key in values:
            _check_value(key, values[key], kind, path)


def check_hparams(hp: HParams, path: str, n_tensors: int | None = None, source: str = "config") -> None:
    """Refuse hparams that are nonsense or would make work without bound, by name
    (docs/design.md §8): sizes positive and within the NE header's int32, whole
    heads per KV group, a rotary width that fits a head, finite eps > 0 and rope
    theta > 0, a context length >= 0, and (given the number of tensors the
    checkpoint really holds) no more layers than those tensors can hold, checked
    before the expected-tensor list is built from it. `source` names what the
    values came from in the messages ("config", "header", "GGUF metadata")."""
    sizes = {"n_vocab": hp.n_vocab, "n_embd": hp.n_embd, "n_head": hp.n_head, "n_head_kv": hp.n_head_kv,
             "n_layer": hp.n_layer, "n_ff": hp.n_ff}
    for name, value in sizes.items():
        if not 1 <= value <= _INT32_MAX:
            raise NetpError(path, f"{name} is {value}: sizes must be 1 .. {_INT32_MAX} "
                                  f"(n_vocab {hp.n_vocab}, n_embd {hp.n_embd}, n_head {hp.n_head}, "
                                  f"n_head_kv {hp.n_head_kv}, n_layer {hp.n_layer}, n_ff {hp.n_ff})")
    if (not hp.n_embd_head and hp.n_embd % hp.n_head) or hp.n_head % hp.n_head_kv:
        raise NetpError(path, f"{hp.n_head} heads / {hp.n_head_kv} KV heads over n_embd {hp.n_embd}: "
                              "not a whole number of heads per KV group")
    if not 0 <= hp.n_rot <= hp.head_dim or hp.n_rot % 2:
        raise NetpError(path, f"rotary width n_rot {hp.n_rot} does not fit head_dim {hp.head_dim}")
    if not (math.isfinite(hp.norm_eps) and 0 < hp.norm_eps < 1):
        raise NetpError(path, f"norm epsilon is {hp.norm_eps}; it must be a finite number in (0, 1)")
    if not (math.isfinite(hp.rope_theta) and 0 < hp.rope_theta < 3.4e38):
        raise NetpError(path, f"rope theta (freq_base) is {hp.rope_theta}; it must be a finite positive number")
    for name in ("n_embd_head", "sliding_window"):  # 0 means "not set" for both
        if not 0 <= getattr(hp, name) <= _INT32_MAX:
            raise NetpError(path, f"{name} is {getattr(hp, name)}; it must be 0 .. {_INT32_MAX}")
    if not (math.isfinite(hp.freq_scale) and 0 < hp.freq_scale < 3.4e38):
        raise NetpError(path, f"rope freq_scale is {hp.freq_scale}; it must be a finite positive number")
    if not 0 <= hp.max_seq_len <= _INT32_MAX:
        raise NetpError(path, f"context length (max_seq_len) is {hp.max_seq_len}; it must be 0 .. {_INT32_MAX}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if not -1 <= getattr(hp, name) <= _INT32_MAX:
            raise NetpError(path, f"{name} is {getattr(hp, name)}; it must be -1 (none) or a token id")
    if n_tensors is not None and hp.n_layer > n_tensors:
        raise NetpError(path, f"{source} says {hp.n_layer} layers, more than its {n_tensors} tensors can hold")
    if hp.n_expert or hp.n_expert_used:
        _check_experts(hp, path, source)


MAX_EXPERTS = 1024  # experts per layer netp takes (the largest models today have 512)
MAX_EXPERT_TENSORS = 1 << 18  # experts over all layers (Qwen3-235B-A22B: 94 x 128 = 12032)


def _check_experts(hp: HParams, path: str, source: str) -> None:
    """An MoE model's counts, before a tensor list is built from them: merged expert
    tensors hold any number of experts in one tensor, so the tensor count bounds
    the layers but not the experts."""
    if not 1 <= hp.n_expert <= MAX_EXPERTS:
        raise NetpError(path, f"{source} says {hp.n_expert} experts; netp takes 1 .. {MAX_EXPERTS}")
    if not 1 <= hp.n_expert_used <= hp.n_expert:
        raise NetpError(path, f"{source} says {hp.n_expert_used} experts per token out of {hp.n_expert}")
    for name in ("n_ff_expert", "moe_step"):
        if not 1 <= getattr(hp, name) <= _INT32_MAX:
            raise NetpError(path, f"{name} is {getattr(hp, name)}; it must be 1 .. {_INT32_MAX}")
    if not 0 <= hp.n_ff_shared <= _INT32_MAX:
        raise NetpError(path, f"n_ff_shared is {hp.n_ff_shared}; it must be 0 .. {_INT32_MAX}")
    moe_layers = sum(hp.is_moe_layer(i) for i in range(min(hp.n_layer, _INT32_MAX)))
    if not moe_layers:
        raise NetpError(path, f"{source} gives no layer experts (every layer a dense MLP): not a mixture of experts")
    if moe_layers * hp.n_expert > MAX_EXPERT_TENSORS:
        raise NetpError(path, f"{source} says {moe_layers} MoE layers of {hp.n_expert} experts; netp takes up to "
                              f"{MAX_EXPERT_TENSORS} experts in all")


def refuse(path: str, what: str) -> NetpError:
    """The error for a config whose math netp does not implement; `what` names the
    feature and says what is supported instead."""
    return NetpError(path, f"unsupported config: {what}; netp would compute this model wrong, so it refuses it")
