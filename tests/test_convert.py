"""convert: HF folders (GPT-J, LLaMA GQA/MQA/tied; safetensors single, sharded,
bf16, .bin), a sentencepiece tokenizer, the SmolLM2 GGUF, and bad inputs.

Expected values come from transformers, torch, safetensors, sentencepiece and
gguf-py reading the same sources, and from docs/design.md §2's rules written out here,
never from netp's own output.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SEED_PROMPT
from netp.convert.cli import convert_command
from netp.convert.stage import convert
from netp.formats.ne import NEReader

ROOT = Path(__file__).resolve().parent.parent
N_VOCAB = 49152


# -- references, written independently of netp --------------------------------------------
def llama_names(n_layer: int, tied: bool) -> dict[str, str]:
    """NE name -> HF name for the LLaMA family (docs/design.md §2)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "model.embed_tokens.weight" if tied else "lm_head.weight"}
    per_layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                 "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                 "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layer):
        names |= {f"layers.{i}.{ne}.weight": f"model.layers.{i}.{hf}.weight" for ne, hf in per_layer.items()}
    return names


def gguf_to_ne(name: str) -> str:
    """llama.cpp's tensor names -> NE names (LLaMA family)."""
    fixed = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, i, part, _ = name.split(".")
    return f"layers.{i}." + {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                             "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
                             "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
                             "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}[part] + ".weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF half-split -> adjacent pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder as f32 numpy, read with torch."""
    import torch
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        state |= load_file(f)
    if (folder / "pytorch_model.bin").is_file():
        state |= torch.load(folder / "pytorch_model.bin", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def byte_level_reference(tokenizer_json: Path, n_vocab: int) -> list[tuple[bytes, float]]:
    """docs/design.md §2: raw bytes through GPT-2's byte decoder, score -i, added tokens -10000."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    spec = json.loads(tokenizer_json.read_text())
    added = {a["id"]: a["content"] for a in spec["added_tokens"]}
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    out = []
    for i in range(n_vocab):
        if i in added:
            out.append((added[i].encode(), -10000.0))
        else:
            out.append((bytes(decoder[c] for c in by_id[i]), float(-i)))
    return out


def assert_no_output(folder: Path) -> None:
    assert [p.name for p in folder.iterdir()] == [], "an error left output behind"


# -- HF folders ------------------------------------------------------------------------------
CASES = [("llama_gqa", "safetensors"), ("llama_mqa", "safetensors"), ("llama_tied", "safetensors"),
         ("gptj", "safetensors"), ("llama_gqa", "sharded"), ("llama_gqa", "bf16"), ("llama_gqa", "bin"),
         ("gptj", "bf16")]


@pytest.mark.parametrize("kind,variant", CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_hf_folder_converts_exactly(tiny_hf_model, tmp_path, kind, variant):
    import transformers

    folder = tiny_hf_model(kind, variant)
    if variant == "sharded":
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    cfg = transformers.AutoConfig.from_pretrained(folder)
    out = tmp_path / "ne-f32.bin"
    convert(str(folder), out, "f32")
    state = hf_state(folder)

    with NEReader(out) as r:
        h = r.header
        if kind.startswith("llama"):
            names = llama_names(cfg.num_hidden_layers, cfg.tie_word_embeddings)
            expected_header = dict(
                n_vocab=cfg.vocab_size, n_embd=cfg.hidden_size, n_mult=256, n_head=cfg.num_attention_heads,
                n_head_kv=cfg.num_key_value_heads, n_layer=cfg.num_hidden_layers,
                n_rot=cfg.hidden_size // cfg.num_attention_heads, ffn_hidden_size=cfg.intermediate_size,
                norm_eps=np.float32(cfg.rms_norm_eps), freq_base=np.float32(cfg.rope_parameters["rope_theta"]),
                max_seq_len=cfg.max_position_embeddings)
        else:
            names = {k: k for k in state if not k.endswith(("attn.bias", "attn.masked_bias"))}
            expected_header = dict(
                n_vocab=cfg.vocab_size, n_embd=cfg.n_embd, n_mult=cfg.n_embd // cfg.n_head, n_head=cfg.n_head,
                n_head_kv=0, n_layer=cfg.n_layer, n_rot=cfg.rotary_dim, ffn_hidden_size=0,
                norm_eps=np.float32(cfg.layer_norm_epsilon), freq_base=10000.0, max_seq_len=cfg.n_positions)
        expected_header |= dict(version=1, ftype=0, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                pad_token_id=cfg.pad_token_id, sep_token_id=-1, rope_scaling_factor=0.0,
                                freq_scale=1.0, n_experts=0, par_res=0)
        assert {k: getattr(h, k) for k in expected_header} == expected_header

        assert set(r.tensors) == set(names)
        for ne, hf in names.items():
            got = r.view(ne)
            assert got.dtype == np.float32 and r.tensors[ne].ggml_type == 0, ne
            want = state[hf]
            if ne.endswith("attention.wq.weight") or ne.endswith("attention.wk.weight"):
                from netp.models.llama import unpermute_rotary

                heads = cfg.num_attention_heads if ".wq." in ne else cfg.num_key_value_heads
                np.testing.assert_array_equal(got, llama_cpp_permute(want, heads), err_msg=ne)
                np.testing.assert_array_equal(unpermute_rotary(np.array(got), heads), want, err_msg=ne)
            else:
                np.testing.assert_array_equal(got, want, err_msg=ne)

        assert r.vocab == byte_level_reference(folder / "tokenizer.json", cfg.vocab_size)

    tok = out.with_name("ne-f32.tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tok / f).read_bytes() == (folder / f).read_bytes()  # copied as they are


def test_f16_is_f32_rounded(tiny_hf_model, tmp_path):
    folder = tiny_hf_model("llama_gqa")
    convert(str(folder), tmp_path / "ne-f32.bin", "f32")
    convert(str(folder), tmp_path / "ne-f16.bin", "f16")
    with NEReader(tmp_path / "ne-f32.bin") as a, NEReader(tmp_path / "ne-f16.bin") as b:
        assert b.header.ftype == 1 and a.vocab == b.vocab
        assert list(a.tensors) == list(b.tensors)
        for name, info in a.tensors.items():
            if len(info.shape) == 1:  # norms stay f32
                assert b.tensors[name].ggml_type == 0
                np.testing.assert_array_equal(b.view(name), a.view(name))
            else:
                assert b.tensors[name].ggml_type == 1 and b.view(name).dtype == np.float16
                np.testing.assert_array_equal(b.view(name), a.view(name).astype(np.float16))


def test_bf16_widening_is_exact():
    """Every bf16 bit pattern (NaNs aside) widens to the float torch gives."""
    import torch

    from netp.formats.hf import bf16_bits_to_f32

    bits = np.arange(1 << 16, dtype=np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    got = bf16_bits_to_f32(bits)
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])
    assert np.isnan(got[~ok]).all()


# -- sentencepiece ---------------------------------------------------------------------
def train_sentencepiece() -> bytes:
    import sentencepiece as spm

    words = ("Once upon a time, there existed a little girl, who liked to have adventures. "
             "She wanted to go to places and meet new people, and have fun.").split() * 40
    sentences = [" ".join(words[i:i + 12]) for i in range(0, len(words), 7)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return model.getvalue()


def test_sentencepiece_vocab_and_tokenizer(tiny_hf_model, tmp_path):
    import sentencepiece as spm
    import tokenizers

    base = tiny_hf_model("llama_gqa")
    folder = tmp_path / "sp-llama"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        os.symlink(base / f, folder / f)
    (folder / "tokenizer.model").write_bytes(train_sentencepiece())
    out = tmp_path / "out" / "sp.bin"
    out.parent.mkdir()
    convert(str(folder), out, "f32")

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = sp.get_piece_size()
    with NEReader(out) as r:
        assert len(r.vocab) == N_VOCAB
        for i in range(n):
            piece = sp.id_to_piece(i)
            if sp.is_unknown(i):
                text = " \u2047 ".encode()
            elif sp.is_control(i):
                text = b""
            elif sp.is_byte(i):
                text = bytes([int(piece[3:5], 16)])
            else:
                text = piece.replace("\u2581", " ").encode()
            assert r.vocab[i] == (text, np.float32(sp.get_score(i))), i
        # ids past the tokenizer: the unknown text, score i
        assert r.vocab[n:] == [(" \u2047 ".encode(), float(i)) for i in range(n, N_VOCAB)]
        assert any(sp.is_byte(i) for i in range(n)) and any(sp.is_control(i) for i in range(n))

    tok = tokenizers.Tokenizer.from_file(str(out.parent / "sp.tokenizer" / "tokenizer.json"))
    for text in (SEED_PROMPT, "She liked places, and fun!", "zebra quietly: \u00e9t\u00e9 42"):
        assert tok.encode(text).ids == [sp.bos_id()] + sp.encode(text), text


# -- SmolLM2 GGUF ---------------------------------------------------------------------------
def test_smollm2_gguf_converts_to_its_dequantized_tensors(smollm2_gguf, smollm2_f32):
    import gguf

    src = gguf.GGUFReader(smollm2_gguf)
    with NEReader(smollm2_f32) as r:
        h = r.header
        assert (h.n_layer, h.n_head, h.n_head_kv, h.n_vocab, h.n_embd) == (30, 9, 3, 49152, 576)
        assert (h.ffn_hidden_size, h.n_rot, h.freq_base, h.ftype) == (1536, 64, 100000.0, 0)
        seen = set()
        for t in src.tensors:
            ne = gguf_to_ne(t.name)
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            np.testing.assert_array_equal(r.view(ne), want, err_msg=t.name)
            seen.add(ne)
            if t.name == "token_embd.weight":  # the GGUF is tied: the head is the embedding
                assert "output.weight" not in {x.name for x in src.tensors}
                np.testing.assert_array_equal(r.view("output.weight"), want)
        assert set(r.tensors) == seen | {"output.weight"}

        # vocab: GGUF tokens in GPT-2's byte alphabet -> raw bytes, -i, control/user-defined -10000
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        decoder = {c: b for b, c in bytes_to_unicode().items()}
        tokens = src.fields["tokenizer.ggml.tokens"].contents()
        types = src.fields["tokenizer.ggml.token_type"].contents()
        want_vocab = [(bytes(decoder[c] for c in tok), -10000.0 if kind in (3, 4) else float(-i))
                      for i, (tok, kind) in enumerate(zip(tokens, types))]
        assert r.vocab == want_vocab
        assert r.vocab[0] == (b"<|endoftext|>", -10000.0) and r.vocab[300][1] == -300.0


def test_smollm2_tokenizer_matches_transformers(smollm2_gguf, smollm2_f32):
    import tokenizers
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    folder = smollm2_f32.with_name("smollm2-f32.tokenizer")
    ours = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in (SEED_PROMPT, "<|im_start|>user\nHi there<|im_end|>", "  two  spaces, caf\u00e9 12345"):
        assert ours.encode(text).ids == reference(text)["input_ids"], text
    assert AutoTokenizer.from_pretrained(folder)(SEED_PROMPT)["input_ids"] == reference(SEED_PROMPT)["input_ids"]


def test_smollm2_tokenizer_splits_digits_first(smollm2_gguf, smollm2_f32):
    """The GGUF says tokenizer.ggml.pre = smollm: every digit is split off before GPT-2's regex
    (llama.cpp's split for it), so whitespace before a digit stays one piece ("\\n\\n" then "1"),
    where transformers' GGUF converter alone gives "\\n", "\\n", "1"."""
    import gguf
    import tokenizers

    src = gguf.GGUFReader(smollm2_gguf)
    assert src.fields["tokenizer.ggml.pre"].contents() == "smollm"
    vocab = {tok: i for i, tok in enumerate(src.fields["tokenizer.ggml.tokens"].contents())}
    ours = tokenizers.Tokenizer.from_file(str(smollm2_f32.with_name("smollm2-f32.tokenizer") / "tokenizer.json"))
    # GPT-2's byte-to-unicode map: "\n" is "\u010a", " " is "\u0120"
    assert ours.encode("see\n\n1.", add_special_tokens=False).ids == [vocab[t] for t in ("see", "\u010a\u010a", "1", ".")]
    assert ours.encode("x =   42", add_special_tokens=False).ids == [
        vocab[t] for t in ("x", "\u0120=", "\u0120\u0120\u0120", "4", "2")]


def test_gguf_tokenizer_parts_match_transformers(smollm2_gguf):
    """netp groups the GGUF metadata (read by gguf-py) exactly as transformers' own
    get_gguf_tokenizer does (which reads it with torch imported)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer

    from netp.formats.gguf_in import GGUFFile
    from netp.formats.tokenizer_dir import gguf_tokenizer_parts

    g = GGUFFile(smollm2_gguf)
    try:
        assert gguf_tokenizer_parts(g.metadata) == get_gguf_tokenizer(str(smollm2_gguf))
    finally:
        g.close()


# -- models/ defaults against transformers -------------------------------------------------
@pytest.mark.parametrize("arch_name,config_class", [
    ("llama", "LlamaConfig"), ("gptj", "GPTJConfig"), ("mistral", "MistralConfig"), ("phi3", "Phi3Config"),
    ("qwen2", "Qwen2Config"), ("qwen3", "Qwen3Config"), ("mixtral", "MixtralConfig"),
    ("qwen2_moe", "Qwen2MoeConfig"), ("qwen3_moe", "Qwen3MoeConfig")])
def test_hf_defaults_match_transformers(arch_name, config_class):
    import transformers

    from netp.models import by_name

    cfg = getattr(transformers, config_class)()
    for key, value in by_name(arch_name).hf_defaults.items():
        actual = getattr(cfg, key, None)
        if actual is None and key == "rope_theta":  # transformers 5 keeps it in rope_parameters
            actual = cfg.rope_parameters["rope_theta"]
        assert actual == value, f"{config_class}.{key}: transformers {actual!r}, netp {value!r}"


TINY_CONFIGS = {  # small vocab: every tensor of each architecture goes through the HF hook below
    "LlamaConfig": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=384, num_hidden_layers=2),
    "GPTJConfig": dict(vocab_size=64, n_embd=128, n_head=4, rotary_dim=16, n_inner=384, n_layer=2),
    "GPTNeoXConfig": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                          num_hidden_layers=2, rotary_pct=0.5),
    "MistralConfig": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=384, num_hidden_layers=2, head_dim=32),
    "Phi3Config": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=384, num_hidden_layers=2, pad_token_id=0),
    "Qwen2Config": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=384, num_hidden_layers=2),
    "Qwen3Config": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=384, num_hidden_layers=2, head_dim=64),
    # transformers 5's own state dicts hold merged 3-D experts (mlp.experts.gate_up_proj, down_proj)
    "MixtralConfig": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, num_hidden_layers=2, num_local_experts=4),
    "Qwen2MoeConfig": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=96, moe_intermediate_size=64, shared_expert_intermediate_size=96,
                           num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, decoder_sparse_step=2),
    "Qwen3MoeConfig": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=96, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                           num_hidden_layers=3, mlp_only_layers=[1], head_dim=64),
}


def test_transforms_hf_names_exactly_the_tensors_the_hf_hook_changes():
    """convert copies the bytes of a tensor transforms_hf does not name, so the
    predicate must agree with what the HF hook (hf_tensor, on each NE tensor's rows
    of its HF tensor: source_parts) does to real data: every tensor of
    transformers' own state dict, each NE tensor once."""
    import torch
    import transformers

    from netp.models import by_hf_config

    seen = set()
    for config_class, kwargs in TINY_CONFIGS.items():
        config = getattr(transformers, config_class)(**kwargs)
        cfg = config.to_dict()
        arch = by_hf_config(cfg, "config.json")
        hp = arch.hparams_from_hf(cfg, "config.json")
        seen.add(arch.name)
        torch.manual_seed(0)
        state = transformers.AutoModelForCausalLM.from_config(config).state_dict()
        changed, produced = set(), {}
        for name, tensor in state.items():
            data = tensor.float().numpy()
            layout = arch.source_parts(name, hp)
            assert layout is not None, (arch.name, name)
            rows = data.reshape(-1, data.shape[-1])
            for part in layout[0]:
                value = rows[part.row0:part.row0 + part.rows].reshape(arch.spec(part.ne).shape(hp))
                out = arch.hf_tensor(part.ne, value, hp)
                produced[part.ne] = out.shape
                if not np.array_equal(out, value):
                    changed.add(part.ne)
        expected = arch.tensor_shapes(hp)
        assert produced == {ne: s for ne, s in expected.items() if ne in produced}, arch.name
        assert set(expected) - set(produced) <= {arch.output_name}, arch.name  # tied heads come from the embedding
        assert changed == {ne for ne in expected if arch.transforms_hf(ne)}, arch.name
        if arch.name in ("llama", "mistral", "phi3"):  # the rotary permutation of wq/wk, every layer
            assert changed == {f"layers.{i}.attention.{w}.weight" for i in range(2) for w in ("wq", "wk")}


# -- hub cache --------------------------------------------------------------------------------
def test_hub_id_resolves_from_local_cache_only(tiny_hf_model, tmp_path, monkeypatch):
    folder = tiny_hf_model("llama_mqa")
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        os.symlink(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    convert("tiny-org/tiny-llama", tmp_path / "hub.bin", "f32")
    with NEReader(tmp_path / "hub.bin") as r:
        assert r.header.n_head_kv == 1


# -- bad inputs: one line, non-zero exit, nothing written ------------------------------------
def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        convert_command.main(args=args, prog_name="convert.py")
    err = capsys.readouterr().err
    return e.value.code, err


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg |= changes
    (folder / "config.json").write_text(json.dumps(cfg))


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _missing_tensor(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, folder / "model.safetensors")


def _unknown_tensor(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(128, np.float32)
    save_file(state, folder / "model.safetensors")


def _truncated(folder: Path) -> None:
    f = folder / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)


BAD = {
    "no-config": (_no_config, "no config.json"),
    "missing-tensor": (_missing_tensor, "missing tensor layers.1.feed_forward.w2.weight"),
    "unknown-tensor": (_unknown_tensor, "model.layers.0.self_attn.q_proj.bias"),
    "truncated": (_truncated, "not a readable safetensors file"),
    "unknown-arch": (lambda d: edit_config(d, model_type="bert", architectures=["BertModel"]),
                     "unsupported architecture 'bert'"),
    # Llama 3 scaling, an explicit head_dim and Mistral's window convert now (tests/test_families.py);
    # what still changes the math netp lacks is refused by name, naming what is supported.
    "rope-yarn": (lambda d: edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0},
                                        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
                  "unsupported config: rope scaling 'yarn' (factor 4.0); netp implements for llama: none, linear, "
                  "llama3"),
    "moe": (lambda d: edit_config(d, model_type="olmoe", num_experts=8),
            "unsupported config: mixture of experts: OLMoE"),
    "llama-as-mixtral": (lambda d: edit_config(d, model_type="mixtral", num_local_experts=8),
                         "tensor model.layers.0.mlp.down_proj.weight is not part of a mixtral model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_error_line(case, tiny_hf_model, tmp_path, capsys):
    damage, expected = BAD[case]
    folder = copy_model(tiny_hf_model("llama_gqa"), tmp_path / "model")
    damage(folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = run_cli(["--outtype", "f32", "--outfile", str(out_dir / "ne-f32.bin"), str(folder)], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert.py: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert_no_output(out_dir)


def test_uncached_hub_id(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["--outtype", "f32", "--outfile", "ne-f32.bin", "EleutherAI/gpt-j-6b"], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "EleutherAI/gpt-j-6b" in err and str(cache) in err and "never downloads" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-cache"]


def test_bin_without_torch_names_the_extra(tiny_hf_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    code, err = run_cli(["--outfile", str(tmp_path / "x.bin"), str(tiny_hf_model("llama_gqa", "bin"))], capsys)
    assert code == 1 and "torch" in err and "extra" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.bin").exists()


def test_seed_line_missing_model_shows_the_corrected_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["--outtype", "f32", "--outfile", "EleutherAI/gpt-j-6b"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "MODEL is missing" in err
    assert "convert.py --outtype f32 --outfile ne-f32.bin EleutherAI/gpt-j-6b" in err
    assert list(tmp_path.iterdir()) == []


# -- real processes -------------------------------------------------------------------------
def test_seed_line_as_a_script(tiny_hf_model, tmp_path):
    """`python scripts/convert.py --outtype f32 --outfile ne-f32.bin MODEL`, verbatim, then
    the published line without MODEL: one line, exit 2."""
    folder = tiny_hf_model("gptj")
    py = sys.executable
    ok = subprocess.run([py, str(ROOT / "scripts/convert.py"), "--outtype", "f32", "--outfile", "ne-f32.bin",
                         str(folder)], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "ne-f32.bin").is_file() and (tmp_path / "ne-f32.tokenizer" / "tokenizer.json").is_file()

    bad = subprocess.run([py, str(ROOT / "scripts/convert.py"), "--outtype", "f32", "--outfile",
                          "EleutherAI/gpt-j-6b"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "convert.py --outtype f32 --outfile ne-f32.bin EleutherAI/gpt-j-6b" in bad.stderr


def test_netp_convert_error_in_a_process(tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "nothing"))
    netp = Path(sys.executable).with_name("netp")
    r = subprocess.run([str(netp), "convert", "--outfile", "x.bin", "no-such-org/no-such-model"], cwd=tmp_path,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("netp convert: error: no-such-org/no-such-model: ")
    assert "torch" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, prog", [
    (["netp", "convert"], "netp convert"),
    (["netp"], "netp"),
    ([sys.executable, str(ROOT / "scripts/convert.py")], "convert.py"),
    ([sys.executable, str(ROOT / "scripts/quantize.py")], "quantize.py"),
    (["shard"], "shard"),
    (["ne-run"], "ne-run"),
])
def test_usage_error_points_at_the_commands_own_help(argv, prog, tmp_path):
    """A bad flag names the command that refused it and the --help that lists its flags."""
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / argv[0]) if argv[0] in ("netp", "shard", "ne-run") else argv[0], *argv[1:]]
    r = subprocess.run([*cmd, "--bogus"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"{prog}: error: ") and "--bogus" in r.stderr, r.stderr
    assert r.stderr.rstrip().endswith(f"(see {prog} --help)"), r.stderr


def test_truncated_gguf_one_error_line(smollm2_gguf, tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(1 << 16))  # ends inside the tokenizer metadata
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["--outfile", str(out / "x.bin"), str(bad)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{bad}: not a readable GGUF file: truncated or corrupt" in err
    assert_no_output(out)


# -- the in-kernel copy of f32 tensors -------------------------------------------------------
@pytest.mark.parametrize("path", ["kernel", "fallback", "hashed"])
def test_writer_copy_from_writes_the_same_file(tmp_path, monkeypatch, path):
    """NEWriter.copy_from (used for f32 tensors that need no change) gives the bytes
    write() gives, through copy_file_range, its read fallback, or with a hasher."""
    import hashlib

    from netp.formats.ne import NEHeader, NEWriter

    data = np.random.default_rng(1).standard_normal((40, 64), dtype=np.float32)
    src = tmp_path / "src.raw"
    src.write_bytes(b"x" * 100 + data.tobytes())
    header = NEHeader(n_vocab=1, n_embd=64, n_head=1, n_layer=1)
    with NEWriter(tmp_path / "a.bin", header, [(b"a", 0.0)]) as w:
        w.add_tensor("n", 0, (64,), data[0])
        w.add_tensor("t", 0, data.shape, data)
        w.add_tensor("m", 0, (64,), data[1])
    if path == "fallback":
        def no_copy(*args):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", no_copy)
    hasher = hashlib.sha256() if path == "hashed" else None
    fd = os.open(src, os.O_RDONLY)
    try:
        with NEWriter(tmp_path / "b.bin", header, [(b"a", 0.0)], hasher=hasher) as w:
            w.add_tensor("n", 0, (64,), data[0])
            w.begin_tensor("t", 0, data.shape)
            w.copy_from(fd, 100, data.nbytes)
            w.add_tensor("m", 0, (64,), data[1])
    finally:
        os.close(fd)
    want = (tmp_path / "a.bin").read_bytes()
    assert (tmp_path / "b.bin").read_bytes() == want
    if hasher is not None:
        assert hasher.hexdigest() == hashlib.sha256(want).hexdigest()


# -- the tokenizer folder helpers quantize and shard use ------------------------------------------
def test_copy_tokenizer_beside(smollm2_f32, tmp_path):
    from netp.errors import NetpError
    from netp.formats.tokenizer_dir import copy_tokenizer_beside, tokenizer_dir_for

    src = tokenizer_dir_for(smollm2_f32)
    assert src == smollm2_f32.with_name("smollm2-f32.tokenizer") and src.is_dir()
    files = sorted(p.name for p in src.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)

    beside = copy_tokenizer_beside(smollm2_f32, tokenizer_dir_for(tmp_path / "ne-q4_0.bin"))  # beside an NE output
    assert beside == tmp_path / "ne-q4_0.tokenizer"
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    inside = copy_tokenizer_beside(smollm2_f32, shard_dir / "tokenizer")  # a folder being filled: <dir>/tokenizer
    assert inside == shard_dir / "tokenizer"
    for folder in (beside, inside):
        assert sorted(p.name for p in folder.iterdir()) == files
        assert all((folder / f).read_bytes() == (src / f).read_bytes() for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ne-q4_0.tokenizer", "shards"]  # no partials

    with pytest.raises(NetpError, match="no tokenizer folder"):
        copy_tokenizer_beside(tmp_path / "lonely.bin", tokenizer_dir_for(tmp_path / "other.bin"))


def test_gguf_tokenizer_build_imports_no_torch(smollm2_gguf, tmp_path):
    """transformers' own GGUF reader imports torch; convert's GGUF path must not (docs/design.md §1)."""
    code = (
        "import sys\n"
        "from netp.formats.gguf_in import GGUFFile\n"
        "from netp.formats.tokenizer_dir import build_tokenizer_dir, write_gguf_tokenizer\n"
        f"g = GGUFFile({str(smollm2_gguf)!r})\n"
        f"build_tokenizer_dir({str(tmp_path / 't.tokenizer')!r}, write_gguf_tokenizer, g.metadata, g.path)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.tokenizer" / "tokenizer.json").is_file()
