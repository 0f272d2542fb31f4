"""Shard time and peak memory on a >= 1 GB model, against `cp` + sync of the same file.

Builds a random LLaMA-shaped f32 NE file (TinyLlama widths: hidden 2048,
16 heads / 4 KV heads, MLP 5632, vocab 32000, 4 layers: 1.25 GB) in a
temporary folder, then, in the same run and with the source in the page
cache for both:
- peer: `cp SRC DST && sync` (the bytes of one copy, flushed to disk);
- `shard --ranks N SRC OUT` (every rank file fsynced, sha256 of the source
  and of every rank file) under `/usr/bin/time -f %M` for max RSS.
Prints each time as a ratio to the peer (goal <= 1.5x) and the max RSS
(goal <= 300 MB), best of --rounds interleaved runs.
Usage: python bench/shard.py [--ranks 2] [--layers 4] [--rounds 3] [--keep]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from netp.formats.constants import GGMLType
from netp.formats.ne import NEHeader, NEWriter
from netp.models import by_name
from netp.models.hparams import HParams

BIN = Path(sys.executable).parent


def build_model(path: Path, n_layer: int) -> int:
    hp = HParams(arch="llama", n_vocab=32000, n_embd=2048, n_head=16, n_head_kv=4, n_layer=n_layer, n_ff=5632,
                 n_rot=128, norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    arch = by_name("llama")
    vocab = [(f"<t{i}>".encode(), -float(i)) for i in range(hp.n_vocab)]
    noise = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MiB, streamed repeatedly
    with NEWriter(path, NEHeader(**arch.header_fields(hp), ftype=0), vocab) as w:
        for name, shape in arch.tensor_shapes(hp).items():
            w.begin_tensor(name, GGMLType.F32, shape)
            left = int(np.prod(shape))
            while left:
                n = min(left, noise.size)
                w.write(noise[:n])
                left -= n
    return path.stat().st_size


def timed(cmd: list[str]) -> tuple[float, str]:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"bench: {' '.join(cmd)} failed: {proc.stderr.strip()}")
    return seconds, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one beside /tmp)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each figure (best kept)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="netp-bench-shard-", dir=args.dir))
    try:
        src = work / "model-f32.bin"
        t0 = time.perf_counter()
        size = build_model(src, args.layers)
        print(f"model: {src.name} {size / 1e9:.2f} GB (LLaMA shapes, {args.layers} layers, f32), "
              f"built in {time.perf_counter() - t0:.1f} s")
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # page cache warm for both sides

        # Interleaved rounds, best of each: this VM's disk speed drifts between runs.
        cp_runs: list[float] = []
        shard_runs: dict[int, list[tuple[float, float]]] = {n: [] for n in args.ranks}
        written: dict[int, int] = {}
        for _ in range(args.rounds):
            cp_s, _ = timed(["sh", "-c", f"cp '{src}' '{work / 'copy.bin'}' && sync"])
            cp_runs.append(cp_s)
            (work / "copy.bin").unlink()
            for n in args.ranks:
                out = work / f"shards-{n}"
                s, err = timed(["/usr/bin/time", "-f", "%M", str(BIN / "shard"), "--ranks", str(n), "--quiet",
                                str(src), str(out)])
                shard_runs[n].append((s, int(err.strip().splitlines()[-1]) / 1024))
                written[n] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
                shutil.rmtree(out)
        cp_s = min(cp_runs)
        print(f"peer  cp + sync: {cp_s:6.2f} s  ({size / cp_s / 1e6:.0f} MB/s)  runs: "
              + ", ".join(f"{r:.2f}" for r in cp_runs))
        for n, runs in shard_runs.items():
            s, rss_mb = min(r[0] for r in runs), max(r[1] for r in runs)
            print(f"shard --ranks {n}: {s:6.2f} s = {s / cp_s:.2f}x cp+sync (goal <= 1.5x), "
                  f"writes {written[n] / size:.2f}x the source's bytes, max RSS {rss_mb:.0f} MB (goal <= 300 MB)  "
                  "runs: " + ", ".join(f"{r[0]:.2f}" for r in runs))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
