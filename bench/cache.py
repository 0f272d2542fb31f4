"""The benches' cache folder and the lock that keeps two benches from making one thing twice.

Everything a bench generates or builds that outlives one run lives under
`$NETP_BENCH_CACHE` (default `~/.cache/netp`), never in the repository:

    peers/         llama.cpp built from the llama-cpp-python sdist, the neural-speed wheel (bench/peers.py)
    checkpoints/   random HF checkpoints in real models' shapes (bench/checkpoints.py)

API:
    cache_dir(*parts) -> Path       the folder $NETP_BENCH_CACHE/parts..., created
    locked(path) -> context manager  an exclusive flock on `path` (created), held for the block; a
                                     second process (another bench) waits for it

Bench only: nothing in netp or tests imports bench/.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

CACHE_ENV = "NETP_BENCH_CACHE"


def cache_dir(*parts: str) -> Path:
    """$NETP_BENCH_CACHE/parts... (default ~/.cache/netp/parts...), created if absent."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "netp").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block (waits, saying so, if another process holds it).
    The kernel drops the lock when the holder dies, so a killed bench never leaves it held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {path} (another bench holds it) ...", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
