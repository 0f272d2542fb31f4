"""Hostile inputs, class 1 and 6 of issue 25: a small file promising unbounded
work, and silent nonsense (docs/design.md §8, "sizes bounded before use").

Every count of a config.json or GGUF is checked against the tensors the
checkpoint really holds before anything is built from it, and a value of
the wrong type or out of range is refused by its name. Each attack runs
`netp convert` in-process under fuzz_harness' time and memory bound.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hostile import attack, tiny_gguf
from test_fuzz import write_tiny_hf


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """test_fuzz's tiny one-layer LLaMA HF folder (12 tensors)."""
    folder = tmp_path_factory.mktemp("tiny-hf") / "model"
    write_tiny_hf(folder)
    return folder


def variant(base: Path, where: Path, config_text: str) -> Path:
    """`base` with another config.json: the weights linked (a checkpoint's own
    files may be links), the tokenizer files copied."""
    where.mkdir()
    os.symlink(base / "model.safetensors", where / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / f, where / f)
    (where / "config.json").write_text(config_text)
    return where


def _config(base: Path, **changes) -> str:
    config = json.loads((base / "config.json").read_text())
    config.update(changes)
    return json.dumps(config)  # NaN / Infinity come out as the literals Python's json reads back


HF_ATTACKS = [
    ({"num_hidden_layers": 10 ** 9}, "config says 1000000000 layers, more than its 12 tensors can hold"),
    ({"num_hidden_layers": 2 ** 40}, "num_hidden_layers is 1099511627776"),
    ({"vocab_size": 2 ** 31}, "vocab_size is 2147483648, expected a whole number"),
    ({"vocab_size": 10 ** 9}, "has shape"),  # fits int32: compared with the real embedding, nothing allocated
    ({"intermediate_size": 2 ** 30}, "has shape"),
    ({"hidden_size": 128.5}, "hidden_size is 128.5, expected a whole number"),
    ({"hidden_size": "128"}, "hidden_size is '128', expected a whole number"),
    ({"hidden_size": float("inf")}, "hidden_size is inf"),
    ({"num_hidden_layers": [1]}, "num_hidden_layers is [1]"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    ({"num_attention_heads": -2}, "num_attention_heads is -2"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps is nan, expected a finite number"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps is inf"),
    ({"rms_norm_eps": -1e-5}, "norm epsilon is -1e-05"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps is '1e-5', expected a finite number"),
    ({"rope_theta": -1.0}, "rope theta (freq_base) is -1.0"),
    ({"rope_theta": 0.0}, "rope theta (freq_base) is 0.0"),
    ({"max_position_embeddings": -5}, "max_position_embeddings is -5"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false', expected true or false"),
    ({"eos_token_id": "x"}, "eos_token_id is 'x', expected a token id"),
    ({"bos_token_id": 2 ** 40}, "bos_token_id is 1099511627776"),
    ({"hidden_act": 7}, "hidden_act is 7, expected a string"),
]


@pytest.mark.parametrize("changes, needle", HF_ATTACKS, ids=[f"{next(iter(c))}={next(iter(c.values()))!r}"[:40]
                                                                for c, _ in HF_ATTACKS])
def test_config_values_refused_by_name(tiny_folder, tmp_path, changes, needle):
    model = variant(tiny_folder, tmp_path / "m", _config(tiny_folder, **changes))
    (tmp_path / "out").mkdir()
    attack(["convert", "--outfile", str(tmp_path / "out" / "ne.bin"), str(model)], [tmp_path, tiny_folder],
           needle, names=model / "config.json" if "has shape" not in needle else model)


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"model_type": "llama", "x": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply"),
    ("[1, 2]", "does not hold a JSON object"),
    ('{"model_type": "llama"', "is not valid JSON"),
    ("\xff\xfe{}", None),
], ids=["deep", "deep-inside", "list", "cut", "not-utf8"])
def test_config_json_shapes(tiny_folder, tmp_path, text, needle):
    model = variant(tiny_folder, tmp_path / "m", "")
    (model / "config.json").write_bytes(text.encode("latin-1"))
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)], [tmp_path], needle,
           names=model / "config.json")


def test_config_json_over_the_cap_is_not_read(tiny_folder, tmp_path):
    model = variant(tiny_folder, tmp_path / "m", "")
    with open(model / "config.json", "wb") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse: refused by its size before a byte is read
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)], [model], "more than the 16 MiB",
           names=model / "config.json", timeout=10)


def test_index_json_over_the_cap_is_not_read(tiny_folder, tmp_path):
    model = variant(tiny_folder, tmp_path / "m", (tiny_folder / "config.json").read_text())
    with open(model / "model.safetensors.index.json", "wb") as f:
        f.truncate(2 << 30)
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)], [model], "more than the 16 MiB",
           names=model / "model.safetensors.index.json", timeout=10)


GGUF_ATTACKS = [
    ({"llama.block_count": 10 ** 9}, "GGUF metadata says 1000000000 layers, more than its 12 tensors can hold"),
    ({"llama.block_count": 2 ** 40}, "llama.block_count is 1099511627776"),
    ({"llama.attention.head_count": "nine"}, "llama.attention.head_count is 'nine', expected a whole number"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count is 0"),
    ({"llama.embedding_length": 0}, "llama.embedding_length is 0"),
    ({"llama.rope.freq_base": float("nan")}, "llama.rope.freq_base is nan, expected a finite number"),
    ({"llama.rope.freq_base": -1.0}, "rope theta (freq_base) is -1.0"),
    ({"llama.attention.layer_norm_rms_epsilon": float("inf")}, "layer_norm_rms_epsilon is inf"),
    ({"llama.attention.layer_norm_rms_epsilon": 0.0}, "norm epsilon is 0.0"),
    ({"llama.context_length": 2 ** 40}, "llama.context_length is 1099511627776"),
    ({"llama.vocab_size": 10 ** 9}, "has shape"),
    ({"tokenizer.ggml.eos_token_id": "one"}, "tokenizer.ggml.eos_token_id is 'one', expected a token id"),
]


@pytest.mark.parametrize("values, needle", GGUF_ATTACKS, ids=[next(iter(v)) + f"={next(iter(v.values()))!r}"[:20]
                                                                for v, _ in GGUF_ATTACKS])
def test_gguf_values_refused_by_name(tmp_path, values, needle):
    model = tiny_gguf(tmp_path / "m.gguf", **values)
    attack(["convert", "--outfile", str(tmp_path / "ne.bin"), str(model)], [tmp_path], needle, names=model)


def test_the_untouched_variants_convert(tiny_folder, tmp_path):
    """The attacks' baselines convert: the refusals above come from the one changed value."""
    model = variant(tiny_folder, tmp_path / "m", (tiny_folder / "config.json").read_text())
    gguf_model = tiny_gguf(tmp_path / "m.gguf")
    for name, src in (("hf", model), ("gguf", gguf_model)):
        out = tmp_path / f"{name}.bin"
        attack(["convert", "-q", "--outfile", str(out), str(src)], [tmp_path], ok=True,
               outputs=[out, tmp_path / f"{name}.tokenizer"])
        assert out.is_file() and (tmp_path / f"{name}.tokenizer" / "tokenizer.json").is_file()
