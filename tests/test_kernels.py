"""The block kernels (netp.runtime.kernels) against numpy on gguf.quants' dequantized blocks."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import quants

from netp.formats.constants import GGMLType, block_geometry
from netp.runtime import kernels as K

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


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name.lower())
@pytest.mark.parametrize("kind", ["random", "zeros", "outlier"])
@pytest.mark.parametrize("rows,n_in", [(64, 32), (37, 32), (130, 4096)])
@pytest.mark.parametrize("T", [1, 5])
def test_matmul_matches_numpy_on_dequantized_blocks(t: GGMLType, kind: str, rows: int, n_in: int, T: int) -> None:
    rng = np.random.default_rng(rows * 7 + n_in + T)
    raw = matrix(rng, t, rows, n_in, kind)
    cut = rows // 3  # two parts stacked by rows, cut inside a tile
    w = K.tile([raw[:cut], raw[cut:]], t)
    assert w.shape == (rows, n_in)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    x[0, 0] = 50.0  # an activation outlier too
    for exact in (False, True):
        ref, scale = reference(x, raw, t, exact)
        got = K.matmul(x, w, exact=exact, threads=1)
        assert got.shape == (T, rows) and got.dtype == np.float32
        # f32 sums of n_in terms: within a few ulps of the sum of magnitudes
        assert np.all(np.abs(got - ref) <= 2e-6 * scale + 1e-30), (exact, np.abs(got - ref).max())
        if kind == "zeros":
            assert np.all(got[:, ::2] == 0.0)
        assert np.array_equal(K.matmul(x, w, exact=exact, threads=2), got)  # no cross-thread sums


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name.lower())
def test_prefill_equals_row_by_row(t: GGMLType) -> None:
    """T rows in one call (each tile decoded once) give each row's decode result."""
    rng = np.random.default_rng(3)
    w = K.tile([matrix(rng, t, 100, 256, "random")], t)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    for exact in (False, True):
        together = K.matmul(x, w, exact=exact)
        apart = np.concatenate([K.matmul(x[i:i + 1], w, exact=exact) for i in range(6)])
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


def test_tiled_layout_and_size() -> None:
    """Tiles of 64 rows, [tile][block][byte][row]; padding rows are zero blocks; q4_0 is 0.625 bytes a weight."""
    rng = np.random.default_rng(6)
    raw = matrix(rng, GGMLType.Q4_0, 128, 256, "random")
    w = K.tile([raw], GGMLType.Q4_0)
    assert w.qs.shape == (2, 8, 16, 64) and w.d.shape == (2, 8, 64)
    blocks = raw.reshape(128, 8, 18)
    assert np.array_equal(w.qs[1, 3, :, 5], blocks[64 + 5, 3, 2:])
    assert w.nbytes == 128 * 256 * 0.625
    short = K.tile([raw[:70]], GGMLType.Q4_0)
    assert short.qs.shape[0] == 2 and not short.qs[1, :, :, 6:].any() and not short.d[1, :, 6:].any()


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
