"""Mixtures of experts (issue 32, docs/design.md §2 "Mixtures of experts"): Mixtral,
Qwen3-MoE and Qwen2-MoE convert (per-expert and transformers 5's merged 3-D
checkpoints, GGUF in llama.cpp's layout), quantize (routers kept f32), shard
(every expert cut like a dense MLP), reshard and pipeline; the families that
stay refused, by name.

Tiny random transformers models made here (vocab 49152 with SmolLM2's
tokenizer; norms, biases, routers and the shared-expert gate randomized after
init): Mixtral with 4 experts top-2 and a sliding window; Qwen3-MoE with 16
experts top-4, head_dim 64, a dense layer between two MoE ones
(mlp_only_layers) and renormalised weights; Qwen2-MoE with a shared expert and
decoder_sparse_step 2 (a dense first layer). Every MLP width (dense 160,
expert 96, shared 128) is a multiple of 32 with at least 3 blocks, so q4_0
cuts over 1..3 ranks fall on blocks, each width cut on its own.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netp.errors import NetpError
from netp.formats.ne import NEReader
from netp.models.context import ForwardTrace
from test_runtime import TOKENS, assert_logits_close, run_ranks

COMMON = dict(vocab_size=49152, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, intermediate_size=96, num_local_experts=4,
                                      num_experts_per_tok=2, sliding_window=5)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, head_dim=64, intermediate_size=160,
                                         moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4,
                                         mlp_only_layers=[1], norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=2, intermediate_size=160, moe_intermediate_size=96,
                                         shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                                         decoder_sparse_step=2)),
}
VARIANTS = ("experts", "merged")  # save_pretrained's per-expert names; the model's own state dict (3-D experts)


def make_model(family: str, zero_router: bool = False):
    import torch
    import transformers

    config_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **kwargs)
    torch.manual_seed(sum(map(ord, family)))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # away from init, so a missing or swapped norm, bias or router cannot pass unseen
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "bias" not in name else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.copy_(torch.zeros_like(p) if zero_router and "shared" not in name else torch.randn_like(p))
    return config, model


def save_model(config, model, folder: Path, variant: str, tokenizer_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if variant == "merged":
        from safetensors.torch import save_file

        config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    else:
        model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def moe_hf(smollm2_tokenizer_dir, tmp_path_factory):
    """moe_hf(family, variant="experts") -> an HF folder of the family's tiny model."""
    cache: dict[tuple[str, str], Path] = {}

    def make(family: str, variant: str = "experts") -> Path:
        if (family, variant) not in cache:
            config, model = make_model(family)
            cache[family, variant] = save_model(config, model, tmp_path_factory.mktemp(f"hf-{family}-{variant}"),
                                                variant, smollm2_tokenizer_dir)
        return cache[family, variant]

    return make


@pytest.fixture(scope="module")
def moe_ne(moe_hf, tmp_path_factory):
    """moe_ne(family, qtype="f32") -> NE file: f32 from netp convert, q4_0 from netp quantize."""
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file

    cache: dict[tuple[str, str], Path] = {}

    def make(family: str, qtype: str = "f32") -> Path:
        if (family, qtype) not in cache:
            out = tmp_path_factory.mktemp(f"ne-{family}-{qtype}") / f"ne-{qtype}.bin"
            if qtype == "f32":
                convert(str(moe_hf(family)), out, "f32")
            else:
                quantize_file(make(family), out, GGMLType.Q4_0)
            cache[family, qtype] = out
        return cache[family, qtype]

    return make


@pytest.fixture(scope="module")
def moe_shards(moe_ne, tmp_path_factory):
    from netp.shard.stage import shard_file

    cache: dict[tuple[str, int], Path] = {}

    def make(family: str, ranks: int) -> Path:
        if (family, ranks) not in cache:
            cache[family, ranks] = tmp_path_factory.mktemp(f"shards-{family}-x{ranks}") / "shards"
            shard_file(moe_ne(family, "q4_0"), cache[family, ranks], ranks)
        return cache[family, ranks]

    return make


def ne_tensors(path: Path) -> dict[str, np.ndarray]:
    with NEReader(path) as r:
        return {name: r.read(name) for name in r.tensors}


# -- the NE layout ------------------------------------------------------------------------------

def neural_speed_mixtral_names(n_layer: int, n_expert: int) -> list[str]:
    """The tensor order of neural-speed 1.0's convert_mixtral (its make_tensors_list, written out)."""
    names = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(n_layer):
        names += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        names += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight", f"layers.{i}.ffn_gate_inp.weight"]
        for j in range(n_expert):
            names += [f"layers.{i}.ffn_gate.{j}.weight", f"layers.{i}.ffn_down.{j}.weight", f"layers.{i}.ffn_up.{j}.weight"]
    return names


def test_mixtral_file_is_neural_speeds_layout(moe_ne):
    with NEReader(moe_ne("mixtral")) as r:
        assert list(r.tensors) == neural_speed_mixtral_names(2, 4)
        h = r.header
        assert (h.n_experts, h.n_experts_used, h.ffn_hidden_size, h.n_mult, h.inner_hidden_size) == (4, 2, 96, 256, 5)
        assert r.shapes["layers.1.ffn_gate_inp.weight"] == (4, 128)
        assert r.shapes["layers.1.ffn_down.3.weight"] == (128, 96)


def test_qwen_moe_layouts(moe_ne):
    """Dense layers keep the dense MLP, MoE layers hold router, experts (and the shared expert);
    the header carries the expert counts and norm_topk_prob; hparams read back from the file."""
    from netp.models import ne_model

    with NEReader(moe_ne("qwen3_moe")) as r:
        names = set(r.tensors)
        assert {"model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.gate.weight",
                "model.layers.2.mlp.experts.15.down_proj.weight"} <= names
        assert not any(n.startswith(("model.layers.1.mlp.gate.", "model.layers.1.mlp.experts.",
                                     "model.layers.0.mlp.gate_proj")) for n in names)
        assert r.shapes["model.layers.1.mlp.gate_proj.weight"] == (160, 128)
        assert r.shapes["model.layers.0.mlp.experts.3.up_proj.weight"] == (96, 128)
        assert (r.header.n_experts, r.header.n_experts_used, r.header.do_layer_norm_before) == (16, 4, 1)
        arch, hp = ne_model(r.header, r.shapes, "f")
        assert (arch.name, hp.n_ff, hp.n_ff_expert, hp.dense_layers, hp.norm_topk_prob) == (
            "qwen3_moe", 160, 96, (1,), True)
    with NEReader(moe_ne("qwen2_moe")) as r:
        assert r.shapes["model.layers.1.mlp.shared_expert_gate.weight"] == (128,)  # HF's (1, 128), as a vector
        assert r.shapes["model.layers.1.mlp.shared_expert.down_proj.weight"] == (128, 128)
        assert "model.layers.0.mlp.down_proj.weight" in r.tensors and "model.layers.0.mlp.gate.weight" not in r.tensors
        assert (r.header.n_experts, r.header.n_experts_used, r.header.do_layer_norm_before) == (8, 2, 0)
        arch, hp = ne_model(r.header, r.shapes, "f")
        assert (arch.name, hp.n_ff_shared, hp.dense_layers) == ("qwen2_moe", 128, (0,))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_checkpoint_converts_to_the_same_file(family, moe_hf, moe_ne, tmp_path):
    """transformers 5's own state dict (3-D mlp.experts.gate_up_proj / down_proj) gives the
    bytes of the per-expert checkpoint's NE file."""
    from netp.convert.stage import convert

    out = tmp_path / "merged.bin"
    convert(str(moe_hf(family, "merged")), out, "f32")
    assert out.read_bytes() == moe_ne(family).read_bytes()


def test_a_merged_tensor_is_read_one_expert_at_a_time(moe_hf, tmp_path, monkeypatch):
    """No read of a merged expert tensor is larger than one expert's part of it."""
    from netp.convert.stage import convert
    from netp.formats.hf import SafetensorsCheckpoint

    reads: list[tuple[str, int | None]] = []
    whole, rows = SafetensorsCheckpoint.read, SafetensorsCheckpoint.read_rows
    monkeypatch.setattr(SafetensorsCheckpoint, "read", lambda self, n: reads.append((n, None)) or whole(self, n))
    monkeypatch.setattr(SafetensorsCheckpoint, "read_rows",
                        lambda self, n, r0, k, out=None: reads.append((n, k)) or rows(self, n, r0, k, out))
    convert(str(moe_hf("qwen2_moe", "merged")), tmp_path / "out.bin", "f16")  # f16: every tensor is read
    merged = [(n, k) for n, k in reads if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(merged) == 8 * 3  # layer 1: gate, up, down of each of 8 experts
    assert all(k == (96 if "gate_up" in n else 128) for n, k in merged), merged


# -- GGUF in llama.cpp's layout -----------------------------------------------------------------

GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}
GGUF_LAYER = {  # HF name suffix (transformers 5's own state dict) -> llama.cpp's name
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}


def write_moe_gguf(family: str, out: Path, tokenizer_meta: dict) -> Path:
    """The family's tiny model as llama.cpp's convert_hf_to_gguf lays it out: merged 3-D
    ffn_{gate,up,down}_exps, the router ffn_gate_inp, the shared expert *_shexp with
    its gate a vector; Mixtral as architecture `llama` with q/k permuted."""
    import gguf

    config, model = make_model(family)
    cfg = config.to_dict()
    arch = GGUF_ARCH[family]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w = gguf.GGUFWriter(out, arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if family != "mixtral":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if family == "mixtral" and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_tokenizer_model(tokenizer_meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tokenizer_meta["tokenizer.ggml.pre"])
    w.add_token_list(tokenizer_meta["tokenizer.ggml.tokens"])
    w.add_token_types(tokenizer_meta["tokenizer.ggml.token_type"])
    w.add_token_merges(tokenizer_meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            w.add_tensor({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                          "lm_head.weight": "output.weight"}[name], np.ascontiguousarray(data))
            continue
        layer, suffix = name.split(".")[2], name.split(".", 3)[-1]
        if suffix == "mlp.experts.gate_up_proj":  # (experts, 2 f, n_embd): gate rows, then up rows
            f = data.shape[1] // 2
            w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(data[:, :f]))
            w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(data[:, f:]))
            continue
        if suffix == "mlp.shared_expert_gate.weight":
            data = data[0]  # llama.cpp stores it as a vector
        if arch == "llama" and suffix == "self_attn.q_proj.weight":
            data = _permute(data, n_head)
        if arch == "llama" and suffix == "self_attn.k_proj.weight":
            data = _permute(data, n_kv)
        w.add_tensor(f"blk.{layer}.{GGUF_LAYER[suffix]}", np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tokenizer_meta(smollm2_gguf):
    from netp.formats.gguf_in import GGUFFile

    src = GGUFFile(smollm2_gguf)
    try:
        return {k: v for k, v in src.metadata.items() if k.startswith("tokenizer.ggml.")}
    finally:
        src.close()


@pytest.fixture(scope="module")
def moe_gguf(tokenizer_meta, tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = write_moe_gguf(family, tmp_path_factory.mktemp(f"gguf-{family}") / f"{family}.gguf",
                                           tokenizer_meta)
        return cache[family]

    return make


def assert_same_ne_tensors(a: Path, b: Path, window: bool = True) -> None:
    with NEReader(a) as g, NEReader(b) as h:
        assert list(g.shapes.items()) == list(h.shapes.items())  # the same tensors, in the same order
        for name in h.tensors:
            assert np.array_equal(g.read(name), h.read(name)), name
        for field in ("n_experts", "n_experts_used", "do_layer_norm_before", "ffn_hidden_size", "n_embd_head_k",
                      "n_head_kv") + (("inner_hidden_size",) if window else ()):
            assert getattr(g.header, field) == getattr(h.header, field), field


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "qwen3_moe" else f
                                    for f in FAMILIES])  # qwen3moe: qwen2moe's path without the shared expert
def test_gguf_converts_to_the_hf_twin(family, moe_gguf, moe_ne, tmp_path):
    """llama.cpp's merged experts are read one expert at a time into the NE file of the HF twin
    (a Mixtral GGUF is architecture `llama` with expert tensors)."""
    from netp.convert.stage import convert

    out = tmp_path / "from-gguf.bin"
    assert convert(str(moe_gguf(family)), out, "f32").arch == family
    assert_same_ne_tensors(out, moe_ne(family))


LLAMA_CPP = Path(os.environ.get("NETP_LLAMA_CPP", Path.home() / ".cache/netp/peers/llama_cpp_python-0.3.36/vendor/llama.cpp"))


@pytest.mark.slow  # llama.cpp's converter imports torch and its own gguf-py: ~10-40 s
@pytest.mark.skipif(not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(),
                    reason="llama.cpp's source tree is not in the peers cache (bench/peers.py fetches it)")
def test_llama_cpps_own_converter(moe_hf, moe_ne, tmp_path):
    """A Mixtral GGUF made by llama.cpp's convert_hf_to_gguf.py converts to the NE tensors of its HF twin
    (llama.cpp's `llama` architecture has no sliding window: its GGUF drops Mixtral's, netp follows the GGUF)."""
    out = tmp_path / "mixtral.gguf"
    p = subprocess.run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), "--outtype", "f32", "--outfile",
                        str(out), str(moe_hf("mixtral"))], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")})
    if p.returncode != 0 and "No module named" in p.stderr:
        pytest.skip(f"llama.cpp's converter lacks a module here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-2000:]
    from netp.convert.stage import convert

    ne = tmp_path / "from-llama-cpp.bin"
    convert(str(out), ne, "f32")
    assert_same_ne_tensors(ne, moe_ne("mixtral"), window=False)


# -- quantize, shard, reshard, pipeline ---------------------------------------------------------

def test_q4_0_keeps_routers_f32_and_experts_in_blocks(moe_ne):
    with NEReader(moe_ne("qwen2_moe", "q4_0")) as r:
        types = {n: t.ggml_type.name for n, t in r.tensors.items()}
    assert types["model.layers.1.mlp.gate.weight"] == "F32"  # router, as llama-quantize keeps ffn_gate_inp
    assert types["model.layers.1.mlp.shared_expert_gate.weight"] == "F32"  # a vector
    assert types["model.layers.1.mlp.experts.7.down_proj.weight"] == "Q4_0"
    assert types["model.layers.1.mlp.shared_expert.up_proj.weight"] == "Q4_0"
    assert types["model.layers.0.mlp.gate_proj.weight"] == "Q4_0"


@pytest.mark.parametrize("ranks", [2, 3])
def test_experts_are_cut_like_dense_mlps(ranks, moe_shards):
    """Each width is cut on 32-value blocks on its own; routers and the shared gate replicated."""
    from netp.formats.manifest import load_manifest
    from netp.models.mapping import block_ranges

    m = load_manifest(moe_shards("qwen3_moe", ranks))
    t = m.tensors
    expert, dense = block_ranges(96, ranks, "w"), block_ranges(160, ranks, "w")
    for name, axis in (("model.layers.2.mlp.experts.11.gate_proj.weight", 0),
                       ("model.layers.2.mlp.experts.11.down_proj.weight", 1)):
        assert (t[name].split, t[name].unit, t[name].axis) == ("rows" if axis == 0 else "cols", "ffn", axis)
        assert [tuple(r) for r in t[name].ranges] == expert
    assert [tuple(r) for r in t["model.layers.1.mlp.up_proj.weight"].ranges] == dense
    assert t["model.layers.0.mlp.gate.weight"].split == "replicated"
    m2 = load_manifest(moe_shards("qwen2_moe", ranks))
    assert m2.tensors["model.layers.1.mlp.shared_expert_gate.weight"].split == "replicated"
    assert [tuple(r) for r in m2.tensors["model.layers.1.mlp.shared_expert.down_proj.weight"].ranges] == \
        block_ranges(128, ranks, "w")


def test_pipeline_and_reshard_give_the_three_step_bytes(moe_hf, moe_shards, tmp_path):
    """One pass from the merged checkpoint, and a 2-rank set reshaped for 3, equal shard of the q4_0 file."""
    from netp.pipeline.onepass import run_pipeline
    from netp.shard.reshard import reshard

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.glob("rank-*.bin"))}

    run_pipeline(str(moe_hf("qwen3_moe", "merged")), tmp_path / "onepass", "q4_0", 3)
    assert files(tmp_path / "onepass") == files(moe_shards("qwen3_moe", 3))
    reshard(moe_shards("mixtral", 2), tmp_path / "reshard", 3)
    assert files(tmp_path / "reshard") == files(moe_shards("mixtral", 3))


def test_a_width_that_cannot_be_cut_is_refused_by_name(moe_ne, tmp_path):
    from netp.shard.stage import shard_file

    with pytest.raises(NetpError, match="cannot shard over 4 ranks: expert MLP width of 96 cannot be cut into 4"):
        shard_file(moe_ne("mixtral", "q4_0"), tmp_path / "x4", 4)


# -- the forward: routing as transformers routes, experts cut over ranks ------------------------

def transformers_run(folder: Path, tokens=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """transformers' float32 logits and, per MoE layer, the experts it routes each token to (T, k)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        out = model(torch.tensor([tokens or TOKENS]), output_router_logits=True)
    chosen = [torch.topk(torch.softmax(r.float(), dim=-1), k, dim=-1).indices.numpy() for r in out.router_logits]
    return out.logits[0].float().numpy(), chosen


def netp_trace(model_path: Path, ranks: int = 1) -> ForwardTrace:
    """netp's trace of the tokens as one batch (rank 0's, on `ranks` simulated ranks)."""
    from netp.runtime.comm import run_world
    from netp.runtime.model import load_rank_model

    def rank(comm):
        m = load_rank_model(model_path, comm, len(TOKENS))
        try:
            trace = ForwardTrace()
            m.forward(np.asarray(TOKENS), 0, trace=trace)
            return trace
        finally:
            m.close()

    return run_world(rank, ranks)


def assert_routed_alike(trace: ForwardTrace, chosen: list[np.ndarray]) -> None:
    """The same experts for every (token, MoE layer) as transformers (as sets: the order within
    a token's k does not change the sum)."""
    moe = [ids for ids in trace.experts if ids is not None]
    assert len(moe) == len(chosen)
    for ours, want in zip(moe, chosen):
        assert np.array_equal(np.sort(ours, axis=1), np.sort(want, axis=1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_matches_transformers_and_routes_alike(family, moe_hf, moe_ne):
    """Batch and KV-cache decode within 1e-3 of transformers; every (token, MoE layer) routed to
    the experts transformers routes it to; dense layers traced as None."""
    theirs, chosen = transformers_run(moe_hf(family))
    assert_logits_close(theirs, run_ranks(moe_ne(family), 1))
    trace = netp_trace(moe_ne(family))
    assert len(trace.experts) == FAMILIES[family][1]["num_hidden_layers"]
    assert_routed_alike(trace, chosen)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_tied_router_chooses_as_torch_topk(family, smollm2_tokenizer_dir, tmp_path):
    """A router of zeros (transformers' own init for Qwen MoE routers): every probability ties,
    and torch.topk's pick among them is the one netp must make (models/topk.py)."""
    from netp.convert.stage import convert

    config, model = make_model(family, zero_router=True)
    folder = save_model(config, model, tmp_path / "hf", "experts", smollm2_tokenizer_dir)
    convert(str(folder), tmp_path / "ne.bin", "f32")
    theirs, chosen = transformers_run(folder)
    assert_logits_close(theirs, run_ranks(tmp_path / "ne.bin", 1))
    assert_routed_alike(netp_trace(tmp_path / "ne.bin"), chosen)
    first = chosen[0][0]
    assert sorted(first.tolist()) != list(range(len(first)))  # torch's pick is not simply the lowest ids


def test_torch_topk_is_replayed_on_ties():
    import torch

    from netp.models.topk import top_k

    rng = np.random.default_rng(0)
    for n, k in ((4, 2), (8, 2), (16, 4), (60, 4), (128, 8), (128, 2), (256, 2), (512, 8)):
        values = rng.integers(0, 3, size=(40, n)).astype(np.float32) / 3  # many ties across the k-th place
        values[0] = 0.25
        want = torch.topk(torch.from_numpy(values), k, dim=-1).indices.numpy()
        assert np.array_equal(top_k(values, k), want), (n, k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_q4_0_shards_match_unsharded(family, moe_ne, moe_shards):
    ref = run_ranks(moe_ne(family, "q4_0"), 1)
    for ranks in (1, 2, 3):  # 3 ranks: 2 KV heads over 4 query heads straddle a rank
        assert_logits_close(ref, run_ranks(moe_shards(family, ranks), ranks))
    assert_logits_close(ref, run_ranks(moe_ne(family, "q4_0"), 2))  # neural-speed's way: slices of one file


def test_decode_reads_only_the_chosen_experts(moe_ne):
    """One decode step applies exactly the k chosen experts of each MoE layer; a prefill applies
    each chosen expert once per layer, to all its tokens together."""
    from netp.runtime.comm import SoloComm
    from netp.runtime.model import load_rank_model

    m = load_rank_model(moe_ne("qwen3_moe", "q4_0"), SoloComm(), len(TOKENS))
    try:
        calls: list[tuple[int, int, int]] = []  # (layer, expert, tokens)

        class Counted:
            def __init__(self, inner, layer, expert):
                self.inner, self.layer, self.expert = inner, layer, expert

            def apply(self, x):
                calls.append((self.layer, self.expert, x.shape[0]))
                return self.inner.apply(x)

        for i, layer in enumerate(m.weights.layers):
            for key in [k for k in layer if k.endswith(".w13")]:
                layer[key] = Counted(layer[key], i, int(key.split(".")[1]))
        trace = ForwardTrace()
        m.forward(np.asarray(TOKENS[:7]), 0, trace=trace)
        for i, ids in enumerate(trace.experts):
            mine = [(e, t) for layer, e, t in calls if layer == i]
            if ids is None:
                assert mine == []
                continue
            assert sorted(e for e, _ in mine) == sorted(set(ids.ravel().tolist()))  # each expert once
            assert all(t == int((ids == e).sum()) for e, t in mine)  # with all of its tokens
        calls.clear()
        trace = ForwardTrace()
        m.forward(np.asarray(TOKENS[7:8]), 7, trace=trace)
        for i, ids in enumerate(trace.experts):
            assert sorted(e for layer, e, _ in calls if layer == i) == ([] if ids is None else sorted(ids[0].tolist()))
    finally:
        m.close()


def verify_report(target: Path, ref: Path, family: str, moe_hf, moe_ne, out: Path, mpi: int | None = None,
                  extra: tuple[str, ...] = ()) -> dict:
    """`netp verify TARGET --ref REF --f32 F32 --hf HF --json OUT` must pass; its report, validated."""
    from reports import validate_report
    from test_runtime import cli

    args = ["verify", str(target), "--ref", str(ref), "--hf", str(moe_hf(family)), "-n", "4", "-t", "1",
            "--json", str(out), *extra]
    if ref != moe_ne(family):
        args += ["--f32", str(moe_ne(family))]
    p = cli(args, prog="netp", mpi=mpi, timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout.rstrip().endswith("verify: PASS"), p.stdout + p.stderr
    return validate_report(out)


def routing_records(doc: dict) -> dict[str, dict]:
    return {c["id"]: c for c in doc["comparisons"] if c["kind"] == "routing"}


def n_moe_layers(family: str) -> int:
    kw = FAMILIES[family][1]
    step = kw.get("decoder_sparse_step", 1)
    return sum(1 for i in range(kw["num_hidden_layers"])
               if i not in kw.get("mlp_only_layers", []) and (i + 1) % step == 0)


@pytest.mark.parametrize("family, ranks", [
    ("qwen3_moe", 2), ("qwen2_moe", 3),
    *(pytest.param(f, n, marks=pytest.mark.slow) for f in FAMILIES for n in (1, 2, 3)
      if (f, n) not in (("qwen3_moe", 2), ("qwen2_moe", 3)))])
def test_netp_verify_hf_q4_0_set(family, ranks, moe_hf, moe_ne, moe_shards, tmp_path):
    """The user's command on a q4_0 set: routing held against transformers for the f32 file
    (100%), and reported for the set vs its unsharded file and for q4_0 vs f32, over every
    (token, MoE layer) pair; the JSON report valid against docs/design.md's schema."""
    doc = verify_report(moe_shards(family, ranks), moe_ne(family, "q4_0"), family, moe_hf, moe_ne,
                        tmp_path / "v.json")
    routing = routing_records(doc)
    assert list(routing) == ["routing", "routing-f32-vs-transformers", "routing-quantized-vs-f32"]
    pairs = len(doc["prompt"]["tokens"]) * n_moe_layers(family)
    assert all(c["figures"]["pairs"] == pairs for c in routing.values()), routing
    hf = routing["routing-f32-vs-transformers"]
    assert hf["figures"]["routing"] == 1.0 and hf["limits"] == [
        {"figure": "routing", "op": ">=", "value": 1.0, "passed": True}]
    assert routing["routing"]["limits"] == [] and routing["routing-quantized-vs-f32"]["limits"] == []


def test_f32_set_routes_as_the_unsharded_file(moe_hf, moe_ne, tmp_path):
    """An f32 Qwen2-MoE set over 3 ranks (shared expert, a dense first layer): held to the same
    experts at every (token, MoE layer) pair as its unsharded file and as transformers."""
    from netp.shard.stage import shard_file

    family = "qwen2_moe"
    shard_file(moe_ne(family), tmp_path / "x3", 3)
    ref, got = netp_trace(moe_ne(family)), netp_trace(tmp_path / "x3", 3)
    assert [e is None for e in got.experts] == [True, False]  # decoder_sparse_step 2: layer 0 dense
    assert np.array_equal(ref.experts[1], got.experts[1])
    doc = verify_report(tmp_path / "x3", moe_ne(family), family, moe_hf, moe_ne, tmp_path / "v.json")
    routing = routing_records(doc)
    assert list(routing) == ["routing", "routing-f32-vs-transformers"]
    assert all(c["figures"]["routing"] == 1.0 and c["limits"][0]["value"] == 1.0 for c in routing.values())


def test_routing_record_fails_on_other_experts(moe_ne):
    """A routing record of a run whose router was changed in one MoE layer: the pairs that moved
    are counted, the limit fails with a reason naming it; a dense model gives no record."""
    from netp.runtime.comparisons import Pass, compare_routing

    experts = netp_trace(moe_ne("qwen3_moe")).routed
    assert experts is not None and len(experts) == 2
    moved = [experts[0], experts[1].copy()]
    moved[1][3] = (moved[1][3] + 1) % FAMILIES["qwen3_moe"][1]["num_experts"]  # token 3, another set of experts
    logits = np.zeros((len(TOKENS), 4), dtype=np.float32)
    c = compare_routing("routing", "t", Pass("ref", logits, None, experts), Pass("x", logits, None, moved),
                        TOKENS, 1.0, None)
    assert c is not None and not c.passed
    assert (c.figures["pairs_alike"], c.figures["pairs"]) == (2 * len(TOKENS) - 1, 2 * len(TOKENS))
    assert "routing agreement" in c.reason and c.rows[3]["layers_alike"] == 1
    same = compare_routing("routing", "t", Pass("ref", logits, None, experts), Pass("x", logits, None,
                           [e[:, ::-1] for e in experts]), TOKENS, 1.0, None)  # another order of the same k
    assert same is not None and same.passed
    assert compare_routing("routing", "t", Pass("ref", logits), Pass("x", logits), TOKENS, 1.0, None) is None


@pytest.mark.mpi
def test_netp_verify_under_mpiexec(moe_hf, moe_ne, moe_shards, tmp_path):
    """netp verify --hf of a 2-rank q4_0 Qwen2-MoE set (shared expert, a dense layer) on a real
    mpiexec -n 2: the set matches its unsharded file and the f32 file matches transformers,
    routing alike."""
    family = "qwen2_moe"
    doc = verify_report(moe_shards(family, 2), moe_ne(family, "q4_0"), family, moe_hf, moe_ne,
                        tmp_path / "v.json", mpi=2)
    assert doc["environment"]["world"] == "mpi" and doc["environment"]["ranks"] == 2
    assert routing_records(doc)["routing-f32-vs-transformers"]["figures"]["routing"] == 1.0


# -- what stays refused ---------------------------------------------------------------------

def _config(model_type: str, **extra) -> dict:
    return {"model_type": model_type, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 384, "num_hidden_layers": 2, "vocab_size": 64, **extra}


REFUSED = {
    "deepseek_v3": (_config("deepseek_v3", n_routed_experts=256, kv_lora_rank=512), "DeepSeek-V3 (multi-head latent"),
    "deepseek_v2": (_config("deepseek_v2", n_routed_experts=64), "DeepSeek-V2"),
    "gpt_oss": (_config("gpt_oss", num_local_experts=32), "gpt-oss (attention sinks, mxfp4"),
    "llama4": (_config("llama4", text_config={"num_local_experts": 16}), "Llama 4"),
    "granitemoe": (_config("granitemoe", num_local_experts=8), "Granite MoE"),
    "olmoe": (_config("olmoe", num_experts=64), "OLMoE"),
    "jamba": (_config("jamba", num_experts=16), "Jamba (Mamba layers)"),
    "unknown": (_config("foo_moe", num_experts=8), "model_type 'foo_moe' with experts (num_experts 8)"),
    "llama-with-experts": (_config("llama", num_local_experts=8), "model_type 'llama' with experts"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_other_mixtures_of_experts_are_refused_by_name(case, tmp_path, capsys):
    from test_convert import run_cli

    config, feature = REFUSED[case]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["--outtype", "f32", "--outfile", str(out / "ne.bin"), str(folder)], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    assert lines[0].startswith(f"convert.py: error: {folder}/config.json: unsupported config: mixture of experts: ")
    assert feature in lines[0] and "model_type mixtral, qwen2_moe, qwen3_moe" in lines[0], lines[0]
    assert list(out.iterdir()) == []


def test_foreign_moe_gguf_is_refused_with_what_is_supported(tmp_path):
    import gguf

    from netp.convert.stage import open_input

    path = tmp_path / "deepseek.gguf"
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NetpError, match=r"unsupported GGUF architecture 'deepseek2' \(supported: .*qwen2moe, qwen3, "
                                        r"qwen3moe\)"):
        open_input(path)
