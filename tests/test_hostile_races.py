"""Hostile timing, class 9 of issue 25: two `shard` runs into one empty OUTDIR
both exited 0, the later silently replacing the earlier (docs/design.md §8).

The set is renamed onto OUTDIR in one rename(2), which succeeds only onto an
absent or empty folder: the run that finishes second is refused, whatever
the interleaving, and the first run's set stays whole.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostile import ATTACKS
from hostile import ne_f32  # noqa: F401  (fixtures)

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("force", [False, True])
def test_the_run_that_finishes_second_is_refused(ne_f32, tmp_path, monkeypatch, force):
    """The race window itself: another run fills OUTDIR after this one checked it was empty."""
    from netp.errors import NetpError
    from netp.formats.manifest import load_manifest
    from netp.shard import stage

    ATTACKS.append(["shard", "race", str(force)])
    outdir = tmp_path / "s"
    outdir.mkdir()
    real_finish = stage._finish
    other = {"done": False}

    def finish_after_the_other_run(tmp, manifest):
        real_finish(tmp, manifest)
        if not other["done"]:
            other["done"] = True
            # the other run (another process: its own temporary name) claims the folder this one checked
            stage.shard_file(ne_f32, tmp_path / "elsewhere" / "s", 1)
            os.rename(tmp_path / "elsewhere" / "s", outdir)
            if force:  # and something the other user put there meanwhile
                (outdir / "theirs.txt").write_text("mine")

    monkeypatch.setattr(stage, "_finish", finish_after_the_other_run)
    match = "holds theirs.txt" if force else "was filled by someone else"
    with pytest.raises(NetpError, match=match):
        stage.shard_file(ne_f32, outdir, 2, force=force)
    assert load_manifest(outdir).world_size == 1  # the other run's set, whole
    assert not [p for p in tmp_path.iterdir() if ".netp-partial-" in p.name]
    assert sorted(p.name for p in outdir.iterdir()) == sorted(["manifest.json", "rank-00000-of-00001.bin", "tokenizer"]
                                                              + (["theirs.txt"] if force else []))


def test_two_concurrent_shard_runs_into_one_empty_folder(ne_f32, tmp_path):
    ATTACKS.append(["shard", "concurrent"])
    outdir = tmp_path / "s"
    outdir.mkdir()
    runs = [subprocess.Popen([str(BIN / "shard"), "--ranks", str(n), "-q", str(ne_f32), str(outdir)],
                             stderr=subprocess.PIPE, text=True) for n in (1, 2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    err = next(e for code, e in results if code != 0).strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"shard: error: {outdir}: "), err
    from netp.shard.check import check_shard_set

    assert check_shard_set(outdir).ok
    assert not [p for p in tmp_path.iterdir() if ".netp-partial-" in p.name]
