"""quantize: block codecs byte-for-byte against gguf.quants (the pinned oracle),
the tensor rule, the streaming pipeline and both entry points on tiny NE models."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import quants as oracle

from conftest import write_stub_tokenizer
from netp.formats.constants import FTYPE_OF_TYPE, GGMLType
from netp.formats.ne import NEHeader, NEReader, NEWriter
from netp.models import by_name
from netp.models.hparams import HParams
from netp.quantize import codecs, rules
from netp.quantize.cli import ns_quantize_command, quantize_command
from netp.quantize.codecs import NonFiniteError, dequantize_rows, quantize_rows

ROOT = Path(__file__).resolve().parent.parent
QTYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)


# -- block codecs against the oracle ---------------------------------------------------

def _ties(t: GGMLType, rng: np.random.Generator, n: int) -> np.ndarray:
    """Blocks whose values land exactly on .5 after scaling by a random (non power of two) d."""
    k = rng.integers(0, 16, (n, 32)).astype(np.float32)
    d = rng.uniform(0.01, 3, (n, 1)).astype(np.float32)
    if t == GGMLType.Q4_0:  # mx = -8 d is the first value; others at (k - 8 + .5) d
        x = (k - np.float32(7.5)) * d
        x[:, 0] = np.float32(-8) * d[:, 0]
    elif t == GGMLType.Q4_1:  # min m, max m + 15 d; others at m + (k + .5) d
        m = rng.uniform(-2, 0, (n, 1)).astype(np.float32)
        x = m + (np.minimum(k, 14) + np.float32(0.5)) * d
        x[:, 0], x[:, 1] = m[:, 0], m[:, 0] + np.float32(15) * d[:, 0]
    else:  # amax 127 d; others at (j + .5) d
        j = rng.integers(-127, 127, (n, 32)).astype(np.float32)
        x = (j + np.float32(0.5)) * d
        x[:, 0] = np.float32(127) * d[:, 0]
    return x.astype(np.float32)


def _cases(t: GGMLType) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(t))
    normal = rng.standard_normal((48, 128), dtype=np.float32)
    special = rng.standard_normal((16, 64), dtype=np.float32)
    special[0, :32] = 0.0  # all-zero block
    special[1, :32] = -0.0  # all negative zeros
    special[2, :32] = np.where(rng.random(32) < 0.5, 0.0, -0.0)  # mixed signed zeros
    special[3, 5] = 1000.0  # one large outlier
    special[4, :32] = -np.abs(special[4, :32])
    special[4, 7] = -9.0  # negative-max block
    special[5, :32] = np.abs(special[5, :32])  # all positive (q4_1 min > 0)
    special[6, :32] = 0.0
    special[6, 3], special[6, 9] = -2.0, 2.0  # |min| == |max|: the first one wins in q4_0
    special[7, :32] = 0.0
    special[7, 3], special[7, 9] = 2.0, -2.0
    special[8, :32] = np.float32(3e-39) * rng.standard_normal(32)  # subnormal: 1/d overflows
    special[9, :32] = np.float32(1e37) * rng.standard_normal(32)  # huge values
    special[10, :32] = 1.0  # constant block
    special[11, 32:] = np.where(rng.random(32) < 0.5, 0.0, -0.0)
    special[11, 40] = 0.5  # zeros and one positive value
    return {
        "normal": normal,
        "special": special,
        "ties": _ties(t, rng, 64),
        "ties_q4_0_power_of_two_d": ((rng.integers(0, 16, (8, 32)) - 7.5) * 0.25).astype(np.float32),
        "f16": rng.standard_normal((20, 96)).astype(np.float16),
        "3d": (rng.standard_normal((3, 5, 64)) * 1e-3).astype(np.float32),
        "multi_chunk": rng.standard_normal((codecs.CHUNK_BLOCKS * 3 // 4 + 5, 64), dtype=np.float32),
    }


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_quantize_bytes_equal_gguf_quants(t):
    for case, x in _cases(t).items():
        with np.errstate(all="ignore"):  # the oracle casts inf/NaN in the subnormal case
            want = oracle.quantize(x, t)
        got = quantize_rows(x, t)
        assert got.shape == want.shape, case
        assert got.tobytes() == want.tobytes(), f"{t.name} {case}: blocks differ at " \
            f"{np.argwhere(got.reshape(-1, got.shape[-1]) != want.reshape(-1, want.shape[-1]))[:4].tolist()}"
        # Threads split the work by chunks; the bytes cannot change.
        assert quantize_rows(x, t, nthread=2).tobytes() == want.tobytes(), case


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_ties_really_are_ties(t):
    """The tie cases sit on .5 after scaling by id (so a codec that divides by d would differ)."""
    x = _ties(t, np.random.default_rng(1), 64)
    if t == GGMLType.Q4_0:
        d = x[:, :1] / np.float32(-8)
        y = x * (np.float32(1) / d)
    elif t == GGMLType.Q4_1:
        d = (x.max(1, keepdims=True) - x.min(1, keepdims=True)) / np.float32(15)
        y = (x - x.min(1, keepdims=True)) * (np.float32(1) / d)
    else:
        d = np.abs(x).max(1, keepdims=True) / np.float32(127)
        y = x * (np.float32(1) / d)
    frac = np.abs(y - np.trunc(y))
    assert (frac == 0.5).mean() > 0.2


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_quants(t):
    rng = np.random.default_rng(7)
    for case, x in _cases(t).items():
        if case == "special":
            x = x[:8]  # skip the blocks whose f16 d overflows
        raw = oracle.quantize(x, t)
        want = oracle.dequantize(raw, t)
        got = dequantize_rows(raw, t)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), case
        out = np.empty_like(want)
        assert dequantize_rows(raw, t, out=out, nthread=2) is out
        assert out.tobytes() == want.tobytes(), case
    # Arbitrary bytes too (any code, any f16 scale but NaN/inf).
    _, nbytes = codecs.block_geometry(t)
    raw = rng.integers(0, 256, (300, 3 * nbytes), dtype=np.uint8)
    for off in range(0, raw.shape[1], nbytes):
        raw[:, off + 1] &= 0x7B  # keep the f16 exponents (d, and m for q4_1) below inf/NaN
        if t == GGMLType.Q4_1:
            raw[:, off + 3] &= 0x7B
    np.testing.assert_array_equal(dequantize_rows(raw, t), oracle.dequantize(raw, t))


def test_f32_f16_pass_through():
    x = np.random.default_rng(0).standard_normal((4, 64), dtype=np.float32)
    raw32 = quantize_rows(x, GGMLType.F32)
    assert raw32.dtype == np.uint8 and raw32.shape == (4, 256)
    np.testing.assert_array_equal(dequantize_rows(raw32, GGMLType.F32), x)
    np.testing.assert_array_equal(dequantize_rows(x, GGMLType.F32), x)  # typed input as NEReader.view gives
    raw16 = quantize_rows(x, GGMLType.F16)
    assert raw16.shape == (4, 128)
    np.testing.assert_array_equal(dequantize_rows(raw16, GGMLType.F16), x.astype(np.float16).astype(np.float32))
    out = np.empty_like(x)
    dequantize_rows(x.astype(np.float16), GGMLType.F16, out=out)
    np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))


def test_nonfinite_is_reported_with_its_block():
    x = np.ones((10, 64), dtype=np.float32)
    x[7, 40] = np.nan
    for t in QTYPES:
        with pytest.raises(NonFiniteError) as e:
            quantize_rows(x, t)
        assert e.value.block == 7 * 2 + 1
    x[7, 40] = -np.inf
    with pytest.raises(NonFiniteError):
        quantize_rows(x, GGMLType.Q4_0, nthread=2)


def test_rows_must_fill_blocks():
    with pytest.raises(ValueError, match="multiple"):
        quantize_rows(np.zeros((2, 48), np.float32), GGMLType.Q4_0)


def test_rule():
    f32, q = GGMLType.F32, GGMLType.Q4_0
    assert rules.target_type((64, 64), f32, q) == q  # layers.0.attention.wq.weight
    assert rules.target_type((100, 64), f32, q) == q  # tok_embeddings.weight
    assert rules.target_type((100, 64), GGMLType.F16, q) == q  # output.weight
    assert rules.target_type((64,), f32, q) == f32  # norm.weight
    assert rules.target_type((256,), f32, q) == f32  # transformer.h.0.mlp.fc_in.bias
    assert rules.target_type((64, 80), GGMLType.F16, q) == GGMLType.F16  # layers.0.feed_forward.w2.weight
    assert rules.header_ftype(GGMLType.Q8_0) == 7


# -- tiny NE models -------------------------------------------------------------------

def _hparams(arch: str) -> HParams:
    # n_ff 80: rows of 80 values do not fill 32-value blocks, so the down
    # projection (LLaMA w2, GPT-J fc_out) stays unquantized under the rule.
    return HParams(arch=arch, n_vocab=96, n_embd=64, n_head=4, n_head_kv=2 if arch == "llama" else 4, n_layer=2,
                   n_ff=80, n_rot=16, norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)


def write_tiny_ne(path: Path, arch_name: str = "llama", dtype=np.float32, tokenizer: bool = True,
                  poison: str | None = None) -> dict[str, np.ndarray]:
    """An NE file written with NEWriter directly (random data, the architecture's names and shapes)."""
    arch, hp = by_name(arch_name), _hparams(arch_name)
    rng = np.random.default_rng(42)
    ftype = GGMLType.F32 if dtype == np.float32 else GGMLType.F16
    header = NEHeader(**arch.header_fields(hp), ftype=FTYPE_OF_TYPE[ftype])
    vocab = [(f"t{i}".encode(), -float(i)) for i in range(hp.n_vocab)]
    tensors = {}
    with NEWriter(path, header, vocab) as w:
        for name, shape in arch.tensor_shapes(hp).items():
            arr = rng.standard_normal(shape, dtype=np.float32) * 0.1
            if len(shape) == 2:
                arr[0, :32] = 0.0  # one all-zero block per matrix
                arr = arr.astype(dtype)
            if name == poison:
                arr[1, 3] = np.nan
            t = GGMLType.F32 if arr.dtype == np.float32 else GGMLType.F16
            w.add_tensor(name, t, shape, arr)
            tensors[name] = arr
    if tokenizer:
        write_stub_tokenizer(path)
    return tensors


def _invoke(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _assert_refused(tmp_path: Path, code: int, stderr: str, prog: str, *needles: str) -> None:
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("out") or ".netp-partial-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_tiny_llama_round_trip_through_the_cli(tmp_path, t):
    src, dst = tmp_path / "ne-f32.bin", tmp_path / f"out-{t.name.lower()}.bin"
    tensors = write_tiny_ne(src)
    code, out, err = _invoke(quantize_command, [src, dst, "--type", t.name.lower(), "--nthread", "2"])
    assert code == 0, err
    assert "tensors quantized" in out and str(dst) in out
    with NEReader(dst) as r, NEReader(src) as r0:
        assert r.header.ftype == FTYPE_OF_TYPE[t]
        assert r.header.n_vocab == r0.header.n_vocab and r.vocab == r0.vocab
        assert list(r.tensors) == list(tensors)
        n_quantized = 0
        for name, arr in tensors.items():
            info = r.tensors[name]
            assert info.shape == arr.shape
            if arr.ndim == 1:
                assert info.ggml_type == GGMLType.F32  # norms stay f32
                np.testing.assert_array_equal(r.view(name), arr)
            elif arr.shape[-1] % 32:
                assert info.ggml_type == GGMLType.F32  # w2: rows of 80 values
                np.testing.assert_array_equal(r.view(name), arr)
            else:
                assert info.ggml_type == t
                assert r.view(name).tobytes() == oracle.quantize(arr, t).tobytes(), name
                n_quantized += 1
        assert n_quantized == 2 + 6 * 2  # embedding, output, 6 matrices per layer
        assert "tok_embeddings.weight" in tensors and r.tensors["output.weight"].ggml_type == t
    tok = tmp_path / f"out-{t.name.lower()}.tokenizer"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tok / f).read_bytes() == (tmp_path / "ne-f32.tokenizer" / f).read_bytes()


def test_f16_input_and_no_tokenizer(tmp_path):
    src, dst = tmp_path / "ne-f16.bin", tmp_path / "out.bin"
    tensors = write_tiny_ne(src, dtype=np.float16, tokenizer=False)
    code, out, err = _invoke(quantize_command, [src, dst, "q8_0"])  # llama-quantize's positional type
    assert code == 0, err
    assert "no tokenizer folder" in out
    with NEReader(dst) as r:
        assert r.header.ftype == FTYPE_OF_TYPE[GGMLType.Q8_0]
        for name, arr in tensors.items():
            if arr.ndim == 2 and arr.shape[-1] % 32 == 0:
                assert r.view(name).tobytes() == oracle.quantize(arr, GGMLType.Q8_0).tobytes(), name
            elif arr.ndim == 2:
                assert r.tensors[name].ggml_type == GGMLType.F16
    assert not (tmp_path / "out.tokenizer").exists()


def test_neural_speed_seed_line_on_gptj(tmp_path, monkeypatch):
    """The seed line, verbatim, on a GPT-J file (its --model_name gptj belongs to GPT-J)."""
    monkeypatch.chdir(tmp_path)
    tensors = write_tiny_ne(tmp_path / "ne-f32.bin", "gptj")
    code, out, err = _invoke(ns_quantize_command, "--model_name gptj --model_file ne-f32.bin "
                                                  "--out_file ne-q4_0.bin --weight_dtype int4".split())
    assert code == 0, err
    with NEReader(tmp_path / "ne-q4_0.bin") as r:
        assert r.header.ftype == 2
        w = "transformer.h.1.attn.q_proj.weight"
        assert r.view(w).tobytes() == oracle.quantize(tensors[w], GGMLType.Q4_0).tobytes()
        assert r.tensors["lm_head.bias"].ggml_type == GGMLType.F32
    assert (tmp_path / "ne-q4_0.tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("flags,t", [("--weight_dtype int4 --alg asym", GGMLType.Q4_1),
                                     ("--weight_dtype int8 --use_ggml --scale_dtype fp32 --group_size 32",
                                      GGMLType.Q8_0)])
def test_neural_speed_flags_map_to_block_types(tmp_path, flags, t):
    src, dst = tmp_path / "ne-f32.bin", tmp_path / "q.bin"
    tensors = write_tiny_ne(src)
    code, _, err = _invoke(ns_quantize_command, ["--model_name", "llama2", "--model_file", src, "--out_file", dst,
                                                 "--nthread", "1", "--quiet", *flags.split()])
    assert code == 0, err
    with NEReader(dst) as r:
        w = "layers.0.feed_forward.w1.weight"
        assert r.view(w).tobytes() == oracle.quantize(tensors[w], t).tobytes()


def test_refuses_already_quantized_input(tmp_path):
    src = tmp_path / "ne-f32.bin"
    write_tiny_ne(src, tokenizer=False)
    q = tmp_path / "q.bin"
    assert _invoke(quantize_command, [src, q, "-q"])[0] == 0
    code, _, err = _invoke(quantize_command, [q, tmp_path / "out.bin"])
    _assert_refused(tmp_path, code, err, "quantize", "q.bin", "already quantized", "q4_0")


def test_refuses_nan_weight_naming_the_tensor(tmp_path):
    src = tmp_path / "ne-f32.bin"
    write_tiny_ne(src, poison="layers.1.attention.wv.weight")
    code, _, err = _invoke(quantize_command, [src, tmp_path / "out.bin", "--type", "q4_1"])
    _assert_refused(tmp_path, code, err, "quantize", "layers.1.attention.wv.weight", "NaN or inf", "row 1")
    assert not (tmp_path / "out.tokenizer").exists()


def test_refuses_nan_in_a_tensor_kept_f32(tmp_path):
    src = tmp_path / "ne-f32.bin"
    write_tiny_ne(src, poison="layers.0.feed_forward.w2.weight")  # rows of 80: kept f32
    code, _, err = _invoke(quantize_command, [src, tmp_path / "out.bin"])
    _assert_refused(tmp_path, code, err, "quantize", "layers.0.feed_forward.w2.weight", "row 1")


@pytest.mark.parametrize("flags,needles", [
    ("--model_name llama --group_size 64", ("--group_size 64", "--group_size 32")),
    ("--model_name gptj", ("gptj", "llama", "--model_name llama")),
    ("--model_name llama --compute_dtype int8", ("--compute_dtype",)),
    ("--model_name llama --scale_dtype bf16", ("--scale_dtype bf16", "fp32")),
    ("--model_name llama --weight_dtype nf4", ("--weight_dtype nf4", "int4")),
    ("--model_name llama --weight_dtype int8 --alg asym", ("int8", "asym", "q8_0")),
    ("--model_name bloom", ("bloom", "gptj")),
])
def test_neural_speed_refusals(tmp_path, flags, needles):
    src = tmp_path / "ne-f32.bin"
    write_tiny_ne(src)
    code, _, err = _invoke(ns_quantize_command, ["--model_file", src, "--out_file", tmp_path / "out.bin",
                                                 *flags.split()])
    _assert_refused(tmp_path, code, err, "quantize.py", *needles)


def test_unknown_flag_and_type_are_usage_errors(tmp_path):
    src = tmp_path / "ne-f32.bin"
    write_tiny_ne(src)
    code, _, err = _invoke(ns_quantize_command, ["--model_file", src, "--out_file", tmp_path / "out.bin",
                                                 "--bogus_flag", "1"])
    _assert_refused(tmp_path, code, err, "quantize.py", "--bogus_flag")
    code, _, err = _invoke(quantize_command, [src, tmp_path / "out.bin", "--type", "q5_0"])
    _assert_refused(tmp_path, code, err, "quantize", "q5_0")


def test_script_entry_point_runs_the_seed_line(tmp_path):
    """scripts/quantize.py as a user runs it (a real process: exit status and stderr)."""
    src = tmp_path / "ne-f32.bin"
    write_tiny_ne(src)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / "scripts" / "quantize.py"), "--model_name", "gptj", "--model_file", "ne-f32.bin",
           "--out_file", "ne-q4_0.bin", "--weight_dtype", "int4"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"quantize.py: error: ne-f32.bin: --model_name gptj is a gptj model, but this file "
                                "holds a llama model (recognised from its tensor names); use --model_name llama")
    cmd[3] = "llama"
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    with NEReader(tmp_path / "ne-q4_0.bin") as r:
        assert r.header.ftype == 2


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_strided_raw_and_out(t):
    """Column slices of a tensor in file form (the runtime's case) and strided destinations."""
    x = np.random.default_rng(5).standard_normal((10, 128), dtype=np.float32)
    raw = oracle.quantize(x, t)
    quarter = raw.shape[1] // 4
    big = np.zeros((10, 200), np.float32)
    dequantize_rows(raw[:, quarter:], t, out=big[:, 10:106])
    np.testing.assert_array_equal(big[:, 10:106], oracle.dequantize(raw, t)[:, 32:])
    assert (big[:, :10] == 0).all() and (big[:, 106:] == 0).all()
    wide = np.zeros((10, raw.shape[1] * 2), np.uint8)
    quantize_rows(x, t, out=wide[:, ::2])
    assert wide[:, ::2].tobytes() == raw.tobytes() and not wide[:, 1::2].any()


def test_smollm2_q4_0(smollm2_f32, smollm2_q4_0):
    """The real model: every matrix of the first and last layer, the embedding and
    the head are the oracle's bytes; norms stay f32; header and tokenizer follow."""
    with NEReader(smollm2_f32) as f32, NEReader(smollm2_q4_0) as q:
        assert q.header.ftype == FTYPE_OF_TYPE[GGMLType.Q4_0]
        assert q.vocab == f32.vocab and list(q.tensors) == list(f32.tensors)
        last = f32.header.n_layer - 1
        checked = 0
        for name, info in f32.tensors.items():
            qi = q.tensors[name]
            assert qi.shape == info.shape
            if len(info.shape) == 1:
                assert qi.ggml_type == GGMLType.F32
                np.testing.assert_array_equal(q.view(name), f32.view(name))
                continue
            assert qi.ggml_type == GGMLType.Q4_0, name  # SmolLM2's rows (576, 1536) fill blocks
            if name.startswith(("layers.0.", f"layers.{last}.")) or not name.startswith("layers."):
                assert q.view(name).tobytes() == oracle.quantize(f32.view(name), GGMLType.Q4_0).tobytes(), name
                checked += 1
        assert checked >= 2 * 7 + 1
        assert q.file_size < f32.file_size / 6
    tok_src = smollm2_f32.with_name("smollm2-f32.tokenizer")
    tok_dst = smollm2_q4_0.with_name("smollm2-q4_0.tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tok_dst / f).read_bytes() == (tok_src / f).read_bytes()
