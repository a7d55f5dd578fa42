"""The OpenAI-compatible server, driven over real HTTP on 127.0.0.1 with the official `openai` client
(and raw httpx for malformed requests). The model is a tiny one trained to give one R1-style reply."""
import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import nanoseek
from nanoseek.cli import main as cli_main
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.interop.hf import load_pretrained
from infer_fixtures import ANSWER, QUESTIONS, REASONING, REPLY, chat_model_dir, serve_process

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from nanoseek.infer.server import create_app  # noqa: E402

TIMEOUT = 30


@contextlib.contextmanager
def running_server(step_delay: float = 0.0, tokenizer=None, **kwargs):
    """create_app + uvicorn in a thread, on a port the OS picked; stopped (and joined) afterwards.
    `step_delay` slows every forward down, so that requests are still running when a test looks."""
    path = chat_model_dir()
    model = load_pretrained(path).eval()
    if step_delay:
        model.register_forward_pre_hook(lambda *_: time.sleep(step_delay))
    app = create_app(model, tokenizer or nanoseek.load_tokenizer(path), "tiny", **kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + TIMEOUT
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    with running_server(max_batch_size=16, max_queue=64) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _prompt_tokens(messages, thinking=False):
    return len(nanoseek.load_tokenizer(chat_model_dir()).apply_chat_template(messages, thinking=thinking))


def _wait_health(url, pred):
    deadline = time.time() + TIMEOUT
    while True:
        h = httpx.get(url + "/health", timeout=TIMEOUT).json()
        if pred(h):
            return h
        assert time.time() < deadline, json.dumps(h)
        time.sleep(0.05)


def test_models_and_plain_chat(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40)
    msg = r.choices[0].message
    assert (msg.content, msg.reasoning_content, r.choices[0].finish_reason) == (ANSWER, REASONING + "\n", "stop")
    assert r.usage.prompt_tokens == _prompt_tokens(messages)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # thinking opened by the template (R1 style): the same split
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40,
                                       extra_body={"chat_template_kwargs": {"thinking": True}})
    assert (r.choices[0].message.content, r.choices[0].message.reasoning_content) == (ANSWER, REASONING + "\n")
    # max_tokens cuts the reply: finish_reason length; n choices; logprobs
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, n=2, seed=1, logprobs=True)
    assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 6
    assert all(len(c.logprobs.content) == 3 and all(t.logprob <= 0 for t in c.logprobs.content) for c in r.choices)


def test_streaming_chat(client):
    messages = [{"role": "user", "content": "hello"}]
    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True})
    reasoning, content, finish, usage, n_chunks = "", "", None, None, 0
    for chunk in stream:
        n_chunks += 1
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == (REASONING + "\n", ANSWER, "stop")
    assert n_chunks > 5  # token by token, not one lump
    assert usage.prompt_tokens == _prompt_tokens(messages) and usage.completion_tokens > 5


def test_completions_plain_and_streaming(client, server):
    tok = nanoseek.load_tokenizer(chat_model_dir())
    prompt = tok.render_chat([{"role": "user", "content": "hello"}])[len(tok.decode([tok.bos_id])):]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    assert r.choices[0].text == REPLY and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt=[prompt, prompt], max_tokens=40, temperature=0,
                                  stop=["plus"])
    assert [c.text for c in r.choices] == ["<think>\nTwo "] * 2 and r.usage.prompt_tokens == 2 * len(tok.encode(prompt)) + 2
    ids = tok.encode(prompt, add_bos=True)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=ids, max_tokens=40, temperature=0, stream=True) if c.choices)
    assert text == REPLY


def _reference_logprobs(ids):
    """log p of each token given the ones before it, from one forward of the saved model."""
    model = load_pretrained(chat_model_dir()).eval()
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logp


def test_echo_returns_the_prompt_tokens_log_probabilities(client):
    """Issue 17.3: what loglikelihood evaluation (lm-eval local-completions) sends: token ids, echo,
    logprobs=k, max_tokens 0 or 1; checked against a forward pass of the same model."""
    tok = nanoseek.load_tokenizer(chat_model_dir())
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    logp = _reference_logprobs(ids)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    assert c.text == tok.decode(ids) and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.tokens == [tok.decode([t]) for t in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    want = [logp[i - 1, t].item() for i, t in enumerate(ids) if i]
    assert c.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(c.logprobs.top_logprobs[1:]):
        values, best = logp[i].topk(3)
        assert len(top) == 3 and sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
        assert top[tok.decode([best[0].item()])] == pytest.approx(values[0].item(), abs=1e-4)
    assert c.logprobs.text_offset[:2] == [0, len(tok.decode(ids[:1]))]
    # with generation: the echoed prompt, then the greedy reply with the logprobs a plain request gets
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=4, echo=True, logprobs=1, temperature=0)
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=4, logprobs=1, temperature=0)
    c, p = r.choices[0], plain.choices[0]
    assert c.text == tok.decode(ids) + p.text and c.logprobs.tokens[len(ids):] == p.logprobs.tokens
    assert c.logprobs.token_logprobs[len(ids):] == pytest.approx(p.logprobs.token_logprobs, abs=1e-5)
    assert all(max(top.values()) == pytest.approx(lp, abs=1e-5)  # greedy: each chosen token is the top one
               for top, lp in zip(p.logprobs.top_logprobs, p.logprobs.token_logprobs))
    # a text prompt: the BOS the server adds is not echoed, so the first word gets its log p too
    text = "def f"
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0)
    with_bos = tok.encode(text, add_bos=True)
    logp = _reference_logprobs(with_bos)
    assert r.choices[0].text == text and r.choices[0].logprobs.top_logprobs is None
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(
        [logp[i, t].item() for i, t in enumerate(with_bos[1:])], abs=1e-4)
    # n choices of one prompt: each echoes it with the same log p (scored once)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1, n=3)
    assert [c.logprobs.token_logprobs for c in r.choices] == [r.choices[0].logprobs.token_logprobs] * 3
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    # streamed: the echo comes first, then the reply
    chunks = [ch.choices[0] for ch in client.completions.create(
        model="tiny", prompt=ids, max_tokens=4, echo=True, logprobs=1, temperature=0, stream=True) if ch.choices]
    assert "".join(ch.text for ch in chunks) == tok.decode(ids) + p.text
    assert sum((ch.logprobs.token_logprobs for ch in chunks), [])[1:] == pytest.approx(
        c.logprobs.token_logprobs[1:], abs=1e-5)


def test_top_logprobs_and_logit_bias(client):
    tok = nanoseek.load_tokenizer(chat_model_dir())
    messages = [{"role": "user", "content": "What is 2+2?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:  # greedy: the chosen token heads its top list, which is sorted
        assert len(t.top_logprobs) == 4 and (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    first = tok.encode(content[0].token)  # "<think>": a control token
    assert len(first) == 1
    # banning the greedy first token changes the first token; forcing one makes it every token
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                       logit_bias={str(first[0]): -100})
    assert r.choices[0].logprobs.content[0].token != content[0].token
    forced = tok.encode_text("x")[0]
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0.7, seed=3,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == "xxx"


# One value per parameter of the openai client's chat / completions requests, different from its default.
# A new parameter in the client fails the walk below until it gets a value here and a decision in the server.
PARAM_VALUES = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}], "logit_bias": {"5": 1}, "logprobs": True,
    "max_completion_tokens": 2, "max_tokens": 2, "metadata": {"team": "nano"}, "modalities": ["text", "audio"],
    "moderation": {"model": "omni-moderation-latest"}, "n": 2, "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.5, "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "auto"}, "prompt_cache_retention": "24h", "reasoning_effort": "low",
    "response_format": {"type": "json_object"}, "safety_identifier": "s", "seed": 1, "service_tier": "flex",
    "stop": ["zz"], "store": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5,
    "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}], "top_logprobs": 2,
    "top_p": 0.5, "user": "u", "verbosity": "low", "web_search_options": {},
    "best_of": 3, "echo": True, "suffix": "end",
}
# what each needs beside it to be well formed (OpenAI's own rules)
PARAM_NEEDS = {"top_logprobs": {"logprobs": True}, "stream_options": {"stream": True}}
HONOURED = {
    "chat": {"logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata", "n", "prompt_cache_key",
             "safety_identifier", "seed", "stop", "stream", "stream_options", "temperature", "top_logprobs", "top_p",
             "user"},
    "completions": {"echo", "logit_bias", "logprobs", "max_tokens", "n", "seed", "stop", "stream", "stream_options",
                    "temperature", "top_p", "user"},
}


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_every_openai_parameter_is_honoured_or_refused_by_name(server, api):
    """Issue 17.3: nothing is silently ignored. The parameter list is the official client's."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    module = chat_create_params if api == "chat" else completion_create_params
    names = set(module.CompletionCreateParamsBase.__annotations__) | {"stream"}
    base = {"model": "tiny", "max_tokens": 2, **({"messages": [{"role": "user", "content": "hi"}]} if api == "chat"
                                                  else {"prompt": "hi"})}
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    values = {**PARAM_VALUES, **({"logprobs": 2} if api == "completions" else {})}  # completions: a count
    outcome = {}
    for name in sorted(names - {"model", "messages", "prompt"}):
        assert name in values, f"no test value for the client's parameter {name!r}"
        body = {**base, **PARAM_NEEDS.get(name, {}), name: values[name]}
        r = httpx.post(server[0] + path, json=body, timeout=TIMEOUT)
        if r.status_code == 400:
            assert r.json()["error"]["param"] == name and name in r.json()["error"]["message"], (name, r.text)
        else:
            assert r.status_code == 200, (name, r.text)
        outcome[name] = r.status_code
    assert {n for n, status in outcome.items() if status == 200} == HONOURED[api]
    r = httpx.post(server[0] + path, json={**base, "frobnicate": 1}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    defaults = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False}
    if api == "chat":  # the values that ask for what the server does anyway are accepted
        assert httpx.post(server[0] + path, json={**base, **defaults}, timeout=TIMEOUT).status_code == 200


def test_concurrent_clients_are_batched(client, server):
    url, app = server
    before = app.state.scheduler.snapshot()["max_batch"]

    def one(i):
        kw = dict(model="tiny", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], temperature=0,
                  max_tokens=40)
        if i % 2:
            parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                     if c.choices]
            return "".join(parts)
        return client.chat.completions.create(**kw).choices[0].message.content

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(one, range(10)))
    assert answers == [ANSWER] * 10
    assert app.state.scheduler.snapshot()["max_batch"] >= max(before, 2)  # requests shared decode steps


@pytest.mark.parametrize("body,status,param,needle", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", "model"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "does not exist"),
    ({"model": "tiny", "messages": []}, 400, "messages", "non-empty"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature", "[0.0, 2.0]"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p", "top_p"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 100}, 400, "n", "'n'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": 5}, 400, "stop", "stop"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages", "context"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}, 400, "max_tokens",
     "context"),
    # issue 18.4: odd inputs get OpenAI-style 4xx, not plain-text 500s
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2**70}, 400, "seed", "'seed'"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages", "surrogate"),
    (b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "nested"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["\ud800"]}, 400, "stop", "surrogate"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream", "stream"),
])
def test_malformed_requests_get_openai_errors(server, body, status, param, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server[0] + "/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and needle in err["message"]
    if "context" in needle:
        assert err["code"] == "context_length_exceeded"


def test_other_errors(server):
    url = server[0]
    assert httpx.get(url + "/v1/nothing", timeout=TIMEOUT).status_code == 404
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [1, 99999]}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": {"a": 1}}, timeout=TIMEOUT)
    assert r.status_code == 400
    r = httpx.get(url + "/v1/models/other", timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": "a\\udfffb"}', timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_more_rows_than_the_batch_are_refused_at_once(server, client):
    """Issue 18.1: 2 prompts x n=16 could never join a 16-row batch; it used to wait forever, blocking
    every request behind it while the scheduler spun."""
    url, app = server
    before = app.state.scheduler.snapshot()["requests"]
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "n": 16, "max_tokens": 2},
                   timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "32" in r.json()["error"]["message"]
    assert app.state.scheduler.snapshot()["requests"] == before
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok"}], temperature=0,
                                       max_tokens=40, n=16)  # a full batch is fine
    assert [c.message.content for c in r.choices] == [ANSWER] * 16


@pytest.mark.parametrize("extra,param", [
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"stream": 1}, "stream"),
])
def test_invalid_requests_are_never_scheduled(server, extra, param):
    """Issue 18.3: a request answered 400 must not be generating anyway."""
    url, app = server
    before = app.state.scheduler.snapshot()["requests"]
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"prompt": "x"})):
        r = httpx.post(url + path, json={"model": "tiny", "max_tokens": 50, **body, **extra}, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert app.state.scheduler.snapshot()["requests"] == before


class GatedTokenizer(Tokenizer):
    """Records the longest text it was asked to encode, and holds any text containing GATE until released."""

    GATE = "hold-the-tokenizer"

    def __init__(self, path):
        tok = nanoseek.load_tokenizer(path)
        super().__init__(tok.backend, tok.config)
        self.longest, self.entered, self.release = 0, threading.Event(), threading.Event()

    def _seen(self, text):
        self.longest = max(self.longest, len(text))
        if self.GATE in text:
            self.entered.set()
            self.release.wait(TIMEOUT)

    def encode(self, text, **kw):
        self._seen(text)
        return super().encode(text, **kw)

    def encode_text(self, text):
        self._seen(text)
        return super().encode_text(text)


def test_big_bodies_are_bounded_and_never_stall_the_event_loop():
    """Issue 18.2: bodies past the limit get 413, a prompt surely past the context is refused before it is
    tokenized, and tokenizing runs off the event loop (/health answers meanwhile)."""
    tok = GatedTokenizer(chat_model_dir())
    with running_server(tokenizer=tok, max_body_bytes=64_000) as (url, app):
        chat = {"model": "tiny", "max_tokens": 5}
        big = json.dumps({**chat, "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
        r = httpx.post(url + "/v1/chat/completions", content=big, timeout=TIMEOUT)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = httpx.post(url + "/v1/chat/completions", content=iter([big[:40_000], big[40_000:]]), timeout=TIMEOUT)
        assert r.status_code == 413  # chunked, no content-length: counted as it arrives
        context = app.state.scheduler.engine.model.config.max_position_embeddings
        too_long = context * max(map(len, tok.backend.get_vocab())) + 1
        assert too_long < 60_000
        r = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={**chat, "messages": [{"role": "user", "content": "x" * too_long}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert tok.longest < too_long  # refused without tokenizing it
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, url + "/v1/chat/completions", timeout=TIMEOUT,
                               json={**chat, "messages": [{"role": "user", "content": tok.GATE}]})
            try:
                assert tok.entered.wait(TIMEOUT)
                assert httpx.get(url + "/health", timeout=5).status_code == 200  # while the tokenizer is busy
            finally:
                tok.release.set()
            assert held.result().status_code == 200


@pytest.mark.parametrize("kwargs,needle", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_queue": 0}, "max_queue"),
    ({"max_model_len": -1}, "max_model_len"),
    ({"max_model_len": 10**6}, "max_position_embeddings"),
    ({"default_max_tokens": -5}, "default_max_tokens"),
])
def test_serve_options_are_validated(kwargs, needle):
    """Issue 18.4: options that would hang every request (batch 0), refuse all (queue 0) or overrun the
    model's positions fail at start-up, naming the option."""
    path = chat_model_dir()
    with pytest.raises(ValueError, match=needle):
        create_app(load_pretrained(path), nanoseek.load_tokenizer(path), **kwargs)


def test_serve_command_refuses_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["serve", "--model", chat_model_dir(), "--max-batch-size", "0"])
    assert e.value.code == 2 and "--max-batch-size" in capsys.readouterr().err


@pytest.fixture
def slow_server():
    """One sequence at a time, one waiting, 20 ms per forward: a 100-token request runs for 2 s."""
    with running_server(step_delay=0.02, max_batch_size=1, max_queue=1) as (url, app):
        yield url, app


LONG = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 100, "stream": True, "ignore_eos": True}


def test_disconnect_mid_stream_frees_the_slot(slow_server):
    url, app = slow_server
    with httpx.Client(timeout=TIMEOUT) as a, httpx.Client(timeout=TIMEOUT) as b:
        with a.stream("POST", url + "/v1/completions", json=LONG) as ra:
            lines = ra.iter_lines()
            assert sum(next(lines).startswith("data: {") for _ in range(6)) >= 2
            with b.stream("POST", url + "/v1/chat/completions", json={**LONG, "prompt": None, "messages": [
                    {"role": "user", "content": "hello"}]}):
                _wait_health(url, lambda h: h["running"] == 1 and h["waiting"] == 1)
            # the client waiting in the queue left: its request is dropped, the running one goes on
            h = _wait_health(url, lambda h: h["waiting"] == 0 and h["cancelled"] == 1)
            assert h["running"] == 1
        h = _wait_health(url, lambda h: h["running"] == 0 and h["cancelled"] == 2)
    assert h["tokens"] < 100  # the running request stopped long before its 100 tokens
    # a client waiting for a whole (non-streamed) reply that gives up is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**LONG, "stream": False}, timeout=0.5)
    h = _wait_health(url, lambda h: h["running"] == 0 and h["cancelled"] == 3)
    # and it keeps serving
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok"}], temperature=0,
                                       max_tokens=40)
    assert r.choices[0].message.content == ANSWER


def test_full_queue_answers_429(slow_server):
    url, app = slow_server
    with httpx.Client(timeout=TIMEOUT) as a, httpx.Client(timeout=TIMEOUT) as b:
        with a.stream("POST", url + "/v1/completions", json=LONG) as ra:
            lines = ra.iter_lines()  # keep it: a dropped httpx iterator closes the connection
            next(lines)
            with b.stream("POST", url + "/v1/completions", json=LONG) as rb:
                _wait_health(url, lambda h: h["running"] == 1 and h["waiting"] == 1)
                r = httpx.post(url + "/v1/completions", json={**LONG, "stream": False}, timeout=TIMEOUT)
                assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
                assert r.headers["retry-after"] == "1"
                assert rb.status_code == 200
                client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model="tiny", prompt="x", max_tokens=5)
    h = _wait_health(url, lambda h: h["running"] == 0 and h["waiting"] == 0)
    assert h["rejected"] == 2 and h["tokens"] < 200


def test_serve_command_with_api_key():
    """`nanoseek serve` as users start it: binds 127.0.0.1, requires the key."""
    key = {"authorization": "Bearer sekret"}
    with serve_process("--api-key", "sekret", "--speculative", headers=key) as (url, _):
        for path in ("/v1/models", "/health", "/docs", "/openapi.json"):  # issue 18.4: nothing without the key
            r = httpx.get(url + path, timeout=TIMEOUT)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(url + "/openapi.json", headers=key, timeout=TIMEOUT).status_code == 200
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=TIMEOUT)
        r = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is 2+2?"}],
                                         temperature=0, max_tokens=40)
        assert r.choices[0].message.content == ANSWER
