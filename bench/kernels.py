"""Block kernel speed on Llama-3.1-8B's matrices (q4_0), against llama.cpp's llama-bench on the same shapes.

Matrices: a layer's products as netp's runtime stacks them (q|k|v 6144 x 4096,
wo 4096 x 4096, gate|up 28672 x 4096, down 4096 x 14336) and the output head
(49152 x 4096), random normals (std 0.02) quantized to q4_0 by netp's own
quantizer. --layers copies of the layer (8 by default: 1.1 GB with the head,
more than any cache) are tiled separately, so every pass streams from memory
as a decode step does. Figures, each the best of --rounds interleaved runs
(the machine is shared), at every --threads count:
- packing: `kernels.tile` of one layer's file bytes vs reading those bytes
  back with np.fromfile from a temporary file (in the page cache);
- decode: one token (T = 1) through every layer's products and the head:
  ms, GB/s of weights, and the kernels-only tok/s (an upper bound for the
  runtime: no attention, norms, Python);
- prefill: T = --prompt tokens through every layer, the head for the last
  token only (as llama-bench's pp does): GMAC/s and kernels-only tok/s;
- the path (AVX-512 VNNI, AVX2 or the portable loops) and resident tiles / file bytes;
- llama.cpp: `llama-bench -p PROMPT -n 32` at the same thread counts on an
  8B-shaped checkpoint with as many layers (bench/checkpoints.py, converted
  and quantized to q4_0 everywhere by llama.cpp's own tools, bench/peers.py),
  one repetition per round between netp's runs; then every ratio.
--no-peer skips llama.cpp (and its 12-minute build on first use).
Usage: python bench/kernels.py [--layers 8] [--rounds 3] [--threads 1,2] [--prompt 64] [--no-peer]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from checkpoints import checkpoint, llama31_8b
from peers import cached_gguf, llama_bench

from netp.formats.constants import GGMLType
from netp.quantize.codecs import quantize_rows
from netp.runtime import kernels, simd

HIDDEN, KV, MLP, VOCAB = 4096, 1024, 14336, 49152
LAYER = {"qkv": (HIDDEN + 2 * KV, HIDDEN), "wo": (HIDDEN, HIDDEN), "gate_up": (2 * MLP, HIDDEN), "down": (HIDDEN, MLP)}
HEAD = (VOCAB, HIDDEN)
Q4_0 = GGMLType.Q4_0


def q4_0_matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    out = np.empty((rows, cols // 32 * 18), dtype=np.uint8)
    step = max(1, (16 << 20) // cols)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        out[a:b] = quantize_rows((rng.standard_normal((b - a, cols), dtype=np.float32) * np.float32(0.02)), Q4_0)
    return out


def best(times: dict, key: tuple, seconds: float) -> None:
    times[key] = min(times.get(key, float("inf")), seconds)


def timed(f, *args) -> float:
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    warm = kernels.warm_up()
    print(f"kernels: {simd.ISA or 'portable loops'}, "
          f"{'compiled' if warm.compiled else 'loaded'} in {warm.seconds:.1f} s")
    rng = np.random.default_rng(0)
    layer_raw = {k: q4_0_matrix(rng, *s) for k, s in LAYER.items()}
    head_raw = q4_0_matrix(rng, *HEAD)
    layer_bytes = sum(r.nbytes for r in layer_raw.values())
    layers = [{k: kernels.tile([r], Q4_0) for k, r in layer_raw.items()} for _ in range(args.layers)]
    head = kernels.tile([head_raw], Q4_0)
    file_bytes = args.layers * layer_bytes + head_raw.nbytes
    resident = sum(w.nbytes for layer in layers for w in layer.values()) + head.nbytes
    macs = args.layers * sum(r * c for r, c in LAYER.values())  # per token, without the head
    print(f"{args.layers} layers + head: {file_bytes / 1e6:.0f} MB q4_0, tiles {resident / 1e6:.0f} MB "
          f"({resident / file_bytes:.3f}x the file)")
    xs = {c: rng.standard_normal((args.prompt, c), dtype=np.float32) for c in (HIDDEN, MLP)}

    def decode(t: int) -> None:
        for layer in layers:
            for w in layer.values():
                kernels.matmul(xs[w.n_in][:1], w, threads=t)
        kernels.matmul(xs[HIDDEN][:1], head, threads=t)

    def prefill(t: int) -> None:
        for layer in layers:
            for w in layer.values():
                kernels.matmul(xs[w.n_in], w, threads=t)
        kernels.matmul(xs[HIDDEN][-1:], head, threads=t)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.bin"
        with open(path, "wb") as f:
            for r in layer_raw.values():
                f.write(r.tobytes())
        peer = None if args.no_peer else peer_model(args.layers)
        times: dict = {}
        llama: dict = {}
        for _ in range(args.rounds):
            best(times, ("read",), timed(np.fromfile, path, np.uint8))
            for t in threads:
                best(times, ("pack", t), timed(lambda: [kernels.tile([r], Q4_0, threads=t) for r in layer_raw.values()]))
                best(times, ("decode", t), timed(decode, t))
                best(times, ("prefill", t), timed(prefill, t))
            if peer is not None:
                for row in peer_bench(peer, threads, args.prompt):
                    llama[row.threads, "tg"] = max(llama.get((row.threads, "tg"), 0.0), row.gen_tok_s)
                    llama[row.threads, "pp"] = max(llama.get((row.threads, "pp"), 0.0), row.prompt_tok_s)

    read = times["read",]
    print(f"\nreading one layer's {layer_bytes / 1e6:.0f} MB (np.fromfile, page cache): {read * 1e3:.1f} ms "
          f"({layer_bytes / read / 1e9:.2f} GB/s)")
    for t in threads:
        pack = times["pack", t]
        print(f"packing it, {t} thread(s): {pack * 1e3:.1f} ms ({layer_bytes / pack / 1e9:.2f} GB/s), "
              f"{pack / read:.2f}x the read")
    print(f"\n{'threads':>7} {'decode ms':>10} {'GB/s':>6} {'tok/s':>7} {'llama tg':>9} {'ratio':>6}   "
          f"{'prefill ms':>10} {'GMAC/s':>7} {'tok/s':>7} {'llama pp':>9} {'ratio':>6}")
    for t in threads:
        dec, pre = times["decode", t], times["prefill", t]
        dec_tok, pre_tok = 1 / dec, args.prompt / pre
        tg, pp = llama.get((t, "tg")), llama.get((t, "pp"))
        print(f"{t:>7} {dec * 1e3:>10.1f} {file_bytes / dec / 1e9:>6.2f} {dec_tok:>7.2f} "
              f"{_fmt(tg):>9} {_ratio(dec_tok, tg):>6}   {pre * 1e3:>10.1f} {macs * args.prompt / pre / 1e9:>7.1f} "
              f"{pre_tok:>7.2f} {_fmt(pp):>9} {_ratio(pre_tok, pp):>6}")
    for t in threads[1:]:
        print(f"{t} threads vs {threads[0]}: decode {times['decode', threads[0]] / times['decode', t]:.2f}x, "
              f"prefill {times['prefill', threads[0]] / times['prefill', t]:.2f}x, "
              f"packing {times['pack', threads[0]] / times['pack', t]:.2f}x")
    print("(netp figures: the block kernels alone; llama.cpp's: the whole model, "
          f"{'' if llama else 'not measured, '}same shapes and layer count)")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ratio(a: float, b: float | None) -> str:
    return "-" if b is None else f"{a / b:.2f}x"


def peer_model(n_layers: int) -> Path:
    """llama.cpp's q4_0 GGUF (q4_0 everywhere) of the 8B-shaped random checkpoint with n_layers layers."""
    return cached_gguf(checkpoint(llama31_8b(n_layers)), "q4_0")


def peer_bench(model: Path, threads: list[int], prompt: int):
    return llama_bench(model, threads=threads, n_prompt=prompt, n_gen=32, repetitions=1)


if __name__ == "__main__":
    main()
