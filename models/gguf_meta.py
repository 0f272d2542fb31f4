"""GGUF metadata read the way llama.cpp writes it (`<arch>.<key>`)."""
from __future__ import annotations

from typing import Any, Mapping

from netp.errors import NetpError


class GGUFMeta:
    """A GGUF's metadata read the way llama.cpp writes it: `arch.key` lookups for its
    general.architecture, every missing required key one NetpError naming it."""

    def __init__(self, meta: Mapping[str, Any], path: str):
        self.meta, self.path, self.arch = meta, path, meta["general.architecture"]

    def need(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.meta:
            raise NetpError(self.path, f"GGUF metadata lacks {full}")
        return self.meta[full]

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def token(self, key: str) -> int:
        return int(self.meta.get(f"tokenizer.ggml.{key}", -1))

    def n_vocab(self) -> int:
        if "tokenizer.ggml.tokens" not in self.meta and not self.get("vocab_size"):
            raise NetpError(self.path, "GGUF metadata lacks tokenizer.ggml.tokens")
        return int(self.get("vocab_size", 0)) or len(self.meta["tokenizer.ggml.tokens"])
