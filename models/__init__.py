"""Per-architecture facts. Importing this package imports every module in it, so
each architecture module registers itself: adding one edits no list here."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "compiled":  # numba's steps for the forwards, imported on first use (~0.5 s of numba)
        importlib.import_module(f"{__name__}.{_module.name}")

from netp.models.architecture import Architecture, SplitRule, TensorSpec  # noqa: E402, F401
from netp.models.hparams import HParams  # noqa: E402, F401
from netp.models.ne_header import ne_model  # noqa: E402, F401
from netp.models.registry import (  # noqa: E402, F401
    all_architectures, architecture_names, by_gguf_architecture, by_hf_config, by_name, by_ne_tensors,
    by_ns_model_name, supported_names,
)
