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
    refuse_foreign_math(config, path)
    model_type = config.get("model_type")
    for arch in _REGISTRY.values():
        if model_type in arch.hf_model_types:
            return arch
    raise NetpError(path, f"unsupported architecture {model_type!r} "
                          f"({', '.join(config.get('architectures') or []) or 'no architectures listed'}); "
                          f"supported model_type: {supported_model_types()}")


def by_gguf_architecture(gguf_arch: str, path: str) -> Architecture:
    for arch in _REGISTRY.values():
        if gguf_arch in arch.gguf_architectures:
            return arch
    known = ", ".join(sorted(t for a in _REGISTRY.values() for t in a.gguf_architectures))
    raise NetpError(path, f"unsupported GGUF architecture {gguf_arch!r} (supported: {known})")


def by_ne_tensors(ne_names: Iterable[str], path: str) -> Architecture:
    names = set(ne_names)
    for arch in _REGISTRY.values():
        if arch.recognises(names):
            return arch
    raise NetpError(path, f"tensor names match no supported architecture ({supported_names()})")


def by_ns_model_name(model_name: str) -> Architecture:
    for arch in _REGISTRY.values():
        if model_name in arch.ns_model_names:
            return arch
    known = ", ".join(sorted(n for a in _REGISTRY.values() for n in a.ns_model_names))
    raise ValueError(f"unknown --model_name {model_name!r} (supported: {known})")


# Config keys of math no netp forward implements, whatever the architecture: (key, what it is).
_FOREIGN_MATH = (
    ("num_local_experts", "mixture of experts"), ("num_experts", "mixture of experts"),
    ("n_routed_experts", "mixture of experts"),
    ("final_logit_softcapping", "logit soft-capping"), ("attn_logit_softcapping", "logit soft-capping"),
)


def refuse_foreign_math(config: Mapping[str, Any], path: str) -> None:
    for key, what in _FOREIGN_MATH:
        if config.get(key):
            raise refuse(path, f"{what} ({key} {config[key]}); netp runs dense decoders without it: "
                               f"model_type {supported_model_types()}")


def supported_model_types() -> str:
    return ", ".join(sorted(t for a in _REGISTRY.values() for t in a.hf_model_types))

