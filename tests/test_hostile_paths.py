"""Hostile paths, class 3 of issue 25: names read from files followed out of
their place, and what the tokenizer folder may carry (docs/design.md §8,
"plain names only", "the tokenizer folder holds known files only").
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from hostile import attack
from hostile import ne_f32, shard_set  # noqa: F401  (fixtures)
from test_fuzz import write_tiny_hf


@pytest.fixture()
def sharded_hf(tmp_path) -> Path:
    """The tiny HF folder with its weights behind a sharded index (one shard file)."""
    folder = tmp_path / "m"
    write_tiny_hf(folder)
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(folder / "model-00001-of-00001.safetensors", "numpy") as f:
        names = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    return folder


@pytest.mark.parametrize("entry", ["../outside/x.safetensors", "/etc/passwd", "..", "sub/x.safetensors", ""])
def test_index_entries_are_plain_names(sharded_hf, tmp_path, entry):
    (tmp_path / "outside").mkdir()
    shutil.copyfile(sharded_hf / "model-00001-of-00001.safetensors", tmp_path / "outside" / "x.safetensors")
    index = sharded_hf / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = entry
    index.write_text(json.dumps(data))
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(sharded_hf)], [tmp_path],
           "is not a plain file name inside its folder", names=index)


@pytest.mark.parametrize("weight_map", [[], {}, "x", None, {"a": 3}])
def test_index_of_the_wrong_shape(sharded_hf, tmp_path, weight_map):
    index = sharded_hf / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(sharded_hf)], [tmp_path], None, names=index)


def test_sharded_index_baseline_converts(sharded_hf, tmp_path):
    out = tmp_path / "ne.bin"
    attack(["convert", "-q", "--outfile", str(out), str(sharded_hf)], [tmp_path], ok=True,
           outputs=[out, tmp_path / "ne.tokenizer"])


# -- tokenizer files of an HF folder: links may not lead out of the checkpoint ----------
def test_hf_tokenizer_link_to_a_private_file(tmp_path):
    model = tmp_path / "m"
    write_tiny_hf(model)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"api_key": "hunter2"}))
    secret.chmod(0o600)
    (model / "tokenizer_config.json").unlink()
    os.symlink(secret, model / "tokenizer_config.json")
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)], [tmp_path],
           "is a symlink to the private file", names=model / "tokenizer_config.json")


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000])
def test_hf_tokenizer_files_are_checked(tmp_path, content):
    model = tmp_path / "m"
    write_tiny_hf(model)
    (model / "special_tokens_map.json").write_bytes(content)
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)], [tmp_path], None,
           names=model / "special_tokens_map.json")


# -- netp's own tokenizer folders (quantize and shard copy them) ------------------------
def _quantize_args(src, tmp_path):
    return ["quantize", str(src), str(tmp_path / "q.bin")]


def _shard_args(src, tmp_path):
    return ["shard", "--ranks", "1", str(src), str(tmp_path / "s")]


@pytest.mark.parametrize("args", [_quantize_args, _shard_args], ids=["quantize", "shard"])
@pytest.mark.parametrize("how", ["link-to-private", "link-inside", "fifo", "folder-link"])
def test_links_in_a_tokenizer_folder_are_refused(ne_f32, tmp_path, args, how):
    tok = tmp_path / "a.tokenizer"
    secret = tmp_path / "secret.json"
    secret.write_text('{"private": true}')
    secret.chmod(0o600)
    if how == "link-to-private":
        (tok / "tokenizer_config.json").unlink()
        os.symlink(secret, tok / "tokenizer_config.json")
        names = tok / "tokenizer_config.json"
    elif how == "link-inside":
        (tok / "special_tokens_map.json").symlink_to("tokenizer_config.json")
        names = tok / "special_tokens_map.json"
    elif how == "fifo":
        os.mkfifo(tok / "chat_template.jinja")
        names = tok / "chat_template.jinja"
    else:
        os.rename(tok, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", tok)
        names = tok
    attack(args(ne_f32, tmp_path), [tmp_path], None, names=names, timeout=20)


@pytest.mark.parametrize("args, folder", [(_quantize_args, "q.tokenizer"), (_shard_args, "s/tokenizer")],
                         ids=["quantize", "shard"])
def test_tokenizer_folder_carries_known_files_as_regular_files(ne_f32, tmp_path, args, folder):
    tok = tmp_path / "a.tokenizer"
    (tok / "tokenizer.json").chmod(0o600)  # a private mode is not copied: the output gets the normal one
    (tok / "notes.txt").write_text("stays behind")
    (tok / "chat_template.jinja").write_text("{{ messages }}")
    outputs = [tmp_path / "q.bin", tmp_path / "q.tokenizer", tmp_path / "s"]
    attack(args(ne_f32, tmp_path), [tmp_path], ok=True, outputs=outputs)
    out = tmp_path / folder
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        st = os.lstat(f)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666 & ~umask, f
        assert f.read_bytes() == (tok / f.name).read_bytes()


@pytest.mark.parametrize("content", [b"not json", b"\xff", b"[" * 100_000, b"[]"])
def test_netp_tokenizer_files_are_checked(ne_f32, tmp_path, content):
    (tmp_path / "a.tokenizer" / "tokenizer.json").write_bytes(content)
    attack(_shard_args(ne_f32, tmp_path), [tmp_path], None, names=tmp_path / "a.tokenizer" / "tokenizer.json")


# -- names inside a manifest -----------------------------------------------------------
def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field, value, needle", [
    ("source.name", "../secret.txt", "source.name '../secret.txt' is not a plain file name"),
    ("source.name", "/etc/passwd", "is not a plain file name"),
    ("tokenizer", "../a.tokenizer", "expected a folder name inside the shard set"),
    ("tokenizer", "/tmp", "expected a folder name inside the shard set"),
    ("ranks.0.file", "../a.bin", "expected 'rank-00000-of-00002.bin'"),
    ("tokenizer_files.0.file", "../../a.bin", "not one of the tokenizer files netp knows"),
    ("tokenizer_files.0.file", "notes.txt", "not one of the tokenizer files netp knows"),
    ("tokenizer_files", None, "expected a list of the tokenizer folder's files"),
])
@pytest.mark.parametrize("command", ["verify", "run", "check", "inspect"])
def test_manifest_names_are_plain(shard_set, tmp_path, field, value, needle, command):
    (tmp_path / "secret.txt").write_text("private")

    def edit(data):
        parts = field.split(".")
        obj = data
        for p in parts[:-1]:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        obj[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value

    _edit_manifest(shard_set, edit)
    args = {"verify": ["verify", str(shard_set)], "run": ["run", "-m", str(shard_set), "--ids", "1,2", "-n", "1"],
            "check": ["shard", "--check", str(shard_set)], "inspect": ["inspect", str(shard_set)]}[command]
    attack(args, [tmp_path], needle, names=shard_set / "manifest.json")


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("change", ["swapped", "linked", "extra"])
def test_tokenizer_files_are_checksummed(shard_set, tmp_path, command, change):
    tok = shard_set / "tokenizer"
    if change == "swapped":
        (tok / "tokenizer.json").write_text('{"model": {"type": "WordLevel"}}')
    elif change == "linked":
        data = (tok / "tokenizer.json").read_bytes()
        (tmp_path / "elsewhere.json").write_bytes(data)
        (tok / "tokenizer.json").unlink()
        os.symlink(tmp_path / "elsewhere.json", tok / "tokenizer.json")
    else:
        (tok / "special_tokens_map.json").write_text("{}")
    if command == "check":
        attack(["shard", "--check", str(shard_set)], [tmp_path], None, names=tok / ("special_tokens_map.json"
                                                                                    if change == "extra" else
                                                                                    "tokenizer.json"))
    elif change != "extra":  # the runtime reads tokenizer.json only, after checking it
        attack(["run", "-m", str(shard_set), "-p", "hi", "-n", "1"], [tmp_path], None, names=tok / "tokenizer.json")
