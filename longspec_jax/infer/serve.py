"""`python -m infer.serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    python -m infer.serve                                  # the demo pair on 127.0.0.1:8000, offline
    python -m infer.serve --model llama3-8b --checkpoint DIR --draft DIR --max-slots 8 --max-context 32768
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "longspec-demo", "prompt": "def fib(n):", "max_tokens": 64, "temperature": 0}'

Endpoints: `/v1/completions`, `/v1/chat/completions` (streaming as server-sent events, a final usage
chunk with `stream_options.include_usage`), `/v1/models`, `/tokenize` and `/detokenize` (vLLM's: what a
prompt or a chat costs in tokens), `/health`, `/metrics` (Prometheus).
A long token-id prompt is best sent with the `openai` Python client as `extra_body={"prompt": ids}`:
given as `prompt`, the client walks every id through its type transform first (64 ms for 8k ids on
a 2-core CPU).

Threads: uvicorn's event loop does HTTP, tokenization and text; one engine thread owns the device
and runs `Engine.step` whenever there is work (`EngineWorker`). Requests reach it through the
engine's thread-safe inbox; its events come back through `loop.call_soon_threadsafe` into one
queue per request, so the HTTP side never blocks the engine and the engine never waits for a slow
client. Admission is bounded: beyond `--max-slots` running and `--max-queue` waiting requests the
server answers 503 with Retry-After. SIGTERM stops accepting, lets in-flight requests finish for up
to `--shutdown-timeout` seconds, cancels the rest and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import sys
import threading
import time

from longspec_jax.infer import cli, prompts, tiny_random
from longspec_jax.infer.cli import UsageError
from longspec_jax.infer.engine import Engine, Event, Request
from longspec_jax.infer.openai_protocol import ApiError

DEFAULT_PORT = 8000


class EngineWorker:
    """Runs `engine.step()` in its own thread and routes each event to its request's asyncio queue.

    `inflight` counts admitted requests not finished yet; `submit` refuses (503) beyond
    `engine.B + max_queue` of them.
    """

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.inflight = 0
        self.recent = collections.deque(maxlen=256)  # (time, tokens emitted) per engine step
        self._ids = 0
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self, timeout: float = 30.0):
        """Stop the engine thread; requests still running get a "cancelled" event."""
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def submit(self, reqs: list[Request]) -> asyncio.Queue:
        """Queue requests (all or none); their events arrive on the returned queue."""
        if not self.alive:
            raise ApiError(503, "the engine is not running", "server_error")
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            if self.inflight + len(reqs) > self.engine.B + self.max_queue:
                raise ApiError(503, f"the server is at capacity ({self.engine.B} running, {self.max_queue} waiting); "
                                    "retry later", "server_error", code="server_busy", headers={"Retry-After": "1"})
            for r in reqs:
                try:
                    self.engine.check(r)
                except ValueError as e:
                    raise ApiError(400, str(e), param="prompt") from None
            self.inflight += len(reqs)
            for r in reqs:
                self._ids += 1
                r.id = f"r{self._ids}"
                self._queues[r.id] = (loop, q)
        for r in reqs:
            self.engine.submit(r)
        self._wake.set()
        return q

    def cancel(self, request_ids):
        for rid in request_ids:
            if rid in self._queues:
                self.engine.cancel(rid)
        self._wake.set()

    def _run(self):
        try:
            while not self._stop.is_set():
                if self.engine.has_work():
                    events = self.engine.step()
                    self.recent.append((time.monotonic(), sum(len(e.tokens) for e in events)))
                    self._route(events)
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001: report to every waiting request, /health turns 503
            self.error = e
        for rid in list(self._queues):
            self._route([Event(rid, [], "error" if self.error else "cancelled",
                               error=None if self.error is None else f"engine stopped: {self.error!r}")])

    def _route(self, events):
        for ev in events:
            with self._lock:
                target = self._queues.get(ev.request_id)
                if target is not None and ev.finish_reason is not None:
                    del self._queues[ev.request_id]
                    self.inflight -= 1
            if target is not None:
                loop, q = target
                try:
                    loop.call_soon_threadsafe(q.put_nowait, ev)
                except RuntimeError:  # the event loop is closed (shutdown)
                    pass

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window_s]
        return sum(n for _, n in recent) / window_s if recent else 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-slots", type=int, default=8, help="requests decoded at once (static batch)")
    p.add_argument("--max-context", type=int, default=None,
                   help="most tokens (prompt + completion) per request; sets each slot's KV capacity "
                        "(default: the model's limit, at most 32768)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the slots; more get 503")
    p.add_argument("--steps-per-call", type=int, default=4, help="decode steps per device call while nothing waits")
    p.add_argument("--prefill-tokens-per-step", type=int, default=None,
                   help="prompt tokens prefilled between two decode calls, in whole --prefill-chunk forwards (more: "
                        "waiting requests start and batch sooner; fewer: smoother streams meanwhile; default: 8192 "
                        "on a GPU, one chunk on a CPU)")
    p.add_argument("--fast-lane-tokens", type=int, default=None,
                   help="a request with at most this many prompt tokens left to prefill after prefix reuse (an "
                        "agent's next turn) prefills in a second staging cache while a long prompt loads, instead "
                        "of waiting for it (default: one prefill chunk; 0: off, saving one slot's KV memory)")
    p.add_argument("--interrupt-on-arrival", action=argparse.BooleanOptionalAction, default=False,
                   help="a decode call ends at the step after a request arrives, so that its prefill waits one "
                        "step, not the rest of the call (one host callback a step; one device only)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions (default: the tokenizer's; without one, "
                        "message contents are joined by newlines)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may run on after SIGTERM before they are cancelled")
    return p


def load_engine(args) -> tuple[Engine, object, tuple]:
    """(engine, tokenizer, stop ids) for the command line: the same model flags and checks as
    `python -m infer.generate`, then the engine (which compiles its executables)."""
    shape, vocab_ids = cli.check_model_flags(args, counts=(
        ("--max-slots", args.max_slots, ""), ("--max-context", args.max_context, ""),
        ("--steps-per-call", args.steps_per_call, ""), ("--port", args.port, "")))
    if args.prefill_tokens_per_step is not None and args.prefill_tokens_per_step < 1:
        raise UsageError(f"--prefill-tokens-per-step must be >= 1, got {args.prefill_tokens_per_step}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.fast_lane_tokens is not None and args.fast_lane_tokens < 0:
        raise UsageError(f"--fast-lane-tokens must be >= 0 (0 turns the fast lane off), got {args.fast_lane_tokens}")
    if args.interrupt_on_arrival and (args.tensor_parallel or 1) > 1:
        raise UsageError("--interrupt-on-arrival needs one device; drop it or --tensor-parallel")
    args.dtype = cli.resolve_dtype(args.dtype)
    dtype = cli.DTYPES[args.dtype]
    if args.model == tiny_random.NAME:
        print(tiny_random.BANNER, flush=True)
    mesh = cli.tensor_parallel_mesh(args.tensor_parallel)
    args.method = cli.choose_method(args)
    cli.check_method(args, shape, vocab_ids)
    cfg, tokenizer, ckpt = cli.open_target(args)
    limit = cfg.max_position_embeddings
    if args.max_context is None:
        args.max_context = min(limit, 32768)
    elif args.max_context > limit:
        raise UsageError(f"--max-context {args.max_context} exceeds {args.model}'s limit of {limit} positions "
                         "(max_position_embeddings); pass at most that")
    draft_path = draft_vocab = None
    if args.method == "tree":
        draft_path = cli.resolve_draft(args)
        draft_vocab = cli.choose_draft_vocab(args, vocab_ids, draft_path, cfg, shape)
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        except OSError as e:
            raise UsageError(f"cannot read --chat-template {args.chat_template!r}: {e.strerror}") from None
    cli.setup_compile_cache(args)
    model = cli.load_target_weights(args, cfg, ckpt, dtype)
    draft = cli.load_draft_model(args, draft_path, cfg, dtype) if args.method == "tree" else None
    t0 = time.perf_counter()
    engine = Engine(model, draft, max_slots=args.max_slots, max_context=args.max_context,
                    tree_shape=None if shape is None else shape.widths, draft_vocab=draft_vocab,
                    prefill_chunk=args.prefill_chunk, mesh=mesh, steps_per_call=args.steps_per_call,
                    prefill_tokens_per_step=args.prefill_tokens_per_step,
                    fast_lane_tokens=args.fast_lane_tokens, interrupt_on_arrival=args.interrupt_on_arrival)
    trees = {("sampled" if s else "greedy"): [w for _, w in t] for s, t in engine.tables.items()}
    print(f"engine: {args.max_slots} slots x {engine.capacity} KV slots, method {args.method}, trees by load "
          f"{trees}, row buckets {list(engine.row_buckets)}, prefill {engine.prefill_chunks_per_step * engine.chunk} "
          f"tokens a step, fast lane {engine.fast_lane_tokens} tokens, "
          f"compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    return engine, tokenizer, prompts.stop_ids(cfg, tokenizer, ckpt)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with our own SIGTERM / SIGINT handlers: a graceful shutdown then exits
        with status 0 (uvicorn re-raises the signal once it has shut down, ending the process with
        -15), and a second SIGINT forces the exit."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def stop(sig, frame):
                self.force_exit = self.should_exit and sig == signal.SIGINT
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code
    try:
        engine, tokenizer, stop_ids = load_engine(args)
    except ValueError as e:  # ConfigError, CheckpointError, UsageError
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from longspec_jax.infer.server_app import create_app

    worker = EngineWorker(engine, args.max_queue)
    app = create_app(worker, tokenizer, stop_ids, model_name=args.served_model_name or args.model,
                     max_context=args.max_context)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = _server_class()(config)
    print(f"serving {args.served_model_name or args.model} on http://{args.host}:{args.port}/v1 "
          f"(OpenAI API; /health, /metrics)", flush=True)
    server.run()  # SIGTERM / SIGINT: graceful shutdown, then the app's lifespan stops the engine
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
