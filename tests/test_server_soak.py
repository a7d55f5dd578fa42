"""`nanoseek serve` under hostile and sustained load (issue 18 acceptance; slow, `make test-slow`), started as
users start it, in its own process on 127.0.0.1:

- an API fuzzer: hypothesis-generated chat and completions requests (well-formed, odd and malformed values
  for every parameter) never get a 5xx, and the server answers normally afterwards;
- a soak: streaming, non-streamed, oversized and disconnecting clients at once for over two minutes; every
  well-formed request is answered, and the server's resident memory at the end is within 10% of its value
  after warm-up.
"""
import contextlib
import json
import threading
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from infer_fixtures import ANSWER, QUESTIONS, serve_process

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

TIMEOUT = 60
PARAMS = ["n", "seed", "stop", "stream", "stream_options", "temperature", "top_p", "top_k", "logit_bias", "logprobs",
          "top_logprobs", "max_tokens", "max_completion_tokens", "frequency_penalty", "presence_penalty", "user",
          "repetition_penalty", "ignore_eos", "echo", "suffix", "best_of", "tools", "tool_choice", "response_format",
          "metadata", "chat_template_kwargs", "store", "modalities", "service_tier", "frobnicate"]


@contextlib.contextmanager
def served(*args: str):
    """`nanoseek serve` in its own process; yields (url, pid) and checks that it is still alive at the end."""
    with serve_process(*args) as (url, proc):
        yield url, proc.pid
        assert proc.poll() is None, "the server died"


def assert_answers_normally(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "temperature": 0, "max_tokens": 40,
                                                        "messages": [{"role": "user", "content": "What is 2+2?"}]},
                   timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWER, r.text


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# ---------------------------------------------------------------------- the fuzzer
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 50),
                    st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False), st.text(max_size=20),
                    st.sampled_from(["\ud800", "<｜end▁of▁sentence｜><｜Assistant｜>", "auto", "none", "text"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
messages = st.one_of(values, st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "wizard"]),
     "content": st.one_of(st.text(max_size=200), values)}), min_size=0, max_size=4))
prompts = st.one_of(values, st.text(max_size=200), st.lists(st.integers(-5, 400), max_size=30),
                    st.lists(st.text(max_size=40), max_size=3))


# values each parameter takes in a well-formed request (half the requests use these, so that many are served)
finite = {"allow_nan": False, "allow_subnormal": False}
VALID = {"n": st.integers(1, 3), "seed": st.integers(0, 2**32), "stream": st.booleans(), "ignore_eos": st.booleans(),
         "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3), "temperature": st.floats(0, 2, **finite),
         "top_p": st.floats(0.01, 1, **finite), "top_k": st.integers(0, 50), "echo": st.booleans(),
         "logit_bias": st.dictionaries(st.integers(0, 299).map(str), st.floats(-100, 100, **finite), max_size=3),
         "logprobs": st.one_of(st.booleans(), st.integers(0, 20)), "top_logprobs": st.integers(0, 20),
         "max_tokens": st.integers(0, 8), "repetition_penalty": st.floats(0.5, 2, **finite), "user": st.text(max_size=9),
         "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                "content": st.text(max_size=100)}), min_size=1, max_size=3)
good_prompts = st.one_of(st.text(min_size=1, max_size=100), st.lists(st.integers(0, 299), min_size=1, max_size=30))


@st.composite
def requests(draw):
    chat, good = draw(st.booleans()), draw(st.booleans())
    body = {"model": "tiny" if good else draw(st.sampled_from(["tiny", "tiny", "other", None]))}
    body["messages" if chat else "prompt"] = draw((good_messages if chat else good_prompts) if good
                                                 else (messages if chat else prompts))
    for name in draw(st.lists(st.sampled_from(PARAMS), max_size=6, unique=True)):
        body[name] = draw(VALID[name] if good and name in VALID else values)
    if draw(st.booleans()):  # keep the well-formed ones short
        body["max_tokens"] = draw(st.integers(0, 8))
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@pytest.fixture(scope="module")
def fuzz_server():
    with served("--default-max-tokens", "8", "--max-batch-size", "8") as server:
        yield server


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests())
def test_fuzzed_requests_never_get_a_server_error(fuzz_server, request):
    url, _ = fuzz_server
    path, body = request
    r = httpx.post(url + path, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics: how many were served, how many refused
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "server_error" not in r.text, (body, r.text[:300])


def test_after_the_fuzzer_the_server_answers_normally(fuzz_server):
    assert_answers_normally(fuzz_server[0])


# ---------------------------------------------------------------------- the soak
SOAK_S = 130
WARMUP_S = 20


def test_soak_mixed_clients(tmp_path):
    with served("--max-batch-size", "8", "--max-queue", "64") as (url, pid):
        stop, errors, counts, lock = threading.Event(), [], {"sent": 0, "answered": 0}, threading.Lock()

        def well_formed(i: int) -> None:
            q = QUESTIONS[i % len(QUESTIONS)]
            with lock:
                counts["sent"] += 1
            if i % 3 == 0:  # streamed chat
                with httpx.stream("POST", url + "/v1/chat/completions", timeout=TIMEOUT, json={
                        "model": "tiny", "stream": True, "temperature": 0, "max_tokens": 40,
                        "messages": [{"role": "user", "content": q}]}) as r:
                    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                                   for line in r.iter_lines() if line.startswith("data: {"))
                ok = r.status_code == 200 and text == ANSWER
            elif i % 3 == 1:  # non-streamed chat, n=2
                r = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT, json={
                    "model": "tiny", "n": 2, "temperature": 0, "max_tokens": 40,
                    "messages": [{"role": "user", "content": q}]})
                ok = r.status_code == 200 and [c["message"]["content"] for c in r.json()["choices"]] == [ANSWER] * 2
            else:  # completions with prompt logprobs
                r = httpx.post(url + "/v1/completions", timeout=TIMEOUT, json={
                    "model": "tiny", "prompt": q, "max_tokens": 4, "echo": True, "logprobs": 2})
                ok = r.status_code == 200 and r.json()["choices"][0]["text"].startswith(q)
            with lock:
                counts["answered"] += ok
                if not ok:
                    errors.append(f"{i}: {r.status_code}")

        def oversized() -> None:  # 9 MB: refused with 413
            r = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT, content=b"x" * (9 << 20),
                           headers={"content-type": "application/json"})
            if r.status_code != 413:
                errors.append(f"oversized: {r.status_code}")

        def disconnecting() -> None:  # reads a few events of a long stream, then hangs up
            with httpx.stream("POST", url + "/v1/completions", timeout=TIMEOUT, json={
                    "model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= 3:
                        break

        def client(kind: int) -> None:
            i = kind
            while not stop.is_set():
                try:
                    if kind == 4:
                        oversized()
                    elif kind == 5:
                        disconnecting()
                    else:
                        well_formed(i)
                except httpx.HTTPError as e:
                    errors.append(f"{kind}: {type(e).__name__}: {e}")
                i += 6

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(WARMUP_S)
        warm = rss_kb(pid)
        time.sleep(SOAK_S - WARMUP_S)
        end = rss_kb(pid)
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        print(f"soak {SOAK_S} s: {counts['answered']}/{counts['sent']} well-formed requests answered, "
              f"RSS {warm / 1024:.0f} MiB after warm-up -> {end / 1024:.0f} MiB ({end / warm:.3f}x)")
        assert not errors, errors[:10]
        assert counts["sent"] == counts["answered"] > 50, counts
        assert end <= 1.10 * warm, (warm, end)
        assert_answers_normally(url)
        health = httpx.get(url + "/health", timeout=TIMEOUT).json()
        assert health["running"] == 0 and health["waiting"] == 0, health
