"""Mixture-of-experts decode speed and memory (issue 32) on a random Qwen3-30B-A3B-shaped q4_0 model.

The model: bench/checkpoints.py's qwen3_30b_a3b with --layers of its 48
layers (hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of width
768, top-8, renormalised; SmolLM2's 49152-token vocab), bf16. In one run:
- `netp pipeline --outtype q4_0` to a 1-rank and a 2-rank shard set; the
  pipeline's max RSS against the largest 2-D matrix in f32 + 300 MB (goal);
- llama.cpp on the same weights: its converter + `llama-quantize
  --output-tensor-type q4_0` (bench/peers.py: routers stay f32 there as in
  netp), `llama-bench -t 1,2 -n --tokens` generation tok/s;
- netp decode tok/s at 1 rank (`ne-run -t 1`) and 2 ranks (`mpiexec -n 2`,
  `-t 1` each), from the timing line, greedy; ratios: 1 rank vs llama.cpp at
  1 thread (goal >= 1.0), 2 ranks vs 1 rank (goal >= 1.8), and 2 ranks vs
  llama.cpp at 2 threads (information);
- each rank's resident weights (the timing line) against its rank file
  (goal <= 1.15x).
Every speed figure is the best of --rounds interleaved measurements (the
machine is shared). The shard sets go to a temporary folder under the bench
cache and are deleted at the end; the checkpoint and the GGUF stay cached.
Usage: python bench/moe.py [--layers 4] [--rounds 3] [--tokens 32]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cache import cache_dir
from checkpoints import checkpoint, qwen3_30b_a3b
from decode import decode_tok_s, ne_run, resident_mb
from peers import cached_gguf, llama_bench, run

BIN = Path(sys.executable).parent


def pipeline(hf: Path, out: Path, ranks: int) -> float:
    """netp pipeline HF OUT --outtype q4_0 --ranks N; returns its max RSS in MB."""
    return run([BIN / "netp", "pipeline", hf, out, "--outtype", "q4_0", "--ranks", str(ranks)]).max_rss_mb


def rank_file_mb(shards: Path) -> list[float]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [r["size"] / 1e6 for r in manifest["ranks"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="layers of Qwen3-30B-A3B's 48 (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each figure (best kept)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per measurement")
    args = ap.parse_args()
    shape = qwen3_30b_a3b(args.layers)
    hf = checkpoint(shape)
    gguf = cached_gguf(hf, "q4_0")
    largest_mb = shape.largest_matrix() * 4 / 1e6
    with tempfile.TemporaryDirectory(prefix="moe-", dir=cache_dir("tmp")) as tmp:
        work = Path(tmp)
        sets = {1: work / "x1", 2: work / "x2"}
        print(f"netp pipeline of {hf.name} to q4_0 shard sets for 1 and 2 ranks in {work} ...", flush=True)
        rss = {n: pipeline(hf, folder, n) for n, folder in sets.items()}
        best: dict[str, float] = {}
        resident: dict[int, list[float]] = {}

        def keep(key: str, value: float) -> None:
            best[key] = max(best.get(key, value), value)

        for _ in range(args.rounds):  # interleaved: a busy spell hurts every figure alike
            for n, folder in sets.items():
                timing, _, _ = ne_run(folder, args.tokens, ranks=n)
                keep(f"netp {n}", decode_tok_s(timing))
                resident[n] = resident_mb(timing)
            for row in llama_bench(gguf, threads=(1, 2), n_prompt=16, n_gen=args.tokens, repetitions=1):
                keep(f"llama.cpp {row.threads}", row.gen_tok_s)
        files = {n: rank_file_mb(folder) for n, folder in sets.items()}

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    one, two, l1, l2 = best["netp 1"], best["netp 2"], best["llama.cpp 1"], best["llama.cpp 2"]
    print(f"\nQwen3-30B-A3B shape, {args.layers} of 48 layers, q4_0, greedy decode, best of {args.rounds}:")
    print(f"  llama.cpp llama-bench tg{args.tokens}, 1 thread        {l1:7.2f} tok/s")
    print(f"  llama.cpp llama-bench tg{args.tokens}, 2 threads       {l2:7.2f} tok/s")
    print(f"  netp 1 rank x 1 thread                {one:7.2f} tok/s  {one / l1:5.2f}x llama.cpp 1 thread "
          f"(goal >= 1.00) {verdict(one >= l1)}")
    print(f"  netp 2 ranks x 1 thread (mpiexec)     {two:7.2f} tok/s  {two / one:5.2f}x 1 rank (goal >= 1.80) "
          f"{verdict(two >= 1.8 * one)}; {two / l2:5.2f}x llama.cpp 2 threads")
    for n in sets:
        pairs = ", ".join(f"{m:.0f} MB of a {f:.0f} MB file ({m / f:.2f}x)" for m, f in zip(resident[n], files[n]))
        ok = all(m <= 1.15 * f for m, f in zip(resident[n], files[n])) and len(resident[n]) == n
        print(f"  resident weights, {n} rank{'s' if n > 1 else ''}: {pairs} (goal <= 1.15x) {verdict(ok)}")
    for n, mb in rss.items():
        print(f"  netp pipeline --ranks {n} max RSS {mb:.0f} MB; largest 2-D matrix in f32 {largest_mb:.0f} MB "
              f"+ 300 = {largest_mb + 300:.0f} MB {verdict(mb <= largest_mb + 300)}")


if __name__ == "__main__":
    main()
