"""Qwen3 (dense): Qwen2's layout without the q/k/v biases, with an RMSNorm
over head_dim applied to every query and key head before rotary, and an
explicit head_dim (n_embd_head_k in the header). neural-speed has no Qwen3:
the file follows its qwen2 naming, and convert warns that only netp's
runtime computes the q/k norms."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from netp.models.checks import refuse
from netp.models.hparams import HParams
from netp.models.qwen2 import Qwen2, qwen_tensors
from netp.models.registry import register


@register
class Qwen3(Qwen2):
    name = "qwen3"
    hf_model_types = ("qwen3",)
    gguf_architectures = ("qwen3",)
    ns_model_names: ClassVar[tuple[str, ...]] = ("qwen3",)
    # Qwen3Config's defaults (tests hold these against transformers).
    hf_defaults = {**Qwen2.hf_defaults, "head_dim": 128, "attention_bias": False}
    tensors = qwen_tensors(biases=False, qk_norms=True)
    recognised_by = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight")

    def check_hf(self, config: Mapping[str, Any], path: str) -> None:
        super().check_hf(config, path)
        if config.get("attention_bias"):
            raise refuse(path, "attention_bias true (netp's qwen3 has q/k norms and no biases; "
                               "Qwen2 has biases: model_type qwen2)")

    def hparams_from_hf(self, config: Mapping[str, Any], path: str) -> HParams:
        # Qwen3Config's head_dim default (128) applies when config.json omits it
        return super().hparams_from_hf({**config, "head_dim": self.hf_value(config, "head_dim")}, path)

    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        return ["qwen3: per-head q/k RMSNorm, which neural-speed (no Qwen3 model) does not compute: only "
                "netp's runtime will run this file"] + super().ns_loader_caveats(hp)
