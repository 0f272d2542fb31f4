#!/usr/bin/env python
"""Benchmark: netp's block codecs vs gguf.quants (the oracle) on LLaMA-shaped tensors.

One run, same tensors for both sides (f32, one LLaMA-7B layer's q/k/v/o and
gate projections: 436 MB by default):
- quantize q4_0 / q4_1 / q8_0: seconds for gguf.quants.quantize, for netp
  on 1 thread and on all cores, the ratio, and a check that the bytes are
  identical;
- dequantize: gguf.quants.dequantize vs netp's dequantize_rows;
- peak RSS (max RSS as `/usr/bin/time -f %M` reports it) of a process that
  quantizes the tensors to q4_0 with each, beside one that only makes them;
- the whole file pipeline (`netp quantize`, streamed) vs `cp` + sync of the
  same NE f32 file: wall time and peak RSS.

    .venv/bin/python bench/quantize.py [--mb 436] [--keep-going]

Not a test: it prints figures and exits non-zero only if bytes differ.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gguf import quants as gguf_quants
from netp.formats.constants import GGMLType
from netp.hostenv import cpu_count
from netp.quantize.codecs import dequantize_rows, quantize_rows

TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
# One LLaMA-7B layer (numpy shapes: rows = output features, columns = ne[0] = input).
LAYER = {"attention.wq": (4096, 4096), "attention.wk": (4096, 4096), "attention.wv": (4096, 4096),
         "attention.wo": (4096, 4096), "feed_forward.w1": (11008, 4096)}


def make_tensors(mb: float, seed: int = 0) -> dict[str, np.ndarray]:
    """LLaMA-7B-layer-shaped f32 tensors totalling about `mb` MB (rows trimmed to fit)."""
    rng = np.random.default_rng(seed)
    budget = int(mb * 1e6)
    out = {}
    for name, (rows, cols) in LAYER.items():
        rows = min(rows, budget // (cols * 4)) // 32 * 32  # whole blocks: the MLP width is a row length too
        if rows <= 0:
            break
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        x *= np.float32(0.02)
        out[name] = x
        budget -= x.nbytes
    return out


ROUNDS = 3


def best_of(rounds: int, contenders: dict) -> list[tuple[float, object]]:
    """Run each contender once per round, in turn; (best seconds, last result) per contender."""
    best = {name: (float("inf"), None) for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t = time.perf_counter()
            result = fn()
            best[name] = (min(best[name][0], time.perf_counter() - t), result)
            del result
    return list(best.values())


def cpu_seconds_busy() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat), 0 where unavailable."""
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, max RSS in MB) of a child process, via /usr/bin/time -f %M."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"bench: child failed: {' '.join(argv)}\n{p.stderr}")
    return wall, int(p.stderr.strip().splitlines()[-1]) / 1024


def rss_worker(mode: str, mb: float) -> None:
    """Child: make the tensors, quantize them to q4_0 with `mode` (or not), keep only the blocks."""
    tensors = make_tensors(mb)
    for name in list(tensors):
        x = tensors.pop(name)
        if mode == "gguf":
            gguf_quants.quantize(x, GGMLType.Q4_0)
        elif mode == "netp":
            quantize_rows(x, GGMLType.Q4_0, nthread=cpu_count())
        del x


def write_ne(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A complete one-layer LLaMA NE f32 file holding `tensors` (the stages refuse partial
    models); the tensors it lacks, or holds trimmed, are filled with random values."""
    from netp.formats.ne import NEHeader, NEWriter
    from netp.models import by_name
    from netp.models.hparams import HParams

    arch = by_name("llama")
    n_ff = tensors["feed_forward.w1"].shape[0] if "feed_forward.w1" in tensors else 11008
    hp = HParams(arch="llama", n_vocab=32, n_embd=4096, n_head=32, n_head_kv=32, n_layer=1, n_ff=n_ff, n_rot=128,
                 norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    rng = np.random.default_rng(1)
    with NEWriter(path, NEHeader(**arch.header_fields(hp), ftype=0),
                  [(f"t{i}".encode(), 0.0) for i in range(hp.n_vocab)]) as w:
        for name, shape in arch.tensor_shapes(hp).items():
            x = tensors.get(name.removeprefix("layers.0.").removesuffix(".weight"))
            if x is None or x.shape != shape:
                x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            w.add_tensor(name, GGMLType.F32, shape, x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=436.0, help="MB of f32 tensors (at least 256 for the report)")
    ap.add_argument("--rss-worker", choices=("none", "gguf", "netp"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_worker:
        rss_worker(args.rss_worker, args.mb)
        return 0

    nthread = cpu_count()
    busy0, own0, wall0 = cpu_seconds_busy(), own_cpu_seconds(), time.perf_counter()
    tensors = make_tensors(args.mb)
    total = sum(x.nbytes for x in tensors.values())
    print(f"tensors: {', '.join(f'{k} {x.shape}' for k, x in tensors.items())}: {total / 1e6:.0f} MB f32; "
          f"{nthread} cores; gguf-py {gguf_version()}")
    ok = True
    print(f"{'':6} {'gguf.quants':>11} {'netp 1 thr':>10} {'netp':>8} {'ratio':>6} {'ratio 1 thr':>11}  bytes")
    for t in TYPES:
        # Rounds interleave the contenders and keep each one's best time, so
        # load from elsewhere on a shared machine hits both sides alike.
        g, n1, n2 = best_of(ROUNDS, {
            "gguf": lambda: {k: gguf_quants.quantize(x, t) for k, x in tensors.items()},
            "netp1": lambda: {k: quantize_rows(x, t, nthread=1) for k, x in tensors.items()},
            "netp": lambda: {k: quantize_rows(x, t, nthread=nthread) for k, x in tensors.items()},
        })
        want, got1, got = g[1], n1[1], n2[1]
        same = all(got[k].tobytes() == want[k].tobytes() and got1[k].tobytes() == want[k].tobytes() for k in want)
        ok &= same
        print(f"q {t.name.lower():4} {g[0]:10.3f}s {n1[0]:9.3f}s {n2[0]:7.3f}s {g[0] / n2[0]:5.1f}x "
              f"{g[0] / n1[0]:10.1f}x  {'identical' if same else 'DIFFER'}")

        outs = {k: np.empty(tensors[k].shape, np.float32) for k in want}
        g, d1, d2 = best_of(ROUNDS, {
            "gguf": lambda: {k: gguf_quants.dequantize(b, t) for k, b in want.items()},
            "netp1": lambda: {k: dequantize_rows(b, t, out=outs[k], nthread=1) for k, b in want.items()},
            "netp": lambda: {k: dequantize_rows(b, t, out=outs[k], nthread=nthread) for k, b in want.items()},
        })
        same = all(d2[1][k].tobytes() == g[1][k].tobytes() for k in want)
        ok &= same
        print(f"dq {t.name.lower():3} {g[0]:10.3f}s {d1[0]:9.3f}s {d2[0]:7.3f}s {g[0] / d2[0]:5.1f}x "
              f"{g[0] / d1[0]:10.1f}x  {'identical' if same else 'DIFFER'}")
        del want, got, got1, outs, g, d1, d2, n1, n2

    me = [sys.executable, os.path.abspath(__file__), "--mb", str(args.mb), "--rss-worker"]
    _, base = peak_rss_mb(me + ["none"])
    _, g_rss = peak_rss_mb(me + ["gguf"])
    _, n_rss = peak_rss_mb(me + ["netp"])
    print(f"peak RSS quantizing to q4_0: tensors alone {base:.0f} MB; gguf.quants {g_rss:.0f} MB "
          f"(+{g_rss - base:.0f}), netp {n_rss:.0f} MB (+{n_rss - base:.0f})")

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        src = Path(tmp) / "ne-f32.bin"
        write_ne(src, tensors)
        del tensors
        netp = Path(sys.executable).with_name("netp")
        cp_wall = q_wall = float("inf")
        for _ in range(2):
            cp_wall = min(cp_wall, peak_rss_mb(["sh", "-c", f"cp {src} {tmp}/copy.bin && sync {tmp}/copy.bin"])[0])
            wall, q_rss = peak_rss_mb([str(netp), "quantize", "-q", str(src), f"{tmp}/ne-q4_0.bin", "--type", "q4_0"])
            q_wall = min(q_wall, wall)
        size = src.stat().st_size
        print(f"file pipeline on {size / 1e6:.0f} MB: netp quantize q4_0 {q_wall:.2f} s, peak RSS {q_rss:.0f} MB; "
              f"cp + sync {cp_wall:.2f} s; quantize takes {q_wall / cp_wall:.1f}x the time of copying the input")
    others = (cpu_seconds_busy() - busy0) - (own_cpu_seconds() - own0)
    print(f"other processes kept {max(others, 0) / (time.perf_counter() - wall0):.2f} of {os.cpu_count()} cores busy "
          "during this run (timings are best of rounds; a busy machine makes the 2-core figures pessimistic)")
    if not ok:
        print("bench: BYTES DIFFER from gguf.quants", file=sys.stderr)
    return 0 if ok else 1


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


if __name__ == "__main__":
    sys.exit(main())
