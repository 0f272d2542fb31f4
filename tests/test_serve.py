"""`netp serve` (issue 34, docs/design.md §11): a real server under
`mpiexec -n 2` on the SmolLM2 q4_0 shard set, talked to with the `openai`
client and with plain HTTP: OpenAI's shapes, greedy and seeded text equal
to ne-run's, stop strings, bad requests, 40 clients at once, a client that
leaves, the API key, SIGTERM, a killed rank.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from serve_harness import BIN, Server

from netp.runtime.serve.text import StopText

MPIEXEC = BIN / "mpiexec"
PROMPT = "Once upon a time, there existed a little girl,"
CTX = 256
# SmolLM2's chat template, rendered by hand for one user message (the template adds its system turn).
CHAT_RENDERED = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

openai = pytest.importorskip("openai")


# -- stop strings, without a server ----------------------------------------------------------

def _stream_through(text: str, stops: list[str], cuts: list[int]) -> tuple[str, bool, list[str]]:
    s = StopText(stops)
    pieces, sent = [], []
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        pieces.append(s.add(text[a:b]))
        sent.append("".join(pieces))
        if s.hit:
            break
    pieces.append(s.finish())
    return "".join(pieces), s.hit, sent


def test_stop_strings_cut_exactly_however_the_text_arrives():
    rng = random.Random(34)
    alphabet = "ab c\n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))]
        cuts = [rng.randrange(0, len(text) + 1) for _ in range(rng.randrange(0, 8))]
        # Generation stops at the first piece after which a stop string is complete; the
        # text ends where the earliest stop string complete by then begins.
        expected, found = text, False
        for end in sorted({*cuts, len(text)}):
            starts = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
            if starts:
                expected, found = text[:min(starts)], True
                break
        out, hit, sent = _stream_through(text, stops, cuts)
        assert out == expected and hit == found, (text, stops, cuts, out)
        # never sent: a stop string, or text a stop string could still grow from
        for prefix in sent:
            assert expected.startswith(prefix)


def test_the_queue_holds_depth_waiting_beside_the_running_one_in_arrival_order():
    from netp.runtime.sampling import SamplingParams
    from netp.runtime.serve.engine import Job, JobQueue, QueueClosed, QueueFull

    def job(i: int) -> Job:
        return Job([i], 1, SamplingParams(), [], lambda event: None)

    never = threading.Event()
    for depth in (0, 2):
        q = JobQueue(depth)
        jobs = [job(i) for i in range(depth + 1)]
        for j in jobs:  # free ranks: one more than depth fits
            q.submit(j)
        with pytest.raises(QueueFull):
            q.submit(job(99))
        assert q.take(0.01, never) is jobs[0]
        with pytest.raises(QueueFull):  # busy: depth wait, no more
            q.submit(job(99))
        if depth:
            jobs[1].cancelled.set()  # a client gone while waiting is skipped
            assert q.take(0.01, never) is jobs[2]
        q.finished()
        late = job(7)
        q.submit(late)
        assert q.close("stopping") == [late]
        with pytest.raises(QueueClosed):
            q.submit(job(8))
        assert q.take(0.01, never) is None


# -- a server for the module -----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2_shards2):
    s = Server(smollm2_shards2, ["-c", str(CTX), "--queue", "6", "--timeout", "60"])
    try:
        yield s
    finally:
        code = s.stop()
        assert code == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def ne_run(shards: Path, *args: str) -> str:
    """ne-run's generated text (its stdout less the prompt it echoes and the timing line)."""
    p = subprocess.run([str(BIN / "ne-run"), "-m", str(shards), "-t", "1", "-c", str(CTX), *args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout.rsplit("\n", 2)[0]


def post(url: str, path: str, body: bytes | str, headers: dict | None = None) -> tuple[int, dict, dict]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read() or b"null")
    finally:
        conn.close()


def test_completion_greedy_equals_ne_run_streaming_or_not(server, client, smollm2_shards2):
    expected = ne_run(smollm2_shards2, "--top_k", "1", "-n", "20", "-p", PROMPT)
    assert expected.startswith(PROMPT) and len(expected) > len(PROMPT) + 20
    r = client.completions.create(model=smollm2_shards2.name, prompt=PROMPT, max_tokens=20,
                                  extra_body={"top_k": 1})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == smollm2_shards2.name
    assert PROMPT + r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (20, r.usage.prompt_tokens + 20)
    timings = r.model_extra["timings"]
    assert timings["predicted_n"] == 20 and timings["prompt_n"] == r.usage.prompt_tokens
    assert timings["predicted_per_second"] > 0 and timings["prompt_per_second"] > 0

    chunks = list(client.completions.create(prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            model=smollm2_shards2.name))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert PROMPT + "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_seeded_sampling_equals_ne_run(server, client, smollm2_shards2):
    expected = ne_run(smollm2_shards2, "--seed", "7", "-n", "16", "-p", PROMPT)
    texts = [client.completions.create(model=smollm2_shards2.name, prompt=PROMPT, max_tokens=16, seed=7,
                                       temperature=0.8, top_p=0.95, extra_body={"top_k": 40, "repeat_penalty": 1.1}
                                       ).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1] and PROMPT + texts[0] == expected


def test_chat_through_the_template_equals_ne_run(server, client, smollm2_shards2):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_shards2 / "tokenizer" / "tokenizer.json"))
    ids = tok.encode(CHAT_RENDERED, add_special_tokens=False).ids
    rendered = ne_run(smollm2_shards2, "--top_k", "1", "-n", "24", "--ids", ",".join(map(str, ids)))
    head, expected = rendered.split("<|im_start|>assistant\n")  # ne-run shows the prompt without its EOS tokens
    assert head + "<|im_start|>assistant\n" == CHAT_RENDERED.replace("<|im_end|>", "")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=smollm2_shards2.name, messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert "Paris" in expected
    assert r.usage.prompt_tokens == len(ids)
    # EOS ends the answer: "stop", and EOS is not in the text
    assert r.choices[0].finish_reason == ("stop" if r.usage.completion_tokens < 24 else "length")

    chunks = list(client.chat.completions.create(model=smollm2_shards2.name, messages=messages, max_tokens=24,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-2].model_extra["timings"]["predicted_n"] == r.usage.completion_tokens


def test_stop_strings_end_the_text_and_are_never_sent(server, client, smollm2_shards2):
    full = client.completions.create(model=smollm2_shards2.name, prompt=PROMPT, max_tokens=24, temperature=0
                                     ).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 4]  # a string inside the text, likely across tokens
    cut = full[:full.index(stop)]
    r = client.completions.create(model=smollm2_shards2.name, prompt=PROMPT, max_tokens=24, temperature=0,
                                  stop=[stop, "never appears"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    deltas = [c.choices[0].text for c in client.completions.create(
        model=smollm2_shards2.name, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True)]
    assert "".join(deltas) == cut and not any(stop in d for d in deltas)


def test_models_and_health(server, client, smollm2_shards2):
    models = client.models.list()
    assert [m.id for m in models.data] == [smollm2_shards2.name]
    u = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}


BAD = [
    (b"this is not json", None),
    (b'["a list"]', None),
    (json.dumps({"prompt": 5}), "prompt"),
    (json.dumps({"prompt": PROMPT, "max_tokens": "5"}), "max_tokens"),
    (json.dumps({"prompt": PROMPT, "temperature": "hot"}), "temperature"),
    (json.dumps({"prompt": PROMPT, "stream": "yes"}), "stream"),
    (json.dumps({"prompt": PROMPT, "model": "gpt-4o"}), "model"),
    (json.dumps({"prompt": PROMPT, "max_tokens": 0}), "max_tokens"),
    (json.dumps({"prompt": PROMPT, "max_tokens": -3}), "max_tokens"),
    (json.dumps({"prompt": PROMPT, "top_p": 1.5}), "top_p"),
    (json.dumps({"prompt": PROMPT, "n": 3}), "n"),
    (json.dumps({"prompt": [49152]}), "prompt"),
    (json.dumps({"prompt": "word " * (CTX + 10)}), "prompt"),
    (b'{"prompt": "x", "temperature": NaN}', None),
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_completion_requests_get_400_with_openais_error_body(server, body, param):
    status, _, reply = post(server.url, "/v1/completions", body)
    assert status == 400, reply
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert reply["error"]["message"]


def test_bad_chat_requests_and_a_prompt_over_the_context(server, smollm2_shards2):
    for body, param in [({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
                        ({"messages": [{"role": 1, "content": "x"}]}, "messages.0.role"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
                        ({"messages": [{"role": "user", "content": "word " * CTX}]}, "messages")]:
        status, _, reply = post(server.url, "/v1/chat/completions", json.dumps(body))
        assert status == 400 and reply["error"]["param"] == param, reply
    status, _, reply = post(server.url, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "word " * CTX}]}))
    assert reply["error"]["code"] == "context_length_exceeded" and f"is {CTX} tokens" in reply["error"]["message"]
    # the server is still there and answers
    status, _, reply = post(server.url, "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}))
    assert status == 200 and reply["usage"]["completion_tokens"] == 2


def test_forty_clients_at_once_are_answered_or_refused(server, smollm2_shards2):
    prompts = [f"{PROMPT} Her name was {name}" for name in ("Anna", "Bob", "Chloe", "Dmitri", "Eve")]
    results: list[tuple[int, int, object]] = []
    lock = threading.Lock()
    c = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=300)

    def one(i: int) -> None:
        prompt = prompts[i % len(prompts)]
        try:
            if i % 2:
                text = "".join(ch.choices[0].text for ch in c.completions.create(
                    model=smollm2_shards2.name, prompt=prompt, max_tokens=3, temperature=0, stream=True))
            else:
                text = c.completions.create(model=smollm2_shards2.name, prompt=prompt, max_tokens=3,
                                            temperature=0).choices[0].text
            outcome: tuple[int, int, object] = (i, 200, text)
        except openai.APIStatusError as e:
            outcome = (i, e.status_code, e.response.headers.get("retry-after"))
        except Exception as e:  # noqa: BLE001 - a lost request fails the test below
            outcome = (i, -1, repr(e))
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(results) == 40 and not any(t.is_alive() for t in threads)
    assert not [r for r in results if r[1] not in (200, 503)], results
    answered = {i: text for i, status, text in results if status == 200}
    refused = [r for r in results if r[1] == 503]
    assert answered and refused, results
    assert all(retry == "1" for _, _, retry in refused)
    # none mixed up: each answer is what its prompt alone gives
    alone = {p: c.completions.create(model=smollm2_shards2.name, prompt=p, max_tokens=3, temperature=0
                                     ).choices[0].text for p in prompts}
    assert all(text == alone[prompts[i % len(prompts)]] for i, text in answered.items()), (answered, alone)
    assert len(set(alone.values())) > 1


def test_a_client_that_leaves_frees_the_ranks(server, smollm2_shards2):
    u = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": PROMPT, "max_tokens": 200, "stream": True, "top_k": 1}), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    seen = b""
    while seen.count(b"data: ") < 3:
        seen += r.read1(4096)
    conn.sock.shutdown(2)
    conn.close()
    m = server.wait_log(r"499 POST /v1/completions prompt \d+ tok, completion (\d+) tok: client disconnected")
    assert int(m.group(1)) < 200
    status, _, reply = post(server.url, "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}))
    assert status == 200


def test_api_key_and_sigterm_drain_on_every_rank(smollm2_shards2):
    s = Server(smollm2_shards2, ["-c", "128", "--api-key", "sekrit"])
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            status, _, reply = post(s.url, "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}), headers)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", reply
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base, api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=s.base, api_key="sekrit", max_retries=0, timeout=120)
        stream = c.completions.create(model=smollm2_shards2.name, prompt=PROMPT, max_tokens=40, temperature=0,
                                      stream=True)
        first = next(iter(stream))
        os.kill(s.proc.pid, signal.SIGTERM)  # mpiexec hands it to every rank
        rest = list(stream)  # the generation under way finishes
        text = first.choices[0].text + "".join(ch.choices[0].text for ch in rest)
        assert rest[-1].choices[0].finish_reason in ("length", "stop") and text
        assert s.proc.wait(60) == 0, s.log()
        assert "stopped" in s.log().splitlines()[-1]
    finally:
        s.kill()


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_rank_ends_the_server(victim, smollm2_shards2):
    s = Server(smollm2_shards2, ["-c", "512", "--timeout", "5"])
    try:
        c = openai.OpenAI(base_url=s.base, api_key="unused", max_retries=0, timeout=60)
        stream = c.completions.create(model=smollm2_shards2.name, prompt=PROMPT, max_tokens=400, temperature=0,
                                      stream=True)
        next(iter(stream))
        ranks = s.ranks()
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[victim], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises((openai.APIError, httpx.HTTPError)):  # an error event, or the connection dropped
            for _ in stream:
                pass
        code = s.proc.wait(30)
        assert code != 0 and time.monotonic() - t0 < 30
    finally:
        s.kill()
