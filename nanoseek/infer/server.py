"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the inference engine (`nanoseek serve`).

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent
events, or not), GET /health. Chat replies carry the thinking in `reasoning_content` beside
`content`, as DeepSeek's API returns it (in streaming deltas too), and every reply has usage counts.

One scheduler thread owns the model and runs a continuous batch: waiting requests join the running
batch between decode steps (one prefill for all that joined), finished ones leave at once, and a
request whose client went away (a dropped stream, or a closed connection while waiting for a
non-streamed reply) is removed before the next step, freeing its slot. At most `max_queue` requests
wait to join; more get 429 (with Retry-After). A request with more rows (prompts x n) than the batch
holds gets 400 at once. Bodies are read up to `max_body_bytes` (413 past it), then parsed, validated
and tokenized on a worker thread, all before anything is scheduled; a prompt whose length in characters
already proves it longer than the context is refused before tokenizing. With an API key every path
(/health and the docs too) needs it. Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
Extensions beyond OpenAI's parameters (as vLLM names them): top_k, repetition_penalty, ignore_eos,
chat_template_kwargs.thinking (open the reply with <think>, R1 style). Every other parameter is either
honoured or refused with a 400 that names it (`CHAT_PARAMS`, `COMPLETION_PARAMS`), never ignored.

For evaluation harnesses (lm-evaluation-harness `local-completions`): /v1/completions takes `echo` with
`logprobs` (the prompt tokens' log-probabilities, `max_tokens: 0` allowed) and `logprobs: k` up to 20
(the k most likely tokens at each position); chat takes `top_logprobs` up to 20; both take `logit_bias`.
"""

import asyncio
import collections
import functools
import hmac
import itertools
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch

from nanoseek.infer.engine import Delta, Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.text import ReasoningParser


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_DONE = object()


@dataclass
class PromptScores:
    """Row `row`'s echoed prompt (the client's tokens: not a BOS the server added) with each token's log p and
    top tokens (None without logprobs): sent before the row's deltas."""

    row: int
    tokens: list[int]
    logprobs: list[float | None]
    top_logprobs: list | None


@dataclass(eq=False)  # identity: `job in waiting` must not compare queues and loops
class Job:
    """One HTTP request: n rows (choices) of the same prompt, or one row per prompt (completions)."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generator: torch.Generator | None = None
    echo_from: list[int] | None = None
    """Score each row's prompt from this token on (echo with logprobs); None = do not score."""
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    open_rows: int = 0

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(self.id, i) for i in range(len(self.prompts))]

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class Scheduler:
    """Continuous batching on a background thread (the only thread that touches the model)."""

    def __init__(self, engine: Engine, max_batch_size: int = 16, max_queue: int = 64):
        self.engine, self.max_batch_size, self.max_queue = engine, max_batch_size, max_queue
        self.batch = engine.new_batch()
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: dict[int, Job] = {}
        self.cond = threading.Condition()
        self.stopped = False
        self.stats = {"requests": 0, "rejected": 0, "cancelled": 0, "steps": 0, "tokens": 0, "max_batch": 0}
        self.thread = threading.Thread(target=self._run, name="nanoseek-scheduler", daemon=True)

    def start(self) -> None:
        self.engine.model.eval()
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        if len(job.prompts) > self.max_batch_size:  # it could never join the batch, and would block the queue
            raise APIError(400, f"this request asks for {len(job.prompts)} sequences (prompts x n); this server "
                                f"decodes at most {self.max_batch_size} at once", param="n")
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                raise APIError(429, f"server busy: {len(self.waiting)} requests already waiting; retry later",
                               "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.stats["requests"] += 1
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        with self.cond:
            if job.id in self.jobs or job in self.waiting:
                job.cancelled = True
                self.cond.notify_all()

    def snapshot(self) -> dict:
        with self.cond:
            return {"running": len(self.batch), "waiting": len(self.waiting), **self.stats}

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self.stopped and not self.waiting and not self.batch:
                    self.cond.wait()
                if self.stopped:
                    break
                for job in [j for j in self.waiting if j.cancelled]:
                    self.waiting.remove(job)
                    self.stats["cancelled"] += 1
                admit, rows = [], len(self.batch)
                while self.waiting and rows + len(self.waiting[0].prompts) <= self.max_batch_size:
                    job = self.waiting.popleft()
                    admit.append(job)
                    rows += len(job.prompts)
                gone = [job for job in self.jobs.values() if job.cancelled]
            try:
                for job in gone:
                    for key in job.keys:
                        self.batch.remove(key)
                    self.jobs.pop(job.id, None)
                    self.stats["cancelled"] += 1
                if admit:
                    self._admit(admit)
                size = len(self.batch)
                deltas = self.batch.step() if self.batch else []
            except Exception as e:  # never let one bad step take the server down
                self._fail_all(e)
                continue
            if size:
                self.stats["steps"] += 1
                self.stats["max_batch"] = max(self.stats["max_batch"], size)
            for d in deltas:
                job = self.jobs.get(d.key[0])
                if job is None:
                    continue
                self.stats["tokens"] += len(d.tokens)
                job.send(d)
                if d.finish_reason:
                    job.open_rows -= 1
                    if job.open_rows == 0:
                        self.jobs.pop(job.id, None)
                        job.send(_DONE)

    def _admit(self, jobs: list[Job]) -> None:
        prompts, params, keys, gens = [], [], [], []
        for job in jobs:
            job.open_rows = len(job.prompts)
            self.jobs[job.id] = job
            scored = {}  # n rows share a prompt: one forward scores it for all of them
            for row, (prompt, p) in enumerate(zip(job.prompts, job.params)):
                if job.echo_from is not None:
                    start, key = job.echo_from[row], tuple(prompt)
                    if key not in scored:
                        scored[key] = self.engine.score(prompt, p.top_logprobs) if p.logprobs else (None, None)
                    lps, tops = scored[key]
                    job.send(PromptScores(row, prompt[start:], lps and lps[start:], tops and tops[start:]))
            prompts += job.prompts
            params += job.params
            keys += job.keys
            gens += [job.generator] * len(job.prompts)
        try:
            self.batch.add(prompts, params, keys=keys, generators=gens)
        except Exception as e:
            for job in jobs:
                self.jobs.pop(job.id, None)
                job.send(e)
            raise

    def _fail_all(self, error: Exception) -> None:
        for job in list(self.jobs.values()):
            job.send(error)
        self.jobs.clear()
        self.batch = self.engine.new_batch()


# ---------------------------------------------------------------------- the HTTP layer
def create_app(model, tokenizer, model_name: str = "nanoseek", *, api_key: str | None = None,
               max_batch_size: int = 16, max_queue: int = 64, max_model_len: int | None = None,
               default_max_tokens: int = 256, speculative: bool = False, thinking: bool = False,
               max_body_bytes: int = 8 << 20, compile: bool | str = "auto"):
    """The FastAPI app; its lifespan starts and stops the scheduler (`app.state.scheduler`)."""
    positions = model.config.max_position_embeddings
    limits = {"max_batch_size": max_batch_size, "max_queue": max_queue, "default_max_tokens": default_max_tokens,
              "max_body_bytes": max_body_bytes, "max_model_len": positions if max_model_len is None else max_model_len}
    for name, value in limits.items():
        hi = positions if name == "max_model_len" else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (hi and value > hi):
            bound = f" and <= {hi} (the model's max_position_embeddings)" if hi else ""
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= 1{bound}, got {value!r}")
    # FastAPI and Starlette are the optional `serve` extra: imported when an app is built, not with the module
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    engine = Engine(model, tokenizer, speculative=speculative, compile=compile)
    scheduler = Scheduler(engine, max_batch_size=max_batch_size, max_queue=max_queue)
    context = max_model_len or positions
    # no token spells more characters than the longest vocabulary entry (byte-level: one char per byte),
    # so a prompt longer than this surely exceeds the context, and is refused without tokenizing it
    max_prompt_chars = context * max(map(len, tokenizer.backend.get_vocab()))
    device = next(model.parameters()).device
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.scheduler = scheduler

    def error_response(e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    if api_key is not None:
        app.add_middleware(_RequireKey, key=api_key, reject=error_response(APIError(
            401, "invalid or missing API key (expected 'Authorization: Bearer KEY')", code="invalid_api_key")))

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):  # still OpenAI's body, never a plain-text 500
        return error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        if err.get("type") == "json_invalid":
            return error_response(APIError(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', '')}"))
        return error_response(APIError(400, f"invalid request body: {err.get('msg', 'malformed')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_response(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    async def parsed(request: Request, parse):
        """The body read up to max_body_bytes, then `parse(raw)` on a worker thread: JSON decoding,
        validation and tokenization of a big body never stall the event loop."""
        too_big = APIError(413, f"request body is larger than {max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return await asyncio.to_thread(parse, b"".join(chunks))

    def body_of(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model_arg = body.get("model")
        if not isinstance(model_arg, str):
            raise APIError(400, "'model' is required and must be a string", param="model")
        if model_arg != model_name:
            raise APIError(404, f"the model {model_arg!r} does not exist; this server has '{model_name}'",
                           param="model", code="model_not_found")
        return body

    def check_prompt_chars(chars: int, param: str) -> None:
        if chars > max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters, more than this model's context of {context} "
                                "tokens can hold", param=param, code="context_length_exceeded")

    def parse_chat(raw: bytes):
        body = body_of(raw)
        _check_params(body, CHAT_PARAMS)
        messages = _messages(body.get("messages"))
        check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        think = _chat_thinking(body, thinking)
        n = _int(body, "n", 1, 1, 16)
        stream, usage = _stream(body)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=think)
        params, gen = _sampling(body, len(prompt), context, default_max_tokens, chat=True,
                                vocab_size=model.config.vocab_size, device=device)
        return prompt, n, params, gen, think, stream, usage

    def parse_completion(raw: bytes):
        body = body_of(raw)
        _check_params(body, COMPLETION_PARAMS)
        prompts, added_bos = _prompts(body.get("prompt"), tokenizer, model.config.vocab_size, check_prompt_chars)
        n = _int(body, "n", 1, 1, 16)
        echo = _bool(body, "echo")
        stream, usage = _stream(body)
        params, gen = _sampling(body, max(map(len, prompts)), context, default_max_tokens, chat=False,
                                vocab_size=model.config.vocab_size, echo=echo, device=device)
        # the echo leaves out the BOS the server added: every token the client sent gets its log p
        echo_from = [int(b) for b in added_bos for _ in range(n)] if echo else None
        return prompts, n, params, gen, stream, usage, echo_from

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **scheduler.snapshot()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str):
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return _model_card(model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        prompt, n, params, gen, think, stream, usage = await parsed(request, parse_chat)
        job = Job([prompt] * n, [params] * n, asyncio.get_running_loop(), asyncio.Queue(), gen)
        scheduler.submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        parsers = [ReasoningParser(think) for _ in range(n)]
        want_lp = params.logprobs
        if stream:
            def chunk(choices, **extra):
                return _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                             "choices": choices, **extra})

            async def events():
                completion_tokens = 0
                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for d in _deltas(job, request, scheduler):
                    i = d.key[1]
                    completion_tokens += len(d.tokens)
                    r, c = parsers[i].feed(d.text, final=d.finish_reason is not None)
                    delta = {**({"reasoning_content": r} if r else {}), **({"content": c} if c else {})}
                    lp = {"content": _chat_logprobs(tokenizer, d.tokens, d.logprobs, d.top_logprobs)} if want_lp else None
                    if delta or d.finish_reason or (lp and lp["content"]):
                        yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}])
                if usage:
                    yield chunk([], usage=_usage(len(prompt), completion_tokens))
                yield "data: [DONE]\n\n"

            return _event_stream(_guard(events()))
        results = await _collect(job, request, scheduler)
        choices, completion_tokens = [], 0
        for i, r in enumerate(results):
            completion_tokens += len(r.tokens)
            parsers[i].feed(r.text, final=True)
            message = {"role": "assistant", "content": parsers[i].content,
                       "reasoning_content": parsers[i].reasoning if parsers[i].opened else None}
            choices.append({"index": i, "message": message, "finish_reason": r.finish_reason, "logprobs": {
                "content": _chat_logprobs(tokenizer, r.tokens, r.logprobs, r.top_logprobs)} if want_lp else None})
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name, "choices": choices,
                "usage": _usage(len(prompt), completion_tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        prompts, n, params, gen, stream, usage, echo_from = await parsed(request, parse_completion)
        rows = [p for p in prompts for _ in range(n)]
        job = Job(rows, [params] * len(rows), asyncio.get_running_loop(), asyncio.Queue(), gen, echo_from)
        scheduler.submit(job)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt_tokens = sum(map(len, prompts))
        want_lp = params.logprobs
        if stream:
            async def events():
                completion_tokens, offsets = 0, [0] * len(rows)
                async for d in _deltas(job, request, scheduler):
                    if isinstance(d, PromptScores):
                        i, text, tokens, lps, tops = d.row, tokenizer.decode(d.tokens), d.tokens, d.logprobs, d.top_logprobs
                    else:
                        i, text, tokens, lps, tops = d.key[1], d.text, d.tokens, d.logprobs, d.top_logprobs
                        completion_tokens += len(tokens)
                        if not (text or d.finish_reason):
                            continue
                    lp = _completion_logprobs(tokenizer, tokens, lps, tops, offsets[i]) if want_lp else None
                    offsets[i] += len(text)
                    yield _sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                                "choices": [{"index": i, "text": text, "logprobs": lp,
                                             "finish_reason": getattr(d, "finish_reason", None)}]})
                if usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                                "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
                yield "data: [DONE]\n\n"

            return _event_stream(_guard(events()))
        results = await _collect(job, request, scheduler)
        choices = []
        for i, r in enumerate(results):
            echo = r.echo or PromptScores(i, [], [] if want_lp else None, [] if params.top_logprobs else None)
            choices.append({"index": i, "text": tokenizer.decode(echo.tokens) + r.text, "finish_reason": r.finish_reason,
                            "logprobs": _completion_logprobs(
                                tokenizer, echo.tokens + r.tokens, echo.logprobs + (r.logprobs or []),
                                echo.top_logprobs + (r.top_logprobs or []) if params.top_logprobs else None)
                            if want_lp else None})
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": _usage(prompt_tokens, sum(len(r.tokens) for r in results))}

    return app


class _RequireKey:
    """ASGI middleware: every HTTP request (/health, /docs and /openapi.json included) needs the key.
    Plain ASGI, not BaseHTTPMiddleware, so streams and disconnect notices pass through untouched."""

    def __init__(self, app, key: str, reject):
        self.app, self.expected, self.reject = app, f"Bearer {key}".encode(), reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                await self.reject(scope, receive, send)
                return
        await self.app(scope, receive, send)


@functools.lru_cache(maxsize=None)
def _event_stream_class():  # built on first use: FastAPI/Starlette are imported lazily
    import anyio
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        """Server-sent events that stop as soon as the client disconnects, even while no event is due
        (Starlette alone notices only when a write fails), and always close their generator, whose
        cleanup cancels the job and frees its batch slot."""

        def __init__(self, content):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async def __call__(self, scope, receive, send):
            try:
                async with anyio.create_task_group() as tg:
                    async def run(fn, *args):
                        try:
                            await fn(*args)
                        except OSError:  # the client went away mid-write
                            pass
                        tg.cancel_scope.cancel()

                    tg.start_soon(run, self.stream_response, send)
                    await run(self.listen_for_disconnect, receive)
            finally:
                await self.body_iterator.aclose()

    return EventStream


def _event_stream(content):
    return _event_stream_class()(content)


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "nanoseek"}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _guard(events):
    """Turn an error in the middle of a stream into an error event (the status line is already sent)."""
    try:
        async for e in events:
            yield e
    except APIError as e:
        yield _sse(e.body())
    except Exception as e:  # noqa: BLE001 - reported to the client, the server keeps serving
        yield _sse(APIError(500, f"generation failed: {e}", "server_error").body())


async def _deltas(job: Job, request, scheduler: Scheduler):
    """The job's deltas as they come; the job is cancelled if the consumer stops early (disconnect)."""
    try:
        while True:
            item = await job.queue.get()
            if item is _DONE:
                return
            if isinstance(item, Exception):
                raise item if isinstance(item, APIError) else APIError(500, f"generation failed: {item}", "server_error")
            yield item
    finally:
        scheduler.cancel(job)


@dataclass
class _Choice:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list | None = None
    finish_reason: str = "length"
    echo: PromptScores | None = None


async def _collect(job: Job, request, scheduler: Scheduler) -> list[_Choice]:
    """Wait for a whole job, polling for a client that went away (then the job is cancelled)."""
    choices = [_Choice() for _ in job.prompts]
    gen = _deltas(job, request, scheduler)
    nxt, next_check = None, time.monotonic() + 0.5
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(gen.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=0.5)
            if time.monotonic() >= next_check:  # on a clock: deltas may keep coming to a client long gone
                next_check = time.monotonic() + 0.5
                if await request.is_disconnected():
                    nxt.cancel()
                    raise APIError(499, "client closed the request")
            if not done:
                continue
            try:
                d: Delta | PromptScores = nxt.result()
            except StopAsyncIteration:
                break
            nxt = None
            if isinstance(d, PromptScores):
                choices[d.row].echo = d
                continue
            c = choices[d.key[1]]
            c.tokens += d.tokens
            c.text += d.text
            if d.logprobs is not None:
                c.logprobs = (c.logprobs or []) + d.logprobs
            if d.top_logprobs is not None:
                c.top_logprobs = (c.top_logprobs or []) + d.top_logprobs
            if d.finish_reason:
                c.finish_reason = d.finish_reason
    finally:
        await gen.aclose()
    return choices


# ---------------------------------------------------------------------- request parsing
# The parameters each endpoint honours: OpenAI's (openai-python's lists; tests/test_server.py walks them)
# and the extensions; anything else is refused with a 400 naming it, as OpenAI refuses unknown ones.
_SHARED_PARAMS = {"model", "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p", "logit_bias",
                  "logprobs", "max_tokens", "frequency_penalty", "presence_penalty", "user",
                  "top_k", "repetition_penalty", "ignore_eos"}
COMPLETION_PARAMS = _SHARED_PARAMS | {"prompt", "echo", "suffix", "best_of"}
CHAT_PARAMS = _SHARED_PARAMS | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs",
                                "metadata", "store", "modalities", "response_format", "tools", "tool_choice",
                                "service_tier", "prompt_cache_key", "safety_identifier"}
# Accepted only at values that ask for what the server does anyway (null always): no tool calls, plain
# text, nothing stored, no suffix, one candidate per choice.
_ONLY = {"store": [False], "modalities": [["text"]], "response_format": [{"type": "text"}], "tools": [[]],
         "tool_choice": ["none"], "service_tier": ["auto", "default"], "suffix": [""], "best_of": [1]}
# Identifiers and annotations, which change nothing in a reply: strings (metadata: a map of strings).
_LABELS = ("user", "prompt_cache_key", "safety_identifier")


def _check_params(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name not in allowed and value is not None:  # null asks for nothing
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    for name, values in _ONLY.items():
        if body.get(name) is not None and body[name] not in values:
            raise APIError(400, f"'{name}' is supported only as {' or '.join(map(json.dumps, values))} (no tool calls, "
                                "structured output, storage, suffix or best_of here)", param=name)
    for name in _LABELS:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise APIError(400, f"'{name}' must be a string", param=name)
    meta = body.get("metadata")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise APIError(400, "'metadata' must be an object of strings", param="metadata")


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be a boolean", param=name)
    return v


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise APIError(400, f"'{name}' must be an integer in [{lo}, {hi if hi is not None else 'inf'}), got {v!r}"
                       if hi is None else f"'{name}' must be an integer in [{lo}, {hi}], got {v!r}", param=name)
    return v


def _float(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise APIError(400, f"'{name}' must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", param=name)
    return float(v)


def _sampling(body: dict, prompt_len: int, context: int, default_max_tokens: int, chat: bool, vocab_size: int,
              echo: bool = False, device="cpu"):
    room = context - prompt_len
    if room < (0 if echo else 1):
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context} tokens",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, None, 0 if echo else 1)  # 0: only the prompt's log-probabilities
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    elif prompt_len + max_tokens > context:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus {name} ({max_tokens}) exceeds this model's "
                       f"context of {context} tokens", param=name, code="context_length_exceeded")
    for name in ("presence_penalty", "frequency_penalty"):
        if _float(body, name, 0.0, -2.0, 2.0) != 0:
            raise APIError(400, f"'{name}' is not supported (use repetition_penalty)", param=name)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
    for s in stop or ():
        _check_unicode(s, "stop")
    seed = _int(body, "seed", None, -(1 << 63), (1 << 64) - 1)  # what a torch generator takes
    if chat:
        logprobs, top = _bool(body, "logprobs"), _int(body, "top_logprobs", 0, 0, 20)
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:  # the chosen tokens' log p, and that many most likely tokens beside them
        top = _int(body, "logprobs", None, 0, 20)
        logprobs, top = top is not None, top or 0
    ignore_eos = _bool(body, "ignore_eos")
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=_int(body, "top_k", 0, 0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        stop_strings=tuple(stop or ()), stop_tokens=[] if ignore_eos else None, logprobs=logprobs, top_logprobs=top,
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size))
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    return params, gen


def _logit_bias(bias, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise APIError(400, "'logit_bias' must be an object mapping token ids to numbers", param="logit_bias")
    out = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias[{key!r}] must be a number in [-100, 100], got {value!r}",
                           param="logit_bias")
        out[token] = float(value)
    return out


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    usage = (opts or {}).get("include_usage", False)
    if not isinstance(usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean", param="stream_options")
    return stream, usage


def _check_unicode(text: str, param: str) -> None:
    # JSON may carry lone surrogates ("\ud800"), which no tokenizer or UTF-8 reply can hold
    try:
        text.encode()
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' is not valid Unicode (it holds a lone surrogate)", param=param) from None


def _chat_thinking(body: dict, default: bool) -> bool:
    kw = body.get("chat_template_kwargs") or {}
    if not isinstance(kw, dict):
        raise APIError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    value = kw.get("thinking", default)
    if not isinstance(value, bool):
        raise APIError(400, "'chat_template_kwargs.thinking' must be a boolean", param="chat_template_kwargs")
    return value


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must be an object with role system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        _check_unicode(content, "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _prompts(prompt, tokenizer, vocab_size: int, check_chars) -> tuple[list[list[int]], list[bool]]:
    """The prompts' token ids, and for each whether the server put BOS in front (a text prompt)."""
    def bad():
        return APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                        param="prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad()
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if len(prompt) > 64:
        raise APIError(400, "at most 64 prompts per request", param="prompt")
    out, added_bos = [], []
    for p in prompt:
        if isinstance(p, str):
            _check_unicode(p, "prompt")
            check_chars(len(p), "prompt")
            out.append(tokenizer.encode(p, add_bos=True))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(not 0 <= t < vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
            out.append(p)
        else:
            raise bad()
        added_bos.append(isinstance(p, str))
    return out, added_bos


def _token_text(tokenizer, t: int) -> str:
    return tokenizer.decode([t])


def _chat_logprobs(tokenizer, tokens, logprobs, tops=None) -> list[dict]:
    def entry(t, lp):
        s = _token_text(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return [{**entry(t, lp), "top_logprobs": [entry(*x) for x in top] if top else []}
            for t, lp, top in zip(tokens, logprobs or [], tops or itertools.repeat(None))]


def _completion_logprobs(tokenizer, tokens, logprobs, tops=None, offset: int = 0) -> dict:
    texts = [_token_text(tokenizer, t) for t in tokens]
    offsets = list(itertools.accumulate([offset] + [len(s) for s in texts[:-1]])) if texts else []
    return {"tokens": texts, "token_logprobs": list(logprobs or []), "text_offset": offsets,
            "top_logprobs": None if tops is None else [None if top is None else {
                _token_text(tokenizer, t): lp for t, lp in top} for top in tops]}
