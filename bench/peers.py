"""The peers netp's benches measure against: llama.cpp's tools and neural-speed 1.0's runtime.

Both are fetched with pip from PyPI into the bench cache (bench/cache.py:
`$NETP_BENCH_CACHE/peers`, default ~/.cache/netp/peers) on first use and
reused after; neither is ever installed into the venv, and nothing in netp
or tests imports this module.

llama.cpp: the full llama.cpp tree ships inside the llama-cpp-python sdist
(`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`);
llama-bench, llama-quantize and llama-perplexity are built from its
vendor/llama.cpp with cmake (Release, GGML_NATIVE but no AMX, see NO_AMX;
no curl/openssl/tests/examples/server; about 12 minutes on 2 cores) into
`peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin`. One build at a
time: a lock file beside the tree serialises benches, and a build already
running in that build folder without the lock (a cmake or compiler whose
working directory is inside it) is waited for, then completed
incrementally; a build made with other flags (no `build/netp-cmake-flags.txt`
equal to CMAKE_FLAGS) is reconfigured and rebuilt. The log goes to
`peers/llama-build.log`. To rebuild from
scratch: `rm -r ~/.cache/netp/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build`.
The same tree's `convert_hf_to_gguf.py` (run with PYTHONPATH=gguf-py and
this venv's python, which has torch) is llama.cpp's own converter.

neural-speed: `pip download --no-deps neural-speed==1.0` (its manylinux
cp311 wheel, whatever the venv's python), unzipped into
`peers/neural-speed-1.0/wheel`. The wheel ships self-contained executables
(`neural_speed/run_llama`, `run_mixtral`, ...; their RPATH finds
libne_layers.so and the bundled libgomp) that read an NE file directly:
no python, no install. With NEURAL_SPEED_VERBOSE=1 they print
llama.cpp-style `model_print_timings` lines (prompt eval / eval ms and
tokens), parsed here. Their loader asserts n_layer in NS_LAYER_COUNTS
(22, 32, 40, 48, 56, 60, 80); neural_speed_run refuses other counts first.

API (bench scripts run as `python bench/x.py` have bench/ on sys.path):
    llama_cpp() -> LlamaCpp            .bench .quantize .perplexity (binaries), .converter
                                       (convert_hf_to_gguf.py), .gguf_py, .tree; builds if needed
    convert_hf_to_gguf(hf_dir, out, outtype="bf16") -> Path      llama.cpp's converter (f32/f16/bf16/q8_0)
    quantize_gguf(src, dst, qtype="q4_0", output_type=qtype, threads=None, allow_requantize=False) -> Path
                                       llama-quantize with --output-tensor-type (q4_0 everywhere by default)
    cached_gguf(hf_dir, qtype="q4_0") -> Path   both steps, cached in $NETP_BENCH_CACHE/gguf/ (the bf16
                                       intermediate deleted): the one call a bench needs for llama.cpp's file
    llama_bench(model, threads=(1,), n_prompt=64, n_gen=32, repetitions=3) -> list[LlamaBench]
                                       one row per thread count: .threads .prompt_tok_s .gen_tok_s (+ std)
    llama_perplexity(model, text, ctx=512, threads=1, kl_base=None, kl=False, chunks=None) -> Perplexity
                                       .ppl .ppl_err; with kl (comparing against kl_base, saved by an
                                       earlier run with kl_base and kl=False): .kld_mean .kld_mean_err
                                       .kld_99 .kld_999 .kld_max .same_top_p (%) .ppl_base
    neural_speed() -> Path             the unzipped wheel's neural_speed/ folder (run_llama, run_mixtral ...)
    neural_speed_copy(model, out) -> Path   the NE file without the tensors neural-speed 1.0 crashes on
                                       (llama3's rope_freqs.weight), or model itself when it has none
    neural_speed_run(model, prompt="..." | ids=[...], threads=1, n_predict=32, ctx=None, runner="run_llama")
                                       -> NeuralSpeedRun: .prompt_tokens .prompt_tok_s .decode_tokens
                                       .decode_tok_s .load_ms .text .wall_s .max_rss_mb
    run(cmd, env=None, timeout=...) -> Run    any command: .stdout .stderr .wall_s .max_rss_mb (the largest
                                       of the process and its waited-for descendants: under mpiexec the
                                       largest rank, not a sum; per-rank figures need each rank's own
                                       report); a non-zero exit raises PeerError with the output's tail

    python bench/peers.py --check     build/find everything and prove it end to end (prints figures)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Sequence

from cache import cache_dir, locked

LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")
# -march=native without AMX: this VM reports AMX and a lone tile instruction runs, but ggml's AMX
# kernels die with SIGILL (tilezero) in llama-bench's prompt pass; netp's numba kernels cannot use
# AMX either, so both sides run on AVX-512 VNNI. Explicit -mno-* flags win over -march=native.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
               f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")
FLAGS_STAMP = "netp-cmake-flags.txt"  # in build/: the flags the binaries were built with
NEURAL_SPEED = "1.0"
# The wheel's executables do not depend on the python ABI; pin the one wheel PyPI has.
NS_WHEEL_ARGS = ("--only-binary", ":all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64")
NS_LAYER_COUNTS = (22, 32, 40, 48, 56, 60, 80)  # neural-speed's loader asserts one of these
BUILD_TOOLS = {"cmake", "make", "gmake", "ninja", "cc1", "cc1plus", "c++", "g++", "gcc", "cc", "as", "ld",
               "collect2", "clang", "clang++"}


class PeerError(RuntimeError):
    """A peer could not be fetched, built or run; the message says which and how."""


@dataclasses.dataclass(frozen=True)
class Run:
    stdout: str
    stderr: str
    wall_s: float
    max_rss_mb: float  # wait4's ru_maxrss: the largest of the process and its descendants, MB (1e6 bytes)


def run(cmd: Sequence[str | os.PathLike], env: dict[str, str] | None = None, timeout: float = 7200,
        cwd: Path | None = None) -> Run:
    """Run `cmd` (env added to os.environ), capture its output, time it and take its max RSS."""
    argv = [str(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err, env={**os.environ, **(env or {})}, cwd=cwd)
        try:
            _, status, usage = _wait4(p, timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise PeerError(f"{' '.join(argv)}: still running after {timeout:.0f} s, killed") from None
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise PeerError(f"{' '.join(argv)} exited with {code}:\n{(stdout + stderr)[-3000:]}")
    return Run(stdout, stderr, wall, usage.ru_maxrss * 1024 / 1e6)


def _wait4(p: subprocess.Popen, timeout: float) -> tuple[int, int, os.struct_rusage]:  # type: ignore[name-defined]
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(p.args, timeout)
        time.sleep(0.02)


# -- llama.cpp ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LlamaCpp:
    tree: Path  # vendor/llama.cpp
    bench: Path
    quantize: Path
    perplexity: Path
    converter: Path  # convert_hf_to_gguf.py
    gguf_py: Path  # put on PYTHONPATH when running the converter


def llama_cpp() -> LlamaCpp:
    """llama.cpp's tools from the cache, downloaded and built first if absent (see the module doc)."""
    peers = cache_dir("peers")
    tree = peers / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    binaries = [tree / "build" / "bin" / t for t in LLAMA_TOOLS]
    found = LlamaCpp(tree, binaries[0], binaries[1], binaries[2], tree / "convert_hf_to_gguf.py", tree / "gguf-py")
    if _built(tree, binaries) and not _foreign_build(tree / "build"):
        return found
    with locked(peers / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.lock"):
        if not (tree / "CMakeLists.txt").is_file():
            _download_llama_cpp(peers)
        _wait_for_foreign_build(tree / "build")
        if not _built(tree, binaries):
            _build_llama_cpp(tree, peers / "llama-build.log")
    if not _built(tree, binaries):
        raise PeerError(f"llama.cpp build finished without {', '.join(map(str, binaries))} "
                        f"(see {peers / 'llama-build.log'})")
    return found


def _built(tree: Path, binaries: list[Path]) -> bool:
    """Every tool exists and was built with today's CMAKE_FLAGS (an older build is rebuilt)."""
    stamp = tree / "build" / FLAGS_STAMP
    return all(b.is_file() for b in binaries) and stamp.is_file() and stamp.read_text() == "\n".join(CMAKE_FLAGS)


def _download_llama_cpp(peers: Path) -> None:
    print(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON}'s sdist into {peers} ...", file=sys.stderr, flush=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
         f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", peers], timeout=1800)
    sdist = peers / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        raise PeerError(f"pip download did not leave {sdist}")
    with tarfile.open(sdist) as t:
        t.extractall(peers, filter="data")


def _foreign_build(build: Path) -> list[int]:
    """Pids of build tools (cmake, make, compilers) working inside `build`, by their /proc cwd."""
    build = build.resolve()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if comm in BUILD_TOOLS and cwd.is_relative_to(build):
            pids.append(int(proc.name))
    return pids


def _wait_for_foreign_build(build: Path) -> None:
    pids = _foreign_build(build)
    if pids:
        print(f"a llama.cpp build is already running in {build} (pids {pids}); waiting for it ...",
              file=sys.stderr, flush=True)
    while _foreign_build(build):
        time.sleep(15)


def _build_llama_cpp(tree: Path, log: Path) -> None:
    jobs = str(os.cpu_count() or 1)
    print(f"building {', '.join(LLAMA_TOOLS)} in {tree / 'build'} with -j{jobs} (about 12 minutes on 2 cores; "
          f"log {log}) ...", file=sys.stderr, flush=True)
    stamp = tree / "build" / FLAGS_STAMP
    stamp.unlink(missing_ok=True)
    with open(log, "a") as f:
        # configuring again is cheap and makes a build dir with other flags rebuild with these
        for cmd in (["cmake", "-B", "build", *CMAKE_FLAGS],
                    ["cmake", "--build", "build", f"-j{jobs}", "--target", *LLAMA_TOOLS]):
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            p = subprocess.run(["nice", "-n", "10", *cmd], cwd=tree, stdout=f, stderr=subprocess.STDOUT)
            if p.returncode:
                raise PeerError(f"{' '.join(cmd)} failed in {tree} (exit {p.returncode}); see {log}")
    stamp.write_text("\n".join(CMAKE_FLAGS))


def convert_hf_to_gguf(hf_dir: Path, out: Path, outtype: str = "bf16") -> Path:
    """An HF folder to a GGUF with llama.cpp's own converter (outtype f32, f16, bf16 or q8_0)."""
    lc = llama_cpp()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(lc.gguf_py), os.environ.get("PYTHONPATH")])),
           "NO_LOCAL_GGUF": ""}
    run([sys.executable, lc.converter, hf_dir, "--outfile", out, "--outtype", outtype], env=env)
    return out


def quantize_gguf(src: Path, dst: Path, qtype: str = "q4_0", output_type: str | None = None,
                  threads: int | None = None, allow_requantize: bool = False) -> Path:
    """llama-quantize SRC DST QTYPE with --output-tensor-type (default: QTYPE, so the output head is
    not llama.cpp's default q6_K and the comparison with netp is fair). allow_requantize: the source
    is itself quantized (the SmolLM2 Q4_1 GGUF)."""
    lc = llama_cpp()
    cmd: list[str | Path] = [lc.quantize, "--output-tensor-type", output_type or qtype]
    if allow_requantize:
        cmd.append("--allow-requantize")
    cmd += [src, dst, qtype.upper()]
    if threads:
        cmd.append(str(threads))
    run(cmd)
    return dst


def cached_gguf(hf_dir: Path, qtype: str = "q4_0") -> Path:
    """llama.cpp's GGUF of an HF folder (a bench/checkpoints.py one), quantized to `qtype` everywhere
    (q4_0, q8_0; or bf16/f16/f32 unquantized), cached as `$NETP_BENCH_CACHE/gguf/<folder>-<qtype>.gguf`.
    The intermediate bf16 GGUF is deleted once quantized: disk holds only the result."""
    out = cache_dir("gguf") / f"{Path(hf_dir).name}-{qtype}.gguf"
    with locked(out.with_name(out.name + ".lock")):
        if out.is_file():
            return out
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            if qtype in ("bf16", "f16", "f32"):
                convert_hf_to_gguf(hf_dir, tmp, qtype)
            else:
                src = out.with_name(f".{out.name}.bf16-{os.getpid()}")
                try:
                    convert_hf_to_gguf(hf_dir, src, "bf16")
                    quantize_gguf(src, tmp, qtype)
                finally:
                    src.unlink(missing_ok=True)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


@dataclasses.dataclass(frozen=True)
class LlamaBench:
    threads: int
    prompt_tok_s: float  # pp<n_prompt>, mean over the repetitions
    prompt_std: float
    gen_tok_s: float  # tg<n_gen>
    gen_std: float


def llama_bench(model: Path, threads: Sequence[int] = (1,), n_prompt: int = 64, n_gen: int = 32,
                repetitions: int = 3) -> list[LlamaBench]:
    """llama-bench -m MODEL -t T,.. -p N_PROMPT -n N_GEN -r REPS -o json: one row per thread count."""
    lc = llama_cpp()
    r = run([lc.bench, "-m", model, "-t", ",".join(map(str, threads)), "-p", str(n_prompt), "-n", str(n_gen),
             "-r", str(repetitions), "-o", "json"])
    try:
        rows = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise PeerError(f"llama-bench printed no JSON ({e}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}") from e
    out = []
    for t in threads:
        pp = [x for x in rows if x["n_threads"] == t and x["n_prompt"] == n_prompt and x["n_gen"] == 0]
        tg = [x for x in rows if x["n_threads"] == t and x["n_gen"] == n_gen and x["n_prompt"] == 0]
        if not pp or not tg:
            raise PeerError(f"llama-bench gave no pp{n_prompt}/tg{n_gen} row for {t} threads:\n{r.stdout[-2000:]}")
        out.append(LlamaBench(t, pp[0]["avg_ts"], pp[0]["stddev_ts"], tg[0]["avg_ts"], tg[0]["stddev_ts"]))
    return out


@dataclasses.dataclass(frozen=True)
class Perplexity:
    ppl: float
    ppl_err: float
    ppl_base: float | None = None  # the KL fields: only with kl=True
    kld_mean: float | None = None
    kld_mean_err: float | None = None
    kld_99: float | None = None
    kld_999: float | None = None
    kld_max: float | None = None
    same_top_p: float | None = None  # percent of positions where both models' top token agree
    wall_s: float = 0.0


def llama_perplexity(model: Path, text: Path, ctx: int = 512, threads: int = 1, kl_base: Path | None = None,
                     kl: bool = False, chunks: int | None = None) -> Perplexity:
    """llama-perplexity -m MODEL -f TEXT -c CTX -t THREADS. kl_base without kl: also save the logits
    there (--kl-divergence-base) for a later kl=True run of another model, which reads the tokens and
    logits from kl_base and reports the KL figures (--kl-divergence)."""
    lc = llama_cpp()
    cmd: list[str | Path] = [lc.perplexity, "-m", model, "-c", str(ctx), "-t", str(threads)]
    if not kl:
        cmd += ["-f", text]
    if kl_base is not None:
        cmd += ["--kl-divergence-base", kl_base]
    if kl:
        if kl_base is None:
            raise ValueError("kl=True needs kl_base (the logits file a reference run saved)")
        cmd.append("--kl-divergence")
    if chunks:
        cmd += ["--chunks", str(chunks)]
    r = run(cmd)
    log = r.stdout + r.stderr

    def num(pattern: str) -> float | None:
        m = re.search(pattern, log)
        return float(m.group(1)) if m else None

    if kl:
        m = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)", log)
        k = re.search(r"Mean\s+KLD:\s*([-\d.]+)\s*±\s*([\d.]+)", log)
        if not m or not k:
            raise PeerError(f"llama-perplexity --kl-divergence printed no statistics:\n{log[-3000:]}")
        return Perplexity(float(m.group(1)), float(m.group(2)), ppl_base=num(r"Mean PPL\(base\)\s*:\s*([\d.]+)"),
                          kld_mean=float(k.group(1)), kld_mean_err=float(k.group(2)),
                          kld_99=num(r"99\.0%\s+KLD:\s*([-\d.]+)"), kld_999=num(r"99\.9%\s+KLD:\s*([-\d.]+)"),
                          kld_max=num(r"Maximum KLD:\s*([-\d.]+)"), same_top_p=num(r"Same top p:\s*([\d.]+)"),
                          wall_s=r.wall_s)
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    if not m:
        raise PeerError(f"llama-perplexity printed no 'Final estimate':\n{log[-3000:]}")
    return Perplexity(float(m.group(1)), float(m.group(2)), wall_s=r.wall_s)


# -- neural-speed ------------------------------------------------------------------------

def neural_speed() -> Path:
    """The neural_speed/ folder of the unzipped neural-speed 1.0 wheel (downloaded first if absent)."""
    home = cache_dir("peers", f"neural-speed-{NEURAL_SPEED}")
    folder = home / "wheel" / "neural_speed"
    if (folder / "run_llama").is_file():
        return folder
    with locked(home / "unpack.lock"):
        if not (folder / "run_llama").is_file():
            wheels = sorted(home.glob("neural_speed-*.whl"))
            if not wheels:
                print(f"downloading neural-speed=={NEURAL_SPEED} into {home} ...", file=sys.stderr, flush=True)
                run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *NS_WHEEL_ARGS,
                     f"neural-speed=={NEURAL_SPEED}", "-d", home], timeout=1800)
                wheels = sorted(home.glob("neural_speed-*.whl"))
            if not wheels:
                raise PeerError(f"pip download left no neural_speed wheel in {home}")
            tmp = home / f".wheel-{os.getpid()}"
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(tmp)
            for exe in (tmp / "neural_speed").glob("run_*"):
                exe.chmod(0o755)
            for exe in (tmp / "neural_speed").glob("quant_*"):
                exe.chmod(0o755)
            shutil.rmtree(home / "wheel", ignore_errors=True)  # an earlier, interrupted unpack
            os.replace(tmp, home / "wheel")
    return folder


@dataclasses.dataclass(frozen=True)
class NeuralSpeedRun:
    prompt_tokens: int
    prompt_tok_s: float  # the prompt's one forward pass ("prompt eval time")
    decode_tokens: int  # n_predict - 1: the first token comes from the prompt pass
    decode_tok_s: float  # "eval time" runs / seconds
    load_ms: float
    text: str
    wall_s: float
    max_rss_mb: float


def _ne_n_layer(model: Path) -> int:
    from netp.formats.ne import NEReader

    with NEReader(model) as r:
        return r.header.n_layer


NS_UNKNOWN_TENSORS = ("rope_freqs.weight",)  # llama3 rope factors: neural-speed 1.0's llama loader
# never asks for the tensor and dereferences a null pointer on it in load_all_data (SIGSEGV)


def neural_speed_copy(model: Path, out: Path) -> Path:
    """`model` without the tensors neural-speed's loader crashes on (NS_UNKNOWN_TENSORS), every other
    byte as is; `model` itself when it has none. Without rope_freqs neural-speed runs plain rope at the
    file's theta: the same work per token, so speed figures compare, but not Llama 3.1's exact outputs."""
    from netp.formats.ne import NEReader, NEWriter

    with NEReader(model) as r:
        if not any(n in r.shapes for n in NS_UNKNOWN_TENSORS):
            return model
        with NEWriter(out, r.header, r.vocab) as w:
            for name in r.shapes:
                if name not in NS_UNKNOWN_TENSORS:
                    info = r.info(name)
                    w.add_tensor(name, info.ggml_type, info.shape, r.view(name))
    return out


def neural_speed_run(model: Path, prompt: str | None = None, ids: Sequence[int] | None = None, threads: int = 1,
                     n_predict: int = 32, ctx: int | None = None, runner: str = "run_llama") -> NeuralSpeedRun:
    """Greedy generation with neural-speed's own runtime (`runner`: run_llama, run_mixtral, ...) on an
    NE file, from a text prompt (tokenized by the runtime with the file's vocabulary) or token ids;
    --ignore-eos so exactly n_predict tokens are made. Refuses layer counts its loader asserts on."""
    if (prompt is None) == (ids is None):
        raise ValueError("give one of prompt and ids")
    n_layer = _ne_n_layer(model)
    if n_layer not in NS_LAYER_COUNTS:
        raise PeerError(f"{model}: {n_layer} layers; neural-speed's loader takes only "
                        f"{', '.join(map(str, NS_LAYER_COUNTS))}")
    exe = neural_speed() / runner
    if not exe.is_file():
        raise PeerError(f"no {exe} (runners: {', '.join(sorted(p.name for p in exe.parent.glob('run_*')))})")
    n_prompt_guess = len(ids) if ids is not None else 4 * len(prompt or "")
    cmd: list[str | Path] = [exe, "-m", model, "-t", str(threads), "-n", str(n_predict), "-c",
                             str(ctx or n_prompt_guess + n_predict + 16), "--top-k", "1", "--temp", "0",
                             "--repeat-penalty", "1.0", "--ignore-eos", "-s", "1"]
    cmd += ["-p", prompt] if prompt is not None else ["--ids", ",".join(map(str, ids or []))]
    r = run(cmd, env={"NEURAL_SPEED_VERBOSE": "1", "OMP_NUM_THREADS": str(threads)})
    log = r.stdout + r.stderr
    pe = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
    ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log.replace("prompt eval time", ""))
    load = re.search(r"load time =\s*([\d.]+) ms", log)
    if not pe or not ev:
        raise PeerError(f"{exe.name} printed no model_print_timings (NEURAL_SPEED_VERBOSE=1):\n{log[-3000:]}")
    text = r.stdout.split("\n\n\n")[0] if "\n\n\n" in r.stdout else r.stdout
    return NeuralSpeedRun(int(pe.group(2)), int(pe.group(2)) / (float(pe.group(1)) / 1e3),
                          int(ev.group(2)), int(ev.group(2)) / (float(ev.group(1)) / 1e3),
                          float(load.group(1)) if load else float("nan"), text, r.wall_s, r.max_rss_mb)


# -- the self-check ----------------------------------------------------------------------

def check() -> None:
    """Build/find every peer and run each helper once on small random models; print the figures."""
    import torch
    import transformers

    from checkpoints import checkpoint, llama31_8b, qwen3_30b_a3b, tiny_llama

    t0 = time.perf_counter()
    for shape in (tiny_llama(2), dataclasses.replace(qwen3_30b_a3b(2), hidden=256, n_heads=4, n_kv_heads=2,
                                                     head_dim=64, n_experts=16, n_experts_used=4, moe_width=128)):
        hf = checkpoint(shape)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            raise PeerError(f"transformers loads {hf} with {bad}")
        with torch.no_grad():
            logits = model(torch.tensor([[1, 504, 3458, 282, 253]])).logits.float()
        print(f"transformers loads {hf.name} as {type(model).__name__} (no missing or unexpected keys); "
              f"logits std {logits.std():.2f}, top-1 {logits[0].argmax(-1).tolist()}")

    with tempfile.TemporaryDirectory(prefix="netp-peers-check-") as tmp:
        work = Path(tmp)
        tiny = checkpoint(tiny_llama(32))
        ne_f32, ne_q4 = work / "tiny-f32.bin", work / "tiny-q4_0.bin"
        netp = Path(sys.executable).parent / "netp"
        run([netp, "convert", "-q", "--outtype", "f32", "--outfile", ne_f32, tiny])
        run([netp, "quantize", "-q", ne_f32, ne_q4, "--type", "q4_0"])
        print(f"neural-speed: {neural_speed()}")
        for threads in (1, 2):
            r = neural_speed_run(ne_q4, prompt="Once upon a time, there existed a little girl,", threads=threads,
                                 n_predict=32)
            print(f"neural-speed run_llama, netp's q4_0 NE of a 32-layer tiny Llama, {threads} thread(s): "
                  f"prompt {r.prompt_tokens} tok {r.prompt_tok_s:.0f} tok/s, decode {r.decode_tokens} tok "
                  f"{r.decode_tok_s:.1f} tok/s, max RSS {r.max_rss_mb:.0f} MB")

        t = time.perf_counter()
        lc = llama_cpp()
        print(f"llama.cpp: {lc.bench.parent} ({time.perf_counter() - t:.0f} s)")
        for shape, what in ((qwen3_30b_a3b(1), "1 of Qwen3-30B-A3B's layers"),
                            (llama31_8b(2), "2 of Llama-3.1-8B's layers")):
            hf = checkpoint(shape)
            ggufs = {}
            for q in ("q4_0", "q8_0"):
                t = time.perf_counter()
                ggufs[q] = cached_gguf(hf, q)
                print(f"llama.cpp's converter + llama-quantize {q} --output-tensor-type {q}: {ggufs[q]} "
                      f"({ggufs[q].stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s)")
            for row in llama_bench(ggufs["q4_0"], threads=(1, 2), repetitions=2):
                print(f"llama-bench q4_0, {what}, {row.threads} thread(s): "
                      f"pp64 {row.prompt_tok_s:.1f} tok/s, tg32 {row.gen_tok_s:.1f} tok/s")
        text = work / "text.txt"
        text.write_text((Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text())
        base = llama_perplexity(ggufs["q8_0"], text, ctx=128, threads=2, kl_base=work / "q8.kld", chunks=4)
        kld = llama_perplexity(ggufs["q4_0"], text, ctx=128, threads=2, kl_base=work / "q8.kld", kl=True,
                               chunks=4)
        print(f"llama-perplexity on the Llama (random weights: the figures only prove the parsing): q8_0 PPL "
              f"{base.ppl:.1f} +/- {base.ppl_err:.1f}; q4_0 vs q8_0: PPL {kld.ppl:.1f}, mean KLD "
              f"{kld.kld_mean:.4f}, 99% KLD {kld.kld_99:.4f}, same top p {kld.same_top_p:.1f}%")
    print(f"check passed in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="build/find the peers and run each helper once")
    args = ap.parse_args()
    if args.check:
        check()
        return
    lc = llama_cpp()
    print(f"llama.cpp tools:  {lc.bench.parent}\nconverter:        {lc.converter} (PYTHONPATH={lc.gguf_py})")
    print(f"neural-speed:     {neural_speed()}")


if __name__ == "__main__":
    main()
