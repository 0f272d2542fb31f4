"""netp's Mixtral NE file against neural-speed 1.0's own converter and runtime (issue 32: "an unsharded
Mixtral NE file loads in neural-speed's run_mixtral").

A random tiny Mixtral (transformers, 32 layers as neural-speed's loader wants, 8 experts, top-2, SmolLM2's
vocabulary) is converted twice to f32: by `netp convert`, and by the wheel's
neural_speed/convert/convert_mixtral.py (bench/peers.py's unzipped wheel; its vocabulary reader wants a
sentencepiece tokenizer.model, which this checkpoint lacks, so a stand-in with the same token count is
handed to it: the vocabulary section is not compared; and it reads only a top-level `rope_theta`, while
transformers 5 saves it under `rope_parameters`, so any other theta than its default 10000 would differ
in the header: the model uses 10000). Printed: the tensors of the two files - names,
order, types, shapes and bytes - and the header fields that differ; then neural-speed's run_mixtral on
netp's f32 and q4_0 files (it must load them and generate).
Usage: python bench/ns_mixtral.py
"""
from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from cache import cache_dir
from checkpoints import _smollm2_tokenizer
from peers import neural_speed, run

BIN = Path(sys.executable).parent


def tiny_mixtral(out: Path) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=32,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.05)
    model.save_pretrained(out)
    # neural-speed's converter finds safetensors only under this name
    (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
    for f in _smollm2_tokenizer().iterdir():
        shutil.copyfile(f, out / f.name)
    return out


def neural_speed_convert(hf: Path, out: Path) -> None:
    """convert_mixtral.py's main() in this process, its vocabulary reader replaced (see the module doc)."""
    script = neural_speed() / "convert" / "convert_mixtral.py"
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location("ns_convert_mixtral", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class StandInVocab:
        vocab_size = vocab_size_base = 49152
        added_tokens_list: list = []
        fname_tokenizer, fname_added_tokens = "stand-in", None

        def all_tokens(self):  # type: ignore[no-untyped-def]
            return ((f"t{i}".encode(), 0.0) for i in range(self.vocab_size))

    module.load_vocab = lambda *a, **k: StandInVocab()
    module.main(["--outtype", "f32", "--outfile", str(out), str(hf)])


def main() -> None:
    from netp.formats.ne import NEReader

    with tempfile.TemporaryDirectory(prefix="ns-mixtral-", dir=cache_dir("tmp")) as tmp:
        work = Path(tmp)
        hf = tiny_mixtral(work / "hf")
        mine, theirs, q4 = work / "netp-f32.bin", work / "ns-f32.bin", work / "netp-q4_0.bin"
        run([BIN / "netp", "convert", "--outtype", "f32", "--outfile", mine, hf, "--quiet"])
        run([BIN / "netp", "quantize", mine, q4, "--type", "q4_0", "--quiet"])
        neural_speed_convert(hf, theirs)
        with NEReader(mine) as a, NEReader(theirs) as b:
            ha, hb = dataclasses.asdict(a.header), dataclasses.asdict(b.header)
            names_a, names_b = list(a.shapes), list(b.shapes)
            same = [n for n in names_a if n in b.shapes and a.info(n).ggml_type == b.info(n).ggml_type
                    and a.info(n).shape == b.info(n).shape and np.array_equal(a.view(n), b.view(n))]
            print(f"tensors: netp {len(names_a)}, neural-speed {len(names_b)}; same order: {names_a == names_b}; "
                  f"identical (type, shape, bytes): {len(same)}")
            print("header fields that differ (netp, neural-speed): "
                  f"{ {k: (ha[k], hb.get(k)) for k in ha if ha[k] != hb.get(k)} }")
            ok = names_a == names_b and len(same) == len(names_a)
        for f in (mine, q4):
            r = run([neural_speed() / "run_mixtral", "-m", f, "-t", "1", "-n", "8", "-c", "64", "--top-k", "1",
                     "--temp", "0", "--ignore-eos", "-s", "1", "-p", "Once upon a time"])
            print(f"run_mixtral on netp's {f.name}: ran ({r.stdout.split(chr(10))[0][:60]!r}...)")
    print(f"\nneural-speed Mixtral layout: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
