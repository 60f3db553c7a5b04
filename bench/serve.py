"""Serve long-context agents: C concurrent simulated agents, K turns each over a growing context,
through the OpenAI-compatible server (`python -m infer.serve`, its own process) and the async
`openai` client; the speculative engine and the same engine in AR mode in one run.

    python -m bench serve --workload serve-demo                          # the demo pair (CPU)
    python -m bench serve --workload serve-llama3-8b --checkpoint DIR --draft DIR    # GPU

Agent a's first prompt is `context` tokens (the demo's held-out code, or random ids; with
--shared-prefix N every agent's starts with the same N tokens, a document each asks about); each turn
appends the reply (its token ids, `return_token_ids`) and `turn_tokens` new tokens, then asks for
`new_tokens` more, streamed, greedy or at --temperature, ignoring EOS. The token ids travel in
`extra_body`: the `openai` client walks a `prompt` list through its type transform one element at a
time (about 64 ms for 8k ids on a 2-core CPU, 240 ms for 32k), a cost of the client library that
would otherwise land in every TTFT. Per mode and concurrency:
output tokens/s (every agent's completion tokens over the wall time), TTFT and inter-token latency
p50 / p99 (a stream chunk's gap shared by its tokens), first-turn (cold) and later-turn (reused
prefix) TTFT, tau, the prefix-reuse hit rate (of requests, and of prompt tokens as vLLM counts it;
from /metrics), and the engine's host work per decode step and between two decode calls (GPUs). A
cold prefill of a later turn's length, timed alone, is the reference for the reused turns' TTFT.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np

from bench import common, workloads


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "serve-demo")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="agents at once (default: 1 2 4 8)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn-tokens", type=int, default=128, help="new user tokens per later turn")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="the agents' first prompts share their first N tokens (one document, a question each)")
    parser.add_argument("--modes", nargs="+", default=["tree", "ar"], choices=["tree", "ar"])
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="the agents' sampling temperature (0: greedy; > 0: each turn seeded, results in *-t<T>.json)")
    parser.add_argument("--checkpoint", help="target checkpoint (default: the workload's model)")
    parser.add_argument("--draft", help="draft checkpoint (default: the model's)")
    parser.add_argument("--max-slots", type=int, default=8)
    parser.add_argument("--server-args", default="", help='more flags for python -m infer.serve, one string joined by '
                        '"=" (--server-args="--interrupt-on-arrival"): argparse reads a value that starts with "--" '
                        'as a flag of its own')
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


def server_model(wl) -> str:
    """The --model name `python -m infer.serve` knows the workload's model by."""
    return {"demo": "longspec-demo", "tiny": "tiny-random"}.get(wl.model, wl.model)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, wl, mode: str, max_context: int):
    """Start `python -m infer.serve` for this mode; returns (process, base url, startup seconds)."""
    import httpx

    port = _port()
    model = server_model(wl)
    cmd = [sys.executable, "-m", "infer.serve", "--model", model, "--method", mode, "--port", str(port),
           "--max-slots", str(args.max_slots), "--max-context", str(max_context), *args.server_args.split()]
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    cmd += ["--draft", args.draft] if args.draft and mode == "tree" else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < 1800:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start in 30 minutes")


def scrape(url: str) -> dict:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"longspec:(\w+)\{[^}]*\} ([-+.\deE]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def contexts(wl, n: int, length: int, seed: int, vocab: int, shared: int = 0) -> list[list[int]]:
    """n first-turn prompts: slices of the demo's held-out code, or random ids; with `shared`, the
    first prompt's first `shared` tokens start every prompt (a document each agent asks about)."""
    firsts = _contexts(wl, n, length, seed, vocab)
    return [firsts[0][:shared] + f[shared:] for f in firsts]


def _contexts(wl, n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    if wl.prompts == "heldout":
        from longspec_jax import demo
        from longspec_jax.weights import load_tokenizer, read_config

        tok = load_tokenizer(demo.TARGET_DIR, read_config(demo.TARGET_DIR))
        texts = [p["text"] for p in demo.heldout_prompts()]
        ids = [tok(t)["input_ids"] for t in texts]
        return [ids[(seed + a) % len(ids)][:length] for a in range(n)]
    return [rng.integers(2, vocab, length).tolist() for _ in range(n)]


async def agent(client, model: str, first: list[int], turns: int, turn_tokens: int, new_tokens: int, rng,
                vocab: int, records: list, temperature: float = 0.0):
    ctx = list(first)
    for turn in range(turns):
        t0 = time.perf_counter()
        stream = await client.completions.create(
            model=model, prompt="", max_tokens=new_tokens, temperature=temperature, stream=True,
            seed=int(rng.integers(2**31)) if temperature > 0 else None,
            extra_body={"prompt": ctx, "ignore_eos": True, "return_token_ids": True})
        arrivals, reply = [], []
        async for chunk in stream:
            ids = (chunk.choices[0].model_extra or {}).get("token_ids") if chunk.choices else None
            if ids:
                arrivals.append((time.perf_counter(), len(ids)))
                reply.extend(ids)
        records.append(dict(turn=turn, prompt_tokens=len(ctx), tokens=len(reply), start=t0,
                            ttft=arrivals[0][0] - t0 if arrivals else None, end=time.perf_counter(),
                            itl=[(t - p) / n for (p, _), (t, n) in zip(arrivals, arrivals[1:]) for _ in range(n)]))
        ctx = ctx + reply + rng.integers(2, vocab, turn_tokens).tolist()


def run_level(url: str, model: str, firsts, args, wl, vocab: int) -> dict:
    import openai

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=3600, max_retries=0)
        records: list = []
        try:
            await asyncio.gather(*(agent(client, model, f, args.turns, args.turn_tokens, wl.new_tokens,
                                         np.random.default_rng(i), vocab, records, args.temperature)
                                   for i, f in enumerate(firsts)))
        finally:
            await client.close()
        return records

    before = scrape(url)
    t0 = time.perf_counter()
    records = asyncio.run(main())
    wall = time.perf_counter() - t0
    after = scrape(url)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    itl = [x for r in records for x in r["itl"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return dict(
        agents=len(firsts), wall_s=wall, output_tokens=sum(r["tokens"] for r in records),
        output_tokens_per_s=sum(r["tokens"] for r in records) / wall,
        ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), itl_p50_s=pct(itl, 50), itl_p99_s=pct(itl, 99),
        ttft_first_turn_s=pct([r["ttft"] for r in records if r["turn"] == 0 and r["ttft"]], 50),
        ttft_later_turns_s=pct([r["ttft"] for r in records if r["turn"] > 0 and r["ttft"]], 50),
        later_turn_prompt_tokens=int(np.median([r["prompt_tokens"] for r in records if r["turn"] > 0] or [0])),
        tau=d.get("generation_tokens_total", 0) / max(1.0, d.get("target_forwards_total", 0)
                                                       + d.get("prefix_cache_queries_total", 0)),
        prefix_hit_rate=d.get("prefix_cache_hits_total", 0) / max(1.0, d.get("prefix_cache_queries_total", 0)),
        reused_tokens=d.get("prefix_cache_reused_tokens_total", 0),
        # vLLM's hit rate: prompt tokens served from the cache (a request reusing a few tokens is a hit above)
        reused_token_share=d.get("prefix_cache_reused_tokens_total", 0) / max(1.0, d.get("prompt_tokens_total", 0)),
        host_ms_per_decode_step=1e3 * d.get("engine_host_busy_seconds_total", 0)
        / max(1.0, d.get("engine_host_busy_steps_total", 0)),
        # Counted on GPUs only (a call returns at dispatch elsewhere): None where no gap was counted.
        call_gap_ms=1e3 * d["engine_call_gap_seconds_total"] / d["engine_call_gaps_total"]
        if d.get("engine_call_gaps_total") else None)


def cold_ttft(url: str, model: str, length: int, vocab: int, seed: int) -> float:
    """TTFT of a fresh prompt of `length` tokens that shares nothing with any resident sequence, the
    second of two such prompts: the first may pay the first run of a prefill width (its last chunk's).
    On an H100 a single cold 8704-token prompt took 0.6 s where 8192-token first turns took 0.23 s."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=3600, max_retries=0)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        prompt = rng.integers(2, vocab, length).tolist()
        t0, ttft = time.perf_counter(), None
        for chunk in client.completions.create(model=model, prompt="", max_tokens=2, temperature=0, stream=True,
                                               extra_body={"prompt": prompt, "ignore_eos": True,
                                                           "return_token_ids": True}):
            if ttft is None and chunk.choices and (chunk.choices[0].model_extra or {}).get("token_ids"):
                ttft = time.perf_counter() - t0
    return float("nan") if ttft is None else ttft


def main(args) -> int:
    wl = workloads.get(args.workload)
    cfg, _ = wl.configs()
    levels = args.concurrency or [1, 2, 4, 8]
    length = wl.contexts[0]
    max_context = length + args.turns * (wl.new_tokens + args.turn_tokens) + 64
    model = server_model(wl)
    record = common.header("serve", args.workload, args.argv)
    if not 0 <= args.shared_prefix < length:
        raise SystemExit(f"--shared-prefix must be in [0, {length}) (the first turn's length), "
                         f"got {args.shared_prefix}")
    record.update(context=length, turns=args.turns, turn_tokens=args.turn_tokens, new_tokens=wl.new_tokens,
                  temperature=args.temperature, max_slots=args.max_slots, shared_prefix=args.shared_prefix, modes={})
    path = common.result_path(args.out, "serve", args.workload + (f"-t{args.temperature:g}" if args.temperature else "")
                              + ("-shared" if args.shared_prefix else ""))
    for mode in args.modes:
        proc, url, startup = launch(args, wl, mode, max_context)
        rows = []
        try:
            # One agent's turns first, not recorded: a server's first requests pay one-time costs (the
            # first run of each executable) that would land on whichever level came first.
            run_level(url, model, contexts(wl, 1, length, seed=999, vocab=cfg.vocab_size), args, wl, cfg.vocab_size)
            record["modes"][mode] = dict(startup_s=startup, compile_s=scrape(url).get("engine_compile_seconds"))
            for c in levels:
                firsts = contexts(wl, c, length, seed=1000 * c, vocab=cfg.vocab_size, shared=args.shared_prefix)
                rows.append(run_level(url, model, firsts, args, wl, cfg.vocab_size))
                r = rows[-1]
                common.log(f"{mode} x{c}: {r['output_tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_s']:.3f} s "
                           f"(later turns {r['ttft_later_turns_s']}), ITL p99 {r['itl_p99_s']:.4f} s, "
                           f"tau {r['tau']:.2f}, hits {r['prefix_hit_rate']:.2f} ({r['reused_token_share']:.2f} of "
                           f"prompt tokens), host {r['host_ms_per_decode_step']:.2f} ms/step, gap {r['call_gap_ms']} ms/call")
                record["modes"][mode]["levels"] = rows
                common.write_json(path, record)
            later = max((r["later_turn_prompt_tokens"] for r in rows), default=0) or length  # one turn: no later
            record["modes"][mode]["cold_ttft_s"] = cold_ttft(url, model, later, cfg.vocab_size, seed=7)
            record["modes"][mode]["cold_ttft_prompt_tokens"] = later
        finally:
            proc.terminate()
            proc.wait(60)
    if {"tree", "ar"} <= set(record["modes"]):
        tree, ar = record["modes"]["tree"]["levels"], record["modes"]["ar"]["levels"]
        record["speedup"] = {str(t["agents"]): t["output_tokens_per_s"] / a["output_tokens_per_s"]
                             for t, a in zip(tree, ar)}
        common.log("speedup over AR by agents: " + ", ".join(f"{k}: {v:.2f}x" for k, v in record["speedup"].items()))
    common.write_json(path, record)
    plot(record, os.path.splitext(path)[0] + ".png")
    common.log(f"wrote {path}")
    return 0


def plot(record: dict, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, m in record["modes"].items():
        n = [r["agents"] for r in m["levels"]]
        a.plot(n, [r["output_tokens_per_s"] for r in m["levels"]], "o-", label=mode)
        b.plot(n, [1e3 * (r["itl_p99_s"] or 0) for r in m["levels"]], "o-", label=mode)
    a.set(xlabel="concurrent agents", ylabel="output tokens/s", title="throughput")
    b.set(xlabel="concurrent agents", ylabel="p99 inter-token latency (ms)", title="latency")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{record['workload']} on {record['device']}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
