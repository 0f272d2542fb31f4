"""SIGKILL at random moments never leaves a bad output (issue 17).

convert, quantize, shard, pipeline and reshard are killed mid-run; afterwards the output name
either does not exist or holds a complete, valid file (or a shard set whose
checksums hold). Leftover temporaries carry the recognisable
`.netp-partial-` mark, and the next run of the same command removes them.
"""
from __future__ import annotations

import random
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netp.formats.ne import NEReader

BIN = Path(sys.executable).parent


def _kill_after(argv: list[str], delay: float, cwd: Path) -> int | None:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return proc.returncode  # finished before the kill
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _valid_ne(path: Path, n_tensors: int) -> None:
    with NEReader(path) as r:
        assert len(r.tensors) == n_tensors
        assert max(t.offset + t.nbytes for t in r.tensors.values()) == r.file_size


def _partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".netp-partial-" in p.name]


def _argv(stage: str, out: Path, gguf: Path, f32: Path, q4_0: Path, shards2: Path) -> list[str]:
    netp = str(BIN / "netp")
    return {
        "convert": [netp, "convert", "--outtype", "f32", "--outfile", str(out), str(gguf), "--quiet"],
        "quantize": [netp, "quantize", str(f32), str(out), "--type", "q4_0", "--quiet"],
        "shard": [str(BIN / "shard"), "--ranks", "2", "--force", "--quiet", str(q4_0), str(out)],
        "pipeline": [netp, "pipeline", str(gguf), str(out), "--outtype", "q4_0", "--ranks", "2", "--force",
                     "--quiet"],
        "reshard": [netp, "reshard", str(shards2), str(out), "--ranks", "3", "--force", "--quiet"],
    }[stage]


# convert and pipeline (35-40 s each here) run in `make test-slow`: quantize, shard and reshard go through
# the same atomic writes (formats/atomic.py) in `make test`.
@pytest.mark.parametrize("stage", [pytest.param("convert", marks=pytest.mark.slow), "quantize", "shard",
                                   pytest.param("pipeline", marks=pytest.mark.slow), "reshard"])
def test_sigkill_leaves_no_bad_output(stage, tmp_path, smollm2_gguf, smollm2_f32, smollm2_q4_0, smollm2_shards2):
    rng = random.Random(f"crash-{stage}")
    n_tensors = len(NEReader(smollm2_f32).tensors)
    out = tmp_path / ("shards" if stage in ("shard", "pipeline", "reshard") else f"ne-{stage}.bin")
    inputs = (smollm2_gguf, smollm2_f32, smollm2_q4_0, smollm2_shards2)
    argv = _argv(stage, out, *inputs)
    # The kills land at random points of a whole run as timed here and now (start-up included), so
    # they fall mid-run on a fast machine and on a loaded one alike.
    timing = tmp_path / "timing"
    timing.mkdir()
    t0 = time.perf_counter()
    subprocess.run(_argv(stage, timing / out.name, *inputs), cwd=timing, check=True, capture_output=True)
    whole = time.perf_counter() - t0
    shutil.rmtree(timing)
    delays = [whole * rng.uniform(0.2, 0.9) for _ in range(3)]
    shard_set = stage in ("shard", "pipeline", "reshard")

    killed = 0
    for delay in delays:
        if _kill_after(argv, delay, tmp_path) is None:
            killed += 1
        if shard_set:
            if out.exists():
                check = subprocess.run([str(BIN / "shard"), "--check", str(out)], capture_output=True, text=True)
                assert check.returncode == 0, check.stdout + check.stderr
        elif out.exists():
            _valid_ne(out, n_tensors)
        for name in _partials(tmp_path):  # the output's, or its tokenizer folder's (`<stem>.tokenizer`)
            assert name.startswith((f".{out.name}.netp-partial-", f".{out.stem}.tokenizer.netp-partial-"))
    assert killed, f"every run finished before its kill (a whole run took {whole:.1f} s)"

    # A clean run afterwards succeeds and sweeps the dead runs' partials.
    subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True)
    assert _partials(tmp_path) == []
    if shard_set:
        check = subprocess.run([str(BIN / "shard"), "--check", str(out)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    else:
        _valid_ne(out, n_tensors)
