"""The OpenAI-compatible server, started for real (uvicorn on 127.0.0.1, a free port) and driven by
the official `openai` client (and httpx where headers or raw bytes matter).

Greedy outputs are compared with the single-request AR decoder on the same models; one test runs
`python -m infer.serve` as a subprocess and stops it with SIGTERM.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax.numpy as jnp
import pytest
from flax import nnx

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from longspec_jax.infer import tiny_random  # noqa: E402
from longspec_jax.infer.decoder import generate_ar  # noqa: E402
from longspec_jax.infer.engine import Engine  # noqa: E402
from longspec_jax.infer.serve import EngineWorker  # noqa: E402
from longspec_jax.infer.server_app import create_app  # noqa: E402
from longspec_jax.configs import DraftConfig  # noqa: E402
from longspec_jax.draft import Draft  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny"
MAX_CONTEXT = 512
SLOTS, QUEUE = 3, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, target, tokenizer, worker, url):
        self.target, self.tokenizer, self.worker, self.url = target, tokenizer, worker, url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
        self.stop_ids = tuple(target.cfg.eos_token_ids)

    def greedy_ids(self, prompt_ids, n):
        return generate_ar(self.target, [prompt_ids], max_new_tokens=n, eos_ids=self.stop_ids).tokens[0]

    def greedy_text(self, prompt_ids, n):
        return self.tokenizer.decode(self.greedy_ids(prompt_ids, n), skip_special_tokens=True)

    def metric(self, name):
        text = httpx.get(self.url + "/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith(f"longspec:{name}")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else None


@pytest.fixture(scope="module")
def served():
    target, cfg, tokenizer = tiny_random.build(seed=3)
    draft = Draft(DraftConfig.from_target(cfg, window=16), cfg.rope, rngs=nnx.Rngs(4), dtype=jnp.float32,
                  param_dtype=jnp.float32)
    engine = Engine(target, draft, max_slots=SLOTS, max_context=MAX_CONTEXT, tree_shape=(1, 1, 1), prefill_chunk=32)
    worker = EngineWorker(engine, max_queue=QUEUE)
    app = create_app(worker, tokenizer, tuple(cfg.eos_token_ids), model_name=MODEL, max_context=MAX_CONTEXT)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield Served(target, tokenizer, worker, url)
    server.should_exit = True
    thread.join(30)


def _ids(served, text):
    return served.tokenizer(text)["input_ids"]


def test_health_models_and_metrics(served):
    assert httpx.get(served.url + "/health").status_code == 200
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = httpx.get(served.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "num_slots_resident", "prefix_cache_hits_total",
                 "prefix_cache_reused_tokens_total", "output_tokens_per_second", "mean_accepted_length",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "engine_call_gap_seconds_total", "engine_call_gaps_total"):
        assert f"longspec:{name}" in text, name
    compile_s = [float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("longspec:engine_compile_seconds{")]
    assert len(compile_s) == 1 and compile_s[0] > 0  # the startup's compile, reported once


def test_completion_equals_greedy_output(served):
    prompt = "the quick brown fox"
    res = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    want = served.greedy_ids(_ids(served, prompt), 24)
    assert res.choices[0].text == served.tokenizer.decode(want, skip_special_tokens=True)
    assert res.choices[0].finish_reason == ("length" if len(want) == 24 else "stop")
    assert res.usage.prompt_tokens == len(_ids(served, prompt)) and res.usage.completion_tokens == len(want)
    # token-id prompts (one, and a batch of two) give the same text per prompt
    ids = _ids(served, prompt)
    res = served.client.completions.create(model=MODEL, prompt=[ids, ids[:-2]], max_tokens=24, temperature=0)
    assert [c.index for c in res.choices] == [0, 1]
    assert res.choices[0].text == served.greedy_text(ids, 24)
    assert res.choices[1].text == served.greedy_text(ids[:-2], 24)


def test_chat_uses_the_template_and_streams(served):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    rendered = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = served.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    want = served.greedy_text(ids, 20)
    res = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert res.choices[0].message.role == "assistant" and res.choices[0].message.content == want
    chunks = list(served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == res.usage.completion_tokens


def test_tokenize_counts_what_the_endpoints_encode(served):
    """vLLM's /tokenize and /detokenize: a prompt's ids are the ones /v1/completions prefills, a
    chat's the ones /v1/chat/completions does (its usage agrees); ids decode back; bad bodies get
    OpenAI errors."""
    post = lambda path, **body: httpx.post(served.url + path, json={"model": MODEL, **body}, timeout=30)  # noqa: E731
    r = post("/tokenize", prompt="the quick brown fox").json()
    assert r["tokens"] == _ids(served, "the quick brown fox") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_CONTEXT
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = post("/tokenize", messages=messages).json()
    res = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert r["count"] == res.usage.prompt_tokens
    rendered = served.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert post("/tokenize", messages=messages, add_generation_prompt=False).json()["tokens"] == \
        served.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ids = _ids(served, "hello there")
    assert post("/detokenize", tokens=ids).json()["prompt"] == served.tokenizer.decode(ids)
    for path, body, status, param in [
            ("/tokenize", dict(prompt="a", messages=messages), 400, "prompt"),
            ("/tokenize", {}, 400, "messages"),
            ("/tokenize", dict(prompt="a", frobnicate=1), 400, "frobnicate"),
            ("/tokenize", dict(prompt="a", model="gpt-4"), 404, "model"),
            ("/detokenize", dict(tokens=[1, served.target.cfg.vocab_size]), 400, "tokens"),
            ("/detokenize", dict(tokens=[1.5]), 400, "tokens.0")]:
        r = post(path, **body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"], r.text


def test_raw_stream_format(served):
    """Server-sent events as OpenAI sends them: `data: <json>` lines, chunks of object
    text_completion, finish_reason null until the last content chunk, then `data: [DONE]`."""
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]


def test_concurrent_staggered_clients_each_get_their_own_output(served):
    prompts = [_ids(served, t) for t in ("alpha", "bravo charlie", "delta echo foxtrot golf", "hotel", "india juliet")]
    lengths = [30, 12, 25, 40, 18]
    want = [served.greedy_text(p, n) for p, n in zip(prompts, lengths)]
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", timeout=120, max_retries=0)

    async def one(i):
        await asyncio.sleep(0.15 * i)
        if i % 2:
            stream = await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i],
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])
        res = await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        return res.choices[0].text

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await client.close()

    assert asyncio.run(main()) == want


def test_two_turn_agent_reuses_its_prefix(served):
    turn1 = _ids(served, "the agent reads a long document, " * 6)
    res1 = served.client.completions.create(model=MODEL, prompt=turn1, max_tokens=16, temperature=0)
    reply = served.greedy_ids(turn1, 16)
    assert res1.choices[0].text == served.tokenizer.decode(reply, skip_special_tokens=True)
    before = served.metric("prefix_cache_reused_tokens_total")
    turn2 = turn1 + reply + _ids(served, " and asks again")[1:]
    res2 = served.client.completions.create(model=MODEL, prompt=turn2, max_tokens=16, temperature=0)
    assert res2.choices[0].text == served.greedy_text(turn2, 16)
    reused = served.metric("prefix_cache_reused_tokens_total") - before
    assert reused >= len(turn1) and res2.usage.prompt_tokens_details.cached_tokens == reused


def test_n_seed_and_stop_strings(served):
    kw = dict(model=MODEL, prompt="sample me", max_tokens=12, temperature=1.0, n=2, seed=7)
    a, b = served.client.completions.create(**kw), served.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    text = served.greedy_text(_ids(served, "stop here"), 30)
    stop = next((text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in
                 text[i:i + 2] and text.find(text[i:i + 2]) == i), None)
    if stop is None:
        pytest.skip("no usable stop string in this output")
    res = served.client.completions.create(model=MODEL, prompt="stop here", max_tokens=30, temperature=0, stop=[stop])
    assert res.choices[0].text == text[:text.find(stop)] and res.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,status,param", [
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"n": 1.5}, 400, "n"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"frobnicate": 1}, 400, "frobnicate"),
    ({"logprobs": 2}, 400, "logprobs"),
    ({"prompt": ""}, 400, "prompt"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"prompt": "x" * 600, "max_tokens": 4}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors(served, body, status, param):
    r = httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", **body}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    if param == "max_tokens" and "prompt" in body:
        assert f"maximum context length is {MAX_CONTEXT} tokens" in err["message"]
    r = httpx.post(served.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_disconnect_mid_stream_frees_the_slot(served):
    body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # closing the response drops the connection mid-stream
    deadline = time.time() + 20
    while time.time() < deadline and (served.worker.engine.running or served.worker.inflight):
        time.sleep(0.05)
    assert served.worker.engine.running == 0 and served.worker.inflight == 0


def test_flood_beyond_the_queue_gets_503_with_retry_after(served):
    body = {"model": MODEL, "prompt": "flood", "max_tokens": 200, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(served.url + "/v1/completions", json=body) for _ in range(9)))

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= SLOTS and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "server_busy"
    texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # every admitted request got the same (its own) greedy output


def test_a_failing_request_fails_alone(served, monkeypatch):
    engine = served.worker.engine
    real_insert = engine.calls.insert
    calls = []

    def insert(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real_insert(*args)

    monkeypatch.setattr(engine.calls, "insert", insert)
    r = httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "one", "max_tokens": 5,
                                                         "temperature": 0}, timeout=60)
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    res = served.client.completions.create(model=MODEL, prompt="two", max_tokens=8, temperature=0)
    assert res.choices[0].text == served.greedy_text(_ids(served, "two"), 8)
    assert httpx.get(served.url + "/health").status_code == 200


def test_cli_server_runs_offline_and_stops_on_sigterm():
    """`python -m infer.serve` as a user starts it; SIGTERM while a stream runs: the process exits
    cleanly within its shutdown timeout."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "infer.serve", "--model", "tiny-random", "--port", str(port),
                             "--max-slots", "2", "--max-context", "256", "--shutdown-timeout", "2", "--method", "tree",
                             "--tree-shape", "1", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not start: " + proc.stdout.read()[-3000:])
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        res = client.completions.create(model="tiny-random", prompt="hello", max_tokens=6, temperature=0)
        assert res.usage.completion_tokens >= 1
        stream = client.completions.create(model="tiny-random", prompt="go on", max_tokens=200, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0 and time.time() - t0 < 30
        with pytest.raises(Exception):
            for _ in stream:  # the stream was cut (or finished) by the shutdown
                pass
            raise ConnectionError("stream ended")
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    assert "serving tiny-random on" in out and "server stopped" in out


def test_bad_server_flags_exit_with_a_message(capsys):
    from longspec_jax.infer import serve

    assert serve.main(["--model", "tiny-random", "--fast-lane-tokens", "-1"]) == 2
    assert "--fast-lane-tokens must be >= 0 (0 turns the fast lane off), got -1" in capsys.readouterr().err
    assert serve.main(["--model", "tiny-random", "--interrupt-on-arrival", "--tensor-parallel", "2"]) == 2
    assert "--interrupt-on-arrival needs one device; drop it or --tensor-parallel" in capsys.readouterr().err
    assert serve.main(["--model", "tiny-random", "--prefill-tokens-per-step", "0"]) == 2
    assert "--prefill-tokens-per-step must be >= 1, got 0" in capsys.readouterr().err
