"""Fuzzing every stage with truncated and corrupted inputs (issue 17).

`make test` runs at least 200 seeded cases; `make test-slow` at least 2,000.
Each case must end in a correct result or a one-line error with a non-zero
exit, no traceback, no hang and nothing under the output name (see
fuzz_harness). The counts and outcome classes are printed.
"""
from __future__ import annotations

import importlib
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fuzz_harness import classify, flip_bytes, run_command, truncation_points
from netp.formats.constants import GGMLType
from netp.formats.ne import NEHeader, NEReader, NEWriter
from netp.models import by_name
from netp.models.base import HParams

TINY = HParams(arch="llama", n_vocab=64, n_embd=64, n_head=2, n_head_kv=1, n_layer=1, n_ff=64, n_rot=32,
               norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)


def command(name: str):
    module, attr = {
        "convert": ("netp.convert.cli", "convert_command"), "quantize": ("netp.quantize.cli", "quantize_command"),
        "shard": ("netp.shard.cli", "shard_command"), "run": ("netp.runtime.cli", "run_command"),
        "inspect": ("netp.inspect", "inspect_command"),
    }[name]
    return getattr(importlib.import_module(module), attr)


def write_tiny_ne(path: Path, quantized: bool = False) -> list[int]:
    """A tiny LLaMA NE file; returns the section boundaries (file offsets)."""
    import gguf

    arch = by_name("llama")
    header = NEHeader(**arch.header_fields(TINY), ftype=2 if quantized else 0)
    vocab = [(bytes([65 + i % 26]) * (1 + i % 3), -float(i)) for i in range(TINY.n_vocab)]
    rng = np.random.default_rng(0)
    bounds = [0, 4]
    with NEWriter(path, header, vocab) as w:
        bounds.append(4 + 31 * 4)
        for name, shape in arch.tensor_shapes(TINY).items():
            bounds.append(w.tell)
            x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
            if quantized and len(shape) == 2 and name != "tok_embeddings.weight":
                w.add_tensor(name, GGMLType.Q4_0, shape, gguf.quants.quantize(x, GGMLType.Q4_0))
            else:
                w.add_tensor(name, GGMLType.F32, shape, x)
            bounds.append(w.tell - 1)
        bounds.append(w.tell)
    return bounds


def mutations(data: bytes, bounds: list[int], rng: random.Random, n_random: int, n_flips: int, region: int):
    for cut in truncation_points(len(data), bounds, rng, n_random):
        yield f"truncate@{cut}", data[:cut]
    for i in range(n_flips):
        yield f"flip#{i}", flip_bytes(data, region, rng, rng.randrange(1, 4))


def fuzz(tmp: Path, scale: int) -> Counter:
    """Run the whole campaign; `scale` multiplies the random cases."""
    rng = random.Random(1234)
    outcomes: Counter = Counter()
    failures: list[str] = []

    def record(stage: str, label: str, code, err, output=None, output_ok=None):
        o = classify(code, err, output, output_ok)
        outcomes[(stage, o.kind)] += 1
        if o.kind == "FAIL":
            failures.append(f"{stage} {label}: {o.detail}")

    def valid_ne(p: Path) -> bool:
        try:
            NEReader(p).close()
            return True
        except Exception:
            return False

    for quantized in (False, True):
        src = tmp / f"src-{quantized}.bin"
        bounds = write_tiny_ne(src, quantized)
        data = src.read_bytes()
        header_region = bounds[3] + 64  # header, vocab, first tensor record
        for label, mutated in mutations(data, bounds, rng, 8 * scale, 12 * scale, header_region):
            case = tmp / "case.bin"
            case.write_bytes(mutated)
            code, _, err = run_command(command("inspect"), [str(case)], "netp inspect")
            record("inspect", label, code, err)
            out = tmp / "out.bin"
            if not quantized:
                code, _, err = run_command(command("quantize"), [str(case), str(out), "--type", "q4_0", "--quiet"],
                                           "netp quantize")
                record("quantize", label, code, err, out, valid_ne)
                out.unlink(missing_ok=True)
            outdir = tmp / "shards"
            code, _, err = run_command(command("shard"), ["--ranks", "2", "--quiet", str(case), str(outdir)], "shard")
            record("shard", label, code, err, outdir, lambda d: (d / "manifest.json").exists())
            shutil.rmtree(outdir, ignore_errors=True)
            code, _, err = run_command(command("run"), ["-m", str(case), "--ids", "1,2,3", "-n", "2", "--temp", "0"],
                                       "ne-run")
            record("run", label, code, err)

    # A shard set whose manifest is truncated or corrupted.
    src = tmp / "src-False.bin"
    good = tmp / "good-shards"
    code, _, err = run_command(command("shard"), ["--ranks", "2", "--quiet", str(src), str(good)], "shard")
    assert code == 0, err
    manifest = (good / "manifest.json").read_bytes()
    text = manifest.decode()
    anchors = [m for m in range(len(text)) if text[m] in "{[,:"]
    bounds = anchors[:: max(1, len(anchors) // 40)]
    for label, mutated in mutations(manifest, bounds, rng, 6 * scale, 10 * scale, len(manifest)):
        case = tmp / "case-shards"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(good, case)
        (case / "manifest.json").write_bytes(mutated)
        code, _, err = run_command(command("inspect"), [str(case)], "netp inspect")
        record("inspect-manifest", label, code, err)
        code, _, err = run_command(command("run"), ["-m", str(case), "--ids", "1,2", "-n", "1", "--temp", "0"],
                                   "ne-run")
        record("run-manifest", label, code, err)
    # Every rank file truncated.
    rank0 = sorted(good.glob("rank-*.bin"))[0]
    data = rank0.read_bytes()
    for label, mutated in mutations(data, [0, 4, 128, len(data) // 2], rng, 4 * scale, 4 * scale, 256):
        case = tmp / "case-shards"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(good, case)
        (case / rank0.name).write_bytes(mutated)
        code, _, err = run_command(command("run"), ["-m", str(case), "--ids", "1,2", "-n", "1", "--temp", "0"],
                                   "ne-run")
        record("run-rankfile", label, code, err)

    total = sum(outcomes.values())
    print(f"\nfuzz: {total} cases; outcome classes: "
          + ", ".join(f"{stage}/{kind}={n}" for (stage, kind), n in sorted(outcomes.items())))
    assert not failures, f"{len(failures)} of {total} cases failed:\n" + "\n".join(failures[:20])
    return outcomes


def test_fuzz_stages(tmp_path, capsys):
    outcomes = fuzz(tmp_path, scale=1)
    with capsys.disabled():
        print(f"\nfuzz (make test): {sum(outcomes.values())} cases")
    assert sum(outcomes.values()) >= 200
    assert sum(n for (_, kind), n in outcomes.items() if kind == "error") > 0


@pytest.mark.slow
def test_fuzz_stages_long(tmp_path, capsys):
    outcomes = fuzz(tmp_path, scale=14)
    with capsys.disabled():
        print(f"\nfuzz (make test-slow): {sum(outcomes.values())} cases")
    assert sum(outcomes.values()) >= 2000
