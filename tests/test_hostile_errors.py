"""Hostile inputs, class 5 of issue 25: errors that broke the one-line rule
(tracebacks, "internal error" without a file, several lines under MPI)
(docs/design.md §8, "one line per failure").
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hostile import attack
from hostile import ne_f32, shard_set  # noqa: F401  (fixtures)

BIN = Path(sys.executable).parent


MANIFEST_ATTACKS = {
    "world_size 1e999": lambda t: t.replace('"world_size": 2', '"world_size": 1e999'),
    "world_size NaN": lambda t: t.replace('"world_size": 2', '"world_size": NaN'),
    "world_size '2'": lambda t: t.replace('"world_size": 2', '"world_size": "2"'),
    "world_size 10**30": lambda t: t.replace('"world_size": 2', '"world_size": ' + "9" * 30),
    "deep nesting": lambda t: t.replace('"world_size": 2', '"world_size": ' + "[" * 100_000 + "]" * 100_000),
    "all nesting": lambda t: "[" * 200_000,
    "hparams.n_head 0": lambda t: _json_edit(t, lambda d: d["hparams"].update(n_head=0)),
    "hparams.n_embd 2**40": lambda t: _json_edit(t, lambda d: d["hparams"].update(n_embd=2 ** 40)),
    "hparams.norm_eps Infinity": lambda t: _json_edit(t, lambda d: d["hparams"].update(norm_eps=float("inf"))),
    "hparams.freq_base -1": lambda t: _json_edit(t, lambda d: d["hparams"].update(freq_base=-1.0)),
    "hparams a list": lambda t: _json_edit(t, lambda d: d.update(hparams=[1, 2])),
    "ranks strings": lambda t: _json_edit(t, lambda d: d.update(ranks=["a", "b"])),
    "tensors null": lambda t: _json_edit(t, lambda d: d.update(tensors=None)),
    "shape 1.5": lambda t: _json_edit(t, lambda d: d["tensors"][0].update(shape=[1.5, 64])),
    "top-level string": lambda t: '"netp-shards"',
    "not UTF-8": lambda t: "\udcff",
}


def _json_edit(text: str, edit) -> str:
    data = json.loads(text)
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize("command", ["run", "run -t", "verify", "inspect", "check"])
@pytest.mark.parametrize("attack_name", list(MANIFEST_ATTACKS))
def test_bad_manifest_is_one_line(shard_set, tmp_path, command, attack_name):
    path = shard_set / "manifest.json"
    text = MANIFEST_ATTACKS[attack_name](path.read_text())
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    args = {"run": ["run", "-m", str(shard_set), "--ids", "1", "-n", "1"],
            "run -t": ["run", "-m", str(shard_set), "--ids", "1", "-n", "1", "-t", "1"],
            "verify": ["verify", str(shard_set)], "inspect": ["inspect", str(shard_set)],
            "check": ["shard", "--check", str(shard_set)]}[command]
    # the manifest, or the rank file that disagrees with it (a header field the validator cannot judge)
    attack(args, [tmp_path], None, names=shard_set)


@pytest.mark.parametrize("option, value, needle", [
    ("--temp", "nan", "--temp nan: must be a finite number >= 0"),
    ("--temp", "-1", "--temp -1.0: must be"),
    ("--temp", "inf", "--temp inf"),
    ("--repeat_penalty", "0", "--repeat_penalty 0.0: must be a finite number > 0"),
    ("--repeat_penalty", "nan", "--repeat_penalty nan"),
    ("--top_p", "2", "--top_p 2.0: must be in [0, 1]"),
    ("--top_p", "nan", "--top_p nan"),
    ("--top_k", "-3", "--top_k -3"),
    ("-p", "caf\udce9", "-p: the prompt is not valid UTF-8 text"),
    ("-p", "\udcff\udcfe", "-p: the prompt is not valid UTF-8 text"),
    ("--ids", "1,x", "--ids '1,x'"),
])
def test_run_options_refused_by_name(ne_f32, tmp_path, option, value, needle):
    args = ["run", "-m", str(ne_f32), "-n", "1", option, value]
    if option != "--ids" and option != "-p":
        args += ["--ids", "1,2"]
    attack(args, [tmp_path], needle)


def test_verify_prompt_not_utf8(ne_f32, tmp_path):
    attack(["verify", str(ne_f32), "-p", "\udcff"], [tmp_path], "-p: the prompt is not valid UTF-8 text")


def test_invalid_utf8_prompt_through_a_real_argv(ne_f32):
    """The bytes reach Python as surrogates through argv: one line, no traceback."""
    p = subprocess.run([str(BIN / "ne-run"), "-m", str(ne_f32), "-n", "1", "-p", b"\xff\xfe".decode("latin-1")
                        .encode("latin-1")], capture_output=True, timeout=60)
    err = p.stderr.decode("utf-8", "replace").strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "not valid UTF-8" in err[0], err


def test_closed_stdout_ends_quietly(ne_f32):
    """`ne-run ... | head -c 1`: the reader goes away; no traceback, no error line."""
    cmd = f"'{BIN / 'ne-run'}' -m '{ne_f32}' --ids 1,2,3 -n 40 -c 64 --temp 0 2>'{ne_f32}.err' | head -c 1"
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, timeout=120)
    assert len(p.stdout) == 1
    err = Path(f"{ne_f32}.err").read_text()
    assert err == "", err
    assert p.returncode in (0, 141)  # 141: ne-run ended by the closed pipe (pipefail reports it)


@pytest.mark.mpi
@pytest.mark.parametrize("args, needle", [
    (["--temp", "nan"], "--temp nan"),
    (["--bogus"], "No such option"),
    (["--ids", "1,x"], "--ids"),
], ids=["bad-option-value", "unknown-option", "bad-ids"])
def test_mpi_one_line_per_failure(shard_set, args, needle):
    base = ["--ids", "1,2"] if "--ids" not in args else []
    p = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "ne-run"), "-m", str(shard_set), "-n", "1",
                        *base, *args], capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and needle in lines[0], p.stderr
    assert lines[0].startswith("[rank 0] ne-run: error: ")


@pytest.mark.mpi
def test_mpi_failure_on_one_rank_after_the_start_is_one_line(shard_set, tmp_path):
    """A failure only rank 0 meets after the ranks agreed to start (a missing tokenizer
    for -p) ends the job through MPI Abort: one line, not MPICH's abort line too."""
    (shard_set / "tokenizer" / "tokenizer.json").write_text("{}")
    p = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "ne-run"), "-m", str(shard_set), "-n", "1",
                        "-p", "hi"], capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert "tokenizer.json" in lines[0] and "MPI_Abort" not in p.stderr
