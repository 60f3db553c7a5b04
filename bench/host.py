"""Host work per decode step of the serving engine: the engine alone, and behind the server's engine
thread (`infer.serve.EngineWorker`) with an asyncio consumer that decodes each event's tokens, the
least the HTTP side does per event. The host work of a step is its wall time minus its waits for
the device (`Engine.stats`: host_busy_s / host_busy_steps); the difference between the two settings
is what sharing the GIL with the server's event-loop thread costs the engine. `call_ms`: how long a
decode call holds the engine's helper thread (on a GPU its whole device time: the loop's dispatch
returns only when the loop ends), against the step's host work.

    python -m bench host --workload serve-demo
    python -m bench host --workload serve-llama3-8b --checkpoint DIR --draft DIR       # GPU

One request of --prompt-tokens (the workload's held-out code or random ids), --new-tokens greedy
tokens, repeated --reps times per setting, the settings interleaved.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench import common, workloads
from bench.serve import contexts, server_model


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "serve-demo")
    parser.add_argument("--checkpoint", help="target checkpoint (default: the workload's model)")
    parser.add_argument("--draft", help="draft checkpoint (default: the model's)")
    parser.add_argument("--max-slots", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


def _time_calls(engine, held: list) -> None:
    """Record the seconds each decode call holds the thread it runs on."""
    def timed(exe):
        def call(*args):
            t = time.perf_counter()
            out = exe(*args)
            held.append(time.perf_counter() - t)
            return out
        return call
    engine.calls.run = {k: timed(exe) for k, exe in engine.calls.run.items()}


def _host_ms(engine, run) -> float:
    busy, steps = engine.stats["host_busy_s"], engine.stats["host_busy_steps"]
    run()
    return 1e3 * (engine.stats["host_busy_s"] - busy) / max(1, engine.stats["host_busy_steps"] - steps)


def main(args) -> int:
    from longspec_jax.infer.engine import Request
    from longspec_jax.infer.serve import EngineWorker, build_parser, load_engine

    wl = workloads.get(args.workload)
    cfg, _ = wl.configs()
    flags = ["--model", server_model(wl), "--max-slots", str(args.max_slots),
             "--max-context", str(args.prompt_tokens + args.new_tokens + 64)]
    flags += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    flags += ["--draft", args.draft] if args.draft else []
    engine, tokenizer, _ = load_engine(build_parser().parse_args(flags))
    prompt = contexts(wl, 1, args.prompt_tokens, seed=0, vocab=cfg.vocab_size)[0]

    def alone():
        engine.generate([prompt], max_new_tokens=args.new_tokens, stop_ids=())

    async def consume():
        queue = worker.submit([Request(prompt, args.new_tokens, stop_ids=())])
        while True:
            event = await queue.get()
            tokenizer.decode(event.tokens)
            if event.finish_reason:
                return

    def behind_worker():  # a fresh engine thread each time: the engine is stepped by one thread at once
        nonlocal worker
        worker = EngineWorker(engine, max_queue=0)
        worker.start()
        try:
            asyncio.run(consume())
        finally:
            worker.stop()

    worker = None
    alone()  # warm up both paths
    behind_worker()
    held: list[float] = []
    _time_calls(engine, held)
    record = common.header("host", args.workload, args.argv)
    record.update(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, max_slots=args.max_slots,
                  alone_ms=[], worker_ms=[])
    path = common.result_path(args.out, "host", args.workload)
    for _ in range(args.reps):
        record["alone_ms"].append(_host_ms(engine, alone))
        record["worker_ms"].append(_host_ms(engine, behind_worker))
        common.write_json(path, record)
    record.update(alone_ms_median=float(np.median(record["alone_ms"])),
                  worker_ms_median=float(np.median(record["worker_ms"])), call_ms_median=1e3 * float(np.median(held)))
    common.log(f"host work per decode step: alone {record['alone_ms_median']:.2f} ms, behind the engine thread "
               f"{record['worker_ms_median']:.2f} ms (medians of {args.reps}); a decode call holds its thread "
               f"{record['call_ms_median']:.2f} ms")
    common.write_json(path, record)
    common.log(f"wrote {path}")
    return 0
