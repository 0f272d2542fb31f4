"""The shard stage (issue 14, docs/design.md §4): rank files, manifest, checksums, refusals.

Inputs are tiny random NE files written here with NEWriter from the
architectures' tensor_shapes; q4_0 data comes from gguf.quants (the oracle).
The rank files are checked by this file's own reassembly: every tensor is
rebuilt from the rank files using only the manifest's ranges, and the
rebuilt model must equal the source byte for byte.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import write_stub_tokenizer
from netp.errors import NetpError
from netp.formats.constants import GGMLType, block_geometry
from netp.formats.manifest import load_manifest, rank_file_name
from netp.models import architecture_names
from netp.formats.ne import NEHeader, NEReader, NEWriter
from netp.models import by_name
from netp.models.hparams import HParams

BIN = Path(sys.executable).parent


def hparams(arch: str, n_head: int, n_head_kv: int, head_dim: int = 32, n_ff: int = 192, n_vocab: int = 150,
            n_layer: int = 2) -> HParams:
    n_embd = n_head * head_dim
    return HParams(arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_layer=n_layer,
                   n_ff=n_ff, n_rot=head_dim if arch == "llama" else head_dim // 2, norm_eps=2.0**-17,
                   rope_theta=10000.0, bos_token_id=1, eos_token_id=2, parallel_residual=arch == "gptj")


def write_ne(path: Path, hp: HParams, qtype: str, seed: int = 0, tokenizer: bool = False) -> Path:
    """A random NE file of architecture hp.arch; 2-D tensors in `qtype`, 1-D in f32."""
    arch = by_name(hp.arch)
    ggml_type = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q4_0": GGMLType.Q4_0, "q8_0": GGMLType.Q8_0}[qtype]
    header = NEHeader(**arch.header_fields(hp), ftype={"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}[qtype])
    vocab = [(f"tok{i}".encode(), -float(i)) for i in range(hp.n_vocab)]
    rng = np.random.default_rng(seed)
    with NEWriter(path, header, vocab) as w:
        for name, shape in arch.tensor_shapes(hp).items():
            x = rng.standard_normal(shape).astype(np.float32)
            if len(shape) == 1 or ggml_type == GGMLType.F32:
                w.add_tensor(name, GGMLType.F32, shape, x)
            elif ggml_type == GGMLType.F16:
                w.add_tensor(name, GGMLType.F16, shape, x.astype(np.float16))
            else:
                w.add_tensor(name, ggml_type, shape, gguf.quants.quantize(x, ggml_type))
    if tokenizer:
        write_stub_tokenizer(path)
    return path


def run_shard(args: list[str], capsys, prog: str = "shard") -> tuple[int, str, str]:
    """Run the shard command in-process; (exit code, stdout, stderr)."""
    from netp.cli import netp as netp_group
    from netp.shard.cli import shard_command

    code = 0
    try:
        if prog == "netp":
            netp_group.main(args=["shard", *args], prog_name="netp")
        else:
            shard_command.main(args=args, prog_name=prog)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def reassemble(outdir: Path):
    """Yield every source tensor, rebuilt as (rows, row bytes) uint8 from the rank files using only
    the manifest, one at a time (name, array)."""
    m = json.loads((outdir / "manifest.json").read_text())
    readers = [NEReader(outdir / r["file"]) for r in m["ranks"]]
    for t in m["tensors"]:
        shape, axis = t["shape"], t["axis"]
        ggml_type = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q4_0": GGMLType.Q4_0, "q8_0": GGMLType.Q8_0}[t["type"]]
        block, block_bytes = block_geometry(ggml_type)
        rows = int(np.prod(shape[:-1]))
        row_bytes = shape[-1] // block * block_bytes
        full = np.zeros((rows, row_bytes), np.uint8)
        covered = np.zeros((rows, row_bytes), bool)
        for r, rng in enumerate(t["ranges"]):
            if rng is None:
                assert t["name"] not in readers[r].tensors
                continue
            info = readers[r].tensors[t["name"]]
            local = np.fromfile(readers[r].path, np.uint8, count=info.nbytes, offset=info.offset)
            a, b = rng
            if axis is None:
                assert list(info.shape) == shape
                region = (slice(None), slice(None))
            elif axis == len(shape) - 1:  # a cut along the row: whole blocks of bytes
                assert a % block == 0 and b % block == 0
                region = (slice(None), slice(a // block * block_bytes, b // block * block_bytes))
            else:
                assert axis == 0 and len(shape) == 2
                region = (slice(a, b), slice(None))
            expect_shape = full[region].shape
            local = local.reshape(expect_shape)
            # overlapping ranges (shared KV heads) must agree where they overlap
            seen = covered[region]
            assert np.array_equal(full[region][seen], local[seen]), t["name"]
            full[region] = local
            covered[region] = True
        assert covered.all(), f"{t['name']} not fully covered by the ranks"
        del covered
        yield t["name"], full
    for r in readers:
        r.close()


def assert_shard_set_is_source(src: Path, outdir: Path, world: int) -> dict:
    m = json.loads((outdir / "manifest.json").read_text())
    assert m["world_size"] == world
    assert [r["file"] for r in m["ranks"]] == [f"rank-{r:05d}-of-{world:05d}.bin" for r in range(world)]
    assert sorted(p.name for p in outdir.iterdir() if p.suffix == ".bin") == [r["file"] for r in m["ranks"]]
    # checksums and sizes, computed here independently
    assert m["source"] == {"name": src.name, "size": src.stat().st_size, "sha256": sha256(src)}
    for r in m["ranks"]:
        path = outdir / r["file"]
        assert r["size"] == path.stat().st_size and r["sha256"] == sha256(path)
    # every rank file: the source's header and vocab bytes unchanged, then its tensors in source order
    with NEReader(src) as s, open(src, "rb") as f:
        prefix = f.read(s.tensor_data_start)
        for r in range(world):
            with open(outdir / rank_file_name(r, world), "rb") as rf:
                assert rf.read(len(prefix)) == prefix
        # Writing the rebuilt tensors as an NE file gives back the source file, byte for byte.
        copy = outdir.parent / f"rebuilt-{outdir.name}.bin"
        names = []
        with NEWriter(copy, s.header, s.vocab) as w:
            for name, data in reassemble(outdir):
                info = s.tensors[name]
                w.add_tensor(name, info.ggml_type, info.shape, data)
                names.append(name)
        assert names == list(s.tensors)
    assert copy.stat().st_size == src.stat().st_size and sha256(copy) == m["source"]["sha256"]
    copy.unlink()
    return m


MODELS = {
    "gptj-4h": hparams("gptj", 4, 4, n_ff=256),
    "llama-gqa-4/2": hparams("llama", 4, 2),
    "llama-mqa-4/1": hparams("llama", 4, 1),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    return {(key, q): write_ne(d / f"{key.replace('/', '_')}-{q}.bin", hp, q, seed=i, tokenizer=q == "q4_0")
            for i, (key, hp) in enumerate(MODELS.items()) for q in ("f32", "q4_0")}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
@pytest.mark.parametrize("model", list(MODELS))
def test_shard_set_rebuilds_the_source(sources, tmp_path, capsys, model, qtype, world):
    src = sources[(model, qtype)]
    outdir = tmp_path / "shards"
    code, out, err = run_shard(["--ranks", str(world), str(src), str(outdir)], capsys)
    assert code == 0, err
    assert "sharded" in out and f"over {world} ranks" in out
    m = assert_shard_set_is_source(src, outdir, world)
    hp = MODELS[model]
    assert m["architecture"] == hp.arch
    assert m["hparams"]["n_head"] == hp.n_head and m["hparams"]["ftype"] == (2 if qtype == "q4_0" else 0)
    # the tokenizer folder travels with the q4_0 sources (made with one above), and only then
    if qtype == "q4_0":
        assert m["tokenizer"] == "tokenizer"
        assert (outdir / "tokenizer" / "tokenizer.json").read_bytes() == \
            (src.with_name(src.stem + ".tokenizer") / "tokenizer.json").read_bytes()
    else:
        assert m["tokenizer"] is None and not (outdir / "tokenizer").exists()
    # the library's validating loader accepts what the stage wrote
    assert load_manifest(outdir).world_size == world
    # no temporary leftovers beside OUTDIR
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def _ranges(m: dict, name: str) -> list:
    return [tuple(r) if r is not None else None for r in next(t for t in m["tensors"] if t["name"] == name)["ranges"]]


@pytest.mark.parametrize("n_head,n_kv,world,q_heads,kv_heads", [
    # docs/design.md §4: query heads cut as evenly as possible, the first ranks one more; each rank
    # holds every KV head its query heads use (group = n_head / n_kv).
    (9, 3, 2, [(0, 5), (5, 9)], [(0, 2), (1, 3)]),
    (9, 3, 3, [(0, 3), (3, 6), (6, 9)], [(0, 1), (1, 2), (2, 3)]),
    (4, 2, 3, [(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 2), (1, 2)]),
    (6, 1, 2, [(0, 3), (3, 6)], [(0, 1), (0, 1)]),
])
def test_heads_and_kv_heads_follow_the_rule(tmp_path, capsys, n_head, n_kv, world, q_heads, kv_heads):
    hd = 32
    hp = hparams("llama", n_head, n_kv, head_dim=hd, n_ff=128, n_vocab=96, n_layer=1)
    src = write_ne(tmp_path / "m.bin", hp, "q4_0")
    outdir = tmp_path / "shards"
    code, _, err = run_shard(["--ranks", str(world), "--quiet", str(src), str(outdir)], capsys)
    assert code == 0, err
    m = assert_shard_set_is_source(src, outdir, world)
    heads = lambda pairs: [(a * hd, b * hd) for a, b in pairs]  # noqa: E731
    assert _ranges(m, "layers.0.attention.wq.weight") == heads(q_heads)
    assert _ranges(m, "layers.0.attention.wo.weight") == heads(q_heads)
    assert _ranges(m, "layers.0.attention.wk.weight") == heads(kv_heads)
    assert _ranges(m, "layers.0.attention.wv.weight") == heads(kv_heads)
    # the KV head rows each rank holds are the source's rows of those heads
    with NEReader(src) as s:
        wk = s.view("layers.0.attention.wk.weight")
        for r, (a, b) in enumerate(kv_heads):
            with NEReader(outdir / rank_file_name(r, world)) as rf:
                assert np.array_equal(rf.view("layers.0.attention.wk.weight"), wk[a * hd:b * hd])
                assert rf.tensors["layers.0.attention.wq.weight"].shape == ((q_heads[r][1] - q_heads[r][0]) * hd,
                                                                             hp.n_embd)


def test_gptj_fc_out_bias_on_rank0_only_and_uneven_vocab(sources, tmp_path, capsys):
    src = sources[("gptj-4h", "f32")]
    outdir = tmp_path / "s"
    assert run_shard(["--ranks", "3", str(src), str(outdir)], capsys)[0] == 0
    m = json.loads((outdir / "manifest.json").read_text())
    assert _ranges(m, "transformer.h.0.mlp.fc_out.bias") == [(0, 128), None, None]  # (n_embd,)
    with NEReader(outdir / rank_file_name(1, 3)) as r1:
        assert "transformer.h.0.mlp.fc_out.bias" not in r1.tensors
    # vocab 150 = 5 blocks of 32 (the last one short) over 3 ranks: 2 + 2 + 1 blocks
    assert _ranges(m, "lm_head.weight") == [(0, 64), (64, 128), (128, 150)]
    assert _ranges(m, "lm_head.bias") == [(0, 64), (64, 128), (128, 150)]


def test_f16_and_q8_0_sources(tmp_path, capsys):
    hp = hparams("llama", 4, 2, n_layer=1)
    for q in ("f16", "q8_0"):
        src = write_ne(tmp_path / f"m-{q}.bin", hp, q)
        outdir = tmp_path / f"s-{q}"
        assert run_shard(["--ranks", "3", "--quiet", str(src), str(outdir)], capsys)[0] == 0
        assert_shard_set_is_source(src, outdir, 3)


def test_netp_shard_and_console_script(sources, tmp_path, capsys):
    src = sources[("llama-gqa-4/2", "q4_0")]
    code, out, err = run_shard(["--ranks", "2", str(src), str(tmp_path / "a")], capsys, prog="netp")
    assert code == 0, err
    proc = subprocess.run([str(BIN / "shard"), "--ranks", "2", str(src), str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("manifest.json", rank_file_name(0, 2), rank_file_name(1, 2)):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_check_detects_a_flipped_byte_and_a_missing_file(sources, tmp_path, capsys):
    src = sources[("llama-mqa-4/1", "q4_0")]
    outdir = tmp_path / "s"
    assert run_shard(["--ranks", "2", "--quiet", str(src), str(outdir)], capsys)[0] == 0
    code, out, err = run_shard(["--check", str(outdir)], capsys)
    # two rank files and the two tokenizer files the manifest checksums
    assert code == 0 and out.count(": ok") == 4 and "all checksums match" in out, out + err
    assert "tokenizer/tokenizer.json: ok" in out

    victim = outdir / rank_file_name(1, 2)
    data = bytearray(victim.read_bytes())
    with NEReader(victim) as r:
        offset = r.tensors["layers.1.feed_forward.w2.weight"].offset + 7  # deep in tensor data
    data[offset] ^= 0x10
    victim.write_bytes(bytes(data))
    code, out, err = run_shard(["--check", str(outdir)], capsys)
    assert code != 0
    assert f"{rank_file_name(0, 2)}: ok" in out
    assert f"{rank_file_name(1, 2)}: MISMATCH: sha256" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shard: error: {victim}: sha256 mismatch: "), err

    victim.unlink()
    code, out, _ = run_shard(["--check", str(outdir)], capsys, prog="netp")
    assert code != 0 and f"{rank_file_name(1, 2)}: MISMATCH: missing" in out


def test_existing_outdir_needs_force(sources, tmp_path, capsys):
    src = sources[("llama-gqa-4/2", "f32")]
    outdir = tmp_path / "s"
    outdir.mkdir()
    (outdir / "old.txt").write_text("keep me unless --force")
    code, out, err = run_shard(["--ranks", "2", str(src), str(outdir)], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "--force" in err
    assert [p.name for p in outdir.iterdir()] == ["old.txt"]
    # --force replaces only a netp shard set (docs/design.md §8): never a folder of other files
    code, _, err = run_shard(["--ranks", "2", "--force", str(src), str(outdir)], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "not a netp shard set" in err
    assert [p.name for p in outdir.iterdir()] == ["old.txt"]
    (outdir / "old.txt").unlink()
    assert run_shard(["--ranks", "1", "--quiet", str(src), str(outdir)], capsys)[0] == 0
    code, _, err = run_shard(["--ranks", "2", "--force", str(src), str(outdir)], capsys)
    assert code == 0, err
    assert_shard_set_is_source(src, outdir, 2)
    # an empty existing folder is fine without --force
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_shard(["--ranks", "1", "--quiet", str(src), str(empty)], capsys)[0] == 0


def _refused(tmp_path: Path, args: list[str], capsys, outdir: Path, *needles: str) -> str:
    code, out, err = run_shard(args, capsys)
    lines = err.strip().splitlines()
    assert code != 0, out
    assert len(lines) == 1 and lines[0].startswith("shard: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not outdir.exists() or not any(outdir.iterdir())
    assert not [p for p in outdir.parent.iterdir() if ".netp-partial-" in p.name]
    return lines[0]


def test_refusals(sources, tmp_path, capsys):
    src = sources[("llama-gqa-4/2", "q4_0")]
    outdir = tmp_path / "out"
    _refused(tmp_path, ["--ranks", "0", str(src), str(outdir)], capsys, outdir, "--ranks", "at least 1")
    _refused(tmp_path, ["--ranks", "-2", str(src), str(outdir)], capsys, outdir, "--ranks")
    _refused(tmp_path, ["--ranks", "5", str(src), str(outdir)], capsys, outdir, str(src), "5 ranks", "4 attention heads")
    not_ne = tmp_path / "notes.txt"
    not_ne.write_text("hello, this is not a model\n" * 10)
    _refused(tmp_path, ["--ranks", "2", str(not_ne), str(outdir)], capsys, outdir, str(not_ne), "not an NE model file")
    _refused(tmp_path, ["--ranks", "2", str(tmp_path / "absent.bin"), str(outdir)], capsys, outdir, "no such file")
    _refused(tmp_path, ["--ranks", "2", str(src)], capsys, outdir, "missing OUTDIR")
    _refused(tmp_path, [str(src), str(outdir)], capsys, outdir, "--ranks")


def test_quantized_column_split_off_a_block_boundary_is_refused(tmp_path, capsys):
    # head_dim 16: wo's columns cut by query heads over 3 ranks fall inside q4_0 blocks (0:32, 32:48, 48:64)
    hp = hparams("llama", 4, 2, head_dim=16, n_ff=128, n_vocab=96, n_layer=1)
    src = write_ne(tmp_path / "m.bin", hp, "q4_0")
    outdir = tmp_path / "out"
    line = _refused(tmp_path, ["--ranks", "3", str(src), str(outdir)], capsys, outdir,
                    "layers.0.attention.wo.weight", "q4_0", "32", "head_dim 16")
    assert "block" in line
    # the same model cuts on block boundaries over 2 ranks (2 heads x 16 = 32 columns each) ...
    assert run_shard(["--ranks", "2", "--quiet", str(src), str(outdir)], capsys)[0] == 0
    assert_shard_set_is_source(src, outdir, 2)
    # ... and its f32 file over 3 ranks: only quantized blocks constrain column cuts
    f32 = write_ne(tmp_path / "m32.bin", hp, "f32")
    assert run_shard(["--ranks", "3", "--quiet", str(f32), str(tmp_path / "o32")], capsys)[0] == 0
    assert_shard_set_is_source(f32, tmp_path / "o32", 3)


def test_failure_midway_leaves_nothing(sources, tmp_path, capsys, monkeypatch):
    from netp.formats import ne

    src = sources[("gptj-4h", "q4_0")]
    outdir = tmp_path / "out"
    calls = {"n": 0}
    original = ne.NEWriter.write

    def failing_write(self, chunk):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device", str(self.tmp_path))
        return original(self, chunk)

    monkeypatch.setattr(ne.NEWriter, "write", failing_write)
    _refused(tmp_path, ["--ranks", "3", str(src), str(outdir)], capsys, outdir, "No space left")
    assert not outdir.exists()
    # and with --force over an existing set, the old set survives the failure
    monkeypatch.setattr(ne.NEWriter, "write", original)
    assert run_shard(["--ranks", "2", "--quiet", str(src), str(outdir)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in outdir.iterdir() if p.is_file()}
    calls["n"] = 0
    monkeypatch.setattr(ne.NEWriter, "write", failing_write)
    code, _, _ = run_shard(["--ranks", "3", "--force", str(src), str(outdir)], capsys)
    assert code != 0
    assert {p.name: p.read_bytes() for p in outdir.iterdir() if p.is_file()} == before


# -- the manifest module ----------------------------------------------------------------
@pytest.fixture(scope="module")
def good_set(sources, tmp_path_factory):
    from netp.shard.stage import shard_file

    outdir = tmp_path_factory.mktemp("good") / "s"
    shard_file(sources[("llama-gqa-4/2", "q4_0")], outdir, 3)
    return outdir


def _corrupt(good: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "bad"
    shutil.copytree(good, d)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _tensor(m: dict, name: str) -> dict:
    return next(t for t in m["tensors"] if t["name"] == name)


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(version=2), "version 2"),
    (lambda m: m.update(world_size=2), "ranks lists 3 files for world_size 2"),
    (lambda m: m["ranks"][1].update(file="rank-1.bin"), "rank-00001-of-00003.bin"),
    (lambda m: m["ranks"][0].update(sha256="xyz"), "sha256"),
    (lambda m: m["hparams"].pop("n_head"), "n_head"),
    (lambda m: m.update(architecture="bloom"), "bloom"),
    (lambda m: _tensor(m, "layers.0.attention.wq.weight")["ranges"].__setitem__(1, [70, 96]),
     "elements 64..70 are on no rank"),
    (lambda m: _tensor(m, "layers.0.attention.wq.weight")["ranges"].__setitem__(2, [96, 200]), "outside"),
    (lambda m: _tensor(m, "layers.0.attention.wo.weight")["ranges"].__setitem__(0, [0, 40]), "blocks"),
    (lambda m: _tensor(m, "layers.0.attention.wo.weight").update(axis=0), "axis"),
    (lambda m: _tensor(m, "norm.weight")["ranges"].__setitem__(1, None), "every rank"),
    (lambda m: _tensor(m, "output.weight").update(type="q5_k"), "q5_k"),
    (lambda m: m["tensors"].append(m["tensors"][0]), "listed twice"),
    (lambda m: m.update(tokenizer="../elsewhere"), "tokenizer"),
])
def test_load_manifest_refuses_bad_manifests(good_set, tmp_path, edit, needle):
    bad = _corrupt(good_set, tmp_path, edit)
    with pytest.raises(NetpError) as e:
        load_manifest(bad, architecture_names())
    assert e.value.path == str(bad / "manifest.json")
    assert needle in e.value.message


def test_load_manifest_round_trip_and_local_shapes(good_set, tmp_path):
    m = load_manifest(good_set)
    assert m.world_size == 3 and m.architecture == "llama" and m.tokenizer == "tokenizer"
    assert m.ne_header() == NEReader(good_set / rank_file_name(0, 3)).header
    for r in range(3):
        with NEReader(good_set / m.ranks[r].file) as rf:
            assert [t.name for t in m.tensors_of(r)] == list(rf.tensors)
            assert all(rf.tensors[t.name].shape == t.local_shape(r) for t in m.tensors_of(r))
    copy = tmp_path / "copy"
    copy.mkdir()
    m.save(copy)
    assert dataclasses.asdict(load_manifest(copy)) == dataclasses.asdict(m)
    (copy / "manifest.json").write_text('{"format": "netp-shards", ')
    with pytest.raises(NetpError, match="not valid JSON"):
        load_manifest(copy)
    with pytest.raises(NetpError, match="no such file"):
        load_manifest(tmp_path)


def test_rank_file_names():
    assert rank_file_name(0, 2) == "rank-00000-of-00002.bin"
    assert rank_file_name(11, 12) == "rank-00011-of-00012.bin"
    with pytest.raises(ValueError):
        rank_file_name(2, 2)


def test_incomplete_tokenizer_folder_is_refused(tmp_path, capsys):
    src = write_ne(tmp_path / "m.bin", hparams("llama", 4, 2, n_layer=1), "f32", tokenizer=True)
    (tmp_path / "m.tokenizer" / "tokenizer_config.json").unlink()
    outdir = tmp_path / "out"
    _refused(tmp_path, ["--ranks", "2", str(src), str(outdir)], capsys, outdir, "tokenizer_config.json")
    assert not outdir.exists()


# -- SmolLM2 (9 heads / 3 KV heads: uneven splits, a shared KV head) ------------------
def test_smollm2_q4_0_over_2_ranks(smollm2_q4_0, smollm2_shards2, capsys):
    m = assert_shard_set_is_source(smollm2_q4_0, smollm2_shards2, 2)
    assert m["architecture"] == "llama" and m["hparams"]["n_head"] == 9 and m["hparams"]["n_head_kv"] == 3
    hd = 64
    assert _ranges(m, "layers.0.attention.wq.weight") == [(0, 5 * hd), (5 * hd, 9 * hd)]
    assert _ranges(m, "layers.0.attention.wk.weight") == [(0, 2 * hd), (1 * hd, 3 * hd)]  # KV head 1 on both
    assert m["tokenizer"] == "tokenizer"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (smollm2_shards2 / "tokenizer" / f).read_bytes() == \
            (smollm2_q4_0.with_name(smollm2_q4_0.stem + ".tokenizer") / f).read_bytes()
    code, out, err = run_shard(["--check", str(smollm2_shards2)], capsys)
    assert code == 0 and "all checksums match" in out, out + err


def test_smollm2_q4_0_over_3_ranks(smollm2_q4_0, tmp_path, capsys):
    outdir = tmp_path / "s3"
    code, _, err = run_shard(["--ranks", "3", "--quiet", str(smollm2_q4_0), str(outdir)], capsys)
    assert code == 0, err
    m = assert_shard_set_is_source(smollm2_q4_0, outdir, 3)
    assert _ranges(m, "layers.0.attention.wq.weight") == [(0, 192), (192, 384), (384, 576)]
    assert _ranges(m, "layers.0.attention.wk.weight") == [(0, 64), (64, 128), (128, 192)]
    assert _ranges(m, "layers.0.feed_forward.w2.weight") == [(0, 512), (512, 1024), (1024, 1536)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_smollm2_f32_and_q4_0_cut_alike(smollm2_f32, smollm2_q4_0, world):
    """docs/design.md §4: cuts are multiples of 32 for every type, so both files' shard sets cut at the same places."""
    from netp.shard.stage import plan_split

    plans = []
    for src in (smollm2_f32, smollm2_q4_0):
        with NEReader(src) as r:
            plans.append([(e.name, e.split, e.axis, e.ranges) for e in plan_split(r, world)[2]])
    assert plans[0] == plans[1]


@pytest.mark.slow
def test_smollm2_f32_over_3_ranks(smollm2_f32, tmp_path, capsys):
    outdir = tmp_path / "s3"
    code, _, err = run_shard(["--ranks", "3", "--quiet", str(smollm2_f32), str(outdir)], capsys)
    assert code == 0, err
    m = assert_shard_set_is_source(smollm2_f32, outdir, 3)
    with NEReader(smollm2_f32) as s, NEReader(outdir / rank_file_name(2, 3)) as r2:
        w2 = "layers.3.feed_forward.w2.weight"
        a, b = _ranges(m, w2)[2]
        assert np.array_equal(r2.view(w2), s.view(w2)[:, a:b])
        a, b = _ranges(m, "output.weight")[2]
        assert np.array_equal(r2.view("output.weight"), s.view("output.weight")[a:b])
