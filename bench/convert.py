"""Benchmark: convert streams a 1.6 GB checkpoint at copy speed in about one tensor of memory.

Builds a random LLaMA-shaped f32 safetensors checkpoint (sharded, with an
index, like real ones) in a temporary folder, then measures in the same run:
- convert wall time (f32 -> f32, a subprocess, start-up included) against
  `cp` + `sync` of the same input bytes: goal <= 1.5x;
- the convert process's max RSS as `/usr/bin/time -f %M` reports it
  (memory-mapped pages included) against the largest tensor in f32:
  goal <= largest tensor + 300 MB.
Each figure is the best of three runs, alternating with its peer. f32
tensors that need no change are copied in the kernel (copy_file_range, as
cp does); an f16 run shows the buffered path's memory for information.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# LLaMA shapes with GQA: 6 layers of hidden 2048 (16 heads / 4 KV heads), MLP 5632, vocab 32000.
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 2048, 16, 4, 5632, 6, 32000
SHARD_BYTES = 600 << 20


def llama_shapes() -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                   p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, FFN), p + "input_layernorm.weight": (HIDDEN,),
                   p + "post_attention_layernorm.weight": (HIDDEN,)}
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def build_checkpoint(folder: Path) -> tuple[int, int]:
    """Write config, byte-level tokenizer and sharded safetensors; returns (total bytes, largest tensor bytes)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": FFN,
              "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))

    rng = np.random.default_rng(0)
    shapes = llama_shapes()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 4 * int(np.prod(shape))
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    for k, names in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: rng.standard_normal(shapes[n], dtype=np.float32) for n in names}, folder / file)
        weight_map |= {n: file for n in names}
    total = sum(4 * int(np.prod(s)) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return total, max(4 * int(np.prod(s)) for s in shapes.values())


def timed(cmd: list[str], **kwargs) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, **kwargs)
    return time.perf_counter() - t


def main() -> int:
    time_bin = shutil.which("time", path="/usr/bin")
    if time_bin is None:
        print("bench/convert.py needs /usr/bin/time (apt-get install -y time)", file=sys.stderr)
        return 1
    netp = shutil.which("netp") or str(Path(sys.executable).with_name("netp"))
    with tempfile.TemporaryDirectory(prefix="netp-bench-convert-", dir=os.environ.get("NETP_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        src = tmp / "model"
        src.mkdir()
        t = time.perf_counter()
        total, largest = build_checkpoint(src)
        subprocess.run(["sync"], check=True)
        print(f"checkpoint: {total / 1e9:.2f} GB of f32 in {len(list(src.glob('*.safetensors')))} shards, "
              f"largest tensor {largest / 1e6:.0f} MB (built in {time.perf_counter() - t:.0f} s)")

        copy_times, convert_times, rss_kb = [], [], []
        for _ in range(3):
            dst = tmp / "copy"
            subprocess.run(["sync"], check=True)  # each timed step starts with nothing left to flush
            copy_times.append(timed(["sh", "-c", f"cp -r '{src}' '{dst}' && sync"]))
            shutil.rmtree(dst)
            subprocess.run(["sync"], check=True)
            out = tmp / "ne-f32.bin"
            convert_times.append(timed([time_bin, "-f", "%M", "-o", str(tmp / "rss"), netp, "convert", "--quiet",
                                        "--outtype", "f32", "--outfile", str(out), str(src)]))
            rss_kb.append(int((tmp / "rss").read_text().split()[-1]))
            out.unlink()
            shutil.rmtree(tmp / "ne-f32.tokenizer")
        # f16 output goes through the reused f32 buffer instead of the in-kernel copy.
        subprocess.run(["sync"], check=True)
        f16_time = timed([time_bin, "-f", "%M", "-o", str(tmp / "rss"), netp, "convert", "--quiet",
                          "--outtype", "f16", "--outfile", str(tmp / "ne-f16.bin"), str(src)])
        f16_rss = int((tmp / "rss").read_text().split()[-1]) * 1024

    best_copy, best_convert, rss = min(copy_times), min(convert_times), min(rss_kb) * 1024
    ratio = best_convert / best_copy
    over = (rss - largest) / 1e6
    print(f"convert wall {best_convert:.2f} s / (cp + sync) {best_copy:.2f} s = {ratio:.2f}x  (goal <= 1.5x)  "
          f"runs: convert {', '.join(f'{x:.2f}' for x in convert_times)}; cp {', '.join(f'{x:.2f}' for x in copy_times)}")
    print(f"max RSS {rss / 1e6:.0f} MB vs largest tensor {largest / 1e6:.0f} MB: {over:+.0f} MB  "
          f"(goal <= +300 MB)  runs: {', '.join(f'{k / 1e3:.0f}' for k in rss_kb)} MB")
    print(f"--outtype f16 (buffered path, for information): max RSS {f16_rss / 1e6:.0f} MB = largest tensor "
          f"{(f16_rss - largest) / 1e6:+.0f} MB; wall {f16_time:.2f} s = {f16_time / best_copy:.2f}x cp + sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
