"""The names a shard set and an NE file's companions go by.

Imports nothing, so the CLI can read a shard set's manifest before numpy
loads (the BLAS thread count must be set first).
"""
from __future__ import annotations

MANIFEST_NAME = "manifest.json"  # inside a shard set
SHARD_TOKENIZER_DIR = "tokenizer"  # the tokenizer folder inside a shard set
TOKENIZER_SUFFIX = ".tokenizer"  # `ne-f32.bin` -> `ne-f32.tokenizer/` beside it
