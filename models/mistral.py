"""Mistral (v0.1-v0.3, Mistral-Nemo's explicit head_dim): LLaMA's math plus a
sliding attention window, written in the LLaMA layout as neural-speed's
convert_mistral does; netp reads its files back as `llama`."""
from __future__ import annotations

from netp.models.llama import Llama
from netp.models.registry import register


@register
class Mistral(Llama):
    name = "mistral"
    hf_model_types = ("mistral",)
    gguf_architectures = ()  # llama.cpp writes Mistral as general.architecture "llama"
    ns_model_names = ()  # "mistral" names the LLaMA layout its files have
    # MistralConfig's defaults (tests hold these against transformers).
    hf_defaults = {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "rope_theta": 10000.0, "sliding_window": 4096,
    }
    recognised_by = ()  # its NE files are LLaMA's
    windowed = True
