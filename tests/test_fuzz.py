"""Fuzzing every stage with truncated and corrupted inputs (issue 17).

`make test` runs at least 200 seeded cases; `make test-slow` at least 2,000.
Each case must end in a correct result or a one-line error with a non-zero
exit, no traceback, no hang and nothing under the output name (see
fuzz_harness). The counts and outcome classes are printed.
"""
from __future__ import annotations

import dataclasses
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
from netp.formats.tokenizer_dir import tokenizer_dir_for
from netp.models import by_name
from netp.models.hparams import HParams

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


# -- convert inputs: a tiny LLaMA as a GGUF file and as an HF safetensors folder ----------
_HF_NAMES = {  # NE name -> HF name, one layer
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.0.attention.wq.weight": "model.layers.0.self_attn.q_proj.weight",
    "layers.0.attention.wk.weight": "model.layers.0.self_attn.k_proj.weight",
    "layers.0.attention.wv.weight": "model.layers.0.self_attn.v_proj.weight",
    "layers.0.attention.wo.weight": "model.layers.0.self_attn.o_proj.weight",
    "layers.0.feed_forward.w1.weight": "model.layers.0.mlp.gate_proj.weight",
    "layers.0.feed_forward.w2.weight": "model.layers.0.mlp.down_proj.weight",
    "layers.0.feed_forward.w3.weight": "model.layers.0.mlp.up_proj.weight",
    "layers.0.attention_norm.weight": "model.layers.0.input_layernorm.weight",
    "layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
}
_GGUF_NAMES = {  # NE name -> llama.cpp name
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight",
    "layers.0.attention.wq.weight": "blk.0.attn_q.weight", "layers.0.attention.wk.weight": "blk.0.attn_k.weight",
    "layers.0.attention.wv.weight": "blk.0.attn_v.weight", "layers.0.attention.wo.weight": "blk.0.attn_output.weight",
    "layers.0.feed_forward.w1.weight": "blk.0.ffn_gate.weight", "layers.0.feed_forward.w2.weight": "blk.0.ffn_down.weight",
    "layers.0.feed_forward.w3.weight": "blk.0.ffn_up.weight", "layers.0.attention_norm.weight": "blk.0.attn_norm.weight",
    "layers.0.ffn_norm.weight": "blk.0.ffn_norm.weight",
}


def tiny_tokenizer():
    """A byte-level BPE trained here, small enough for a 1-layer model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Once upon a time there was a tiny model that read its own files."] * 20, trainer)
    return tok


def tiny_weights(n_vocab: int) -> tuple[HParams, dict[str, np.ndarray]]:
    hp = dataclasses.replace(TINY, n_vocab=n_vocab, bos_token_id=0, eos_token_id=1, max_seq_len=64)
    rng = np.random.default_rng(1)
    return hp, {name: (rng.standard_normal(shape) * 0.1).astype(np.float32)
                for name, shape in by_name("llama").tensor_shapes(hp).items()}


def write_tiny_hf(folder: Path) -> list[int]:
    """config.json + model.safetensors + tokenizer files; returns model.safetensors' section boundaries."""
    from safetensors.numpy import save_file

    tok = tiny_tokenizer()
    hp, weights = tiny_weights(tok.get_vocab_size())
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": hp.n_vocab,
        "hidden_size": hp.n_embd, "intermediate_size": hp.n_ff, "num_hidden_layers": hp.n_layer,
        "num_attention_heads": hp.n_head, "num_key_value_heads": hp.n_head_kv, "rms_norm_eps": hp.norm_eps,
        "rope_theta": hp.rope_theta, "max_position_embeddings": hp.max_seq_len, "bos_token_id": 0,
        "eos_token_id": 1, "tie_word_embeddings": False}))
    st = folder / "model.safetensors"
    save_file({_HF_NAMES[ne]: w for ne, w in weights.items()}, str(st))
    data = st.read_bytes()
    n = int.from_bytes(data[:8], "little")
    offsets = [8 + n + a for t in json.loads(data[8:8 + n]).values() if isinstance(t, dict)
               for a in t["data_offsets"]]
    return [0, 8, 8 + n // 2, 8 + n, *offsets]


def write_tiny_gguf(path: Path) -> list[int]:
    """A llama.cpp-style GGUF of the same tiny model; returns its section boundaries."""
    import gguf

    tok = tiny_tokenizer()
    hp, weights = tiny_weights(tok.get_vocab_size())
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(hp.max_seq_len)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(hp.norm_eps)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for ne, x in weights.items():
        w.add_tensor(_GGUF_NAMES[ne], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(str(path))
    bounds = [0, 4, 8, 16, 24]
    bounds += [f.offset for f in r.fields.values()]
    bounds += [t.field.offset for t in r.tensors] + [int(r.data_offset)] + [int(t.data_offset) for t in r.tensors]
    return sorted(set(bounds))


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

    # convert (and inspect) a GGUF file; convert a safetensors folder and its config.json.
    def convert_case(stage: str, label: str, model: Path) -> None:
        out = tmp / "conv.bin"
        code, _, err = run_command(command("convert"), ["--outtype", "f32", "--outfile", str(out), "--quiet",
                                                         str(model)], "netp convert")
        tok = tokenizer_dir_for(out)
        if code != 0 and tok.exists():
            record(stage, label, -1, f"error exit but tokenizer folder {tok} exists")
        else:
            record(stage, label, code, err, out, lambda p: valid_ne(p) and tok.is_dir())
        out.unlink(missing_ok=True)
        shutil.rmtree(tok, ignore_errors=True)

    src = tmp / "tiny.gguf"
    bounds = write_tiny_gguf(src)
    good_hf = tmp / "tiny-hf"
    hf_bounds = write_tiny_hf(good_hf)
    for model in (src, good_hf):  # the unmutated inputs convert: the errors below are the mutations'
        convert_case("convert-baseline", model.name, model)
    assert outcomes[("convert-baseline", "ok")] == 2, failures
    data = src.read_bytes()
    for label, mutated in mutations(data, bounds, rng, 8 * scale, 12 * scale, bounds[-2]):
        case = tmp / "case.gguf"
        case.write_bytes(mutated)
        code, _, err = run_command(command("inspect"), [str(case)], "netp inspect")
        record("inspect-gguf", label, code, err)
        convert_case("convert-gguf", label, case)
    for file, file_bounds, region in (("model.safetensors", hf_bounds, hf_bounds[3]), ("config.json", None, None)):
        data = (good_hf / file).read_bytes()
        if file_bounds is None:  # JSON: cut at its punctuation
            file_bounds = [i for i, c in enumerate(data) if c in b"{[,:"]
            region = len(data)
        for label, mutated in mutations(data, file_bounds, rng, 4 * scale, 8 * scale, region):
            case = tmp / "case-hf"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(good_hf, case)
            (case / file).write_bytes(mutated)
            convert_case(f"convert-{file}", label, case)

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
