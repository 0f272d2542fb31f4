"""GPT-NeoX end to end (issue 18): names, hparams, header, split plan, and the
numpy forward through convert f32 -> quantize q4_0 -> shard at 1, 2, 3 ranks,
checked against transformers' own GPTNeoXForCausalLM and against the
unsharded file (docs/design.md §5: max |dlogit| <= 1e-3, same argmax where the
reference's top-2 margin exceeds 1e-3), and once under a real mpiexec.

The tiny models are random transformers GPTNeoXConfig models made here
(hidden 128, 4 heads of 32, MLP 512 = 4 x hidden as neural-speed's loader
assumes, or 384 = 3 x hidden for the one that warns, 2 layers, SmolLM2's vocab of 49152), weights scaled x5 so that
attention and rotary shape the logits (at the default init of std 0.02 a
wrong rotary would move them by less than the bound).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netp.errors import NetpError
from netp.formats.ne import NEHeader, NEReader
from netp.models import by_hf_config, by_name, by_ne_tensors, by_ns_model_name
from netp.models.mapping import Mapping

BOUND = 1e-3
SEED_PROMPT = "Once upon a time, there existed a little girl,"
BIN = Path(sys.executable).parent
NEOX = by_name("gpt_neox")

# kind -> GPTNeoXConfig overrides: both residual forms, partial and full rotary.
KINDS = {
    "parallel_rot25": dict(use_parallel_residual=True, rotary_pct=0.25),
    "sequential_rot100": dict(use_parallel_residual=False, rotary_pct=1.0, rotary_emb_base=500.0),
}
TIED = {"tied_rot50": dict(use_parallel_residual=True, rotary_pct=0.5, tie_word_embeddings=True)}
NARROW = {"mlp_3x": dict(use_parallel_residual=True, rotary_pct=0.25, intermediate_size=384)}
TINY = dict(vocab_size=49152, hidden_size=128, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2,
            max_position_embeddings=256, layer_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def assert_logits_agree(ref: np.ndarray, got: np.ndarray, what: str) -> float:
    """docs/design.md §5's rule; returns max |dlogit|."""
    assert ref.shape == got.shape, what
    diff = float(np.abs(ref - got).max())
    assert diff <= BOUND, f"{what}: max |dlogit| {diff:.3g} > {BOUND}"
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > BOUND
    same = ref.argmax(-1) == got.argmax(-1)
    assert same[decisive].all(), f"{what}: argmax differs at positions {np.flatnonzero(decisive & ~same)}"
    return diff


# -- the tiny models, made once per module ---------------------------------------

class Tiny:
    """One tiny model: HF folder, transformers' logits, and the NE files made from it."""

    def __init__(self, folder: Path, model, tokens: list[int], n_prompt: int):
        self.folder, self.model, self.tokens, self.n_prompt = folder, model, tokens, n_prompt
        import torch

        with torch.no_grad():
            self.hf_logits = model(torch.tensor([tokens])).logits[0].numpy()
        self.files: dict[str, Path] = {}
        self.ref_logits: dict[str, np.ndarray] = {}


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    torch = pytest.importorskip("torch")
    import transformers
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(smollm2_tokenizer_dir / "tokenizer.json")).encode(SEED_PROMPT).ids
    tokens = prompt + [int(t) for t in np.random.default_rng(18).integers(0, TINY["vocab_size"], 10)]
    made: dict[str, Tiny] = {}

    def make(kind: str) -> Tiny:
        if kind not in made:
            folder = tmp_path_factory.mktemp(kind) / "hf"
            config = transformers.GPTNeoXConfig(**{**TINY, **{**KINDS, **TIED, **NARROW}[kind]})
            torch.manual_seed(sum(map(ord, kind)))
            model = transformers.GPTNeoXForCausalLM(config).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 1:  # norms and biases away from 1/0: a swapped tensor cannot pass unseen
                        p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
                    else:
                        p.mul_(5.0)
            model.save_pretrained(folder)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(smollm2_tokenizer_dir / f, folder / f)
            made[kind] = Tiny(folder, model, tokens, len(prompt))
        return made[kind]

    return make


def ne_file(t: Tiny, qtype: str) -> Path:
    """The model's NE f32 file (convert) or q4_0 file (quantize of the f32 one), made once."""
    if qtype not in t.files:
        out = t.folder.parent / f"ne-{qtype}.bin"
        if qtype == "f32":
            from netp.convert.stage import convert

            convert(str(t.folder), out, "f32")
        else:
            from netp.formats.constants import GGMLType
            from netp.quantize.stage import quantize_file

            quantize_file(ne_file(t, "f32"), out, GGMLType.Q4_0, model_name="gpt_neox", nthread=1)
        t.files[qtype] = out
    return t.files[qtype]


def run_logits(model: Path, t: Tiny, world: int = 1) -> np.ndarray:
    """Teacher-forced logits of t.tokens (prompt as a batch, then token by token through
    the KV cache) on `world` ranks simulated in one process, through the runtime's API."""
    from netp.runtime.comm import run_world
    from netp.runtime.model import load_rank_model
    from conftest import teacher_forced

    def rank(comm):
        m = load_rank_model(model, comm, len(t.tokens))
        try:
            return teacher_forced(m, t.tokens, t.n_prompt)
        finally:
            m.close()

    return run_world(rank, world)


def unsharded_logits(t: Tiny, qtype: str) -> np.ndarray:
    if qtype not in t.ref_logits:
        t.ref_logits[qtype] = run_logits(ne_file(t, qtype), t)
    return t.ref_logits[qtype]


# -- names, hparams, header -------------------------------------------------------

def test_defaults_are_transformers_defaults():
    from transformers import GPTNeoXConfig

    full = GPTNeoXConfig().to_dict()
    assert NEOX.hparams_from_hf({"model_type": "gpt_neox"}, "c") == NEOX.hparams_from_hf(full, "c")
    rope = GPTNeoXConfig().rope_parameters
    for key, value in NEOX.hf_defaults.items():
        got = rope[key] if key in ("rope_theta", "partial_rotary_factor") else getattr(GPTNeoXConfig(), key)
        assert got == value, key


def test_pre_transformers_5_config_keys():
    """Pythia-era config.json: rotary_pct, rotary_emb_base; read as transformers 5 reads them."""
    from transformers import GPTNeoXConfig

    old = dict(model_type="gpt_neox", hidden_size=256, num_attention_heads=8, intermediate_size=1024,
               num_hidden_layers=3, vocab_size=1000, rotary_pct=0.5, rotary_emb_base=50000,
               use_parallel_residual=False, layer_norm_eps=1e-6, rope_scaling=None)
    hp = NEOX.hparams_from_hf(old, "c")
    assert (hp.n_rot, hp.rope_theta, hp.parallel_residual, hp.norm_eps, hp.n_head_kv) == (16, 50000.0, False, 1e-6, 8)
    assert NEOX.hparams_from_hf(GPTNeoXConfig(**{k: v for k, v in old.items() if k != "model_type"}).to_dict(),
                                "c") == hp
    assert by_hf_config(old, "c") is NEOX and by_ns_model_name("gptneox") is NEOX


@pytest.mark.parametrize("change, needle", [
    (dict(hidden_act="gelu_new"), "hidden_act 'gelu_new'"),
    (dict(attention_bias=False), "attention_bias false"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling 'dynamic'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}), "rope scaling 'linear'"),
    (dict(head_dim=64), "head_dim 64"),
    (dict(rotary_pct=0.3), "rotary dims 9"),
])
def test_refusals_name_what_is_unsupported(change, needle):
    config = dict(model_type="gpt_neox", hidden_size=128, num_attention_heads=4, **change)
    with pytest.raises(NetpError) as e:
        NEOX.hparams_from_hf(config, "x/config.json")
    assert needle in str(e.value) and "x/config.json" in str(e.value)


def test_name_map_covers_transformers_state_dict(tiny):
    t = tiny("parallel_rot25")
    hp = NEOX.hparams_from_hf(json.loads((t.folder / "config.json").read_text()), "c")
    expected = NEOX.tensor_shapes(hp)
    mapped = {}
    for name, p in t.model.state_dict().items():
        nes = NEOX.ne_names_from_hf(name)
        assert nes is not None and len(nes) <= 1, name
        if nes:
            mapped[nes[0]] = tuple(p.shape)
    assert mapped == expected  # every tensor, with its shape, nothing left over
    for buffer in ("gpt_neox.layers.3.attention.bias", "gpt_neox.layers.0.attention.masked_bias",
                   "gpt_neox.layers.1.attention.rotary_emb.inv_freq"):
        assert NEOX.ne_names_from_hf(buffer) == ()
    assert NEOX.ne_names_from_hf("embed_out.weight") == NEOX.ne_names_from_hf("lm_head.weight") == ("embed_out.weight",)
    assert NEOX.ne_names_from_hf("gpt_neox.layers.0.mlp.gate_proj.weight") is None
    assert by_ne_tensors(expected, "f") is NEOX and not by_name("gptj").recognises(expected)
    assert not NEOX.recognises(by_name("llama").tensor_shapes(hp))


def test_header_fields_as_neural_speed_writes_them(tiny):
    t = tiny("sequential_rot100")
    with NEReader(ne_file(t, "f32")) as r:
        h, shapes = r.header, {i.name: i.shape for i in r.tensors.values()}
    # neural-speed's convert_gptneox: n_mult 0, n_head_kv 0, n_rot = head_dim x rotary_pct, par_res
    assert (h.n_vocab, h.n_embd, h.n_mult, h.n_head, h.n_head_kv, h.n_layer, h.n_rot) == (49152, 128, 0, 4, 0, 2, 32)
    assert (h.par_res, h.ffn_hidden_size, h.ftype, h.bos_token_id, h.eos_token_id, h.pad_token_id) == (0, 0, 0, 1, 2, 2)
    assert (h.norm_eps, h.freq_base) == (np.float32(1e-5), 500.0)
    config = json.loads((t.folder / "config.json").read_text())
    from_hf = NEOX.hparams_from_hf(config, "c")
    assert NEOX.hparams_from_ne(h, shapes) == dataclasses.replace(from_hf, norm_eps=float(np.float32(1e-5)))
    hp = NEOX.hparams_from_hf({**config, "use_parallel_residual": True, "rotary_pct": 0.25,
                               "rope_parameters": None}, "c")
    assert NEOX.header_fields(hp)["par_res"] == 1 and NEOX.header_fields(hp)["n_rot"] == 8
    assert NEOX.hparams_from_ne(NEHeader(**NEOX.header_fields(hp)), shapes) == hp


@pytest.mark.parametrize("world", [1, 2, 3])
def test_split_plan_keeps_whole_heads_q_k_v_together(world):
    hp = NEOX.hparams_from_hf(dict(model_type="gpt_neox", **TINY), "c")
    shapes = NEOX.tensor_shapes(hp)
    hd, p = hp.head_dim, "gpt_neox.layers.1."
    # a fused qkv whose every row says (head, q|k|v, dim): HF's per-head layout
    labels = np.array([(h, j, k) for h in range(hp.n_head) for j in range(3) for k in range(hd)])
    heads_seen: list[int] = []
    for r in range(world):
        mp = Mapping(world, r, hp, NEOX)
        h0, h1 = mp.q_heads()
        s = mp.slice_of(p + "attention.query_key_value.weight", shapes[p + "attention.query_key_value.weight"])
        mine = labels[s.start:s.stop]
        assert s.axis == 0 and set(mine[:, 0]) == set(range(h0, h1))  # whole heads, nothing else
        assert len(mine) == 3 * hd * (h1 - h0)  # each with its q, k and v rows
        heads_seen += sorted(set(mine[:, 0]))
        b = mp.slice_of(p + "attention.query_key_value.bias", shapes[p + "attention.query_key_value.bias"])
        assert (b.axis, b.start, b.stop) == (0, s.start, s.stop)
        d = mp.slice_of(p + "attention.dense.weight", shapes[p + "attention.dense.weight"])
        assert (d.axis, d.start, d.stop) == (1, h0 * hd, h1 * hd)
        f0, f1 = mp.ffn()
        assert (mp.slice_of(p + "mlp.dense_h_to_4h.bias", (hp.n_ff,)).start, mp.slice_of(
            p + "mlp.dense_4h_to_h.weight", shapes[p + "mlp.dense_4h_to_h.weight"]).axis) == (f0, 1)
        for bias in ("attention.dense.bias", "mlp.dense_4h_to_h.bias"):
            assert mp.slice_of(p + bias, (hp.n_embd,)).held == (r == 0)  # counted once, by rank 0
        assert mp.slice_of("embed_out.weight", shapes["embed_out.weight"]).axis == 0
        for name in ("gpt_neox.embed_in.weight", p + "post_attention_layernorm.bias", "gpt_neox.final_layer_norm.weight"):
            assert mp.slice_of(name, shapes[name]).axis is None
    assert heads_seen == list(range(hp.n_head))


def test_gelu_is_the_erf_gelu():
    import torch

    from netp.models.layers import gelu

    x = np.linspace(-12, 12, 100001, dtype=np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert (np.abs(gelu(x) - ref) <= 1e-6 * np.maximum(1.0, np.abs(x))).all()  # f32 rounding, not a formula
    assert np.abs(gelu(x) - torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()).max() > 1e-4


# -- the forward against transformers ------------------------------------------------

@pytest.mark.parametrize("kind", [*KINDS, *TIED])
def test_f32_matches_transformers(tiny, kind):
    t = tiny(kind)
    if kind in TIED:  # no head in the checkpoint: convert writes the embedding as embed_out
        from safetensors import safe_open

        with safe_open(str(t.folder / "model.safetensors"), "np") as f:
            assert "embed_out.weight" not in f.keys() and "gpt_neox.embed_in.weight" in f.keys()
    assert_logits_agree(t.hf_logits, unsharded_logits(t, "f32"), f"{kind} NE f32 vs transformers")


@pytest.mark.parametrize("kind, n_ff", [("parallel_rot25", 512), ("mlp_3x", 384)])
def test_convert_warns_when_neural_speed_would_misread_the_mlp(tiny, kind, n_ff):
    """neural-speed's loader assumes an MLP of 4 x hidden: `netp convert` of any other
    width warns in one line, still writes the file, and netp's runtime runs it right."""
    t = tiny(kind)
    out = t.folder.parent / "cli-f32.bin"
    p = subprocess.run([str(BIN / "netp"), "convert", "--quiet", "--outfile", str(out), str(t.folder)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if ": warning: " in line]
    if n_ff == 4 * TINY["hidden_size"]:
        assert warnings == [], p.stderr
    else:
        assert len(warnings) == 1 and warnings[0].startswith(f"netp convert: warning: {t.folder}: "), p.stderr
        assert "intermediate_size 384 is not 4 x hidden_size (512)" in warnings[0]
        assert "neural-speed" in warnings[0]
    with NEReader(out) as r:
        assert r.tensors["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].shape == (n_ff, TINY["hidden_size"])
    assert_logits_agree(t.hf_logits, run_logits(out, t), f"{kind} NE f32 vs transformers")


def test_wrong_rotary_would_be_caught(tiny, monkeypatch):
    """The check has teeth: GPT-J's adjacent-pair rotary on NeoX weights fails the bound."""
    from netp.models import gpt_neox, layers

    t = tiny("parallel_rot25")
    monkeypatch.setattr(gpt_neox, "rotate_halves", layers.rotate_pairs)
    with pytest.raises(AssertionError, match="max"):
        assert_logits_agree(t.hf_logits, run_logits(ne_file(t, "f32"), t), "pairs instead of halves")


# -- shard sets against the unsharded file ---------------------------------------------

@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_shard_set_matches_unsharded(tiny, kind, qtype, world):
    from netp.formats.manifest import load_manifest
    from netp.shard.stage import shard_file

    t = tiny(kind)
    src = ne_file(t, qtype)
    out = src.parent / f"shards-{qtype}-{world}"
    shard_file(src, out, world)
    manifest = load_manifest(out)
    assert manifest.architecture == "gpt_neox"
    qkv = manifest.tensors["gpt_neox.layers.0.attention.query_key_value.weight"]
    assert (qkv.split, qkv.unit, qkv.axis) == ("rows", "qkv_heads", 0)
    assert manifest.tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"].ranges[1:] == (None,) * (world - 1)
    if qtype == "f32":  # rank files hold HF's rows of their heads, checked against torch's weight
        w = t.model.state_dict()["gpt_neox.layers.0.attention.query_key_value.weight"].numpy()
        per_head = w.reshape(4, 3 * 32, 128)
        for r in range(world):
            h0, h1 = Mapping(world, r, NEOX.hparams_from_ne(manifest.ne_header(), {
                n: e.shape for n, e in manifest.tensors.items()}), NEOX).q_heads()
            with NEReader(out / manifest.ranks[r].file) as rf:
                np.testing.assert_array_equal(rf.view(qkv.name), per_head[h0:h1].reshape(-1, 128))
    got = run_logits(out, t, world)
    assert_logits_agree(unsharded_logits(t, qtype), got, f"{kind} {qtype} shard set on {world} ranks")


def test_q4_0_tracks_f32(tiny):
    """4-bit weights change the logits but keep them: per position, the q4_0
    logits correlate with the f32 ones (a misplaced block or nibble would not)."""
    t = tiny("parallel_rot25")
    f32, q4 = unsharded_logits(t, "f32"), unsharded_logits(t, "q4_0")
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(f32, q4)]
    print("q4_0 vs f32 logit correlation per position: min", min(corr))
    assert np.abs(f32 - q4).max() > BOUND and min(corr) > 0.9


# -- under a real MPI launch -------------------------------------------------------

def test_verify_under_mpiexec_two_ranks(tiny):
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("mpiexec not installed (pip install 'netp[mpi]')")
    from netp.shard.stage import shard_file

    t = tiny("sequential_rot100")
    src = ne_file(t, "q4_0")
    out = src.parent / "shards-mpi-2"
    shard_file(src, out, 2)
    cmd = [str(mpiexec), "-n", "2", str(BIN / "netp"), "verify", str(out), "--f32", str(ne_file(t, "f32")),
           "--hf", str(t.folder), "-n", "4", "-t", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 MPI ranks vs ne-q4_0.bin on 1 rank" in proc.stdout
    assert "vs transformers" in proc.stdout and "verify: PASS" in proc.stdout
    assert proc.stdout.count(": PASS") >= 2  # shard set vs unsharded, f32 vs transformers
