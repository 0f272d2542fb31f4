"""The compiled decode step (runtime/fused.py) and the shared-memory all-reduce
(runtime/shmcomm.py), docs/design.md §5 "Compiled decode" and §9.

The compiled step must give the bits of the forward's Python layers for every
family whose layer it runs (biases, q/k norms, windows, rotated halves, an
explicit head_dim, KV groups straddling ranks, each block type), at 1 rank, on
simulated ranks (the all-reduce done by the caller) and under mpiexec (done
inside the call through shared memory). The shared all-reduce must equal the
ranks' sum in rank order, fall back to MPI beyond its buffer, and keep the
communicator's deadline: a stopped peer ends the job with one line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import teacher_forced
from netp.formats.constants import GGMLType
from netp.runtime.comm import run_world
from netp.runtime.model import load_rank_model
from test_families import FAMILIES, family_hf, family_ne, family_shards  # noqa: F401 - fixtures
from test_runtime import BIN, MPIEXEC, N_PROMPT, TOKENS, cli


def logits_both_ways(model: Path, ranks: int, nthread: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced logits of `model` on `ranks` simulated ranks of `nthread` threads, with the compiled
    decode step (asserted in use) and without it."""
    def rank(comm, compiled: bool):
        m = load_rank_model(model, comm, len(TOKENS), nthread=nthread, compiled_decode=compiled)
        try:
            assert (m.compiled is not None) == compiled
            return teacher_forced(m, TOKENS, N_PROMPT)
        finally:
            m.close()

    return tuple(run_world(lambda comm: rank(comm, c), ranks) for c in (True, False))  # type: ignore[return-value]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_decode_gives_the_python_layers_bits(family, family_ne, family_shards):
    # 3 ranks: 2 KV heads over 4 query heads straddle a rank (both ranks hold and cache that KV head);
    # 2 threads: the step's products split among them (results independent of the thread count)
    one_thread = None
    for model, ranks, nthread in ((family_ne(family, "q4_0"), 1, 1), (family_ne(family, "q4_0"), 1, 2),
                                  (family_shards(family, 3), 3, 1)):
        fused, python = logits_both_ways(model, ranks, nthread)
        assert np.abs(python).max() > 1
        assert np.array_equal(fused, python), (family, ranks, nthread, np.abs(fused - python).max())
        if ranks == 1:
            one_thread = fused if one_thread is None else one_thread
            assert np.array_equal(fused, one_thread), (family, nthread)


@pytest.mark.parametrize("qtype", [GGMLType.Q4_1, GGMLType.Q8_0])
def test_compiled_decode_each_block_type(qtype, family_ne, tmp_path):
    from netp.quantize.stage import quantize_file

    out = tmp_path / f"ne-{qtype.name.lower()}.bin"
    quantize_file(family_ne("llama3"), out, qtype)
    fused, python = logits_both_ways(out, 1)
    assert np.array_equal(fused, python)


def test_compiled_decode_not_taken_where_it_does_not_apply(family_ne, family_hf):
    """f32 matrices, --exact: the Python layers (the step is for block matrices against q8_0 activations)."""
    from netp.runtime.comm import SoloComm

    for model, load in ((family_ne("llama3"), {}), (family_ne("llama3", "q4_0"), {"exact": True})):
        m = load_rank_model(model, SoloComm(), 16, **load)
        try:
            assert m.compiled is None, load
        finally:
            m.close()


ALLREDUCE = r"""
import os, sys
import numpy as np
from netp.runtime.comm import mpi_world
from netp.runtime.shmcomm import BUFFER_BYTES
comm = mpi_world()
shared = comm.allgather(comm.shm is not None)
rng = np.random.default_rng(comm.rank)
big = BUFFER_BYTES // 8 + 1000  # past the buffer: through MPI
for shape, dtype in [((1, 576), np.float64), ((3, 100), np.float32), ((1, big), np.float64)] * 40:
    x = rng.standard_normal(shape).astype(dtype)
    every = comm.allgather(x)
    want = every[0].copy()
    for v in every[1:]:
        want += v
    got = comm.allreduce(x.copy())
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32)), (shape, dtype)
    assert len({g.tobytes() for g in comm.allgather(got)}) == 1  # the same bits on every rank
    widths = [3 + r for r in range(comm.size)]  # a gather of unequal slices, small and past the buffer
    for rows in (2, big // 3):
        part = np.full((rows, widths[comm.rank]), comm.rank, dtype=np.float32)
        full = comm.gather_cols(part, widths)
        assert (full is None) == (comm.rank != 0)
        if full is not None:
            assert np.array_equal(full, np.concatenate([np.full((rows, w), r, np.float32)
                                                        for r, w in enumerate(widths)], axis=1))
    for obj in ((7, False), "x" * (2 * big)):  # a token, and a pickle past the buffer
        assert comm.bcast(obj if comm.rank == 0 else None) == obj
if comm.rank == 0:
    print("shared memory" if all(shared) else "mpi" if not any(shared) else "mixed", flush=True)
"""


@pytest.mark.mpi
def test_shared_memory_allreduce_sums_in_rank_order(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE)
    for env, path in (({}, "shared memory"), ({"NETP_SHARED_MEMORY": "0"}, "mpi")):
        p = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, str(script)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, **env})
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == path


DECODE = r"""
import sys
import numpy as np
from conftest import teacher_forced
from netp.runtime.comm import mpi_world
from netp.runtime.model import load_rank_model
from netp.runtime.sources import resolve_model
comm = mpi_world()
tokens = [int(t) for t in sys.argv[2].split(",")]
out = []
for compiled in (True, False):
    m = load_rank_model(resolve_model(sys.argv[1]), comm, len(tokens), compiled_decode=compiled)
    assert (m.compiled is not None) == compiled and (not compiled or m.compiled.mode == 1)  # 1: shared memory
    out.append(teacher_forced(m, tokens, 7))
    m.close()
if comm.rank == 0:
    assert np.array_equal(out[0], out[1]), np.abs(out[0] - out[1]).max()
    print("equal", flush=True)
"""


@pytest.mark.mpi
def test_compiled_decode_under_mpiexec_through_shared_memory(family_shards, tmp_path):
    script = tmp_path / "decode.py"
    script.write_text(DECODE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    p = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, str(script), str(family_shards("qwen3", 3)),
                        ",".join(map(str, TOKENS))], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "equal"


def _rank_pids(launcher: int) -> dict[int, int]:
    """PMI rank -> pid of the processes mpiexec (pid `launcher`) started, found by their environment."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ne-run" in cmd and b"hydra" not in cmd:
            for kv in env:
                if kv.startswith(b"PMI_RANK="):
                    out[int(kv.split(b"=")[1])] = int(d.name)
    return out


@pytest.mark.mpi
def test_stopped_peer_ends_a_shared_memory_job_at_the_deadline(smollm2_shards2):
    """Rank 1 stopped (SIGSTOP) mid-generation: rank 0 waits in the shared-memory all-reduce, gives up at
    --timeout with one line naming rank 1, and the job ends."""
    cmd = [str(MPIEXEC), "-n", "2", str(BIN / "ne-run"), "-m", str(smollm2_shards2), "-p", "Once upon a time",
           "-n", "1500", "-c", "2048", "-t", "1", "--timeout", "3", "--seed", "5", "--temp", "1.0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: dict[int, int] = {}
    try:
        assert p.stdout is not None
        p.stdout.read(40)  # generation is under way
        pids = _rank_pids(p.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for pid in pids.values():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    lines = [ln for ln in err.splitlines() if "netp" in ln or "ne-run" in ln]
    assert len(lines) == 1 and "lost contact with rank 1: all-reduce not complete after 3 s (--timeout)" in lines[0], err
    assert waited >= 3, waited
