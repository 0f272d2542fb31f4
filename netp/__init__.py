"""netp: Hugging Face / GGUF checkpoints -> NE files -> quantized -> pre-sharded -> verified.

The stages live in the subpackages netp.formats, netp.models, netp.convert,
netp.quantize, netp.shard and netp.runtime; the click CLI in netp.cli.
"""
import os

__version__ = "0.1.0"

# numba reads its cache folder once, when first imported, and several netp modules import it
# (models.compiled, runtime.kernels, runtime.shmcomm, ...) in whatever order a command reaches them: so
# the folder is chosen here, before any of them, a per-user one unless the user chose one
# (docs/design.md §5). Set in runtime.kernels instead, it came after models' package import had
# loaded numba, and the compiled code was cached in the source tree's __pycache__.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "netp", "numba"))
