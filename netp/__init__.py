"""netp: Hugging Face / GGUF checkpoints -> NE files -> quantized -> pre-sharded -> verified.

The stages live in the subpackages netp.formats, netp.models, netp.convert,
netp.quantize, netp.shard and netp.runtime; the click CLI in netp.cli.
"""
__version__ = "0.1.0"
