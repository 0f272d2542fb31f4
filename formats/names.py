"""The names a shard set and an NE file's companions go by.

Imports nothing, so the CLI can read a shard set's manifest before numpy
loads (the BLAS thread count must be set first).
"""
from __future__ import annotations

MANIFEST_NAME = "manifest.json"  # inside a shard set
SHARD_TOKENIZER_DIR = "tokenizer"  # the tokenizer folder inside a shard set
TOKENIZER_SUFFIX = ".tokenizer"  # `ne-f32.bin` -> `ne-f32.tokenizer/` beside it
# The files of a tokenizer folder: always the first two; the others when the checkpoint has
# them (transformers 5 keeps chat templates apart). A tokenizer folder carries nothing else.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")
KNOWN_TOKENIZER_FILES = TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES
