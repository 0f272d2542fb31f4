"""The NE reader and writer: round trips, layout facts, and refusals."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from netp.errors import NetpError
from netp.formats.constants import NE_HEADER_FIELDS, GGMLType
from netp.formats.ne import NEHeader, NEReader, NEWriter


def _write_small(path, tensors, vocab=((b"a", 0.0), (b"bc", -1.0))):
    header = NEHeader(n_vocab=len(vocab), n_embd=64, n_head=2, n_layer=1, ftype=0, norm_eps=2.0**-20)  # exact in f32
    with NEWriter(path, header, list(vocab)) as w:
        for name, arr in tensors.items():
            t = GGMLType.F32 if arr.dtype == np.float32 else GGMLType.F16
            w.add_tensor(name, t, arr.shape, arr)
    return header


def test_round_trip_header_vocab_tensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 64), dtype=np.float32),
               "b": rng.standard_normal(64).astype(np.float16),
               "c": rng.standard_normal((2, 3, 32), dtype=np.float32)}
    header = _write_small(tmp_path / "m.bin", tensors)
    with NEReader(tmp_path / "m.bin") as r:
        assert r.header == header
        assert r.vocab == [(b"a", 0.0), (b"bc", -1.0)]
        assert list(r.tensors) == list(tensors)
        for name, arr in tensors.items():
            info = r.tensors[name]
            assert info.offset % 32 == 0
            assert info.shape == arr.shape
            np.testing.assert_array_equal(r.view(name), arr)
            np.testing.assert_array_equal(r.read(name), arr)
        np.testing.assert_array_equal(r.read("a.weight", rows=(1, 3)), tensors["a.weight"][1:3])


def test_bytes_follow_the_documented_layout(tmp_path):
    """Hand-parse the file with struct, independent of NEReader."""
    arr = np.arange(64, dtype=np.float32).reshape(2, 32)
    _write_small(tmp_path / "m.bin", {"w": arr}, vocab=[(b"xy", 2.5)])
    raw = (tmp_path / "m.bin").read_bytes()
    assert raw[:4] == b"tjgg"
    n_fields = len(NE_HEADER_FIELDS)
    fmt = "<" + "".join(f for _, f, _ in NE_HEADER_FIELDS)
    values = struct.unpack_from(fmt, raw, 4)
    assert values[:3] == (1, 1, 64)  # version, n_vocab, n_embd
    pos = 4 + struct.calcsize(fmt)
    assert n_fields == 31
    assert struct.unpack_from("<i", raw, pos)[0] == 2 and raw[pos + 4:pos + 6] == b"xy"
    assert struct.unpack_from("<f", raw, pos + 6)[0] == 2.5
    pos += 10
    n_dims, name_len, ttype = struct.unpack_from("<iii", raw, pos)
    assert (n_dims, name_len, ttype) == (2, 1, 0)
    assert struct.unpack_from("<ii", raw, pos + 12) == (32, 2)  # ne[0] first
    data = pos + 12 + 8 + 1
    data += -data % 32
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4", 64, data).reshape(2, 32), arr)
    assert len(raw) == data + arr.nbytes


def test_writer_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "m.bin"
    header = NEHeader(n_vocab=1, n_embd=32, n_head=1, n_layer=1)
    with pytest.raises(RuntimeError):
        with NEWriter(out, header, [(b"a", 0.0)]) as w:
            w.add_tensor("x", GGMLType.F32, (32,), np.zeros(32, np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [0, 3, 10, 60, 200, -5, -1])
def test_truncated_files_are_refused(tmp_path, cut):
    src = tmp_path / "m.bin"
    _write_small(src, {"w": np.ones((4, 64), np.float32)})
    raw = src.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) + cut])
    with pytest.raises(NetpError) as e:
        NEReader(bad)
    assert str(bad) in str(e.value)


def test_wrong_magic_and_impossible_sizes(tmp_path):
    src = tmp_path / "m.bin"
    _write_small(src, {"w": np.ones((4, 64), np.float32)})
    raw = bytearray(src.read_bytes())
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + raw[4:])
    with pytest.raises(NetpError, match="magic"):
        NEReader(bad)
    big = bytearray(raw)
    struct.pack_into("<i", big, 8, 10**9)  # n_vocab
    bad.write_bytes(big)
    with pytest.raises(NetpError, match="vocab"):
        NEReader(bad)


# -- the header against the tensors (models.ne_model, used by every stage that reads NE) --
def _tiny_llama(path, **header_changes):
    """A complete 2-layer LLaMA NE file, then header fields changed in place."""
    import dataclasses

    from netp.models import by_name
    from netp.models.hparams import HParams

    arch = by_name("llama")
    hp = HParams(arch="llama", n_vocab=8, n_embd=64, n_head=4, n_head_kv=2, n_layer=2, n_ff=96, n_rot=16,
                 norm_eps=1e-5, rope_theta=1e4, bos_token_id=1, eos_token_id=2)
    header = dataclasses.replace(NEHeader(**arch.header_fields(hp), ftype=0), **header_changes)
    rng = np.random.default_rng(0)
    with NEWriter(path, header, [(bytes([97 + i]), 0.0) for i in range(hp.n_vocab)]) as w:
        for name, shape in arch.tensor_shapes(hp).items():
            w.add_tensor(name, GGMLType.F32, shape, rng.standard_normal(shape, dtype=np.float32))
    return path


@pytest.mark.parametrize("changes, needle", [
    ({}, None),
    ({"n_layer": 3}, "missing tensor layers.2.attention.wq.weight of a llama model with 3 layers"),
    ({"n_layer": 1}, "tensor layers.1.attention.wq.weight is not part of a llama model with 1 layers"),
    ({"n_layer": 2_097_153}, "header says 2097153 layers, more than its 21 tensors can hold"),
    ({"n_head": 3}, "not a whole number of heads"),
    ({"n_head_kv": 3}, "not a whole number of heads per KV group"),
    ({"n_head_kv": 4}, "tensor layers.0.attention.wk.weight has shape [32, 64], the header implies [64, 64]"),
    ({"n_rot": 17}, "rotary width n_rot 17 does not fit head_dim 16"),
    ({"ffn_hidden_size": 128}, "layers.0.feed_forward.w1.weight has shape [96, 64], the header implies [128, 64]"),
])
def test_header_must_match_the_tensors(tmp_path, changes, needle):
    from netp.models import ne_model

    path = _tiny_llama(tmp_path / "m.bin", **changes)
    with NEReader(path) as r:
        shapes = r.shapes
        if needle is None:
            arch, hp = ne_model(r.header, shapes, str(path))
            assert (arch.name, hp.n_layer, hp.n_head_kv, hp.n_ff) == ("llama", 2, 2, 96)
            return
        with pytest.raises(NetpError, match="^" + str(path).replace(".", r"\.") + ": ") as e:
            ne_model(r.header, shapes, str(path))
        assert needle in str(e.value)


def test_read_of_a_tensor_over_2_gib(tmp_path):
    """Linux returns at most 0x7ffff000 bytes per read call: a --no_mmap read of a larger
    tensor (a 70B model's f32 embedding is 4.2 GB) loops instead of calling the healthy
    file truncated. The tensor is a hole in a sparse file but for its first and last
    values, so the disk holds only a few KiB; the read needs ~2 GiB of memory."""
    from netp.formats.ne import header_to_bytes, tensor_record, vocab_to_bytes

    n = (0x7ffff000 + 4096) // 4  # f32 values: just past one call's limit
    header = NEHeader(n_vocab=1, n_embd=64, n_head=2, n_layer=1, ftype=0)
    head = header_to_bytes(header) + vocab_to_bytes([(b"a", 0.0)])
    head += tensor_record("big", GGMLType.F32, (n,), len(head))
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.write(head + np.float32(7.0).tobytes())
        f.seek(len(head) + 4 * (n - 2))
        f.write(np.array([1.5, -2.5], dtype=np.float32).tobytes())
    with NEReader(path) as r:
        assert r.tensors["big"].nbytes > 0x7ffff000
        data = r.read("big")
        assert data.shape == (n,) and data[0] == 7.0 and list(data[-2:]) == [1.5, -2.5]
        assert not data[1:-2].any()
        del data
        assert list(r.read("big", rows=(n - 2, n))) == [1.5, -2.5]


def test_the_cheap_type_table_is_checked_even_under_python_O():
    """netp/typenames.py (the copy CLIs import without gguf) must agree with formats/constants.py:
    the check raises at import, and `python -O`, which drops asserts, keeps it."""
    import subprocess
    import sys

    code = "import netp.typenames as t; t.QK = 64\nimport netp.formats.constants"
    p = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "ImportError: netp/typenames.py" in p.stderr and "disagrees" in p.stderr, p.stderr
