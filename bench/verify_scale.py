"""Memory of `mpiexec -n 2 netp verify` with layer-streamed references at Llama-3.1-8B's shape
(issue 33 point 1; docs/design.md §5 "Layer-streamed references").

A random Llama-3.1-8B-shaped bf16 checkpoint (bench/checkpoints.py, SmolLM2's vocabulary, --layers,
default 32: 14.8 GB) goes through netp convert (f32 NE, 29.5 GB at 32 layers), quantize (q4_0)
and shard (2 ranks). Then, one run per reference so each figure is its own:
  mpiexec -n 2 netp verify shards --ref ne-q4_0.bin
  mpiexec -n 2 netp verify shards --ref ne-q4_0.bin --f32 ne-f32.bin
  mpiexec -n 2 netp verify shards --ref ne-q4_0.bin --f32 ne-f32.bin --hf CHECKPOINT
each -n 4 -t 1. Printed: the largest process's max RSS (peers.run: under mpiexec, the largest
process), each rank's resident weights (from a `netp run` timing line), the goal
max RSS <= the largest rank's resident weights + 2 GB, and the wall time.
Disk: the f32 file needs 0.87 GB per layer (+1.6 GB); when the free space cannot hold it and its
q4_0 copies, the q4_0 file and the set come from `netp pipeline` instead and only --ref runs
(--hf is compared with the f32 file; said in the output). --no-mmap passes --no_mmap to verify.
Random weights: the comparisons' figures mean nothing here (the KL limits may fail); this
bench measures memory and time only.
Usage: python bench/verify_scale.py [--layers 32] [--no-mmap]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache import cache_dir
from checkpoints import checkpoint, llama31_8b
from peers import run

BIN = Path(sys.executable).parent
GB = 1e9


def verify_run(args: list[str]) -> tuple[float, float, int]:
    """(wall s, max RSS MB of the largest process, exit status) of mpiexec -n 2 netp verify ARGS
    (a failed comparison, likely on random weights, is still measured)."""
    cmd = [str(BIN / "mpiexec"), "-n", "2", str(BIN / "netp"), "verify", *args, "-n", "4", "-t", "1",
           "--timeout", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1e3, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-mmap", action="store_true", help="verify --no_mmap: read the rank files, not mapped")
    args = ap.parse_args()
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    hf = checkpoint(llama31_8b(args.layers))
    mmap_args = ["--no_mmap"] if args.no_mmap else []
    with tempfile.TemporaryDirectory(dir=cache_dir("tmp")) as tmp:
        work = Path(tmp)
        f32, q4, shards = work / "ne-f32.bin", work / "ne-q4_0.bin", work / "shards"
        need = 0.87 * GB * args.layers + 1.6 * GB
        have_f32 = shutil.disk_usage(work).free > need + 2 * 0.3 * need
        if have_f32:
            print(f"converting {hf} to f32 NE ({need / GB:.1f} GB) ...", flush=True)
            convert(str(hf), f32, "f32")
            quantize_file(f32, q4, GGMLType.Q4_0)
            shard_file(q4, shards, 2)
        else:  # no f32 file: the q4_0 file and the set straight from the checkpoint, --f32 left out
            print(f"the f32 NE file ({need / GB:.1f} GB) and its q4_0 copies need more than the free disk holds: "
                  "--f32 and --hf (compared with the f32 file) are left out; q4_0 by netp pipeline", flush=True)
            for ranks, out in ((1, work / "one"), (2, shards)):
                run([str(BIN / "netp"), "pipeline", "-q", str(hf), str(out), "--outtype", "q4_0", "--ranks", str(ranks)])
            (work / "one" / "rank-00000-of-00001.bin").rename(q4)  # a 1-rank set's file is the NE file
        r = run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "netp"), "run", "-m", str(shards), "--ids", "1,2,3",
                 "-n", "1", "-t", "1", "-c", "16"], timeout=3600)
        m = re.search(r"per-rank resident weights MB: ([\d., ]+)", r.stdout)
        if not m:
            raise SystemExit(f"bench/verify_scale.py: error: no timing line in:\n{r.stdout[-2000:]}")
        resident = [float(x) for x in m.group(1).split(",")]
        budget = max(resident) + 2000
        print(f"\n== mpiexec -n 2 netp verify, Llama-3.1-8B shape, {args.layers} layers, q4_0 shard set; "
              f"per-rank resident weights MB: {', '.join(f'{x:.0f}' for x in resident)}; goal max RSS <= "
              f"{budget:.0f} MB")
        ok = True
        runs = (("--ref", ["--ref", str(q4)]),
                ("--ref --f32", ["--ref", str(q4), "--f32", str(f32)]),
                ("--ref --f32 --hf", ["--ref", str(q4), "--f32", str(f32), "--hf", str(hf)])) if have_f32 else \
            (("--ref", ["--ref", str(q4)]),)
        for label, extra in runs:
            wall, rss, code = verify_run([str(shards), *extra, *mmap_args])
            good = rss <= budget
            ok &= good
            print(f"  {label:<18} max RSS {rss:8.0f} MB  {'PASS' if good else 'FAIL'}  wall {wall:7.0f} s"
                  f"  (verify exit {code})", flush=True)
    print(f"\nverify scale bench: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
