"""One pass and resharding (issue 27, docs/design.md §10).

- `netp pipeline` == convert -> quantize -> shard, every file of the shard set
  byte for byte (rank files, manifest with the three-step file as its source,
  tokenizer), for tiny LLaMA (GQA, tied), GPT-J and GPT-NeoX models made here
  with transformers and for SmolLM2, at 2 and 3 ranks and every type;
- `netp reshard` 2->3, 3->2, 2->1 == `shard --ranks M` of the source;
- the layout a StreamedNE computes is the file NEWriter writes;
- --output_type / --embedding_type on both quantize entry points and pipeline.

The default suite runs every type and every tiny model at both rank counts
(not every combination; DEFAULT) and SmolLM2 once; `-m slow` the rest.
"""
from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import numpy as np
import pytest

from netp.formats.constants import GGMLType, type_from_name
from netp.formats.ne import NEReader, StreamedNE

TYPES = ("f32", "f16", "q4_0", "q4_1", "q8_0")
TINY_KINDS = ("llama_gqa", "llama_tied", "gptj", "gpt_neox")


# The default suite: every type, every kind at both rank counts; the rest of the matrix is slow.
DEFAULT = {("llama_gqa", "q4_0", 3), ("llama_gqa", "f16", 2), ("llama_tied", "q8_0", 2), ("llama_tied", "f32", 3),
           ("gptj", "q4_1", 3), ("gptj", "q4_0", 2), ("gpt_neox", "q4_0", 3), ("gpt_neox", "f32", 2)}


def _params(kinds: tuple[str, ...]) -> list:
    return [pytest.param(kind, outtype, ranks, marks=[] if (kind, outtype, ranks) in DEFAULT else [pytest.mark.slow])
            for kind in kinds for outtype in TYPES for ranks in (2, 3)]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """`netp ARGS` in-process: (exit code, stderr)."""
    from netp.cli import netp

    code = 0
    try:
        netp.main(args=args, prog_name="netp")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, capsys.readouterr().err


def same_tree(a: Path, b: Path) -> None:
    """Every file under a and b exists in both with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert files_a, f"{a} is empty"
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), f"{rel} differs"


@pytest.fixture(scope="session")
def neox_hf_model(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-NeoX (fused q|k|v, partial rotary, MLP 4x), made as tests/test_gpt_neox.py makes them."""
    torch = pytest.importorskip("torch")
    import transformers

    folder = tmp_path_factory.mktemp("neox") / "hf"
    config = transformers.GPTNeoXConfig(vocab_size=49152, hidden_size=128, num_attention_heads=4,
                                        intermediate_size=512, num_hidden_layers=2, max_position_embeddings=256,
                                        rotary_pct=0.25, use_parallel_residual=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(27)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_tokenizer_dir / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def model_path(tiny_hf_model, neox_hf_model, smollm2_gguf):
    def get(kind: str) -> str:
        if kind == "gpt_neox":
            return str(neox_hf_model)
        if kind == "smollm2":
            return str(smollm2_gguf)
        return str(tiny_hf_model(kind))
    return get


@pytest.fixture(scope="session")
def three_step(model_path, request, tmp_path_factory: pytest.TempPathFactory):
    """(kind, type) -> the unsharded NE file of convert (f32/f16) -> quantize (q*), named
    ne-<type>.bin, made once; SmolLM2's f32 file is the session's."""
    from netp.convert.stage import convert
    from netp.quantize.stage import quantize_file

    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, outtype: str) -> Path:
        if (kind, outtype) not in made:
            folder = tmp_path_factory.mktemp(f"{kind}-{outtype}")
            out = folder / f"ne-{outtype}.bin"
            if outtype in ("f32", "f16"):
                if kind == "smollm2" and outtype == "f32":
                    smollm2_f32 = request.getfixturevalue("smollm2_f32")
                    out.symlink_to(smollm2_f32)
                    shutil.copytree(smollm2_f32.with_name("smollm2-f32.tokenizer"), folder / "ne-f32.tokenizer")
                else:
                    convert(model_path(kind), out, outtype)
            else:
                quantize_file(get(kind, "f32"), out, type_from_name(outtype))
            made[kind, outtype] = out
        return made[kind, outtype]

    return get


@pytest.fixture(scope="session")
def sharded(three_step, tmp_path_factory: pytest.TempPathFactory):
    """(kind, type, ranks) -> `shard --ranks` of the three-step file, made once."""
    from netp.shard.stage import shard_file

    made: dict[tuple[str, str, int], Path] = {}

    def get(kind: str, outtype: str, ranks: int) -> Path:
        if (kind, outtype, ranks) not in made:
            out = tmp_path_factory.mktemp(f"{kind}-{outtype}-x{ranks}") / "shards"
            shard_file(three_step(kind, outtype), out, ranks)
            made[kind, outtype, ranks] = out
        return made[kind, outtype, ranks]

    return get


# -- pipeline == convert -> quantize -> shard ----------------------------------------

@pytest.mark.parametrize("kind, outtype, ranks", _params(TINY_KINDS))
def test_pipeline_equals_three_steps(kind, outtype, ranks, model_path, sharded, tmp_path):
    from netp.pipeline.onepass import run_pipeline

    out = tmp_path / "shards"
    result = run_pipeline(model_path(kind), out, outtype, ranks, nthread=2)
    same_tree(out, sharded(kind, outtype, ranks))
    assert result.manifest.source.name == f"ne-{outtype}.bin"
    assert {t.type for t in result.manifest.tensors.values()} >= {outtype}


@pytest.mark.parametrize("variant", ["bf16", pytest.param("sharded", marks=pytest.mark.slow)])
def test_pipeline_equals_three_steps_bf16_and_sharded_checkpoints(variant, tiny_hf_model, tmp_path):
    """Real checkpoints are bf16 (widened into a buffer each read reuses) and split over files."""
    from netp.convert.stage import convert
    from netp.pipeline.onepass import run_pipeline
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    model = str(tiny_hf_model("llama_gqa", variant))
    convert(model, tmp_path / "ne-f32.bin", "f32")
    quantize_file(tmp_path / "ne-f32.bin", tmp_path / "ne-q4_1.bin", GGMLType.Q4_1)
    shard_file(tmp_path / "ne-q4_1.bin", tmp_path / "three", 2)
    run_pipeline(model, tmp_path / "one", "q4_1", 2)
    same_tree(tmp_path / "one", tmp_path / "three")


@pytest.mark.parametrize("outtype, ranks", [
    pytest.param(t, r, marks=[] if (t, r) == ("q4_0", 3) else [pytest.mark.slow]) for t in TYPES for r in (2, 3)])
def test_pipeline_equals_three_steps_smollm2(outtype, ranks, model_path, sharded, tmp_path):
    """SmolLM2 from its Q4_1 GGUF (tied head written as output.weight, 9 heads / 3 KV heads:
    KV heads shared across ranks at 2, block-aligned MLP and vocab cuts)."""
    from netp.pipeline.onepass import run_pipeline

    out = tmp_path / "shards"
    run_pipeline(model_path("smollm2"), out, outtype, ranks)
    same_tree(out, sharded("smollm2", outtype, ranks))


def test_pipeline_cli_refusals(model_path, tmp_path, capsys):
    def run(*args: str) -> tuple[int, str]:
        return run_cli(["pipeline", *args], capsys)

    model = model_path("llama_gqa")
    code, err = run(model, str(tmp_path / "o"), "--outtype", "f16", "--ranks", "2", "--output_type", "q8_0", "-q")
    assert code == 1 and "need a quantized --outtype" in err and not (tmp_path / "o").exists()
    code, err = run(model, str(tmp_path / "o"), "--outtype", "q4_0", "--ranks", "5", "-q")
    assert code == 1 and "cannot shard over 5 ranks" in err and not (tmp_path / "o").exists()
    code, err = run(model, model, "--outtype", "q4_0", "--ranks", "2", "--force", "-q")
    assert code == 1 and "--force would delete it" in err and (Path(model) / "config.json").is_file()
    assert run(model, str(tmp_path / "o"), "--outtype", "q4_0", "--ranks", "2", "-q")[0] == 0
    assert (tmp_path / "o" / "manifest.json").is_file()


# -- the streamed layout ---------------------------------------------------------

def test_streamed_ne_lays_out_the_written_file(smollm2_q4_0):
    """A StreamedNE given a file's header, vocab and tensor records serves exactly its
    bytes (header, vocab, records, padding, data) at every offset."""
    with NEReader(smollm2_q4_0) as r:
        def fill(info, row0, out):
            real = r.tensors[info.name]
            row_bytes = real.nbytes if len(real.shape) == 1 else real.row_nbytes
            r.read_into(real.offset + row0 * row_bytes, out)

        s = StreamedNE(smollm2_q4_0, r.header, r.vocab, [(t.name, t.ggml_type, t.shape) for t in r.tensors.values()],
                       fill)
        assert s.file_size == r.file_size
        assert {n: (t.offset, t.nbytes) for n, t in s.tensors.items()} == \
               {n: (t.offset, t.nbytes) for n, t in r.tensors.items()}
        whole = np.fromfile(smollm2_q4_0, dtype=np.uint8)
        got = np.empty_like(whole)
        pos = 0
        for t in s.tensors.values():  # the gap before each tensor in two reads, then the data in row chunks
            mid = (pos + t.offset) // 2
            s.read_into(pos, got[pos:mid])
            s.read_into(mid, got[mid:t.offset])
            row_bytes = t.nbytes if len(t.shape) == 1 else t.row_nbytes
            step = max(1, (1 << 20) // row_bytes) * row_bytes
            for a in range(t.offset, t.offset + t.nbytes, step):
                b = min(a + step, t.offset + t.nbytes)
                s.read_into(a, got[a:b])
            pos = t.offset + t.nbytes
        assert pos == whole.size
        assert np.array_equal(got, whole)


# -- reshard == shard of the source ------------------------------------------------

RESHARDS = [(2, 3), (3, 2), (2, 1)]


@pytest.mark.parametrize("kind, outtype", [
    pytest.param("llama_gqa", "q4_0"), pytest.param("gpt_neox", "q8_0"), pytest.param("smollm2", "q4_0"),
    *[pytest.param(k, t, marks=pytest.mark.slow) for k in (*TINY_KINDS, "smollm2") for t in TYPES
      if (k, t) not in (("llama_gqa", "q4_0"), ("gpt_neox", "q8_0"), ("smollm2", "q4_0"))]])
def test_reshard_equals_shard_of_source(kind, outtype, sharded, tmp_path):
    from netp.shard.reshard import reshard

    for n, m in RESHARDS:
        out = tmp_path / f"{n}to{m}"
        reshard(sharded(kind, outtype, n), out, m)
        same_tree(out, sharded(kind, outtype, m))


def test_reshard_reads_each_kv_replica_once(sharded, tmp_path, monkeypatch):
    """SmolLM2 at 2 ranks holds KV head 1 on both ranks: reshard reads its rows from
    rank 0 only, so the bytes read from the rank files' tensor data are exactly the
    source's tensor bytes."""
    from netp.formats import ne
    from netp.formats.manifest import load_manifest, local_nbytes
    from netp.shard.reshard import reshard

    src = sharded("smollm2", "q4_0", 2)
    read = {"bytes": 0}
    real = ne.NEReader.read_into

    def counting(self, offset, out):
        if self.path.parent == src and offset >= self.tensor_data_start:
            read["bytes"] += out.nbytes
        return real(self, offset, out)

    monkeypatch.setattr(ne.NEReader, "read_into", counting)
    reshard(src, tmp_path / "x3", 3)
    m = load_manifest(src)
    source_bytes = sum(ne.tensor_nbytes(type_from_name(t.type), t.shape) for t in m.tensors.values())
    stored = sum(local_nbytes(t, r) for t in m.tensors.values() for r in range(2))
    assert stored > source_bytes  # the replicas are there to be read twice
    assert read["bytes"] == source_bytes


def test_reshard_refusals(sharded, tmp_path, capsys):
    src = sharded("llama_gqa", "q4_0", 2)

    def run(*args: str) -> tuple[int, str]:
        return run_cli(["reshard", *args], capsys)

    # A cut M cannot make: refused as shard refuses it.
    code, err = run(str(src), str(tmp_path / "x5"), "--ranks", "5", "-q")
    assert code == 1 and "cannot shard over 5 ranks: 5 ranks is more than the model's 4 attention heads" in err
    assert not (tmp_path / "x5").exists()
    code, err = run(str(src), str(src), "--ranks", "2", "--force", "-q")
    assert code == 1 and "--force would delete it" in err
    # A rank file that does not match its manifest is refused before anything is read.
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    rank1 = bad / "rank-00001-of-00002.bin"
    data = bytearray(rank1.read_bytes())
    data[-1] ^= 0xFF
    rank1.write_bytes(bytes(data))
    code, err = run(str(bad), str(tmp_path / "x3"), "--ranks", "3", "-q")
    assert code == 1 and "rank-00001-of-00002.bin: sha256 mismatch" in err
    assert not (tmp_path / "x3").exists()


# -- --output_type / --embedding_type ------------------------------------------------

def _dequantized(reader: NEReader, name: str) -> np.ndarray:
    import gguf

    info = reader.tensors[name]
    return gguf.quants.dequantize(reader.view(name), gguf.GGMLQuantizationType(int(info.ggml_type)))


@pytest.mark.parametrize("entry", ["netp", "scripts"])
def test_type_overrides(entry, three_step, tmp_path, capsys):
    """--output_type q8_0 --embedding_type f16 on a tied model: the embedding holds
    its f32 values as f16, the output.weight copy holds gguf-py's q8_0 blocks of
    them, every other matrix stays q4_0."""
    import gguf

    from netp.quantize.cli import ns_quantize_command, quantize_command

    f32 = three_step("llama_tied", "f32")
    out = tmp_path / "ne-q4_0.bin"
    if entry == "netp":
        command, args = quantize_command, [str(f32), str(out), "--type", "q4_0"]
    else:
        command, args = ns_quantize_command, ["--model_name", "llama", "--model_file", str(f32), "--out_file", str(out),
                                              "--weight_dtype", "int4"]
    try:
        command.main([*args, "--output_type", "q8_0", "--embedding_type", "f16", "-q"], prog_name="quantize")
    except SystemExit as e:
        pytest.fail(f"exit {e.code}: {capsys.readouterr().err}")
    with NEReader(f32) as src, NEReader(out) as got:
        for name, info in got.tensors.items():
            want = {"output.weight": GGMLType.Q8_0, "tok_embeddings.weight": GGMLType.F16}.get(
                name, GGMLType.Q4_0 if len(info.shape) == 2 else GGMLType.F32)
            assert info.ggml_type == want, name
        values = src.view("tok_embeddings.weight")
        assert np.array_equal(got.view("tok_embeddings.weight"), values.astype(np.float16))
        blocks = gguf.quants.quantize(np.asarray(src.view("output.weight")), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(got.view("output.weight"), blocks)
        assert got.header.ftype == NEReader(three_step("llama_tied", "q4_0")).header.ftype


@pytest.mark.parametrize("kind, ranks, output_type, embedding_type", [
    ("llama_tied", 2, "q8_0", "q8_0"), ("gptj", 3, "f32", "q4_1")])
def test_pipeline_type_overrides_equal_three_steps(kind, ranks, output_type, embedding_type, model_path,
                                                   three_step, tmp_path):
    from netp.pipeline.onepass import run_pipeline
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    q = tmp_path / "three" / "ne-q4_0.bin"
    q.parent.mkdir()
    quantize_file(three_step(kind, "f32"), q, GGMLType.Q4_0, output_type=type_from_name(output_type),
                  embedding_type=type_from_name(embedding_type))
    shard_file(q, tmp_path / "three-shards", ranks)
    run_pipeline(model_path(kind), tmp_path / "one", "q4_0", ranks, output_type=output_type,
                 embedding_type=embedding_type)
    same_tree(tmp_path / "one", tmp_path / "three-shards")


def test_override_choices_agree():
    from netp.quantize import cli, rules

    assert cli.OVERRIDE_TYPES == rules.OVERRIDE_TYPES


def _big_embedding_checkpoint(folder: Path, n_vocab: int, n_embd: int) -> int:
    """A one-layer bf16 LLaMA folder (tied head, test_fuzz's tiny tokenizer padded to
    n_vocab) whose embedding dwarfs every other tensor; written a chunk of rows at a
    time. Returns the embedding's size in f32."""
    import json

    from test_fuzz import tiny_tokenizer

    n_ff, n_head = 256, 8
    folder.mkdir()
    tok = tiny_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": n_vocab, "hidden_size": n_embd,
        "intermediate_size": n_ff, "num_hidden_layers": 1, "num_attention_heads": n_head,
        "num_key_value_heads": n_head, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}))
    layer = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (n_vocab, n_embd), "model.norm.weight": (n_embd,),
              layer + "input_layernorm.weight": (n_embd,), layer + "post_attention_layernorm.weight": (n_embd,),
              **{layer + f"self_attn.{p}_proj.weight": (n_embd, n_embd) for p in "qkvo"},
              layer + "mlp.gate_proj.weight": (n_ff, n_embd), layer + "mlp.up_proj.weight": (n_ff, n_embd),
              layer + "mlp.down_proj.weight": (n_embd, n_ff)}
    header, at = {}, 0
    for name, shape in shapes.items():
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + 2 * int(np.prod(shape))]}
        at = header[name]["data_offsets"][1]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(0)
    block = ((rng.standard_normal((1024, n_embd), dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for shape in shapes.values():
            rows = int(np.prod(shape[:-1]))
            for r in range(0, rows, block.shape[0]):
                part = block[:min(block.shape[0], rows - r), :shape[-1]]
                f.write((part | np.uint16(0x3f80) if len(shape) == 1 else part).tobytes())  # norms near 1
    return n_vocab * n_embd * 4


@pytest.mark.parametrize("command", ["pipeline", "convert"])
def test_bf16_tensors_stream_in_chunks(command, tmp_path):
    """A bf16 tensor is read a chunk of rows at a time, never whole in f32: the one pass's
    (and convert's) peak memory grows by far less than the largest tensor's f32 values
    (here a 400 MB embedding; growth measured in a fresh process from after its imports)."""
    import subprocess
    import sys

    f32_bytes = _big_embedding_checkpoint(tmp_path / "model", 98304, 1024)
    call = (f"run_pipeline({str(tmp_path / 'model')!r}, {str(tmp_path / 'shards')!r}, 'f16', 2)"
            if command == "pipeline" else
            f"convert({str(tmp_path / 'model')!r}, {str(tmp_path / 'ne-f32.bin')!r}, 'f32')")
    code = f"""
import resource
from netp.convert.stage import convert
from netp.pipeline.onepass import run_pipeline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
{call}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    assert grown < f32_bytes / 2, (grown, f32_bytes)
