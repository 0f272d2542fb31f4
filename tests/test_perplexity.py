"""`netp perplexity` (issue 33, docs/design.md §5 "Perplexity"): llama-perplexity's
method on the project's own docs as the text (never a download).

References are independent of netp's scoring: transformers' own model and
torch's cross entropy over the same windows; for KL, torch's kl_div of the
two models' logits window by window. A shard set's ranks give the unsharded
file's figures; bad inputs end in one line and exit 2 with nothing written.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hostile import attack
from reports import ROOT, validate_report

BIN = Path(sys.executable).parent
TEXT = ROOT / "docs" / "design.md"  # ~15k SmolLM2 tokens of the project's own prose
CTX, CHUNKS = 64, 3


def netp(args: list[str], mpi: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = ([str(BIN / "mpiexec"), "-n", str(mpi)] if mpi else []) + [str(BIN / "netp"), "perplexity", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tiny_hf_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaMA (GQA) as NE f32 and q4_0, a 2-rank q4_0 shard set, and a copy of the f32
    file whose tokenizer_config.json says add_bos_token (SmolLM2's tokenizer adds no BOS)."""
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    root = tmp_path_factory.mktemp("ppl")
    hf = tiny_hf_model("llama_gqa")
    m = {"hf": hf, "f32": root / "ne-f32.bin", "q4_0": root / "ne-q4_0.bin", "shards": root / "set" / "shards",
         "bos": root / "bos" / "ne-f32.bin"}
    convert(str(hf), m["f32"], "f32")
    quantize_file(m["f32"], m["q4_0"], GGMLType.Q4_0)
    (root / "set").mkdir()
    shard_file(m["q4_0"], m["shards"], 2)
    (root / "bos").mkdir()
    shutil.copyfile(m["f32"], m["bos"])
    shutil.copytree(root / "ne-f32.tokenizer", root / "bos" / "ne-f32.tokenizer")
    config = root / "bos" / "ne-f32.tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "add_bos_token": True}))
    return m


def run_json(args: list[str], out: Path, mpi: int | None = None) -> dict:
    p = netp([*args, "--json", str(out)], mpi=mpi)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Final estimate: PPL = " in p.stdout and f"report: {out}" in p.stdout
    return validate_report(out)


def windows_of(hf: Path, add_bos: bool, bos: int) -> list[list[int]]:
    """The windows llama-perplexity scores, from transformers' tokenizer of the HF folder."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(hf)(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    tokens = [bos] + ids if add_bos else ids
    out = []
    for w in range(min(len(tokens) // CTX, CHUNKS)):
        window = tokens[w * CTX:(w + 1) * CTX]
        if add_bos:
            window[0] = bos
        out.append(window)
    return out


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_equals_transformers_cross_entropy(tiny, tmp_path, add_bos):
    import torch
    from transformers import AutoModelForCausalLM

    model_file = tiny["bos"] if add_bos else tiny["f32"]
    doc = run_json([str(model_file), "-f", str(TEXT), "--ctx", str(CTX), "--chunks", str(CHUNKS), "-t", "1"],
                   tmp_path / "ppl.json")
    hf = AutoModelForCausalLM.from_pretrained(tiny["hf"], dtype=torch.float32).eval()
    nll = []
    for window in windows_of(tiny["hf"], add_bos, bos=1):
        with torch.no_grad():
            logits = hf(torch.tensor([window])).logits[0].double()
        nll.append(torch.nn.functional.cross_entropy(logits[CTX // 2:CTX - 1], torch.tensor(window[CTX // 2 + 1:]),
                                                     reduction="none"))
    v = torch.cat(nll).numpy()
    ppl = math.exp(v.mean())
    stderr = ppl * math.sqrt((np.mean(v * v) - v.mean() ** 2) / (v.size - 1))
    assert doc["add_bos"] is add_bos and doc["windows"] == CHUNKS and doc["scored"] == v.size == CHUNKS * (CTX // 2 - 1)
    assert ppl > 1000  # a random model: near the vocabulary size, so the check is not vacuous
    assert doc["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert doc["ppl_stderr"] == pytest.approx(stderr, rel=1e-3)
    assert doc["running_ppl"][-1] == pytest.approx(doc["ppl"], rel=1e-12) and doc["kl"] is None


def test_kl_against_the_reference_equals_torch_kl_div(tiny, tmp_path):
    """q4_0 against its f32 file: mean, 99% and max KL and same-top share as torch computes them."""
    import torch

    from netp.runtime.comm import SoloComm
    from netp.runtime.model import load_rank_model

    doc = run_json([str(tiny["q4_0"]), "-f", str(TEXT), "--ctx", str(CTX), "--chunks", str(CHUNKS),
                    "--ref", str(tiny["f32"]), "-t", "1"], tmp_path / "kl.json")
    models = [load_rank_model(tiny[k], SoloComm(), CTX) for k in ("f32", "q4_0")]
    kl, same = [], []
    for window in windows_of(tiny["hf"], False, bos=1):
        ref, got = (torch.from_numpy(m.forward(np.array(window), 0, all_logits=True)[CTX // 2:CTX - 1]).double()
                    for m in models)
        log_p, log_q = ref.log_softmax(-1), got.log_softmax(-1)
        kl.append(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1))
        same.append(ref.argmax(-1) == got.argmax(-1))
    for m in models:
        m.close()
    kl_all, same_all = torch.cat(kl).numpy(), torch.cat(same).numpy()
    k = doc["kl"]
    assert kl_all.mean() > 1e-6  # q4_0 moved the logits
    assert k["mean"] == pytest.approx(kl_all.mean(), rel=1e-5)
    assert k["p99"] == pytest.approx(np.percentile(kl_all, 99), rel=1e-4)
    assert k["max"] == pytest.approx(kl_all.max(), rel=1e-4)
    assert k["top1"] == pytest.approx(same_all.mean(), abs=1e-12)
    # and the reference against itself: no divergence, the same top token everywhere
    doc = run_json([str(tiny["f32"]), "-f", str(TEXT), "--ctx", str(CTX), "--chunks", "2", "--ref", str(tiny["f32"]),
                    "-t", "1"], tmp_path / "self.json")
    assert doc["kl"]["max"] < 1e-9 and doc["kl"]["top1"] == 1.0
    assert doc["kl"]["ref_ppl"] == pytest.approx(doc["ppl"], rel=1e-12)


@pytest.mark.mpi
def test_shard_set_ranks_equal_the_unsharded_file(tiny, tmp_path):
    """2 ranks (simulated, and under mpiexec) give the unsharded file's perplexity to 4 significant digits."""
    args = ["-f", str(TEXT), "--ctx", str(CTX), "--chunks", str(CHUNKS), "-t", "1"]
    one = run_json([str(tiny["q4_0"]), *args], tmp_path / "one.json")
    simulated = run_json([str(tiny["shards"]), *args], tmp_path / "sim.json")
    mpi = run_json([str(tiny["shards"]), *args], tmp_path / "mpi.json", mpi=2)
    assert simulated["environment"]["world"] == "simulated" and mpi["environment"]["world"] == "mpi"
    assert mpi["environment"]["ranks"] == simulated["environment"]["ranks"] == 2
    for doc in (simulated, mpi):
        assert float(f"{doc['ppl']:.4g}") == float(f"{one['ppl']:.4g}")
        assert doc["ppl"] == pytest.approx(one["ppl"], rel=5e-5)


def test_smollm2_shards_with_kl_against_f32(smollm2_shards2, smollm2_q4_0, smollm2_f32, tmp_path):
    """The real model: the 2-rank q4_0 set against its f32 source over the docs; the set equals its source."""
    args = ["-f", str(TEXT), "--ctx", "128", "--chunks", "2", "-t", "1"]
    doc = run_json([str(smollm2_shards2), *args, "--ref", str(smollm2_f32)], tmp_path / "set.json")
    assert 5 < doc["kl"]["ref_ppl"] < doc["ppl"] < 500  # English prose: far below the 49152-token vocabulary
    assert 0.01 < doc["kl"]["mean"] < 2 and 0.3 < doc["kl"]["top1"] < 1
    one = run_json([str(smollm2_q4_0), *args], tmp_path / "one.json")
    assert doc["ppl"] == pytest.approx(one["ppl"], rel=5e-5)


# -- bad input: one line, exit 2, nothing written ---------------------------------------------

@pytest.fixture
def texts(tmp_path) -> dict[str, Path]:
    t = {"bad": tmp_path / "latin1.txt", "empty": tmp_path / "empty.txt", "short": tmp_path / "short.txt",
         "blank": tmp_path / "blank.txt", "docs": tmp_path / "docs.txt"}
    t["bad"].write_bytes("Caf\u00e9 au lait, ".encode("latin-1") * 100)
    t["empty"].write_bytes(b"")
    t["blank"].write_text("\n \n")
    t["short"].write_text("Once upon a time, there existed a little girl.")
    shutil.copyfile(TEXT, t["docs"])
    return t


@pytest.mark.parametrize("case, needle", [
    ("bad", "is not UTF-8 text (byte 3"),
    ("empty", "is empty"),
    ("blank", "is empty"),
    ("short", "needs at least 128 (two windows)"),
    ("missing", "no such file"),
    ("ctx-odd", "--ctx 63: the window must be an even number"),
    ("ctx-large", "--ctx 512 is larger than the model's context of 256 tokens"),
    ("json-in-set", "lies inside the input folder"),
    ("json-over-text", "is the input"),
    ("json-over-model", "is the input"),
    ("json-in-tokenizer", "lies inside the input folder"),
    ("json-no-folder", "does not exist"),
    ("json-folder", "is a folder"),
    ("ref-other-vocab", "has a vocabulary of"),
])
def test_bad_input_is_one_line_and_exit_2(case, needle, tiny, texts, tmp_path):
    from test_fuzz import write_tiny_ne

    model, text, extra = tiny["shards"], texts["docs"], []
    names = text
    if case in texts:
        text = names = texts[case]
    elif case == "missing":
        text = names = tmp_path / "nothing.txt"
    elif case.startswith("ctx"):
        extra, names = ["--ctx", "63" if case == "ctx-odd" else "512"], None if case == "ctx-odd" else model
    elif case.startswith("json"):
        out = {"json-in-set": model / "report.json", "json-over-text": text, "json-over-model": tiny["q4_0"],
               "json-in-tokenizer": tiny["q4_0"].with_name("ne-q4_0.tokenizer") / "r.json",
               "json-no-folder": tmp_path / "no" / "r.json", "json-folder": tmp_path / "folder"}[case]
        (tmp_path / "folder").mkdir()
        if case in ("json-over-model", "json-in-tokenizer"):
            model = tiny["q4_0"]
        extra, names = ["--json", str(out)], out
    elif case == "ref-other-vocab":
        other = tmp_path / "other.bin"
        write_tiny_ne(other)
        extra, names = ["--ref", str(other)], other
    args = ["perplexity", str(model), "-f", str(text), *(["--ctx", str(CTX)] if not case.startswith("ctx") else []),
            "--chunks", "2", "-t", "1", *extra]
    attack(args, [tiny["f32"].parent, tmp_path], needle, names=names, status=2)


@pytest.mark.mpi
def test_bad_input_under_mpiexec_exits_2_with_one_line(tiny, texts):
    p = netp([str(tiny["shards"]), "-f", str(texts["bad"]), "--ctx", str(CTX)], mpi=2, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [f"[rank 0] netp perplexity: error: {texts['bad']}: is not UTF-8 text (byte 3 cannot be read)"]
