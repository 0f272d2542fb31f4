"""The registry of architectures: each models/<arch>.py registers its class with
`@register`, and every stage finds an architecture by its name, config.json,
GGUF metadata, NE tensor names or neural-speed --model_name here."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, TypeVar

from netp.errors import NetpError
from netp.models.architecture import Architecture
from netp.models.checks import refuse


_REGISTRY: dict[str, Architecture] = {}
_Arch = TypeVar("_Arch", bound=type[Architecture])


def register(cls: _Arch) -> _Arch:
    _REGISTRY[cls.name] = cls()
    return cls


def all_architectures() -> list[Architecture]:
    return list(_REGISTRY.values())


def architecture_names() -> tuple[str, ...]:
    """netp's name of every registered architecture (what a manifest may say)."""
    return tuple(sorted(_REGISTRY))


def supported_names() -> str:
    return ", ".join(architecture_names())


def by_name(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError as e:
        raise ValueError(f"unknown architecture {name!r} (supported: {supported_names()})") from e


def by_hf_config(config: Mapping[str, Any], path: str) -> Architecture:
    model_type = config.get("model_type")
    found = next((a for a in _REGISTRY.values() if model_type in a.hf_model_types), None)
    refuse_foreign_math(config, path, found)
    if found is not None:
        return found
    raise NetpError(path, f"unsupported architecture {model_type!r} "
                          f"({', '.join(config.get('architectures') or []) or 'no architectures listed'}); "
                          f"supported model_type: {supported_model_types()}")


def by_gguf_architecture(gguf_arch: str, path: str, tensor_names: Iterable[str] = ()) -> Architecture:
    """The architecture of a GGUF: of those claiming its general.architecture, the one
    whose tensor rules its names meet most specifically (a `llama` GGUF with expert
    tensors is Mixtral's)."""
    names = list(tensor_names)
    scored = [(score, arch) for arch in _REGISTRY.values() if gguf_arch in arch.gguf_architectures
              for score in [arch.gguf_recognition(names)] if score is not None]
    if scored:
        return max(scored, key=lambda s: s[0])[1]
    known = ", ".join(sorted(t for a in _REGISTRY.values() for t in a.gguf_architectures))
    raise NetpError(path, f"unsupported GGUF architecture {gguf_arch!r} (supported: {known})")


def by_ne_tensors(ne_names: Iterable[str], path: str) -> Architecture:
    """The architecture whose recognition rules a file's tensor names meet most
    specifically (a Mixtral file also has LLaMA's attention names)."""
    names = set(ne_names)
    scored = [(score, arch) for arch in _REGISTRY.values() for score in [arch.recognition(names)]
              if score is not None]
    if scored:
        return max(scored, key=lambda s: s[0])[1]
    raise NetpError(path, f"tensor names match no supported architecture ({supported_names()})")


def by_ns_model_name(model_name: str) -> Architecture:
    for arch in _REGISTRY.values():
        if model_name in arch.ns_model_names:
            return arch
    known = ", ".join(sorted(n for a in _REGISTRY.values() for n in a.ns_model_names))
    raise ValueError(f"unknown --model_name {model_name!r} (supported: {known})")


# Config keys of math no netp forward implements, whatever the architecture: (key, what it is).
_FOREIGN_MATH = (
    ("final_logit_softcapping", "logit soft-capping"), ("attn_logit_softcapping", "logit soft-capping"),
)
# Config keys that say a model has experts; only an architecture that declares them runs it.
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
# Mixtures of experts netp refuses, by model_type: what their math has beyond softmax routing over SiLU experts.
_FOREIGN_MOE = {
    "deepseek_v2": "DeepSeek-V2 (multi-head latent attention, grouped routing, shared experts)",
    "deepseek_v3": "DeepSeek-V3 (multi-head latent attention, grouped sigmoid routing with a bias)",
    "gpt_oss": "gpt-oss (attention sinks, mxfp4 experts, clamped SwiGLU)",
    "llama4": "Llama 4 (sigmoid routing, a shared expert, chunked attention)",
    "llama4_text": "Llama 4 (sigmoid routing, a shared expert, chunked attention)",
    "granitemoe": "Granite MoE (multipliers on embeddings, attention, residual and logits)",
    "granitemoeshared": "Granite MoE (multipliers on embeddings, attention, residual and logits)",
    "granitemoehybrid": "Granite MoE hybrid (Mamba layers)",
    "olmoe": "OLMoE (q/k norms over whole projections, softmax before top-k without renormalising)",
    "jamba": "Jamba (Mamba layers)",
    "dbrx": "DBRX (clipped fused qkv, its own expert layout)",
    "phimoe": "PhiMoE (sparsemixer routing)",
    "qwen3_next": "Qwen3-Next (gated delta-net layers)",
}


def _model_types(moe: bool) -> str:
    return ", ".join(sorted(t for a in _REGISTRY.values() if bool(a.expert_keys) == moe for t in a.hf_model_types))


def refuse_foreign_math(config: Mapping[str, Any], path: str, arch: Architecture | None = None) -> None:
    """Refuse by name math that `arch` (the config's model_type's architecture, if netp has
    it) does not implement: soft-capping anywhere, experts outside the MoE families."""
    for key, what in _FOREIGN_MATH:
        if config.get(key):
            raise refuse(path, f"{what} ({key} {config[key]}); netp runs dense decoders without it: "
                               f"model_type {supported_model_types()}")
    model_type = config.get("model_type")
    foreign = _FOREIGN_MOE.get(str(model_type))
    expert_key = next((k for k in _EXPERT_KEYS if config.get(k) and (arch is None or k not in arch.expert_keys)),
                      None)
    if foreign or expert_key:
        what = foreign or f"model_type {model_type!r} with experts ({expert_key} {config.get(expert_key or '')})"
        raise refuse(path, f"mixture of experts: {what}; netp runs the mixtures of experts of model_type "
                           f"{_model_types(moe=True)} and the dense decoders of model_type {_model_types(moe=False)}")


def supported_model_types() -> str:
    return ", ".join(sorted(t for a in _REGISTRY.values() for t in a.hf_model_types))
