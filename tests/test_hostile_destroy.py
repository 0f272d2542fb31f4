"""Hostile paths, class 2 of issue 25: an input destroyed by its own output
(docs/design.md §8, "inputs are never written").

No output goes over, into or in place of an input (an output inside the
input folder, a tokenizer folder that is the input, an OUTDIR holding the
input), and `--force` removes only a netp shard set or an empty folder.
Every attack checks the watched folders byte for byte before and after.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hostile import attack
from hostile import ne_f32  # noqa: F401  (fixtures)
from test_fuzz import write_tiny_hf


@pytest.fixture()
def victim(tmp_path) -> Path:
    folder = tmp_path / "victim"
    write_tiny_hf(folder)
    return folder


@pytest.mark.parametrize("outfile, needle", [
    ("victim/model.safetensors", "lies inside the input folder"),
    ("victim/config.json", "lies inside the input folder"),
    ("victim/new.bin", "lies inside the input folder"),
    ("victim/sub/../new.bin", "lies inside the input folder"),
])
def test_convert_never_writes_into_its_input(victim, tmp_path, outfile, needle):
    (victim / "sub").mkdir()
    attack(["convert", "--outfile", str(tmp_path / outfile), str(victim)], [tmp_path], needle,
           names=tmp_path / outfile)


def test_convert_output_through_a_link_into_the_input(victim, tmp_path):
    os.symlink(victim / "model.safetensors", tmp_path / "out.bin")
    attack(["convert", "--outfile", str(tmp_path / "out.bin"), str(victim)], [tmp_path], "lies inside the input folder",
           names=tmp_path / "out.bin")


def test_convert_tokenizer_folder_is_never_the_input(tmp_path):
    """`convert --outfile foo.bin foo.tokenizer`: the tokenizer folder would be renamed over the input."""
    model = tmp_path / "foo.tokenizer"
    write_tiny_hf(model)
    attack(["convert", "--outfile", str(tmp_path / "foo.bin"), str(model)], [tmp_path], "is the input",
           names=tmp_path / "foo.tokenizer")


def test_convert_gguf_over_itself(tmp_path):
    from hostile import tiny_gguf

    model = tiny_gguf(tmp_path / "m.gguf")
    attack(["convert", "--outfile", str(model), str(model)], [tmp_path], "is the input", names=model)


def test_convert_into_a_hub_cache_snapshot(victim, tmp_path, monkeypatch):
    snapshot = _fake_hub_cache(victim, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = snapshot / "ne.bin"
    attack(["convert", "--outfile", str(out), "netp-test/tiny"], [tmp_path], "lies inside the input folder", names=out)


def _fake_hub_cache(folder: Path, cache: Path) -> Path:
    """Hugging Face's cache layout for repo netp-test/tiny: blobs/<sha> files and
    snapshots/<rev>/<name> symlinks to ../../blobs/<sha>, refs/main naming the rev."""
    import hashlib

    repo = cache / "models--netp-test--tiny"
    rev = "0" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            blob = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, repo / "blobs" / blob)
            os.symlink(f"../../blobs/{blob}", snapshot / f.name)
    return snapshot


def test_hub_cache_links_still_convert(victim, tmp_path, monkeypatch):
    """A checkpoint's own files may be links: the cache's snapshot links to blobs convert
    (weights, config and tokenizer files), and the tokenizer lands as regular files."""
    _fake_hub_cache(victim, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out" / "ne.bin"
    out.parent.mkdir()
    attack(["convert", "-q", "--outfile", str(out), "netp-test/tiny"], [tmp_path], ok=True,
           outputs=[out, out.with_name("ne.tokenizer")])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert not (out.with_name("ne.tokenizer") / f).is_symlink()
        assert (out.with_name("ne.tokenizer") / f).read_bytes() == (victim / f).read_bytes()


# -- quantize ---------------------------------------------------------------------
@pytest.mark.parametrize("out, needle", [
    ("a.bin", "is the input"),
    ("a.tokenizer/q.bin", "lies inside the input folder"),
    ("a.tokenizer", "is a directory"),
])
def test_quantize_never_writes_over_its_input(ne_f32, tmp_path, out, needle):
    # (a folder as OUT is click's usage error, which quotes the path its own way)
    attack(["quantize", str(ne_f32), str(tmp_path / out)], [tmp_path], needle,
           names=None if needle == "is a directory" else tmp_path / out)


def test_quantize_tokenizer_folder_linked_to_the_inputs(ne_f32, tmp_path):
    os.symlink(tmp_path / "a.tokenizer", tmp_path / "b.tokenizer")
    attack(["quantize", str(ne_f32), str(tmp_path / "b.bin")], [tmp_path], "is the input",
           names=tmp_path / "b.tokenizer")


# -- shard ------------------------------------------------------------------------
@pytest.mark.parametrize("make, outdir, needle", [
    ("userdata", "userdata", "is not a netp shard set"),
    (None, "a.tokenizer", "is the input"),
    (None, ".", "must be named plainly"),
    (None, "..", "must be named plainly"),
    ("shards", "shards/..", "must be named plainly"),
    ("shardset+stray", "set", "holds notes.txt, which is not part of its shard set"),
    ("file", "afile", "exists and is not a folder"),
    ("link", "linked", "is a symlink"),
    ("parent", "", "must be named plainly"),
], ids=["unrelated-folder", "input-tokenizer", "dot", "dotdot", "x-dotdot", "set-with-stray-file", "a-file",
        "symlinked", "cwd-as-empty"])
def test_shard_force_removes_only_a_shard_set(ne_f32, tmp_path, monkeypatch, make, outdir, needle):
    if make == "userdata":
        (tmp_path / "userdata").mkdir()
        (tmp_path / "userdata" / "thesis.tex").write_text("years of work")
    elif make == "shards":
        (tmp_path / "shards").mkdir()
    elif make == "shardset+stray":
        from netp.shard.stage import shard_file

        shard_file(ne_f32, tmp_path / "set", 1)
        (tmp_path / "set" / "notes.txt").write_text("mine")
    elif make == "file":
        (tmp_path / "afile").write_text("x")
    elif make == "link":
        (tmp_path / "real").mkdir()
        os.symlink(tmp_path / "real", tmp_path / "linked")
    monkeypatch.chdir(tmp_path)
    attack(["shard", "--ranks", "1", "--force", str(ne_f32), outdir], [tmp_path], needle)


def test_shard_outdir_holding_the_input(ne_f32, tmp_path):
    attack(["shard", "--ranks", "1", "--force", str(ne_f32), str(tmp_path)], [tmp_path], "holds the input",
           names=tmp_path)


@pytest.mark.parametrize("existing", ["shard set", "empty folder", "absent"])
def test_shard_force_replaces_a_shard_set_or_an_empty_folder(ne_f32, tmp_path, existing):
    from netp.formats.manifest import load_manifest
    from netp.shard.stage import shard_file

    outdir = tmp_path / "s"
    if existing == "shard set":
        shard_file(ne_f32, outdir, 2)
    elif existing == "empty folder":
        outdir.mkdir()
    attack(["shard", "-q", "--ranks", "1", "--force", str(ne_f32), str(outdir)], [tmp_path], ok=True,
           outputs=[outdir])
    assert load_manifest(outdir).world_size == 1
    assert sorted(p.name for p in outdir.iterdir()) == ["manifest.json", "rank-00000-of-00001.bin", "tokenizer"]
