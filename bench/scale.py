"""Issue 31's scale proof: the whole 32-layer Llama-3.1-8B-shaped checkpoint through netp, against its peers.

Steps (the checkpoint, ~14.8 GB bf16 with SmolLM2's vocabulary, generated
once by bench/checkpoints.py; never committed):
1. `netp pipeline --outtype q4_0 --ranks 2` (wall time and max RSS; goal:
   <= the largest tensor in f32 + 300 MB), and `--ranks 1`, whose one rank
   file is byte for byte the unsharded ne-q4_0.bin (docs/design.md §4), so it
   serves as verify's --ref and as neural-speed's input without a 29.5 GB
   f32 file on the disk;
2. `mpiexec -n 2 ne-run` on the 2-rank set: decode and prefill tok/s (timing
   line) and the largest process's max RSS; the same at 1 rank x 1 thread
   (the kernels warmed by a one-token run first, so no load counts a
   compile); the memory bus's read speed at 1 and 2 processes
   (bench/membw.py) beside the bytes per second the decodes read;
3. `mpiexec -n 2 netp verify --ref` (the set vs the unsharded file), its
   verdict and max RSS;
4. peers on the same weights: llama-bench (llama.cpp's converter +
   llama-quantize q4_0 --output-tensor-type q4_0) at 1 and 2 threads, and
   neural-speed 1.0's run_llama (1 and 2 threads) on a copy of the NE file
   without rope_freqs.weight, which its loader crashes on (bench/peers.py).
Disk: the 14.8 GB checkpoint + 3 x 4.2 GB of netp q4_0 + llama.cpp's
transient 14.8 GB bf16 GGUF and its 4.2 GB q4_0 GGUF: ~46 GB at the peak.
About 10 minutes on an idle 2-core machine once the checkpoint exists
(generating it takes ~3 more). `make bench-scale` runs it.
Usage: python bench/scale.py [--layers 32] [--tokens 32] [--prompt-tokens 64] [--work DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from checkpoints import checkpoint, llama31_8b
from membw import split_read_gbps
from peers import NS_LAYER_COUNTS, PeerError, cached_gguf, llama_bench, neural_speed_copy, neural_speed_run, run

BIN = Path(sys.executable).parent


def timing(stdout: str) -> dict[str, float]:
    line = stdout.strip().splitlines()[-1]
    out = {}
    for key, pat in {"load_s": r"load (\d+) ms", "prompt": r"prompt \d+ tok ([\d.]+) tok/s",
                     "decode": r"decode \d+ tok ([\d.]+) tok/s"}.items():
        m = re.search(pat, line)
        if not m:
            sys.exit(f"bench/scale.py: error: no {key} in the timing line: {line}")
        out[key] = float(m.group(1)) / (1e3 if key == "load_s" else 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="layers of the 8B shape (default: all 32)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per run")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (token ids)")
    ap.add_argument("--work", type=Path, default=None, help="folder for netp's outputs (default: a temporary one)")
    args = ap.parse_args()

    shape = llama31_8b(args.layers)
    hf = checkpoint(shape)
    largest_f32_mb = shape.largest_matrix() * 4 / 1e6
    ids = [(7919 * i) % 40000 + 100 for i in range(args.prompt_tokens)]
    rows: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        rows.append(text)

    with tempfile.TemporaryDirectory(prefix="netp-bench-scale-", dir=args.work) as tmp:
        work = Path(tmp)
        s2, s1 = work / "shards-2", work / "shards-1"
        p2 = run([BIN / "netp", "pipeline", "-q", hf, s2, "--outtype", "q4_0", "--ranks", "2"])
        bound = largest_f32_mb + 300
        say(f"netp pipeline q4_0 x2 ranks: {p2.wall_s:.0f} s, max RSS {p2.max_rss_mb:.0f} MB vs largest tensor "
            f"in f32 {largest_f32_mb:.0f} + 300 = {bound:.0f} MB {'ok' if p2.max_rss_mb <= bound else 'MISSED'}")
        p1 = run([BIN / "netp", "pipeline", "-q", hf, s1, "--outtype", "q4_0", "--ranks", "1"])
        ne = work / "ne-q4_0.bin"  # the unsharded file: a 1-rank set's rank file, byte for byte
        (s1 / "rank-00000-of-00001.bin").rename(ne)
        shutil.rmtree(s1)
        say(f"netp pipeline q4_0 x1 rank (the unsharded NE file, {ne.stat().st_size / 1e9:.2f} GB): "
            f"{p1.wall_s:.0f} s, max RSS {p1.max_rss_mb:.0f} MB")

        def ne_run(model: Path, ranks: int, threads: int) -> tuple[dict[str, float], float]:
            cmd: list[str | Path] = [BIN / "ne-run", "-m", model, "--ids", ",".join(map(str, ids)), "-n",
                                     str(args.tokens), "-c", str(len(ids) + args.tokens + 8), "-t", str(threads),
                                     "--top_k", "1"]
            r = run([BIN / "mpiexec", "-n", str(ranks), *cmd] if ranks > 1 else cmd, timeout=7200)
            return timing(r.stdout), r.max_rss_mb

        os.sync()  # the ~8 GB just written go to disk now, not as writeback stealing a core from a timed rank
        run([BIN / "ne-run", "-m", ne, "--ids", "1,2", "-n", "1", "-t", "1"])  # kernels compiled (or loaded) once
        two, rss2 = ne_run(s2, 2, 1)
        one, rss1 = ne_run(ne, 1, 1)
        say(f"ne-run, 2 MPI ranks x 1 thread: decode {two['decode']:.2f} tok/s, prefill {two['prompt']:.2f} tok/s, "
            f"load {two['load_s']:.1f} s, largest process max RSS {rss2:.0f} MB")
        say(f"ne-run, 1 rank x 1 thread (NE file): decode {one['decode']:.2f} tok/s, prefill {one['prompt']:.2f} "
            f"tok/s, load {one['load_s']:.1f} s, max RSS {rss1:.0f} MB; 2 ranks = {two['decode'] / one['decode']:.2f}x")
        gb = ne.stat().st_size / 1e9  # weight bytes a decode step reads, all ranks together
        bw1, bw2 = split_read_gbps(ne.stat().st_size)  # each rank's working set
        say(f"memory read (bench/membw.py, a rank's bytes per process): 1 process {bw1:.1f} GB/s, 2 together "
            f"{bw2:.1f} GB/s; decode reads "
            f"{one['decode'] * gb:.1f} GB/s at 1 rank, {two['decode'] * gb:.1f} GB/s at 2 ranks")
        v = run([BIN / "mpiexec", "-n", "2", BIN / "netp", "verify", s2, "--ref", ne, "-n", "8", "-t", "1", "-q"],
                timeout=7200)
        say(f"mpiexec -n 2 netp verify --ref: passed, largest process max RSS {v.max_rss_mb:.0f} MB")

        gguf = cached_gguf(hf, "q4_0")
        for row in llama_bench(gguf, threads=(1, 2), n_prompt=64, n_gen=args.tokens, repetitions=1):
            say(f"llama-bench -t {row.threads}: tg {row.gen_tok_s:.2f} tok/s, pp64 {row.prompt_tok_s:.2f} tok/s")
            if row.threads == 1:
                say(f"  netp 1 rank / llama.cpp 1 thread: decode {one['decode'] / row.gen_tok_s:.2f}x, prefill "
                    f"{one['prompt'] / row.prompt_tok_s:.2f}x")
            else:
                say(f"  netp 2 ranks / llama.cpp 2 threads: decode {two['decode'] / row.gen_tok_s:.2f}x, prefill "
                    f"{two['prompt'] / row.prompt_tok_s:.2f}x")
        if args.layers in NS_LAYER_COUNTS:
            ns_file = neural_speed_copy(ne, work / "ne-q4_0-for-neural-speed.bin")
            if ns_file != ne:
                say("neural-speed runs a copy without rope_freqs.weight (its loader crashes on it): plain rope, "
                    "the same work per token")
            for threads in (1, 2):
                try:
                    ns = neural_speed_run(ns_file, ids=ids, threads=threads, n_predict=args.tokens)
                except PeerError as e:
                    say(f"neural-speed run_llama -t {threads}: failed: {str(e).splitlines()[0]}")
                    continue
                mine = one if threads == 1 else two
                say(f"neural-speed run_llama -t {threads}: decode {ns.decode_tok_s:.2f} tok/s, prompt "
                    f"{ns.prompt_tok_s:.2f} tok/s, max RSS {ns.max_rss_mb:.0f} MB; netp "
                    f"{'1 rank' if threads == 1 else '2 ranks'} = {mine['decode'] / ns.decode_tok_s:.2f}x decode, "
                    f"{mine['prompt'] / ns.prompt_tok_s:.2f}x prefill")
        else:
            say(f"neural-speed skipped: its loader takes {', '.join(map(str, NS_LAYER_COUNTS))} layers only")
    print(f"\nLlama-3.1-8B shape, {args.layers} layers, q4_0 - summary")
    for r in rows:
        print("  " + r)


if __name__ == "__main__":
    main()
