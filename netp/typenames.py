"""The tensor type names and block geometry the CLIs and kernels name, in a module that imports
nothing, so a CLI's --help need not load gguf or numpy for them. formats/constants.py holds
the full table (from gguf-py) and checks it agrees with this one at import."""
from __future__ import annotations

TYPE_NAMES = ("f32", "f16", "q4_0", "q4_1", "q8_0")  # every type netp reads and writes
QUANTIZED_TYPE_NAMES = ("q4_0", "q4_1", "q8_0")  # netp quantize --type
OVERRIDE_TYPE_NAMES = ("f32", "f16", "q8_0", "q4_1", "q4_0")  # --output_type / --embedding_type
QK = 32  # values per block of every quantized type netp writes (ggml's QK4_0, QK4_1, QK8_0)
