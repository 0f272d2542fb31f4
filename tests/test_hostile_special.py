"""Hostile inputs, class 7 of issue 25 (and the manifest half of class 1):
FIFOs, devices and giant side files (docs/design.md §8, "no special files").

A FIFO blocked every stage until killed, and a manifest that is /dev/zero
grew RSS to 24 GB; now each is refused before it is read. The harness' alarm
(10 s) and memory bound turn a hang or a big allocation into a failure.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostile import attack
from hostile import ne_f32, shard_set  # noqa: F401  (fixtures)
from test_fuzz import write_tiny_hf


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("stage", ["convert", "quantize", "shard", "run", "inspect", "verify"])
@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/null"])
def test_a_special_file_as_the_input(tmp_path, stage, special):
    model = _fifo(tmp_path / "m.bin") if special == "fifo" else Path(special)
    args = {"convert": ["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)],
            "quantize": ["quantize", str(model), str(tmp_path / "q.bin")],
            "shard": ["shard", "--ranks", "1", str(model), str(tmp_path / "s")],
            "run": ["run", "-m", str(model), "--ids", "1", "-n", "1"],
            "inspect": ["inspect", str(model)],
            "verify": ["verify", str(model)]}[stage]
    attack(args, [tmp_path], "is a FIFO" if special == "fifo" else "is a character device", names=model, timeout=10)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "model.safetensors.index.json",
                                  "tokenizer.model"])
def test_a_fifo_inside_an_hf_folder(tmp_path, name):
    model = tmp_path / "m"
    write_tiny_hf(model)
    (model / name).unlink(missing_ok=True)
    _fifo(model / name)
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)], [tmp_path], "is a FIFO",
           names=model / name, timeout=10)


def test_a_gguf_fifo(tmp_path):
    model = _fifo(tmp_path / "m.gguf")
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)], [tmp_path], "is a FIFO", names=model,
           timeout=10)


@pytest.mark.parametrize("command", ["run", "verify", "inspect", "check", "ne-run -t"])
@pytest.mark.parametrize("manifest", ["fifo", "/dev/zero", "/dev/urandom", "2 GiB", "a folder"])
def test_manifest_that_never_ends(shard_set, tmp_path, command, manifest):
    path = shard_set / "manifest.json"
    path.unlink()
    if manifest == "fifo":
        _fifo(path)
    elif manifest.startswith("/dev/"):
        os.symlink(manifest, path)
    elif manifest == "2 GiB":
        with open(path, "wb") as f:
            f.truncate(2 << 30)
    else:
        path.mkdir()
    args = {"run": ["run", "-m", str(shard_set), "--ids", "1", "-n", "1"],
            "ne-run -t": ["run", "-m", str(shard_set), "--ids", "1", "-n", "1", "-t", "1"],
            "verify": ["verify", str(shard_set)], "inspect": ["inspect", str(shard_set)],
            "check": ["shard", "--check", str(shard_set)]}[command]
    attack(args, [tmp_path], None, names=path, timeout=10)
