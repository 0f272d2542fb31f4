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
# numba invalidates a cached function when its own file changes, not when a function it calls (and
# compiled into it) does: the compiled decode step kept an old product after kernels.py changed. So
# the per-user folder has one subfolder per version of the files netp compiles.
_COMPILED_SOURCES = {"netp.runtime": ("kernels.py", "simd.py", "fused.py", "shmcomm.py"),
                     "netp.models": ("compiled.py",)}


def _numba_cache_dir() -> str:
    import hashlib
    import importlib.util

    digest = hashlib.sha256()
    for package, names in _COMPILED_SOURCES.items():
        spec = importlib.util.find_spec(package)  # the package's folder, without importing it
        assert spec is not None and spec.submodule_search_locations
        for name in names:
            with open(os.path.join(list(spec.submodule_search_locations)[0], name), "rb") as f:
                digest.update(f.read())
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "netp", "numba", digest.hexdigest()[:16])


if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = _numba_cache_dir()
