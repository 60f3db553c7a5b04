"""The FastAPI application behind `python -m infer.serve`: routes, text streaming, metrics.

`create_app(worker, tokenizer, stop_ids, model_name, max_context)` needs a started-or-startable
`serve.EngineWorker`; the app's lifespan starts it and, at shutdown (SIGTERM included), stops it.
Tests run this app under a real uvicorn server and drive it with the `openai` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool

from longspec_jax.infer import engine as eng
from longspec_jax.infer import openai_protocol as oai
from longspec_jax.sampling import SamplingParams


class TextStream:
    """Incremental detokenization of one choice with stop strings.

    Text is decoded incrementally (vLLM's offsets: each call decodes only the tokens since the last
    stable point, so a long completion costs O(new tokens) per call, not O(all)); an incomplete
    UTF-8 character (a trailing U+FFFD) waits for its remaining bytes. `sent` is the text handed out;
    a tail that could still grow into a stop string is held back, and a stop string ends the text
    right before it.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text = ""  # decoded so far
        self.sent = ""
        self.stopped = False
        self._prefix, self._read = 0, 0  # tokens[prefix:read] decode to the stable end of `text`

    def add(self, tokens: list[int], final: bool = False) -> str:
        self.tokens.extend(tokens)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if final or not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
        text = self.text
        # Only a stop string ending past the sent text is new (the sent text was checked already).
        start = max(0, len(self.sent) - max((len(s) for s in self.stops), default=0) + 1)
        cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        elif not final:
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        delta, self.sent = text[len(self.sent):], max(text, self.sent, key=len)
        return delta


class _Choice:
    def __init__(self, index: int, prompt_index: int, rid: str, prompt_tokens: int, text: TextStream, arrival: float):
        self.index, self.prompt_index, self.rid, self.prompt_tokens, self.text = index, prompt_index, rid, \
            prompt_tokens, text
        self.completion_tokens = self.cached = 0
        self.finish_reason: str | None = None
        self.arrival, self.last = arrival, None


class Metrics:
    """Prometheus metrics (vLLM's names under a `longspec:` prefix) on the app's own registry."""

    def __init__(self, worker, model_name: str):
        self.registry = CollectorRegistry()
        labels = dict(labelnames=["model_name"])
        buckets = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
        self.ttft = Histogram("longspec:time_to_first_token_seconds", "Arrival to first token.", buckets=buckets,
                              registry=self.registry, **labels).labels(model_name)
        self.itl = Histogram("longspec:inter_token_latency_seconds", "Time per output token after the first "
                             "(an engine step's gap shared by the tokens it emitted).", buckets=buckets,
                             registry=self.registry, **labels).labels(model_name)
        self.e2e = Histogram("longspec:e2e_request_latency_seconds", "Arrival to finish.", buckets=buckets,
                             registry=self.registry, **labels).labels(model_name)
        self.finished = Counter("longspec:request_success_total", "Finished requests by reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.model_name = model_name
        self.registry.register(_EngineCollector(worker, model_name))

    def observe(self, choice: _Choice, tokens: int, now: float):
        if tokens:
            if choice.last is None:
                self.ttft.observe(now - choice.arrival)
            else:
                for _ in range(tokens):
                    self.itl.observe((now - choice.last) / tokens)
            choice.last = now

    def finish(self, choice: _Choice, now: float):
        self.e2e.observe(now - choice.arrival)
        self.finished.labels(self.model_name, choice.finish_reason or "abort").inc()


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, worker, model_name):
        self.worker, self.model = worker, model_name

    def collect(self):
        e, w = self.worker.engine, self.worker
        s = dict(e.stats)
        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"longspec:{name}", doc, labels=["model_name"])
            g.add_metric([self.model], value)
            return g
        def counter(name, doc, value):
            c = CounterMetricFamily(f"longspec:{name}", doc, labels=["model_name"])
            c.add_metric([self.model], value)
            return c
        yield gauge("num_requests_running", "Requests in slots.", e.running)
        yield gauge("num_requests_waiting", "Admitted requests not in a slot yet.", max(0, w.inflight - e.running))
        yield gauge("num_slots_resident", "Free slots holding a finished sequence for prefix reuse.", e.resident)
        yield gauge("output_tokens_per_second", "Tokens emitted per second over the last 10 s.", w.tokens_per_s())
        yield gauge("mean_accepted_length", "tau: emitted tokens per target forward (prefill forward included).",
                    s["generated_tokens"] / max(1, s["forwards"] + s["requests"]))
        yield gauge("engine_compile_seconds", "Seconds the engine took to compile its executables at startup.",
                    e.compile_s)
        yield counter("prompt_tokens", "Prompt tokens admitted.", s["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated.", s["generated_tokens"])
        yield counter("prefix_cache_queries", "Requests admitted (each looks for a reusable prefix).",
                      s["requests"])
        yield counter("prefix_cache_hits", "Requests that reused a resident prefix.", s["prefix_hits"])
        yield counter("prefix_cache_reused_tokens", "Prompt tokens not prefilled thanks to reuse.",
                      s["reused_tokens"])
        yield counter("target_forwards", "Decode steps summed over requests.", s["forwards"])
        yield counter("engine_decode_calls", "Device calls of the decode loop.", s["steps"])
        yield counter("engine_host_busy_seconds", "Host work of decode steps without admission (the step's "
                      "time minus its waits for the device).", s["host_busy_s"])
        yield counter("engine_host_busy_steps", "Decode steps counted in engine_host_busy_seconds.",
                      s["host_busy_steps"])
        yield counter("engine_call_gap_seconds", "Time from a decode call's return to the next call's start, "
                      "over plain decode steps (the host's work between two device calls; GPUs only).", s["gap_s"])
        yield counter("engine_call_gaps", "Gaps counted in engine_call_gap_seconds.", s["gap_calls"])


def create_app(worker, tokenizer, stop_ids, *, model_name: str, max_context: int) -> FastAPI:
    metrics = Metrics(worker, model_name)
    vocab_size = worker.engine.cfg.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not worker.thread.is_alive() and worker.error is None:
            worker.start()
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="longspec-jax", lifespan=lifespan)

    @app.exception_handler(oai.ApiError)
    async def api_error(request, e: oai.ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = oai.validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health():
        return JSONResponse({}, status_code=200 if worker.alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "longspec-jax", "root": model_name,
                                            "max_model_len": max_context}]}

    def sampling_of(body) -> SamplingParams:
        try:
            return SamplingParams(1.0 if body.temperature is None else body.temperature,
                                  max(0, body.top_k or 0), 1.0 if body.top_p is None else body.top_p)
        except ValueError as e:
            raise oai.ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    def check_model(body):
        if body.model != model_name:
            raise oai.ApiError(404, f"The model `{body.model}` does not exist.", param="model",
                               code="model_not_found")

    def encode_text(text: str) -> list[int]:  # a completion's prompt
        return tokenizer(text)["input_ids"]

    def encode_chat(messages, add_generation_prompt: bool = True) -> list[int]:  # a chat's prompt
        messages = [dict(m.model_dump(exclude_none=True), content=m.text()) for m in messages]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]

    def requests_for(body, prompts: list[list[int]], max_tokens: int | None) -> list[eng.Request]:
        check_model(body)
        body.refuse_unsupported()
        sampling = sampling_of(body)
        stops = tuple(() if body.ignore_eos else stop_ids) + tuple(body.stop_token_ids or ())
        reqs = []
        for p in prompts:
            if not p:
                raise oai.ApiError(400, "the prompt is empty", param="prompt")
            n_new = max_tokens if max_tokens is not None else max_context - len(p)
            if len(p) + max(n_new, 1) > max_context:
                raise oai.ApiError(400, f"This model's maximum context length is {max_context} tokens. However, you "
                                        f"requested {len(p) + n_new} tokens ({len(p)} in the prompt, {n_new} in the "
                                        "completion). Please reduce the length of the prompt or completion.",
                                   param="max_tokens" if max_tokens is not None else "messages")
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + len(reqs)
                reqs.append(eng.Request(list(p), n_new, sampling, stops, seed, body.session_id))
        return reqs

    async def run(request: Request, body, prompts, max_tokens, chat: bool):
        reqs = requests_for(body, prompts, max_tokens)
        arrival = time.monotonic()
        q = worker.submit(reqs)
        choices = {r.id: _Choice(i, i // body.n, r.id, len(r.prompt), TextStream(tokenizer, body.stop_strings),
                                 arrival) for i, r in enumerate(reqs)}
        rid = oai.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return StreamingResponse(_stream(q, choices, rid, body, chat), media_type="text/event-stream")
        pending = set(choices)
        try:
            while pending:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        worker.cancel(pending)
                        return JSONResponse({}, status_code=499)
                    continue
                c = choices.get(ev.request_id)
                if c is None or c.finish_reason is not None:
                    continue
                if ev.error:
                    worker.cancel(pending)
                    raise oai.ApiError(500, f"generation failed: {ev.error}", "server_error")
                _take(c, ev, worker, pending)
        except asyncio.CancelledError:
            worker.cancel(pending)
            raise
        out = [dict(index=c.index, text=c.text.sent, finish_reason=c.finish_reason,
                    token_ids=c.text.tokens[:c.completion_tokens] if body.return_token_ids else None)
               for c in choices.values()]
        use = _usage(choices.values())
        return (oai.chat_body if chat else oai.completion_body)(rid, model_name, out, use)

    def _take(c: _Choice, ev: eng.Event, worker_, pending) -> str:
        """Apply one event to its choice; returns the new text."""
        now = time.monotonic()
        c.completion_tokens += len(ev.tokens)
        c.cached = max(c.cached, ev.cached_tokens)
        metrics.observe(c, len(ev.tokens), now)
        delta = c.text.add(ev.tokens, final=ev.finish_reason is not None)
        if c.text.stopped:
            c.finish_reason = "stop"
            worker_.cancel([c.rid])
        elif ev.finish_reason is not None:
            c.finish_reason = oai.FINISH_REASONS.get(ev.finish_reason, ev.finish_reason)
        if c.finish_reason is not None:
            pending.discard(c.rid)
            metrics.finish(c, now)
        return delta

    async def _stream(q, choices, rid, body, chat):
        pending = set(choices)
        usage_each = body.stream_options is not None and body.stream_options.continuous_usage_stats
        try:
            if chat:
                for c in choices.values():
                    yield oai.sse(oai.chat_chunk(rid, model_name, c.index, {"role": "assistant", "content": ""}, None))
            while pending:
                ev = await q.get()
                c = choices.get(ev.request_id)
                if c is None or c.finish_reason is not None:
                    continue
                if ev.error:
                    worker.cancel(pending)
                    yield oai.sse(oai.ApiError(500, f"generation failed: {ev.error}", "server_error").body())
                    break
                delta = _take(c, ev, worker, pending)
                use = _usage(choices.values()) if usage_each else None
                ids = ev.tokens if body.return_token_ids else None
                if delta or ids or c.finish_reason is not None:
                    if chat:
                        yield oai.sse(oai.chat_chunk(rid, model_name, c.index, {"content": delta} if delta else {},
                                                     c.finish_reason, use, ids))
                    else:
                        yield oai.sse(oai.completion_chunk(rid, model_name, c.index, delta, c.finish_reason, use, ids))
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield oai.sse(oai.usage_chunk(rid, model_name, "chat.completion.chunk" if chat else
                                                  "text_completion", _usage(choices.values())))
            yield oai.sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: free the slots
            worker.cancel(pending)
            raise

    @app.post("/v1/completions")
    async def completions(body: oai.CompletionRequest, request: Request):
        p = body.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            texts = [p] if isinstance(p, str) else p
            if not all(texts):
                raise oai.ApiError(400, "the prompt is empty; send the text to continue", param="prompt")
            prompts = await run_in_threadpool(lambda: [encode_text(t) for t in texts])
        else:
            prompts = [p] if (not p or isinstance(p[0], int)) else p
        return await run(request, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oai.ChatCompletionRequest, request: Request):
        prompt = await run_in_threadpool(encode_chat, body.messages)
        return await run(request, body, [prompt], body.max_completion_tokens or body.max_tokens, chat=True)

    @app.post("/tokenize")
    async def tokenize(body: oai.TokenizeRequest):
        check_model(body)
        body.check()
        ids = await run_in_threadpool(lambda: encode_text(body.prompt) if body.messages is None
                                      else encode_chat(body.messages, body.add_generation_prompt))
        return {"count": len(ids), "max_model_len": max_context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: oai.DetokenizeRequest):
        check_model(body)
        bad = [t for t in body.tokens if not 0 <= t < vocab_size]
        if bad:
            raise oai.ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="tokens")
        return {"prompt": await run_in_threadpool(tokenizer.decode, body.tokens)}  # special tokens kept, as vLLM

    return app


def _usage(choices) -> dict:
    """OpenAI's usage: each prompt's tokens once (n choices share them), every choice's completion."""
    choices = list(choices)
    prompt = {c.prompt_index: c.prompt_tokens for c in choices}
    cached = {c.prompt_index: c.cached for c in choices}
    return oai.usage(sum(prompt.values()), sum(c.completion_tokens for c in choices), sum(cached.values()))
