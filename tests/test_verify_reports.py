"""verify's reports for CI (issue 33 point 3, docs/design.md §5 "Verification" and "Reports"):
--json validated against the schema in docs/design.md, --junit read by a JUnit reader,
limits as options, exit status 0 / 1 / 2, report paths refused before anything runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hostile import attack
from reports import validate_report

BIN = Path(sys.executable).parent
SEED_PROMPT = "Once upon a time, there existed a little girl,"


def netp(args: list[str], mpi: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = ([str(BIN / "mpiexec"), "-n", str(mpi)] if mpi else []) + [str(BIN / "netp"), "verify", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tiny_hf_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaMA (GQA): f32, q4_0, a 2-rank q4_0 shard set, and a copy of the set whose
    rank 1 holds a changed layer-1 w2 slice (its manifest's sha256 updated to match)."""
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.formats.ne import NEReader
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    root = tmp_path_factory.mktemp("verify-reports")
    m = {"hf": tiny_hf_model("llama_gqa"), "f32": root / "ne-f32.bin", "q4_0": root / "ne-q4_0.bin",
         "shards": root / "set" / "shards", "f32_shards": root / "f32set" / "shards",
         "broken": root / "broken" / "shards"}
    convert(str(m["hf"]), m["f32"], "f32")
    quantize_file(m["f32"], m["q4_0"], GGMLType.Q4_0)
    for name, src in (("shards", "q4_0"), ("f32_shards", "f32")):
        m[name].parent.mkdir()
        shard_file(m[src], m[name], 2)
    m["broken"].parent.mkdir()
    shutil.copytree(m["f32_shards"], m["broken"])
    rank1 = m["broken"] / "rank-00001-of-00002.bin"
    with NEReader(rank1) as r:
        info = r.tensors["layers.1.feed_forward.w2.weight"]
    data = np.frombuffer(rank1.read_bytes(), np.float32, info.nbytes // 4, info.offset)
    with open(rank1, "r+b") as f:
        f.seek(info.offset)
        f.write((data * 1.5).astype(np.float32).tobytes())
    manifest = json.loads((m["broken"] / "manifest.json").read_text())
    manifest["ranks"][1]["sha256"] = hashlib.sha256(rank1.read_bytes()).hexdigest()
    (m["broken"] / "manifest.json").write_text(json.dumps(manifest))
    return m


def junit(path: Path):
    from junitparser import JUnitXml

    xml = JUnitXml.fromfile(str(path))
    suites = list(xml)
    assert len(suites) == 1
    return suites[0], list(suites[0])


def test_passing_run_reports_every_comparison(tiny, tmp_path):
    out, xml = tmp_path / "verify.json", tmp_path / "report.xml"
    p = netp([str(tiny["shards"]), "--ref", str(tiny["q4_0"]), "--f32", str(tiny["f32"]), "--hf", str(tiny["hf"]),
              "-n", "3", "-t", "1", "--json", str(out), "--junit", str(xml)])
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-4:] == [f"report: {out}", f"JUnit report: {xml}", "", "verify: PASS"]
    doc = validate_report(out)
    ids = [c["id"] for c in doc["comparisons"]]
    assert ids == ["decode-vs-batch", "target", "f32-vs-transformers", "quantized-vs-f32", "kernel-modes"]
    assert doc["passed"] and doc["status"] == 0 and doc["first_diverging_layer"] is None
    assert doc["environment"]["ranks"] == 2 and doc["environment"]["world"] == "simulated"
    assert doc["thresholds"] == {"max_dlogit": 1e-3, "max_kl": 1.0, "min_top1": 0.25, "min_routing": 1.0}
    # the tokens: the prompt as the tokenizer encodes it, then 3 greedy tokens
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(tiny["hf"] / "tokenizer.json")).encode(SEED_PROMPT).ids
    assert doc["prompt"]["tokens"][:len(prompt)] == prompt and doc["prompt"]["n_prompt"] == len(prompt)
    assert len(doc["prompt"]["tokens"]) == len(prompt) + 3
    # the manifest's identity: its own sha256 and the rank files' as they are on disk
    assert doc["manifest"]["sha256"] == hashlib.sha256((tiny["shards"] / "manifest.json").read_bytes()).hexdigest()
    for r in doc["manifest"]["ranks"]:
        assert r["sha256"] == hashlib.sha256((tiny["shards"] / r["file"]).read_bytes()).hexdigest()
    for c in doc["comparisons"]:
        assert c["passed"] and c["reason"] == "" and len(c["rows"]) == len(doc["prompt"]["tokens"])
        assert all(lim["passed"] for lim in c["limits"]) and c["limits"]
    hf = doc["comparisons"][2]
    assert 0 < hf["figures"]["max_dlogit"] <= 1e-3 == hf["limits"][0]["value"]
    assert hf["figures"]["max_dlogit"] == max(r["max_dlogit"] for r in hf["rows"])
    kl = doc["comparisons"][3]
    assert kl["figures"]["mean_kl"] == pytest.approx(np.mean([r["kl"] for r in kl["rows"]]), rel=1e-9)
    assert kl["figures"]["top1"] == pytest.approx(np.mean([r["top1"] for r in kl["rows"]]))
    suite, cases = junit(xml)
    assert suite.tests == 5 and suite.failures == 0 and suite.errors == 0
    assert [c.name.split(":")[0] for c in cases] == ids
    assert [c.classname for c in cases] == ["netp.verify.kl"] + ["netp.verify.logits"] * 2 + ["netp.verify.kl"] * 2
    assert all(c.is_passed for c in cases)


def test_failing_run_exits_1_naming_the_layer(tiny, tmp_path):
    out, xml = tmp_path / "verify.json", tmp_path / "report.xml"
    p = netp([str(tiny["broken"]), "--ref", str(tiny["f32"]), "-n", "3", "-t", "1", "--json", str(out),
              "--junit", str(xml)])
    assert p.returncode == 1, p.stdout + p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"netp verify: error: {tiny['broken']}: verification failed: ")
    assert "first diverging hidden state: layer 1 " in err[0] and p.stdout.rstrip().endswith("verify: FAIL")
    doc = validate_report(out)
    assert not doc["passed"] and doc["status"] == 1
    assert doc["first_diverging_layer"]["layer"] == 1 and doc["first_diverging_layer"]["state"] == 2
    target = next(c for c in doc["comparisons"] if c["id"] == "target")
    assert not target["passed"] and target["reason"] in err[0]
    assert target["figures"]["max_dlogit"] > 1e-3
    assert [lim["passed"] for lim in target["limits"]][0] is False
    suite, cases = junit(xml)
    assert suite.failures == 1
    failed = [c for c in cases if not c.is_passed]
    assert len(failed) == 1 and failed[0].result[0].message == target["reason"]


def test_limits_are_options(tiny, tmp_path):
    """--max-kl between the q4_0 file's KL (~1e-3) and its kernel modes' (~1e-6) fails the first alone;
    a generous --max-dlogit passes the broken set."""
    out, xml = tmp_path / "verify.json", tmp_path / "report.xml"
    p = netp([str(tiny["q4_0"]), "--f32", str(tiny["f32"]), "-n", "2", "-t", "1", "--max-kl", "1e-4",
              "--json", str(out), "--junit", str(xml)])
    assert p.returncode == 1, p.stdout + p.stderr
    doc = validate_report(out)
    verdicts = {c["id"]: c["passed"] for c in doc["comparisons"]}
    assert verdicts == {"decode-vs-batch": True, "quantized-vs-f32": False, "kernel-modes": True}
    kl = doc["comparisons"][1]
    assert kl["reason"].startswith(f"{kl['title']}: mean KL divergence ") and "> 0.0001" in kl["reason"]
    assert doc["thresholds"]["max_kl"] == 1e-4
    suite, cases = junit(xml)
    assert suite.failures == 1 and [c.is_passed for c in cases] == [True, False, True]
    p = netp([str(tiny["broken"]), "--ref", str(tiny["f32"]), "-n", "2", "-t", "1", "--max-dlogit", "1e3"])
    assert p.returncode == 0, p.stdout + p.stderr  # the broken layer moves the logits by less than 1000


def test_cli_defaults_are_the_runtime_limits():
    """--help writes the defaults out (no runtime import): they must be the runtime's."""
    from netp.runtime.cli import verify_command
    from netp.runtime.verify import MAX_DLOGIT, MAX_KL, MIN_ROUTING, MIN_TOP1, VerifyOptions

    defaults = {o.name: o.default for o in verify_command.params}
    limits = ("max_dlogit", "max_kl", "min_top1", "min_routing")
    assert tuple(defaults[k] for k in limits) == (MAX_DLOGIT, MAX_KL, MIN_TOP1, MIN_ROUTING)
    opts = VerifyOptions(Path("x"))
    assert tuple(getattr(opts, k) for k in limits) == (MAX_DLOGIT, MAX_KL, MIN_TOP1, MIN_ROUTING)


@pytest.mark.parametrize("case, needle", [
    ("junit-in-set", "lies inside the input folder"),
    ("json-over-ref", "is the input"),
    ("json-over-f32-tokenizer", "lies inside the input folder"),
    ("same-path", "is given to both --json and --junit"),
    ("json-no-folder", "does not exist"),
])
def test_bad_report_path_is_one_line_and_exit_2(case, needle, tiny, tmp_path):
    args = [str(tiny["shards"]), "--ref", str(tiny["q4_0"]), "--f32", str(tiny["f32"]), "-n", "2", "-t", "1"]
    bad = {"junit-in-set": ["--junit", str(tiny["shards"] / "r.xml")],
           "json-over-ref": ["--json", str(tiny["q4_0"])],
           "json-over-f32-tokenizer": ["--json", str(tiny["f32"].with_name("ne-f32.tokenizer") / "r.json")],
           "same-path": ["--json", str(tmp_path / "r"), "--junit", str(tmp_path / "r")],
           "json-no-folder": ["--json", str(tmp_path / "none" / "r.json")]}[case]
    attack(["verify", *args, *bad], [tiny["f32"].parent, tmp_path], needle, names=bad[-1], status=2)


@pytest.mark.mpi
def test_under_mpiexec_rank_0_writes_the_reports(tiny, tmp_path):
    out, xml = tmp_path / "verify.json", tmp_path / "report.xml"
    p = netp([str(tiny["shards"]), "--ref", str(tiny["q4_0"]), "-n", "3", "-t", "1", "--json", str(out),
              "--junit", str(xml)], mpi=2)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = validate_report(out)
    assert doc["environment"]["world"] == "mpi" and doc["environment"]["ranks"] == 2
    assert [c["id"] for c in doc["comparisons"]] == ["decode-vs-batch", "target", "kernel-modes"]
    assert junit(xml)[0].tests == 3
    assert sorted(os.listdir(tmp_path)) == ["report.xml", "verify.json"]  # no partial left behind
    p = netp([str(tiny["shards"]), "--ref", str(tiny["q4_0"]), "--junit", str(tiny["shards"] / "r.xml")], mpi=2)
    assert p.returncode == 2 and len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1, p.stderr
    assert not (tiny["shards"] / "r.xml").exists()
