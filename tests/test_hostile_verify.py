"""Hostile pairs, class 8 of issue 25: `verify --ref/--f32` of another model
printed a KL table and "verify: PASS" (docs/design.md §8, "provenance for verify").

Refused before any model runs: a shard set's --ref must be its source (size
and sha256 of the manifest), and --f32 the file the quantized one came from
(structure equal, one small tensor re-quantized byte-equal).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hostile import attack
from test_fuzz import write_tiny_hf, write_tiny_ne


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny HF LLaMA (with a real tokenizer) as f32, q4_0 and a 2-rank q4_0 shard set;
    `other_f32`/`other_q4_0`: the same structure with other weights; `alien`: another structure."""
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.formats.ne import NEReader, NEWriter
    from netp.formats.tokenizer_dir import copy_tokenizer_beside, tokenizer_dir_for
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    root = tmp_path_factory.mktemp("verify-pairs")
    write_tiny_hf(root / "hf")
    m = {"f32": root / "ne-f32.bin", "q4_0": root / "ne-q4_0.bin", "other_f32": root / "other-f32.bin",
         "other_q4_0": root / "other-q4_0.bin", "alien": root / "alien.bin", "shards": root / "set" / "shards"}
    convert(str(root / "hf"), m["f32"], "f32")
    quantize_file(m["f32"], m["q4_0"], GGMLType.Q4_0)
    rng = np.random.default_rng(7)
    with NEReader(m["f32"]) as r, NEWriter(m["other_f32"], r.header, r.vocab) as w:
        for name, info in r.tensors.items():  # every weight moved: same names, shapes and header
            x = r.read(name)
            w.add_tensor(name, info.ggml_type, info.shape, x + rng.standard_normal(x.shape).astype(np.float32) * 0.05)
    copy_tokenizer_beside(m["f32"], tokenizer_dir_for(m["other_f32"]))
    quantize_file(m["other_f32"], m["other_q4_0"], GGMLType.Q4_0)
    write_tiny_ne(m["alien"])
    (root / "set").mkdir()
    shard_file(m["q4_0"], m["shards"], 2)
    return m


@pytest.mark.parametrize("args, bad, needle", [
    (["shards", "--ref", "q4_0", "--f32", "other_f32"], "other_f32", "re-quantized from it differs"),
    (["shards", "--ref", "q4_0", "--f32", "alien"], "alien", "another model"),
    (["shards", "--ref", "other_q4_0"], "other_q4_0", "is not the source of shard set"),
    (["shards", "--ref", "other_q4_0", "--f32", "other_f32"], "other_q4_0", "is not the source of shard set"),
    (["shards", "--ref", "f32"], "f32", "is not the source of shard set"),
    (["shards", "--f32", "other_f32"], "other_f32", "re-quantized from it differs"),
    (["shards", "--f32", "alien"], "alien", "another model"),
    (["q4_0", "--f32", "other_f32"], "other_f32", "re-quantized from it differs"),
    (["other_q4_0", "--f32", "f32"], "f32", "re-quantized from it differs"),
    (["q4_0", "--f32", "alien"], "alien", "another model"),
    (["q4_0", "--f32", "q4_0"], None, None),  # a quantized --f32: its smallest tensor is not f32
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_verify_refuses_another_model(models, args, bad, needle):
    argv = ["verify", *[str(models[a]) if a in models else a for a in args], "-n", "2"]
    line = attack(argv, [models["f32"].parent], needle, names=models[bad] if bad else None)
    assert "internal error" not in line


def test_verify_of_the_true_pair_passes(models):
    out = attack(["verify", str(models["shards"]), "--ref", str(models["q4_0"]), "--f32", str(models["f32"]),
                  "-n", "2"], [models["f32"].parent], ok=True)
    assert out.rstrip().endswith("verify: PASS") and "KL divergence" in out
