"""Today's families (issue 23, docs/design.md §2 "Today's families"): Llama 3.x
rope scaling, linear rope scaling, an explicit head_dim, Qwen2 biases and tied
embeddings, Qwen3 q/k norms, Mistral's and Phi-3's sliding window, Phi-3's
fused projections; GGUF files laid out as llama.cpp writes them; the
refusals that remain.

Every model is a tiny random transformers model made here (2 layers, vocab
49152 with SmolLM2's tokenizer, norms and biases randomized after init)
whose feature matters at the test's length: windows shorter than the 12
tokens run, llama3 scaling with original_max_position_embeddings 16 so the
low frequencies really are scaled. References are transformers' own
float32 logits, or the unsharded file at 1 rank.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netp.errors import NetpError
from netp.formats.ne import NEReader
from test_runtime import MPIEXEC, N_PROMPT, TOKENS, assert_logits_close, run_ranks

COMMON = dict(num_hidden_layers=2, vocab_size=49152, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
ATTN = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}
WINDOW = 5  # < the 12 tokens run: prefill and decode both cut keys off
# family -> (transformers config class, kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama3": ("LlamaConfig", dict(**ATTN, rope_parameters=LLAMA3)),
    "llama_linear": ("LlamaConfig", dict(**ATTN, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 10000.0})),
    "mistral": ("MistralConfig", dict(**ATTN, head_dim=64, sliding_window=WINDOW)),  # head_dim != 128 / 4
    "qwen2": ("Qwen2Config", dict(**ATTN, tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", dict(**ATTN, head_dim=64)),
    "phi3": ("Phi3Config", dict(**ATTN, sliding_window=WINDOW)),
}
NE_ARCH = {"llama3": "llama", "llama_linear": "llama", "mistral": "llama", "phi3": "llama", "qwen2": "qwen2",
           "qwen3": "qwen3"}


def _save(family: str, folder: Path, tokenizer_dir: Path) -> None:
    import torch
    import transformers

    config_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **kwargs)
    torch.manual_seed(sum(map(ord, family)))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from 1/0, so a missing or swapped one cannot pass unseen
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "bias" not in name else 0.0) + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / f, folder / f)


@pytest.fixture(scope="module")
def family_hf(smollm2_tokenizer_dir, tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = tmp_path_factory.mktemp(f"hf-{family}")
            _save(family, cache[family], smollm2_tokenizer_dir)
        return cache[family]

    return make


@pytest.fixture(scope="module")
def family_ne(family_hf, tmp_path_factory):
    """family_ne(family, qtype) -> NE file: f32 from netp convert, q4_0 from netp quantize."""
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file

    cache: dict[tuple[str, str], Path] = {}

    def make(family: str, qtype: str = "f32") -> Path:
        if (family, qtype) not in cache:
            out = tmp_path_factory.mktemp(f"ne-{family}-{qtype}") / f"ne-{qtype}.bin"
            if qtype == "f32":
                convert(str(family_hf(family)), out, "f32")
            else:
                quantize_file(make(family), out, GGMLType.Q4_0)
            cache[family, qtype] = out
        return cache[family, qtype]

    return make


@pytest.fixture(scope="module")
def family_shards(family_ne, tmp_path_factory):
    from netp.shard.stage import shard_file

    cache: dict[tuple[str, int], Path] = {}

    def make(family: str, ranks: int) -> Path:
        if (family, ranks) not in cache:
            cache[family, ranks] = tmp_path_factory.mktemp(f"shards-{family}-x{ranks}") / "shards"
            shard_file(family_ne(family, "q4_0"), cache[family, ranks], ranks)
        return cache[family, ranks]

    return make


def transformers_logits(folder: Path, tokens=TOKENS) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


# -- f32 against transformers, q4_0 over 1, 2 and 3 ranks against unsharded ------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_matches_transformers(family, family_hf, family_ne):
    """The prompt as one batch, then 5 tokens one by one through the KV cache (the window cuts both)."""
    ne = family_ne(family)
    with NEReader(ne) as r:
        from netp.models import ne_model

        assert ne_model(r.header, r.shapes, str(ne))[0].name == NE_ARCH[family]
    theirs = transformers_logits(family_hf(family))
    assert np.abs(theirs).max() > 1
    assert_logits_close(theirs, run_ranks(ne, 1))


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "llama_linear" else f
                                    for f in FAMILIES])  # llama_linear: llama3's code path, another table
def test_q4_0_shards_match_unsharded(family, family_ne, family_shards):
    ref = run_ranks(family_ne(family, "q4_0"), 1)
    for ranks in (1, 2, 3):  # 3 ranks: 2 KV heads over 4 query heads straddle a rank
        assert_logits_close(ref, run_ranks(family_shards(family, ranks), ranks))


def test_feature_is_carried_and_matters(family_hf, family_ne, tmp_path):
    """Each feature lands where docs/design.md §2 says, and computing without it
    is measurably wrong (so the tests above could fail)."""
    import dataclasses

    from netp.formats.ne import NEWriter
    from netp.models.layers import rotary_tables

    with NEReader(family_ne("mistral")) as r:
        assert (r.header.n_embd_head_k, r.header.inner_hidden_size) == (64, WINDOW)
        assert r.shapes["layers.0.attention.wq.weight"] == (4 * 64, 128)
    with NEReader(family_ne("llama_linear")) as r:
        assert r.header.freq_scale == np.float32(0.25)
    with NEReader(family_ne("qwen3")) as r:
        assert r.header.n_embd_head_k == 64 and r.shapes["model.layers.1.self_attn.k_norm.weight"] == (64,)
    with NEReader(family_ne("llama3")) as r:
        factors = r.read("rope_freqs.weight")
    # llama.cpp's formula (its convert_hf_to_gguf), written out here, not netp's
    dim, p = 32, LLAMA3
    want = []
    for freq in 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < p["original_max_position_embeddings"] / p["high_freq_factor"]:
            want.append(1.0)
        elif wavelen > p["original_max_position_embeddings"] / p["low_freq_factor"]:
            want.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            want.append(1 / ((1 - smooth) / p["factor"] + smooth))
    np.testing.assert_allclose(factors, want, rtol=1e-6)
    assert (factors == 8.0).sum() >= 10 and 1 < factors[1] < 8  # most pairs scaled, one smoothed
    # the same weights without the window / without the factors: far from transformers
    for family, change in (("mistral", dict(inner_hidden_size=0)), ("llama3", None)):
        src = family_ne(family)
        out = tmp_path / f"{family}-without.bin"
        with NEReader(src) as r:
            header = dataclasses.replace(r.header, **change) if change else r.header
            w = NEWriter(out, header, r.vocab)
            for name, info in r.tensors.items():
                data = r.read(name)
                if name == "rope_freqs.weight":
                    data = np.ones_like(data)
                w.begin_tensor(name, info.ggml_type, info.shape)
                w.write(np.ascontiguousarray(data))
            w.commit()
        shutil.copytree(src.with_name(src.stem + ".tokenizer"), out.with_name(out.stem + ".tokenizer"))
        diff = np.abs(transformers_logits(family_hf(family)) - run_ranks(out, 1)).max()
        assert diff > 1e-2, (family, diff)
    assert rotary_tables(4, 32, 1e4, 0.5)[1][2, 0] == pytest.approx(math.sin(1.0), abs=1e-6)  # p 2 x 1/2


def test_convert_warns_by_name_where_neural_speed_lacks_the_math(family_hf, tmp_path):
    from netp.convert.stage import convert

    expected = {"llama3": "rope_freqs.weight", "mistral": "sliding_window 5", "qwen3": "q/k RMSNorm",
                "phi3": "LLaMA layout", "qwen2": "grouped KV heads"}
    for family, needle in expected.items():
        r = convert(str(family_hf(family)), tmp_path / f"{family}.bin", "f32")
        assert any(needle in w for w in r.warnings), (family, r.warnings)
    r = convert(str(family_hf("llama_linear")), tmp_path / "linear.bin", "f32")
    assert r.warnings == ()


# -- GGUF files laid out as llama.cpp writes them ----------------------------------------------

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {  # HF suffix -> llama.cpp tensor name (its tensor_mapping)
    "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}


@pytest.fixture(scope="module")
def tokenizer_meta(smollm2_gguf):
    """SmolLM2's tokenizer metadata, read once (gguf-py decodes 49152 strings slowly)."""
    from netp.formats.gguf_in import GGUFFile

    src = GGUFFile(smollm2_gguf)
    try:
        return {k: v for k, v in src.metadata.items() if k.startswith("tokenizer.ggml.")}
    finally:
        src.close()


def write_gguf(family: str, folder: Path, meta: dict, out: Path, extra=None) -> Path:
    """The HF folder as llama.cpp's converter would write it: its metadata keys,
    its tensor names, q/k permuted for llama-style rotary (not for qwen2/qwen3,
    which llama.cpp rotates NEOX-style), rope_freqs.weight for Llama 3, no
    output.weight when the embeddings are tied; SmolLM2's tokenizer (`meta`).
    extra(writer): more metadata."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    arch = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[family]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    w = gguf.GGUFWriter(out, arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    if family == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    if extra is not None:
        extra(w)
    if family == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(head_dim, rope).astype(np.float32))
    state = load_file(folder / "model.safetensors")
    for name, data in state.items():
        if name == "lm_head.weight":
            w.add_tensor("output.weight", data)
            continue
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name.removeprefix("model.")
        gname = GGUF_NAMES[suffix]
        if name.startswith("model.layers."):
            gname = f"blk.{name.split('.')[2]}.{gname}"
        if arch == "llama" and suffix == "self_attn.q_proj.weight":
            data = _llama_cpp_permute(data, n_head)
        if arch == "llama" and suffix == "self_attn.k_proj.weight":
            data = _llama_cpp_permute(data, n_kv)
        w.add_tensor(gname, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _llama3_factors(dim: int, p: dict) -> np.ndarray:
    out = []
    for freq in 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        lo, hi = p["original_max_position_embeddings"] / p["low_freq_factor"], \
            p["original_max_position_embeddings"] / p["high_freq_factor"]
        if wavelen < hi:
            out.append(1.0)
        elif wavelen > lo:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(out)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_gguf_converts_to_the_hf_twin_and_matches_transformers(family, family_hf, family_ne, tokenizer_meta,
                                                                tmp_path):
    """Same NE tensors as the HF folder (so a Llama 3 GGUF's own rope_freqs.weight is kept),
    and the file computes what transformers computes on the HF twin."""
    from netp.convert.stage import convert

    gguf_path = write_gguf(family, family_hf(family), tokenizer_meta, tmp_path / f"{family}.gguf")
    out = tmp_path / "from-gguf.bin"
    convert(str(gguf_path), out, "f32")
    with NEReader(out) as g, NEReader(family_ne(family)) as h:
        assert list(g.shapes.items()) == list(h.shapes.items())  # the same tensors, in the same order
        for name in h.tensors:
            a, b = g.read(name), h.read(name)
            if name == "rope_freqs.weight":  # llama.cpp's factors vs transformers' formula: rounding apart
                np.testing.assert_allclose(a, b, rtol=1e-6)
            else:
                assert np.array_equal(a, b), name
        for field in ("n_embd_head_k", "n_head_kv", "freq_base", "ffn_hidden_size", "n_rot"):
            assert getattr(g.header, field) == getattr(h.header, field), field
    assert_logits_close(transformers_logits(family_hf(family)), run_ranks(out, 1))


# -- under a real mpiexec ---------------------------------------------------------------------

MPI_FAMILIES = """
import sys
import numpy as np
from netp.runtime.comm import mpi_world
from netp.runtime.model import load_rank_model
tokens, n_prompt = [int(t) for t in sys.argv[1].split(",")], int(sys.argv[2])
comm = mpi_world()
for shards, ref in zip(sys.argv[3::2], sys.argv[4::2]):
    m = load_rank_model(shards, comm, len(tokens))
    rows = [m.forward(np.asarray(tokens[:n_prompt]), 0, all_logits=True)]  # as conftest.teacher_forced
    rows += [m.forward(np.asarray(tokens[p:p + 1]), p) for p in range(n_prompt, len(tokens))]
    logits = np.concatenate(rows) if comm.rank == 0 else None
    m.close()
    if comm.rank == 0:
        want = np.load(ref)
        print(shards, float(np.abs(want - logits).max()),
              bool((np.argmax(want, -1) == np.argmax(logits, -1)).all()), flush=True)
"""


MPI_RUN = [f for f in FAMILIES if f != "llama_linear"]


@pytest.mark.mpi
def test_families_on_two_mpi_ranks(family_ne, family_shards, tmp_path):
    """One mpiexec -n 2 runs every family's 2-rank q4_0 shard set; each matches its unsharded file."""
    script = tmp_path / "families.py"
    script.write_text(MPI_FAMILIES)
    args = []
    for family in MPI_RUN:
        ref = tmp_path / f"{family}.npy"
        np.save(ref, run_ranks(family_ne(family, "q4_0"), 1))
        args += [str(family_shards(family, 2)), str(ref)]
    p = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script), ",".join(map(str, TOKENS)),
                        str(N_PROMPT), *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == len(MPI_RUN), p.stdout
    for line in lines:
        _, diff, same_argmax = line.split()
        assert float(diff) <= 1e-3 and same_argmax == "True", line


# -- what is still refused, by name, with what is supported --------------------------------------

def _config(model_type: str, **extra) -> dict:
    return {"model_type": model_type, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 384, "num_hidden_layers": 2, "vocab_size": 64, **extra}


REFUSED = {
    "longrope": (_config("phi3", rope_scaling={"type": "longrope", "short_factor": [1.0] * 16,
                                               "long_factor": [2.0] * 16}),
                 "rope scaling 'longrope'", "netp implements for phi3: none, linear"),
    "su": (_config("phi3", rope_scaling={"type": "su", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}),
           "rope scaling 'su'", "none, linear"),
    "yarn": (_config("qwen2", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                               "original_max_position_embeddings": 32768}),
             "rope scaling 'yarn' (factor 4.0)", "netp implements for qwen2: none, linear"),
    "softcap": (_config("gemma2", final_logit_softcapping=30.0), "logit soft-capping (final_logit_softcapping 30.0)",
                "model_type gpt_neox"),
    "unknown": (_config("bert", architectures=["BertModel"]), "unsupported architecture 'bert' (BertModel)",
                "supported model_type: gpt_neox, gptj, llama, mistral, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe"),
    "qwen2-window": (_config("qwen2", use_sliding_window=True, sliding_window=4096), "use_sliding_window true",
                     "Mistral and Phi-3 a window on every layer"),
    "partial-rotary": (_config("phi3", partial_rotary_factor=0.75), "partial_rotary_factor 0.75", "Phi-3 mini/medium"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_feature_and_what_is_supported(case, tmp_path, capsys):
    from test_convert import run_cli

    config, feature, supported = REFUSED[case]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["--outtype", "f32", "--outfile", str(out / "ne.bin"), str(folder)], capsys)
    assert code != 0
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"convert.py: error: {folder}/config.json: "), err
    assert feature in err[0] and supported in err[0], err[0]
    assert list(out.iterdir()) == []


def test_gguf_rope_scaling_yarn_is_refused(family_hf, tokenizer_meta, tmp_path):
    import gguf

    from netp.convert.stage import open_input

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)

    path = write_gguf("qwen2", family_hf("qwen2"), tokenizer_meta, tmp_path / "yarn.gguf", extra=yarn)
    with pytest.raises(NetpError, match="rope scaling 'yarn'; netp implements: none, linear, llama3"):
        open_input(path)


def test_netp_verify_hf_on_a_windowed_fused_family(family_hf, family_ne, family_shards):
    """The user's command: netp verify SHARDS --ref q4_0 --f32 f32 --hf HF, the seed prompt
    plus 4 tokens (longer than Phi-3's window here)."""
    from test_runtime import cli

    p = cli(["verify", str(family_shards("phi3", 2)), "--ref", str(family_ne("phi3", "q4_0")),
             "--f32", str(family_ne("phi3")), "--hf", str(family_hf("phi3")), "-n", "4", "-t", "1"], prog="netp")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "vs transformers" in p.stdout and p.stdout.rstrip().endswith("verify: PASS"), p.stdout
