"""Shared checks of the hostile-input tests (issue 25, docs/design.md §8).

`attack(...)` runs one netp command in-process on a crafted input and asserts
what every attack must end in: a non-zero exit with exactly one line
`<prog>: error: <file>: <what>` naming the file (no traceback, no "internal
error"), or, for an attack that must be survived, exit 0; always within a
time and memory bound (fuzz_harness.run_command), every byte under the
watched folders unchanged (sha256 of each file before and after) and nothing
created there, except, on success, under the output's own place.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Iterable

import pytest

from fuzz_harness import ERROR_LINE, run_command

ATTACKS: list[list[str]] = []  # every attack run this session, counted in the terminal summary (conftest.py)


_HASH_LIMIT = 256 << 20


def tree_state(roots: Iterable[Path]) -> dict[str, str]:
    """Every path under `roots` -> what it is: sha256 and mode of a regular file
    (size, mtime and inode past 256 MiB: the sparse giants of the tests), the target
    of a link (never followed), 'dir', or the kind of a special file."""
    state: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    state[p] = "link:" + os.readlink(p)
                elif stat.S_ISDIR(st.st_mode):
                    state[p] = "dir"
                elif stat.S_ISREG(st.st_mode) and st.st_size > _HASH_LIMIT:  # a sparse giant: size and times
                    state[p] = f"big:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{stat.S_IMODE(st.st_mode):o}"
                elif stat.S_ISREG(st.st_mode):
                    h = hashlib.sha256()
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            h.update(chunk)
                    state[p] = f"{h.hexdigest()}:{stat.S_IMODE(st.st_mode):o}"
                else:
                    state[p] = f"special:{stat.S_IFMT(st.st_mode)}"
    return state


def netp_group():
    from netp.cli import netp

    return netp


def attack(args: list[str], watch: Iterable[Path], needle: str | None = None, *, names: str | os.PathLike | None = None,
           ok: bool = False, outputs: Iterable[Path] = (), timeout: int = 60, command=None, prog: str = "netp",
           status: int | None = None) -> str:
    """Run `netp ARGS` (or `command`) and assert the outcome; returns the error line (or stdout when ok).

    needle: text the error line must hold; names: the file the line must name
    (the path as given, at the start of <file>: <what>); outputs: on success, the
    only paths allowed to change (with everything under them); status: the exit
    status a refusal must have (default: any non-zero)."""
    ATTACKS.append(args)
    watch = [Path(w) for w in watch]
    before = tree_state(watch)
    code, out, err = run_command(command or netp_group(), args, prog, timeout=timeout)
    after = tree_state(watch)
    assert code >= 0, f"{args}: {err}"  # negative: timeout, memory bound or an escaped exception
    assert "Traceback" not in err, err
    if ok:
        assert code == 0, f"{args}: expected success, got {code}: {err}"
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        places = [str(o) for o in outputs]
        allowed = {p for p in changed if any(p == o or p.startswith(o + os.sep) for o in places)}
        assert changed <= allowed, f"{args}: changed outside the output: {sorted(changed - allowed)}"
        return out
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"{args}: expected a refusal, got exit 0 (stderr {err!r})"
    assert status is None or code == status, f"{args}: expected exit {status}, got {code} (stderr {err!r})"
    assert len(lines) == 1, f"{args}: expected one error line, got {lines}"
    line = lines[0]
    assert ERROR_LINE.match(line) and "internal error" not in line, line
    if needle is not None:
        assert needle in line, f"{needle!r} not in {line!r}"
    if names is not None:
        assert f": error: {names}: " in line or f": error: {names}" in line, f"{line!r} does not name {names}"
    assert before == after, f"{args}: files changed by a refused command: " \
        f"{sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))}"
    if os.environ.get("NETP_SHOW_ATTACKS"):
        print(f"\n{line}")
    return line


def tiny_gguf(path: Path, **values) -> Path:
    """test_fuzz's tiny LLaMA GGUF with metadata values replaced or added, of any
    GGUF type: `tiny_gguf(p, **{"llama.block_count": 10**9})`; a str value is
    written as a GGUF string, a float as f32, an int as u32 (or u64 when large)."""
    import gguf
    from test_fuzz import _GGUF_NAMES, tiny_tokenizer, tiny_weights
    import json

    tok = tiny_tokenizer()
    hp, weights = tiny_weights(tok.get_vocab_size())
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    meta = {"llama.context_length": hp.max_seq_len, "llama.embedding_length": hp.n_embd,
            "llama.block_count": hp.n_layer, "llama.feed_forward_length": hp.n_ff,
            "llama.attention.head_count": hp.n_head, "llama.attention.head_count_kv": hp.n_head_kv,
            "llama.attention.layer_norm_rms_epsilon": float(hp.norm_eps), "llama.rope.freq_base": float(hp.rope_theta),
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    meta.update(values)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if isinstance(value, str):
            w.add_key_value(key, value, gguf.GGUFValueType.STRING)
        elif isinstance(value, float):
            w.add_key_value(key, value, gguf.GGUFValueType.FLOAT32)
        else:
            w.add_key_value(key, value, gguf.GGUFValueType.UINT32 if 0 <= value < 2 ** 32 else gguf.GGUFValueType.INT64)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for ne, x in weights.items():
        w.add_tensor(_GGUF_NAMES[ne], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- the tiny inputs the attacks start from (fixtures: test modules import them by name) --------------------

@pytest.fixture()
def ne_f32(tmp_path: Path) -> Path:
    """A tiny f32 NE file with its stub tokenizer folder."""
    from conftest import write_stub_tokenizer
    from test_fuzz import write_tiny_ne

    path = tmp_path / "a.bin"
    write_tiny_ne(path)
    write_stub_tokenizer(path)
    return path


@pytest.fixture()
def shard_set(ne_f32: Path, tmp_path: Path) -> Path:
    """That file cut for 2 ranks."""
    from netp.shard.stage import shard_file

    shard_file(ne_f32, tmp_path / "s", 2)
    return tmp_path / "s"
