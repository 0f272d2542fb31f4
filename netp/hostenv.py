"""What the MPI launcher and the machine tell this process, read from the
environment and the OS: no mpi4py import, so an error line or a thread count
costs nothing."""
from __future__ import annotations

import os

# Launchers export these to every rank (MPICH/hydra: PMI_*, Open MPI: OMPI_*, PMIx: PMIX_*).
WORLD_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")  # ranks on this host


def _first(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def launched_under_mpi() -> bool:
    """Whether this process is one rank of an mpiexec/mpirun launch."""
    return any(n in os.environ for n in WORLD_SIZE_VARS + RANK_VARS)


def env_world_size() -> int:
    """The world size the launcher announced (1 when not launched under MPI)."""
    return _int(_first(WORLD_SIZE_VARS), 1)


def env_rank() -> str | None:
    """This process's rank as the launcher announced it (None when not said)."""
    return _first(RANK_VARS)


def ranks_on_this_host(default: int = 1) -> int:
    """How many ranks the launcher started on this host (`default` when not launched)."""
    return _int(_first(LOCAL_SIZE_VARS) or _first(WORLD_SIZE_VARS), default)


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
