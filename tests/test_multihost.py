"""Several hosts (issue 26, docs/design.md §9): SmolLM2 q4_0 over 2 and 3
namespaced hosts on a bridge (tests/multihost.py), each holding only its
rank file, manifest.json and tokenizer/, talking TCP through veth pairs.

Checked: the text and the verify table equal the one-host run's; the
all-reduce traffic crosses the bridge; a host without its rank file fails
in one line; a killed rank or a host whose link goes down ends every rank
and mpiexec. 3 hosts and the default --timeout are slow (`make test-multihost`).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from multihost import BIN, Cluster, host_files, host_name, unavailable

from netp.formats.manifest import rank_file_name

REASON = unavailable()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

pytestmark = pytest.mark.multihost
PROMPT = "Once upon a time, there existed a little girl,"
RUN_ARGS = ["--top_k", "1", "-t", "1", "-n", "16", "-p", PROMPT]
NETP = str(BIN / "netp")


@pytest.fixture(scope="module")
def shard_sets(smollm2_q4_0, smollm2_shards2, tmp_path_factory):
    """{2: the session's 2-rank SmolLM2 q4_0 set, 3: a 3-rank one} (read-only)."""
    from netp.shard.stage import shard_file

    three = tmp_path_factory.mktemp("mh-shards3") / "shards"
    shard_file(smollm2_q4_0, three, 3)
    return {2: smollm2_shards2, 3: three}


@pytest.fixture(scope="module", autouse=True)
def sigterm_tears_down():
    """A SIGTERM to pytest (a CI timeout) unwinds like Ctrl-C, so the cluster finalizers still run."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def cluster(tmp_path):
    """cluster(n) -> a started Cluster of n hosts; always torn down, and checked gone."""
    made: list[Cluster] = []

    def make(n: int) -> Cluster:
        c = Cluster(n, tmp_path / f"cluster{len(made)}")
        made.append(c)
        return c.__enter__()

    yield make
    for c in made:
        names = list(c.created)
        c.close()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(name in left for name in names), left


def one_host(args: list[str]) -> subprocess.CompletedProcess:
    """The same shard set on one host, its ranks simulated in one process."""
    return subprocess.run([NETP, *args], capture_output=True, text=True, timeout=300)


def table(verify_out: str) -> list[str]:
    """verify's comparison rows, without the lines naming the shard set's path and world."""
    return [ln for ln in verify_out.splitlines() if not ln.startswith(("verify ", "== "))]


def hparams(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())["hparams"]


@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_hosts_match_one_host_over_the_bridge(n, shard_sets, smollm2_q4_0, cluster):
    shards = shard_sets[n]
    c = cluster(n)
    c.place(shards)
    for r in range(n):  # each host holds its own rank file, the manifest and the tokenizer only
        assert sorted(os.listdir(c.root / "hosts" / host_name(r))) == sorted(
            p.name for p in host_files(shards, r))
        assert {rank_file_name(r, n), "manifest.json", "tokenizer"} == set(os.listdir(c.root / "hosts" / host_name(r)))
    sent_before = [c.bytes_from(r) for r in range(n)]
    p = c.run([NETP, "run", "-m", str(c.mount), *RUN_ARGS])
    sent = [c.bytes_from(r) - b for r, b in zip(range(n), sent_before)]
    assert p.returncode == 0, p.stderr
    ref = one_host(["run", "-m", str(shards), *RUN_ARGS])
    assert ref.returncode == 0, ref.stderr
    text, timing = p.stdout.splitlines()[0], p.stdout.splitlines()[-1]
    assert text == ref.stdout.splitlines()[0] and len(text) > len(PROMPT) + 20
    assert f"{n} MPI ranks" in timing

    # All-reduce traffic crossed each host's veth: every rank sends at least its
    # (T, n_embd) vector of f64 partial sums (docs/design.md §5) per all-reduce,
    # 2 per layer, over every token fed.
    hp = hparams(shards)
    prompt_tok, decode_tok = (int(x) for x in re.search(r"prompt (\d+) tok .* decode (\d+) tok", timing).groups())
    per_token = hp["n_layer"] * 2 * hp["n_embd"] * 8
    print(f"{n} hosts: bytes each host sent into the bridge {sent}; all-reduce payload alone "
          f"{per_token * (prompt_tok + decode_tok)} ({prompt_tok} + {decode_tok} tokens)")
    for r in range(n):
        assert sent[r] >= per_token * (prompt_tok + decode_tok), (r, sent)
    # ...and the timing line states the same per-token payload for every rank
    kb = re.search(r"kB sent per token \(all-reduce\+gather\): ([^|]+)", timing).group(1).split(", ")
    assert [float(k.split("+")[0]) for k in kb] == [round(per_token / 1e3, 1)] * n
    vocab_part = [float(k.split("+")[1]) for k in kb]
    assert vocab_part[0] == 0 and all(v > 0 for v in vocab_part[1:])  # rank 0 keeps its logits slice

    v = c.run([NETP, "verify", str(c.mount), "--ref", str(smollm2_q4_0), "-n", "4", "-t", "1"])
    assert v.returncode == 0, v.stdout + v.stderr
    assert f"on {n} MPI ranks vs" in v.stdout and v.stdout.rstrip().endswith("verify: PASS")
    vref = one_host(["verify", str(shards), "--ref", str(smollm2_q4_0), "-n", "4", "-t", "1"])
    assert table(v.stdout) == table(vref.stdout)


@pytest.mark.slow  # (38 s; `make test-multihost` runs it, and test_runtime's one-host version stays in `make test`)
def test_verify_with_the_references_on_rank_0s_host_only(shard_sets, smollm2_q4_0, smollm2_f32, smollm2_gguf,
                                                        cluster):
    """README's recipe: --ref, --f32 and --hf exist on rank 0's host only; the other host
    holds its rank file, the manifest and the tokenizer, and verify passes (rank 0 alone
    resolves the plan and runs the references)."""
    c = cluster(2)
    c.place(shard_sets[2])
    ref, f32, hf = (c.give(0, p) for p in (smollm2_q4_0, smollm2_f32, smollm2_gguf))
    assert not (c.root / "hosts" / host_name(1) / smollm2_q4_0.name).exists()
    v = c.run([NETP, "verify", str(c.mount), "--ref", str(ref), "--f32", str(f32), "--hf", str(hf),
               "-n", "3", "-t", "1"])
    assert v.returncode == 0, v.stdout + v.stderr
    assert "on 2 MPI ranks vs smollm2-q4_0.bin on 1 rank" in v.stdout
    assert "vs transformers" in v.stdout and "KL divergence" in v.stdout
    assert v.stdout.rstrip().endswith("verify: PASS") and "FAIL" not in v.stdout


@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_host_without_its_rank_file_fails_in_one_line(n, shard_sets, cluster):
    shards = shard_sets[n]
    c = cluster(n)
    lacking = n - 1
    c.place(shards, skip=[shards / rank_file_name(lacking, n)])
    p = c.run([NETP, "run", "-m", str(c.mount), *RUN_ARGS])
    assert p.returncode != 0 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"[rank {lacking}] netp run: error: ")
    assert f"{rank_file_name(lacking, n)}: rank file of rank {lacking} is missing" in lines[0]


class Generation:
    """A long greedy generation over the cluster, read as it streams."""

    def __init__(self, c: Cluster, timeout: float | None, options: tuple[str, ...] = ()):
        args = [NETP, "run", "-m", str(c.mount), "--top_k", "1", "-t", "1", "-n", "400", "-p", PROMPT]
        if timeout is not None:
            args += ["--timeout", str(timeout)]
        self.c, self.proc, self.out = c, c.start(args, options=options), []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while ch := self.proc.stdout.read(1):
            self.out.append(ch)

    def wait_for_tokens(self, chars: int = 30, limit: float = 180) -> dict[int, list[int]]:
        """Block until text beyond the prompt streams; returns the rank pids per host."""
        t0 = time.monotonic()
        while len("".join(self.out)) < len(PROMPT) + chars:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() - t0 < limit, "no tokens"
            time.sleep(0.05)
        ranks = self.c.rank_pids("netp")
        assert sorted(ranks) == list(range(self.c.n)) and all(len(p) == 1 for p in ranks.values()), ranks
        return ranks

    def ends(self, limit: float) -> tuple[float, float | None]:
        """Seconds until every rank process is gone, and until mpiexec returned (None: not within limit)."""
        t0 = time.monotonic()
        ranks_gone = mpiexec_gone = None
        while time.monotonic() - t0 < limit:
            now = time.monotonic() - t0
            if ranks_gone is None and not self.c.rank_pids("netp"):
                ranks_gone = now
            if mpiexec_gone is None and self.proc.poll() is not None:
                mpiexec_gone = now
            if ranks_gone is not None and mpiexec_gone is not None:
                break
            time.sleep(0.05)
        assert ranks_gone is not None, f"ranks still running after {limit} s: {self.c.rank_pids('netp')}"
        return ranks_gone, mpiexec_gone


def test_killed_rank_ends_every_rank(shard_sets, cluster):
    c = cluster(2)
    c.place(shard_sets[2])
    g = Generation(c, timeout=None)
    ranks = g.wait_for_tokens()
    os.kill(ranks[1][0], signal.SIGKILL)
    ranks_gone, mpiexec_gone = g.ends(limit=10)
    print(f"SIGKILL of rank 1: every rank gone after {ranks_gone:.2f} s, mpiexec after {mpiexec_gone} s")
    assert mpiexec_gone is not None and g.proc.returncode != 0
    assert "stop:" not in "".join(g.out)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 2])
def test_killed_rank_ends_the_others_by_their_deadline(victim, shard_sets, cluster):
    """hydra told not to clean up: the survivors end by their own deadline, and the lowest of
    them names the dead rank in one line. (Before the roll call went over UDP, sending it to the
    dead rank through MPI crashed MPICH's UCX layer, SIGSEGV, and no line was printed.)"""
    c = cluster(3)
    c.place(shard_sets[3])
    g = Generation(c, timeout=5, options=("-disable-auto-cleanup",))
    ranks = g.wait_for_tokens()
    os.kill(ranks[victim][0], signal.SIGKILL)
    ranks_gone, mpiexec_gone = g.ends(limit=15)
    print(f"SIGKILL of rank {victim}, no hydra cleanup: ranks gone after {ranks_gone:.2f} s, "
          f"mpiexec after {mpiexec_gone} s")
    assert mpiexec_gone is not None and g.proc.returncode != 0
    lines = g.proc.stderr.read().strip().splitlines()
    reporter = 1 if victim == 0 else 0
    assert len(lines) == 1 and re.fullmatch(
        rf"\[rank {reporter}\] netp run: error: lost contact with rank {victim}: \S[^:]* not complete after "
        rf"5 s \(--timeout\); this rank gives up", lines[0]), lines


@pytest.mark.parametrize("n,victim,timeout", [(2, 1, 5), pytest.param(3, 0, None, marks=pytest.mark.slow)])
def test_host_link_down_ends_every_rank_and_mpiexec(n, victim, timeout, shard_sets, cluster):
    c = cluster(n)
    c.place(shard_sets[n])
    g = Generation(c, timeout=timeout)
    g.wait_for_tokens()
    c.link_down(victim)
    ranks_gone, mpiexec_gone = g.ends(limit=60)
    print(f"link of host {victim} of {n} down (--timeout {timeout or 'default'}): every rank gone after "
          f"{ranks_gone:.2f} s, mpiexec after {mpiexec_gone} s")
    assert mpiexec_gone is not None, "mpiexec did not return within 60 s"
    assert g.proc.returncode != 0 and "stop:" not in "".join(g.out)
    lines = g.proc.stderr.read().strip().splitlines()
    assert len(lines) == 1, lines
    # reported by the lowest rank still in touch with the others, naming the lost one
    reporter = 1 if victim == 0 else 0
    waited = f"{timeout or 30:g} s (--timeout)"
    assert re.fullmatch(rf"\[rank {reporter}\] netp run: error: lost contact with rank {victim}: "
                        rf"\S[^:]* not complete after {re.escape(waited)}; this rank gives up", lines[0]), lines[0]


# -- netp serve over the hosts ------------------------------------------------------------

SERVE_PORT = 18734  # inside host 0's own network namespace: nothing else listens there


class Served:
    """`netp serve` over the cluster, its clients run inside host 0's namespace (rank 0 listens on
    127.0.0.1 there)."""

    def __init__(self, c: Cluster, timeout: float, options: tuple[str, ...] = ()):
        self.c = c
        self.proc = c.start([NETP, "serve", str(c.mount), "--port", str(SERVE_PORT), "-t", "1", "-c", "512",
                             "--timeout", str(timeout)], options=options)
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.monotonic()
        while not any("serving " in ln for ln in self.err):
            assert self.proc.poll() is None, "\n".join(self.err)
            assert time.monotonic() - t0 < 300, "the server did not start"
            time.sleep(0.1)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line.rstrip("\n"))

    def stream(self, max_tokens: int = 400) -> subprocess.Popen:
        """A streaming completion by curl inside host 0's namespace; its stdout is the event stream."""
        body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True})
        return subprocess.Popen(["ip", "netns", "exec", self.c.host_ns[0], "curl", "-sN", "--max-time", "120",
                                 f"http://127.0.0.1:{SERVE_PORT}/v1/completions", "-d", body],
                                stdout=subprocess.PIPE, text=True)

    def ends(self, limit: float) -> float:
        t0 = time.monotonic()
        while self.proc.poll() is None:
            assert time.monotonic() - t0 < limit, "the server did not end"
            time.sleep(0.05)
        return time.monotonic() - t0

    def reason(self) -> list[str]:
        """The error lines (the request log lines left out)."""
        time.sleep(0.2)
        return [ln for ln in self.err if " error: " in ln]


def _read_events(client: subprocess.Popen, until_chunks: int) -> list[str]:
    events: list[str] = []
    assert client.stdout is not None
    while len([e for e in events if '"text_completion"' in e]) < until_chunks:
        line = client.stdout.readline()
        assert line, events
        if line.startswith("data: "):
            events.append(line)
    return events


@pytest.mark.parametrize("n,victim,how", [(2, 1, "link"), pytest.param(3, 2, "kill", marks=pytest.mark.slow),
                                          pytest.param(3, 0, "kill", marks=pytest.mark.slow)])
def test_serve_lost_peer_answers_the_client_and_ends(n, victim, how, shard_sets, cluster):
    c = cluster(n)
    c.place(shard_sets[n])
    s = Served(c, timeout=5, options=("-disable-auto-cleanup",) if how == "kill" else ())
    client = s.stream()
    events = _read_events(client, 3)
    t0 = time.monotonic()
    if how == "link":
        c.link_down(victim)
    else:
        os.kill(c.rank_pids("netp")[victim][0], signal.SIGKILL)
    out, _ = client.communicate(timeout=60)
    answered = time.monotonic() - t0
    events += [ln for ln in out.splitlines() if ln.startswith("data: ")]
    s.ends(limit=30)
    print(f"serve on {n} hosts, rank {victim} lost ({how}, --timeout 5): the client's stream ended after "
          f"{answered:.2f} s, the server after {time.monotonic() - t0:.2f} s")
    assert s.proc.returncode != 0
    reporter = 1 if victim == 0 else 0
    assert len(s.reason()) == 1 and re.fullmatch(
        rf"\[rank {reporter}\] netp serve: error: lost contact with rank {victim}: \S[^:]* not complete after 5 s "
        rf"\(--timeout\); this rank gives up", s.reason()[0]), s.err
    if victim != 0:  # rank 0 alive: the client got an error event, never [DONE]
        assert '"error"' in events[-1] and "lost a rank" in events[-1], events[-3:]
        assert not any("[DONE]" in e for e in events)


def test_serve_idle_notices_a_lost_link(shard_sets, cluster):
    """No request in flight: the keep-alive rounds still find the lost host within the deadline."""
    c = cluster(2)
    c.place(shard_sets[2])
    s = Served(c, timeout=4)
    c.link_down(1)
    took = s.ends(limit=30)
    print(f"idle server, link of host 1 down: server ended {took:.2f} s later")
    assert s.proc.returncode != 0 and took < 4 + 1 + 5  # deadline + keep-alive period + slack
    assert len(s.reason()) == 1 and "lost contact with rank 1" in s.reason()[0], s.err
