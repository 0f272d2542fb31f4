"""Hostile conditions, class 4 of issue 25: failures that left debris or named
nothing (docs/design.md §8, "every failure, ENOSPC included, names the output
file and leaves no temporary behind").

A full disk is a small tmpfs mounted for the test (root only; always
unmounted), the output written into it, the inputs beside it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import write_stub_tokenizer
from hostile import attack
from test_fuzz import write_tiny_hf, write_tiny_ne


@pytest.fixture()
def small_disk(tmp_path):
    """A folder on a tmpfs of the size given: `small_disk(kib) -> Path`."""
    mounts: list[Path] = []

    def make(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                                               capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]


@pytest.mark.parametrize("kib", [8, 64, 192])
def test_convert_on_a_full_disk(tmp_path, small_disk, kib):
    model = tmp_path / "m"
    write_tiny_hf(model)
    disk = small_disk(kib)
    out = disk / "ne.bin"
    line = attack(["convert", "--outfile", str(out), str(model)], [tmp_path], "No space left on device", names=None)
    assert str(disk) in line  # the output (or its tokenizer folder) is named, not "internal error"
    assert _partials(disk) == []


@pytest.mark.parametrize("kib", [8, 24])
def test_quantize_on_a_full_disk(tmp_path, small_disk, kib):
    src = tmp_path / "a.bin"
    write_tiny_ne(src)
    write_stub_tokenizer(src)
    disk = small_disk(kib)
    out = disk / "q.bin"
    line = attack(["quantize", str(src), str(out)], [tmp_path], "No space left on device")
    assert str(disk) in line
    assert _partials(disk) == []


@pytest.mark.parametrize("kib", [8, 100])
def test_shard_on_a_full_disk(tmp_path, small_disk, kib):
    src = tmp_path / "a.bin"
    write_tiny_ne(src)
    write_stub_tokenizer(src)
    disk = small_disk(kib)
    line = attack(["shard", "--ranks", "2", str(src), str(disk / "s")], [tmp_path], "No space left on device")
    assert str(disk) in line
    assert _partials(disk) == []


def test_writer_abort_unlinks_when_the_flush_fails(tmp_path, small_disk):
    """NEWriter.abort closes (which flushes, which fails on a full disk) and still unlinks."""
    from netp.errors import NetpError
    from netp.formats.ne import NEHeader, NEWriter

    disk = small_disk(8)
    w = NEWriter(disk / "x.bin", NEHeader(n_vocab=1, n_embd=32, n_head=1, n_layer=1), [(b"a", 0.0)])
    w.begin_tensor("t", 0, (4096,))
    with pytest.raises(NetpError, match="No space left on device"):
        for _ in range(16):  # 16 KiB into an 8 KiB disk; the buffer holds the last of it
            w.write(np.zeros(256, dtype=np.float32))
        w.commit()
    w.abort()
    assert _partials(disk) == []


@pytest.mark.parametrize("field, value", [("n_head", 2 ** 31), ("n_embd", -(2 ** 31) - 1), ("norm_eps", float("nan")),
                                          ("freq_base", 1e39), ("max_seq_len", 1.5)])
def test_header_values_the_file_cannot_hold_are_refused_before_writing(tmp_path, field, value):
    from netp.errors import NetpError
    from netp.formats.ne import NEHeader, NEWriter

    header = NEHeader(n_vocab=1, n_embd=32, n_head=1, n_layer=1)
    setattr(header, field, value)
    with pytest.raises(NetpError, match=f"header field {field} = .* (does not fit|is not a finite float32)"):
        NEWriter(tmp_path / "x.bin", header, [(b"a", 0.0)])
    assert list(tmp_path.iterdir()) == []


def test_tensor_shape_past_int32_is_refused(tmp_path):
    from netp.errors import NetpError
    from netp.formats.ne import NEHeader, NEWriter

    w = NEWriter(tmp_path / "x.bin", NEHeader(n_vocab=1, n_embd=32, n_head=1, n_layer=1), [(b"a", 0.0)])
    with pytest.raises(NetpError, match="does not fit the NE format's int32"):
        w.begin_tensor("t", 0, (2, 2 ** 31))
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("outdir", ["link", "s/..", "s/../t"])
def test_indirect_outdir_refused_before_the_work(tmp_path, outdir):
    src = tmp_path / "a.bin"
    write_tiny_ne(src)
    write_stub_tokenizer(src)
    (tmp_path / "s").mkdir()
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    attack(["shard", "--ranks", "1", str(src), str(tmp_path / outdir)], [tmp_path], None,
           names=tmp_path / outdir)
