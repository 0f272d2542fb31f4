"""Per-architecture facts. Importing this package registers every architecture."""
from netp.models import gpt_neox, gptj, llama  # noqa: F401  (registration side effect)
from netp.models.base import (  # noqa: F401
    Architecture, HParams, SplitRule, all_architectures, architecture_names, by_gguf_architecture, by_hf_config,
    by_name, by_ne_tensors, by_ns_model_name, ne_model, supported_names,
)
