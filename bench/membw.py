"""The memory bus's read speed, for the decode ceiling: a q4_0 decode step reads every weight byte once,
so tok/s <= read GB/s / weight GB per token, and N ranks on one host share one bus.

    read_gbps(processes=1) -> float   GB/s that `processes` concurrent processes read together

Each process sums its own 512 MiB array (far beyond any cache) with numpy, after a barrier so they
run at once; the figure is all bytes over the slowest process's time, best of `passes`.
Usage: python bench/membw.py   (prints 1 and 2 processes)
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

ARRAY_BYTES = 512 << 20


def _reader(barrier: mp.synchronize.Barrier, passes: int, out: mp.queues.Queue) -> None:
    a = np.ones(ARRAY_BYTES // 8, dtype=np.uint64)  # pages touched before the clock starts
    best = float("inf")
    for _ in range(passes):
        barrier.wait()
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    out.put(best)


def read_gbps(processes: int = 1, passes: int = 5) -> float:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(barrier, passes, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return processes * ARRAY_BYTES / max(times) / 1e9


if __name__ == "__main__":
    one, two = read_gbps(1), read_gbps(2)
    print(f"memory read: 1 process {one:.1f} GB/s, 2 processes together {two:.1f} GB/s ({two / one:.2f}x)")
