"""Layer-streamed references (issue 33 point 1, docs/design.md §5 "Layer-streamed references"):
an NE file through netp's forward one layer at a time, transformers one decoder layer at a
time, each equal to the whole model's run and holding about one layer of weights.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netp.models.context import ForwardTrace
from netp.runtime.comm import SoloComm
from netp.runtime.model import load_rank_model
from netp.runtime.streamed import StreamedWeights, streamed_pass

TOKENS = [1, 504, 2113, 260, 857, 28, 1380, 4936, 30, 355, 47, 7140]


@pytest.fixture(scope="module")
def tiny_ne(tiny_hf_model, tmp_path_factory):
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file

    cache: dict[tuple[str, str], Path] = {}

    def make(kind: str, qtype: str) -> Path:
        if (kind, qtype) not in cache:
            folder = tmp_path_factory.mktemp(f"st-{kind}-{qtype}")
            f32 = folder / "ne-f32.bin"
            convert(str(tiny_hf_model(kind)), f32, "f32")
            out = f32
            if qtype != "f32":
                out = folder / f"ne-{qtype}.bin"
                quantize_file(f32, out, GGMLType[qtype.upper()])
            cache[kind, qtype] = out
        return cache[kind, qtype]

    return make


def whole_pass(path: Path, exact: bool = False) -> tuple[np.ndarray, list[np.ndarray], int]:
    m = load_rank_model(path, SoloComm(), len(TOKENS), exact=exact)
    try:
        trace = ForwardTrace()
        logits = m.forward(np.array(TOKENS), 0, all_logits=True, trace=trace)
        return logits, trace.states, m.weights.resident_bytes
    finally:
        m.close()


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_tied", "gptj"])
@pytest.mark.parametrize("qtype", ["f32", "q4_0", "q8_0"])
def test_streamed_ne_equals_the_whole_model(tiny_ne, kind, qtype):
    """Bit for bit: the same assembly and forward, only the weights arrive layer by layer."""
    path = tiny_ne(kind, qtype)
    for exact in ([False, True] if qtype != "f32" else [False]):
        logits, states, _ = whole_pass(path, exact)
        got = streamed_pass(path, TOKENS, exact=exact)
        assert np.array_equal(got.logits, logits)
        assert got.states is not None and len(got.states) == len(states) == 3
        assert all(np.array_equal(a, b) for a, b in zip(got.states, states))


def test_streamed_weights_hold_one_layer_at_a_time(tiny_ne):
    """The most weight bytes held at once is the largest of one layer and the head, not the model."""
    from netp.runtime.sources import open_rank_source
    from netp.runtime.model import RankModel

    path = tiny_ne("llama_gqa", "f32")
    _, _, whole = whole_pass(path)
    source = open_rank_source(path, 0, 1)
    try:
        weights = StreamedWeights(source)
        model = RankModel(source, SoloComm(), weights, len(TOKENS))
        model.forward(np.array(TOKENS), 0, all_logits=True)
        hp = source.hp
        layer = 4 * (hp.n_embd * (hp.n_embd + 2 * hp.n_embd_kv) + hp.n_embd * hp.n_embd + 3 * hp.n_embd * hp.n_ff
                     + 2 * hp.n_embd)
        head = 4 * (hp.n_vocab * hp.n_embd + hp.n_embd)
        assert weights.peak_bytes == max(layer, head)
        assert whole >= head + hp.n_layer * layer > weights.peak_bytes  # the whole model holds them all
        assert weights._layer is None and weights._head is not None  # the last layer was dropped for the head
    finally:
        source.close()


def test_streamed_f32_smollm2_memory(smollm2_f32):
    """A process streaming SmolLM2's f32 file (652 MB) grows by far less than the file."""
    code = f"""
import resource
from pathlib import Path
import numpy as np
from netp.runtime.streamed import streamed_pass
import netp.runtime.kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
p = streamed_pass(Path({str(smollm2_f32)!r}), list(range(100, 164)))
assert np.isfinite(p.logits).all() and len(p.states) == 31
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    size = smollm2_f32.stat().st_size
    head = 49152 * 576 * 4
    assert grown < 3 * head < size / 1.9, (grown, head, size)


# -- transformers ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, variant", [("llama_gqa", "safetensors"), ("llama_tied", "safetensors"),
                                           ("gptj", "safetensors"), ("llama_gqa", "sharded"),
                                           ("llama_mqa", "bf16")])
def test_streamed_transformers_equals_from_pretrained(tiny_hf_model, kind, variant):
    import torch
    from transformers import AutoModelForCausalLM

    from netp.runtime.hf_reference import _streamed_model, transformers_pass, weight_files

    folder = tiny_hf_model(kind, variant)
    files = weight_files(folder)
    assert files is not None
    model = _streamed_model(folder, files)
    assert model is not None  # streamed, not loaded whole
    with torch.no_grad():
        model(torch.tensor([TOKENS]))
    layer_params = [p for n, p in model.named_parameters() if ".layers." in n or ".h." in n]
    assert layer_params and all(p.is_meta for p in layer_params)  # every layer dropped after its use
    got = transformers_pass(str(folder), TOKENS, threads=1)
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = whole(torch.tensor([TOKENS]), output_hidden_states=True)
    assert np.abs(out.logits[0].numpy()).max() > 0.05
    assert np.array_equal(got.logits, out.logits[0].numpy())
    assert got.states is not None and len(got.states) == len(out.hidden_states)
    assert all(np.array_equal(a, b[0].numpy()) for a, b in zip(got.states, out.hidden_states))


def test_bin_checkpoint_is_loaded_whole(tiny_hf_model):
    """pytorch_model.bin cannot be read a layer at a time: transformers loads it (the same figures)."""
    from netp.runtime.hf_reference import transformers_pass, weight_files

    folder = tiny_hf_model("llama_gqa", "bin")
    assert weight_files(folder) is None
    got = transformers_pass(str(folder), TOKENS, threads=1)
    ref = transformers_pass(str(tiny_hf_model("llama_gqa")), TOKENS, threads=1)
    assert np.array_equal(got.logits, ref.logits)
