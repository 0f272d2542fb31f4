"""`netp inspect` on real files: the SmolLM2 GGUF, its NE f32/q4_0 files and
a 2-rank shard set; facts checked against gguf-py, NEReader and the manifest,
and a damaged shard set ending in one error line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

from netp.formats.manifest import load_manifest
from netp.formats.ne import NEReader

NETP = Path(sys.executable).parent / "netp"


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(NETP), "inspect", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_ne_json_matches_the_reader(smollm2_q4_0):
    p = inspect(smollm2_q4_0, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    with NEReader(smollm2_q4_0) as r:
        assert info["architecture"] == "llama" and info["vocab_size"] == len(r.vocab)
        assert info["header"]["n_layer"] == r.header.n_layer and info["header"]["n_head_kv"] == r.header.n_head_kv
        assert [t["name"] for t in info["tensors"]] == list(r.tensors)
        for t in info["tensors"]:
            ti = r.tensors[t["name"]]
            assert (t["offset"], t["nbytes"], tuple(t["shape"])) == (ti.offset, ti.nbytes, ti.shape)
        assert info["file_size"] == r.file_size
    totals = info["totals"]
    assert sum(v["tensors"] for v in totals.values()) == len(info["tensors"])
    assert set(totals) == {"f32", "q4_0"}
    assert info["hparams"]["n_head"] // info["hparams"]["n_head_kv"] == 3  # SmolLM2-135M: 9 heads, 3 KV heads


def test_ne_text_lists_every_tensor(smollm2_f32):
    p = inspect(smollm2_f32)
    assert p.returncode == 0, p.stderr
    with NEReader(smollm2_f32) as r:
        for name, t in r.tensors.items():
            assert any(line.split()[:3] == [name, "f32", "x".join(map(str, t.shape))] for line in p.stdout.splitlines())
        params = sum(int(np.prod(t.shape)) for t in r.tensors.values())
    assert f"{params} values" in p.stdout


def test_gguf_metadata_and_tensors_match_gguf_py(smollm2_gguf):
    p = inspect(smollm2_gguf, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    r = gguf.GGUFReader(smollm2_gguf)
    assert info["metadata"]["general.architecture"] == "llama"
    assert info["metadata"]["tokenizer.ggml.tokens"] == f"[{len(r.fields['tokenizer.ggml.tokens'].data)} items]"
    assert [(t["name"], t["type"], t["nbytes"]) for t in info["tensors"]] == \
        [(t.name, t.tensor_type.name.lower(), int(t.n_bytes)) for t in r.tensors]


def test_shard_set_rechecks_checksums(smollm2_shards2, tmp_path):
    p = inspect(smollm2_shards2)
    assert p.returncode == 0, p.stderr
    m = load_manifest(smollm2_shards2)
    for rank in m.ranks:
        assert f"{rank.file}: ok" in p.stdout
    assert "all checksums match" in p.stdout

    broken = tmp_path / "shards"
    shutil.copytree(smollm2_shards2, broken)
    victim = broken / m.ranks[1].file
    with open(victim, "r+b") as f:  # one byte deep in the last tensor's data
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 1]))
    p = inspect(broken)
    assert p.returncode == 1
    assert f"{m.ranks[1].file}: MISMATCH: sha256" in p.stdout and f"{m.ranks[0].file}: ok" in p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"netp inspect: error: {victim}: sha256 mismatch"), p.stderr


def test_debug_shows_the_wrapped_library_error_behind_the_same_line(tmp_path):
    broken = tmp_path / "shards"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"format": "netp-shards", "version": 1,,}')
    plain = inspect(broken)
    assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert plain.stderr.startswith(f"netp inspect: error: {broken / 'manifest.json'}: is not valid JSON"), plain.stderr
    debug = inspect(broken, "--debug")
    assert debug.returncode == 1 and debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()
    # the json module's own exception, chained as the cause of netp's one-line error
    assert "json.decoder.JSONDecodeError" in debug.stderr and "direct cause" in debug.stderr, debug.stderr


def test_files_for_rank_name_what_a_host_needs(smollm2_shards2):
    for rank in range(2):
        p = inspect(smollm2_shards2, "--files-for-rank", rank)
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == [str(smollm2_shards2 / f"rank-{rank:05d}-of-00002.bin"),
                                         str(smollm2_shards2 / "manifest.json"), str(smollm2_shards2 / "tokenizer")]
    p = inspect(smollm2_shards2, "--files-for-rank", 2)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == f"netp inspect: error: {smollm2_shards2 / 'manifest.json'}: --files-for-rank 2: the set has " \
                       f"ranks 0..1\n"
