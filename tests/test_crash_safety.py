"""SIGKILL at random moments never leaves a bad output (issue 17).

convert, quantize, shard, pipeline and reshard are killed mid-run; afterwards the output name
either does not exist or holds a complete, valid file (or a shard set whose
checksums hold). Leftover temporaries carry the recognisable
`.netp-partial-` mark, and the next run of the same command removes them.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
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


@pytest.mark.parametrize("stage", ["convert", "quantize", "shard", "pipeline", "reshard"])
def test_sigkill_leaves_no_bad_output(stage, tmp_path, smollm2_gguf, smollm2_f32, smollm2_q4_0, smollm2_shards2):
    rng = random.Random(f"crash-{stage}")
    n_tensors = len(NEReader(smollm2_f32).tensors)
    if stage == "convert":
        out = tmp_path / "ne-f32.bin"
        argv = [str(BIN / "netp"), "convert", "--outtype", "f32", "--outfile", str(out), str(smollm2_gguf), "--quiet"]
        delays = [rng.uniform(0.5, 6.0) for _ in range(3)]
    elif stage == "quantize":
        out = tmp_path / "ne-q4_0.bin"
        argv = [str(BIN / "netp"), "quantize", str(smollm2_f32), str(out), "--type", "q4_0", "--quiet"]
        delays = [rng.uniform(0.3, 1.5) for _ in range(3)]
    elif stage == "shard":
        out = tmp_path / "shards"
        argv = [str(BIN / "shard"), "--ranks", "2", "--force", "--quiet", str(smollm2_q4_0), str(out)]
        delays = [rng.uniform(0.3, 1.2) for _ in range(3)]
    elif stage == "pipeline":  # ~15 s of work after start-up
        out = tmp_path / "shards"
        argv = [str(BIN / "netp"), "pipeline", str(smollm2_gguf), str(out), "--outtype", "q4_0", "--ranks", "2",
                "--force", "--quiet"]
        delays = [rng.uniform(2.0, 10.0) for _ in range(2)]
    else:
        out = tmp_path / "shards"
        argv = [str(BIN / "netp"), "reshard", str(smollm2_shards2), str(out), "--ranks", "3", "--force", "--quiet"]
        delays = [rng.uniform(0.5, 2.0) for _ in range(3)]
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
    assert killed, "every run finished before its kill: raise the delays"

    # A clean run afterwards succeeds and sweeps the dead runs' partials.
    subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True)
    assert _partials(tmp_path) == []
    if shard_set:
        check = subprocess.run([str(BIN / "shard"), "--check", str(out)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    else:
        _valid_ne(out, n_tensors)
