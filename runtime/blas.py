"""-t: the BLAS threads of each rank (the block kernels take the same count, see runtime/kernels.py).

Set through the environment before numpy is first imported (OpenBLAS and
OpenMP read it once, at load); when numpy is already loaded (a test calling
the command in-process), through OpenBLAS's own setter found in the loaded
library. This module imports nothing heavy.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys

from netp.formats.names import MANIFEST_NAME
from netp.hostenv import cpu_count, ranks_on_this_host

_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")


def default_threads(simulated_ranks: int = 1) -> int:
    """Cores per rank on this machine: the cores over the ranks the launcher started
    here, or over the ranks simulated as threads of this process."""
    return max(1, cpu_count() // max(1, ranks_on_this_host(simulated_ranks)))


def manifest_world_size(model: str | os.PathLike) -> int:
    """A shard set's world size read from its manifest as plain JSON (no numpy yet); 1 otherwise."""
    from netp.formats.paths import read_json

    try:  # capped, FIFOs refused: this runs before the error handler, so nothing here may hang or raise
        world = read_json(os.path.join(model, MANIFEST_NAME)).get("world_size", 1)
        return max(1, world) if isinstance(world, int) else 1
    except Exception:  # noqa: BLE001 - not a shard set, or a broken one: the loader reports it properly
        return 1


def set_blas_threads(n: int) -> None:
    for var in _ENV:
        os.environ[var] = str(n)
    if "numpy" not in sys.modules:
        return
    try:
        with open("/proc/self/maps") as f:
            libs = set(re.findall(r"\S*openblas\S*\.so\S*", f.read()))
    except OSError:
        return
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(handle, name, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                break
