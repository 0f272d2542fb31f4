"""The block kernels (netp.runtime.kernels) against numpy on gguf.quants' dequantized blocks."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import quants

from netp.formats.constants import GGMLType, block_geometry
from netp.runtime import kernels as K
from netp.runtime import simd

TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
SCALE_BYTES = {GGMLType.Q4_0: 2, GGMLType.Q4_1: 4, GGMLType.Q8_0: 2}


def random_blocks(rng: np.random.Generator, t: GGMLType, rows: int, n_in: int) -> np.ndarray:
    """Any code bytes (q8_0: every int8 including -128), finite random f16 scales (and q4_1 minimums)."""
    block, block_bytes = block_geometry(t)
    raw = rng.integers(0, 256, size=(rows, n_in // block, block_bytes), dtype=np.uint8)
    heads = rng.uniform(-0.05, 0.05, size=(rows, n_in // block, SCALE_BYTES[t] // 2)).astype(np.float16)
    raw[:, :, :SCALE_BYTES[t]] = heads.view(np.uint8)
    return raw.reshape(rows, -1)


def matrix(rng: np.random.Generator, t: GGMLType, rows: int, n_in: int, kind: str) -> np.ndarray:
    if kind == "random":
        return random_blocks(rng, t, rows, n_in)
    w = rng.standard_normal((rows, n_in)).astype(np.float32)
    if kind == "zeros":  # every other row all-zero blocks (d = 0), the rest quantized normally
        w[::2] = 0.0
    elif kind == "outlier":  # one large value per row dominates its block's scale
        w[np.arange(rows), rng.integers(0, n_in, rows)] = 1000.0
    return quants.quantize(w, t)


def reference(x: np.ndarray, raw: np.ndarray, t: GGMLType, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """(x' @ W.T, |x'| @ |W|.T) in float64, W = gguf's dequantized blocks, x' = x or its q8_0 round trip."""
    w = quants.dequantize(raw, t).astype(np.float64)
    xa = x if exact else quants.dequantize(quants.quantize(x, GGMLType.Q8_0), GGMLType.Q8_0)
    xa = xa.astype(np.float64)
    return xa @ w.T, np.abs(xa) @ np.abs(w).T


PATHS = [pytest.param(True, id=f"simd-{simd.ISA}", marks=pytest.mark.skipif(simd.ISA is None, reason="no AVX2 or AVX-512 VNNI")),
         pytest.param(False, id="portable")]


def products(x: np.ndarray, w: K.TiledBlocks, exact: bool, threads: int, use_simd: bool) -> np.ndarray:
    return K._matmul(x, w, exact, threads, False, use_simd)


@pytest.mark.parametrize("use_simd", PATHS)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name.lower())
@pytest.mark.parametrize("kind", ["random", "zeros", "outlier"])
@pytest.mark.parametrize("rows,n_in", [(64, 32), (37, 32), (130, 4096)])
@pytest.mark.parametrize("T", [1, 5, 9])
def test_matmul_matches_numpy_on_dequantized_blocks(t: GGMLType, kind: str, rows: int, n_in: int, T: int,
                                                     use_simd: bool) -> None:
    rng = np.random.default_rng(rows * 7 + n_in + T)
    raw = matrix(rng, t, rows, n_in, kind)
    cut = rows // 3  # two parts stacked by rows, cut inside a tile
    w = K.tile([raw[:cut], raw[cut:]], t)
    assert w.shape == (rows, n_in)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    x[0, 0] = 50.0  # an activation outlier too
    for exact in (False, True):
        ref, scale = reference(x, raw, t, exact)
        got = products(x, w, exact, 1, use_simd)
        assert got.shape == (T, rows) and got.dtype == np.float32
        # f32 sums of n_in terms: within a few ulps of the sum of magnitudes
        assert np.all(np.abs(got - ref) <= 2e-6 * scale + 1e-30), (exact, np.abs(got - ref).max())
        if kind == "zeros":
            assert np.all(got[:, ::2] == 0.0)
        for threads in (2, 3):  # no cross-thread sums
            assert np.array_equal(products(x, w, exact, threads, use_simd), got)


@pytest.mark.skipif(simd.ISA is None, reason="no AVX2 or AVX-512 VNNI")
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name.lower())
@pytest.mark.parametrize("T", [1, 2, 3, 4, 7])
def test_simd_and_portable_loops_give_the_same_bits(t: GGMLType, T: int) -> None:
    """The f64 partial sums themselves, which the all-reduce adds: equal to the last bit on both paths."""
    rng = np.random.default_rng(T)
    raw = matrix(rng, t, 200, 1024, "random")
    w = K.tile([raw], t)
    x = rng.standard_normal((T, 1024)).astype(np.float32) * 3
    a = K._matmul(x, w, False, 1, True, True)
    b = K._matmul(x, w, False, 2, True, False)
    assert a.dtype == np.float64 and np.array_equal(a, b)


@pytest.mark.parametrize("use_simd", PATHS)
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name.lower())
def test_prefill_equals_row_by_row(t: GGMLType, use_simd: bool) -> None:
    """T rows in one call (each tile decoded once) give each row's decode result."""
    rng = np.random.default_rng(3)
    w = K.tile([matrix(rng, t, 100, 256, "random")], t)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    for exact in (False, True):
        together = products(x, w, exact, 1, use_simd)
        apart = np.concatenate([products(x[i:i + 1], w, exact, 1, use_simd) for i in range(6)])
        assert np.array_equal(together, apart)


def test_q8_activations_match_gguf_including_half_ties() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4096)).astype(np.float32) * np.float32(3.0)
    # a block whose codes hit exact .5 ties: max 127 -> d = 1, id = 1; half away from zero gives 3, -4, 1, -1
    x[0, :32] = 0.0
    x[0, :5] = [127.0, 2.5, -3.5, 0.5, -0.5]
    x[1, 32:64] = 0.0  # an all-zero block: d = 0, codes 0
    x[2, 64:96] = 1e-6  # a scale below f16's normal range (subnormal d)
    x[2, 96:128] = 70000.0  # a large block (d = 70000 / 127, still a normal f16)
    xq, xd, xs = K.quantize_q8(x)
    expect = quants.quantize(x, GGMLType.Q8_0).reshape(3, -1, 34)
    assert np.array_equal(xq.view(np.uint8), expect[:, :, 2:])
    assert np.array_equal(xd, expect[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32))
    assert np.array_equal(xs, xq.astype(np.int32).sum(axis=2))
    assert list(xq[0, 0, :5]) == [127, 3, -4, 1, -1]


def test_f16_scale_rounding_matches_numpy() -> None:
    """The activation scale is kept as its f16 value, rounded like numpy's astype(np.float16)."""
    rng = np.random.default_rng(5)
    v = np.concatenate([
        np.exp(rng.uniform(np.log(1e-9), np.log(6e4), 20000)),  # subnormal through large normal f16
        [0.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 65504.0, 65519.0, 65520.0, 1e6],
        np.float32(1.0) + np.arange(-4, 5) * np.float32(2.0 ** -11),  # ties at 1.0 +- half an f16 ulp
    ]).astype(np.float32)
    got = np.array([K._f16_value(np.float32(a)) for a in v], dtype=np.float32)
    with np.errstate(over="ignore"):  # 65520 and above become inf, as intended
        expect = v.astype(np.float16).astype(np.float32)
    assert np.array_equal(got, expect)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name.lower())
def test_tiled_layout_and_size(t: GGMLType) -> None:
    """Tiles of 64 rows, codes [tile][block][word][row][4] (q8_0's + 128), f16 scales [tile][block][row];
    padding rows are zero blocks; the tiles hold exactly the file's bytes; packing threads change nothing."""
    rng = np.random.default_rng(6)
    raw = matrix(rng, t, 128, 256, "random")
    w = K.tile([raw], t)
    head = SCALE_BYTES[t]
    words = 8 if t == GGMLType.Q8_0 else 4
    assert w.qs.shape == (2, 8, words, 64, 4) and w.qs.dtype == np.uint8
    assert w.d.shape == (2, 8, 64) and w.d.dtype == np.float16
    blocks = raw.reshape(128, 8, -1)
    codes = blocks[64 + 5, 3, head:]
    if t == GGMLType.Q8_0:
        codes = codes ^ np.uint8(0x80)
    assert np.array_equal(w.qs[1, 3, :, 5, :].reshape(-1), codes)
    assert w.d[1, 3, 5] == blocks[64 + 5, 3, :2].view(np.float16)[0]
    if t == GGMLType.Q4_1:
        assert w.m[1, 3, 5] == blocks[64 + 5, 3, 2:4].view(np.float16)[0]
    assert w.nbytes == raw.nbytes
    short = K.tile([raw[:70]], t)
    assert short.qs.shape[0] == 2 and not short.qs[1, :, :, 6:].any() and not short.d[1, :, 6:].any()
    cut = K.tile([raw[:1], raw[1:70]], t, threads=2)  # parts cut inside a tile, packed by 2 threads
    assert np.array_equal(cut.qs, short.qs) and np.array_equal(cut.d.view(np.uint16), short.d.view(np.uint16))


def test_warm_up_reports_cache_use() -> None:
    first = K.warm_up()
    assert first.seconds >= 0.0 and K.warm_up() is first  # once per process


_START = """
import sys
import numpy as np
from netp.formats.constants import GGMLType
from netp.runtime import kernels as K
from gguf import quants
start = K.warm_up()
rng = np.random.default_rng(7)
w = K.tile([quants.quantize(rng.standard_normal((70, 256)).astype(np.float32), GGMLType.Q4_1)], GGMLType.Q4_1)
y = K.matmul(rng.standard_normal((3, 256)).astype(np.float32), w, threads=2)
print(int(start.compiled), y.tobytes().hex())
"""


@pytest.mark.slow
def test_two_ranks_starting_at_once_share_one_compile(tmp_path) -> None:
    """Two processes on an empty cache folder: one compiles, the other waits and loads; a third loads too."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONWARNINGS": "error::UserWarning"}

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _START], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    both = [start(), start()]
    outs = [p.communicate(timeout=600) for p in both]
    assert all(p.returncode == 0 for p in both), [err for _, err in outs]
    assert not any("Numba" in err or "cache" in err.lower() for _, err in outs), [err for _, err in outs]
    compiled = sorted(out.split()[0] for out, _ in outs)
    assert compiled == ["0", "1"]  # one compile, one load of it
    third = start()
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0 and out.split()[0] == "0", err
    assert len({o.split()[1] for o, _ in outs} | {out.split()[1]}) == 1  # the same bits from every start


_ON_ANOTHER_CPU = """
from netp.runtime import simd
from tests.test_kernels import portable_case
print(simd.ISA, portable_case())
"""

def portable_case() -> str:
    """The f64 partial sums of every type at T = 1 and 6, as hex: the same bits on every path and CPU."""
    rng = np.random.default_rng(8)
    out = []
    for t in TYPES:
        w = K.tile([random_blocks(rng, t, 70, 256)], t)
        for T in (1, 6):
            out.append(K.matmul(rng.standard_normal((T, 256)).astype(np.float32), w, partial=True).tobytes().hex())
    return ",".join(out)


# (CPU name, features) numba is told to compile for, and the products' path it must take there
OTHER_CPUS = {"avx2": ("haswell", "+avx2,+avx,+fma,+f16c,+sse4.2,+popcnt,+bmi2"),
              "None": ("nehalem", "+sse4.2,+popcnt")}


@pytest.mark.parametrize("isa", sorted(OTHER_CPUS))
def test_another_cpu_takes_its_own_path_with_the_same_bits(tmp_path, isa: str) -> None:
    """numba told to compile for a Haswell (AVX2, no AVX-512) or a Nehalem (no AVX): the kernels take the
    AVX2 products or the portable loops, never code for a CPU the target lacks, and give the bits this
    machine's path gives. A path equal to this machine's is covered by the tests above."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if isa == str(simd.ISA):
        pytest.skip(f"this machine's own path ({isa}) is tested in process")
    name, features = OTHER_CPUS[isa]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CPU_NAME": name,
           "NUMBA_CPU_FEATURES": features, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    p = subprocess.run([sys.executable, "-c", _ON_ANOTHER_CPU], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    chosen, bits = p.stdout.split()
    assert chosen == isa
    assert bits == portable_case()


def test_the_drivers_python_calls_release_the_gil():
    """A load's sha256 thread and ranks simulated as threads run beside these calls only when they do
    not hold the GIL (measured: 2 simulated ranks of the 8B shape decoded at 6.9 tok/s with it, 14.0
    without)."""
    from netp.models import compiled

    entry = [K._pack_serial, K._quantize_q8, K._q8_serial, K._simd_serial,
             K._f32_serial, compiled.rms_norm_into, compiled.silu_mul, compiled.attend_one]
    assert [f.py_func.__name__ for f in entry if not f.targetoptions.get("nogil")] == []
