"""Per-architecture facts. Importing this package imports every module in it, so
each architecture module registers itself: adding one edits no list here."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from netp.models.base import (  # noqa: E402, F401
    Architecture, HParams, SplitRule, TensorSpec, all_architectures, architecture_names, by_gguf_architecture,
    by_hf_config, by_name, by_ne_tensors, by_ns_model_name, ne_model, supported_names,
)
