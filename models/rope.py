"""Rope settings of a config.json (transformers 4 and 5), and the Llama 3 per-pair
frequency divisors computed from them (docs/design.md §2, Today's families)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from netp.models.checks import refuse

if TYPE_CHECKING:
    from netp.models.architecture import Architecture


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The rope settings of a config.json of transformers 4 (`rope_theta`, `rope_scaling`)
    or 5 (`rope_parameters`), merged; rope_type "default" when unscaled."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling")
    if scaling:
        params = {**scaling, **params}
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_from_hf(arch: Architecture, config: Mapping[str, Any], path: str,
                 scalings: tuple[str, ...] = ()) -> tuple[float, float]:
    """(rope theta, partial rotary factor) from a config.json of transformers 4 or 5.

    Rope scaling types other than `scalings` (linear with factor 1.0 is no
    scaling) are refused by name (longrope/su, YaRN, dynamic NTK, ...);
    rope_scaling_from_hf turns the accepted ones into freq_scale and factors.
    """
    params = rope_parameters(config)
    rope_type, factor = params["rope_type"], params.get("factor", 1.0)
    if rope_type != "default" and rope_type not in scalings and not (rope_type == "linear" and factor == 1.0):
        supported = ", ".join(("none",) + scalings)
        raise refuse(path, f"rope scaling {rope_type!r} (factor {factor}); netp implements for {arch.name}: {supported}")
    theta = params.get("rope_theta", config.get("rope_theta", arch.hf_defaults.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor",
                         config.get("rotary_pct", config.get("partial_rotary_factor",
                                                             arch.hf_defaults.get("partial_rotary_factor", 1.0))))
    return float(theta), float(partial)


def rope_scaling_from_hf(config: Mapping[str, Any], n_rot: int, theta: float) -> tuple[float, tuple[float, ...]]:
    """(freq_scale, per-pair frequency divisors) of an accepted rope scaling:
    linear factor f -> positions / f (freq_scale 1/f, transformers divides its
    inverse frequencies by f); llama3 -> the divisors transformers'
    _compute_llama3_parameters applies, one per rotary pair (docs/design.md §2)."""
    params = rope_parameters(config)
    if params["rope_type"] == "linear":
        return 1.0 / float(params.get("factor", 1.0)), ()
    if params["rope_type"] != "llama3":
        return 1.0, ()
    factor, low, high = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    original = float(params["original_max_position_embeddings"])
    inv_freq = 1.0 / theta ** (np.arange(0, n_rot, 2, dtype=np.int64).astype(np.float32) / n_rot)
    wavelen = 2 * np.pi / inv_freq.astype(np.float64)
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(wavelen < original / high, 1.0,
                       np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return 1.0, tuple(float(f) for f in factors)
