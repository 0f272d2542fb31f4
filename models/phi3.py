"""Phi-3 (mini/medium, 4k context): LLaMA's math with fused checkpoint tensors
and a sliding window. The HF hook cuts qkv_proj into wq|wk|wv and
gate_up_proj into w1|w3 (gate first, as transformers' Phi3MLP chunks it) and
permutes wq/wk as for LLaMA, so the file has the LLaMA layout and netp reads
it back as `llama`. neural-speed's own phi3 loader wants the fused tensors
(and a 3072-wide model), so convert warns that only netp runs the file.
longrope/su scaling (the 128k kinds) is refused by name."""
from __future__ import annotations

from typing import Any, Mapping

from netp.models.checks import refuse
from netp.models.hparams import HParams
from netp.models.llama import _HF, Llama, llama_tensors
from netp.models.registry import register


@register
class Phi3(Llama):
    name = "phi3"
    hf_model_types = ("phi3",)
    gguf_architectures = ()
    ns_model_names = ()  # "phi3" names the LLaMA layout its files have
    # Phi3Config's defaults (tests hold these against transformers).
    hf_defaults = {
        "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 32000, "tie_word_embeddings": False,
        "rope_theta": 10000.0,
    }
    tensors = llama_tensors(qkv=(_HF + "self_attn.qkv_proj.weight",) * 3, gate_up=_HF + "mlp.gate_up_proj.weight")
    recognised_by = ()  # its NE files are LLaMA's
    rope_scalings = ("linear",)
    windowed = True

    def check_hf(self, config: Mapping[str, Any], path: str) -> None:
        super().check_hf(config, path)
        if config.get("partial_rotary_factor") not in (None, 1.0):
            raise refuse(path, f"partial_rotary_factor {config['partial_rotary_factor']} "
                               "(netp's phi3 rotates whole heads: Phi-3 mini/medium)")

    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        return ["phi3: stored in the LLaMA layout (qkv_proj and gate_up_proj cut apart); neural-speed's phi3 "
                "loader wants them fused, so run it with netp or as --model_name llama"] + \
            super().ns_loader_caveats(hp)
