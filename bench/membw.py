"""The memory bus's read speed, for the decode ceiling: a q4_0 decode step reads every weight byte once,
so tok/s <= read GB/s / weight GB per token, and N ranks on one host share one bus.

    read_gbps(processes=1, nbytes=512 MiB) -> float   GB/s that `processes` concurrent processes read
                                                     together, each summing its own `nbytes` array
    split_read_gbps(nbytes) -> (one, two)            GB/s of 1 process reading nbytes, and of 2 reading
                                                     half each together: a 2-rank decode's ceiling

Each process sums its own array (far beyond any cache; give a decode's working set, as its page
tables stop fitting the caches too) with numpy, after a barrier so they run at once; the figure is
all bytes over the slowest process's time, best of `passes`.
Usage: python bench/membw.py [GB per process ...]   (prints 1 and 2 processes; default 0.5)
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np


def _reader(barrier: mp.synchronize.Barrier, nbytes: int, passes: int, out: mp.queues.Queue) -> None:
    a = np.ones(nbytes // 8, dtype=np.uint64)  # pages touched before the clock starts
    best = float("inf")
    for _ in range(passes):
        barrier.wait()
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    out.put(best)


def read_gbps(processes: int = 1, nbytes: int = 512 << 20, passes: int = 5) -> float:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(barrier, nbytes, passes, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return processes * nbytes / max(times) / 1e9


def split_read_gbps(nbytes: int) -> tuple[float, float]:
    """(1 process reading nbytes, 2 processes reading nbytes / 2 each, together) in GB/s: a decode step
    reads every weight byte once, so 2 ranks on one bus decode at most (two / one)x one rank."""
    return read_gbps(1, nbytes), read_gbps(2, nbytes // 2)


if __name__ == "__main__":
    import sys

    for gb in map(float, sys.argv[1:] or ["0.5"]):
        n = int(gb * 1e9) // 8 * 8
        one, two = read_gbps(1, n), read_gbps(2, n)
        print(f"memory read, {gb:g} GB per process: 1 process {one:.1f} GB/s, 2 processes together {two:.1f} GB/s "
              f"({two / one:.2f}x)")
