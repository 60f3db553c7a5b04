"""A continuous-batching speculative engine: fixed slots, per-slot sampling as data, prefix reuse.

    engine = Engine(target, draft, max_slots=4, max_context=8192)
    results = engine.generate([prompt_a, prompt_b], max_new_tokens=256)   # or submit() + step()

The device holds one `DecodeState` of `max_slots` rows (`longspec_jax/infer/state.py`): each slot a target KV
cache of static capacity and a constant-size draft ring. Between decode calls the host admits
requests into free slots and collects tokens; one jitted `DecodeLoop.run` advances every running
slot at once (the same step `Decoder.generate` runs), and finished or free slots are masked. What
it compiles for these shapes is `longspec_jax/infer/engine_calls.py`; this file schedules it.

* Admission: a prompt is prefilled at batch 1 into a staging cache, `prefill_tokens_per_step` per
  engine step between decode calls (running requests keep streaming while it loads); then its first
  token is drawn, the draft ring rebuilt from the prompt's tail, and the row written into its slot.
* Prefix reuse: a finished sequence stays resident in its slot (KV valid for all but its last
  token) until the slot is needed. A request copies the longest prefix any slot holds (resident,
  or a running request's committed tokens) and prefills the rest (`slots.choose_slot`: an agent's
  next turn takes its own slot, another question over one document a free slot). The draft keeps
  nothing: its cross-attention reads the target's last-layer KV, its ring is rebuilt from the last
  tokens. A request that extends a free slot's sequence goes before older cold ones (`slots.next_request`).
* Fast lane: while a long prompt loads, a request with at most `fast_lane_tokens` left to prefill
  (an agent's next turn) prefills in a second staging cache and starts at once (`slots.Lane`); the
  long prompt's next chunks wait for it one step.
* Speculation only where it wins: each decode call's tree shape (or plain AR) comes from the number
  of running slots (`longspec_jax/infer/defaults.py`), every shape on the same state; a step whose
  every running request samples takes the sampled table (`loop.loops_for`). Where idle rows would
  cost compute the call runs only a bucket of rows holding the running slots (`decode_calls`).
* One call in flight: a decode call runs on a helper thread while this one hands out the previous
  call's tokens (on a GPU a call returns only when its loop ends: XLA copies a data-dependent loop
  condition to the host each iteration). Optionally a call ends at the step after a request
  arrives (`interrupt_on_arrival`), so an agent's next turn waits a step, not the rest of a call.

Lossless per request: rows never interact (each has its own cache, ring, key and settings), and
every step is exact per row, so at T = 0 a request's output is its own greedy output whatever runs
beside it, and at T > 0 its distribution is the target's.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longspec_jax.infer import defaults, runtime
from longspec_jax.infer.decoder import Decoder
from longspec_jax.infer.engine_calls import EOS_SLOTS, bucket_rows, compile_calls, row_inputs, warm_up
from longspec_jax.infer.loop import add_interrupt, loops_for
from longspec_jax.infer.state import STOP_NAMES, DecodeState
from longspec_jax import kv_cache as kvc
from longspec_jax.infer.slots import Event, Lane, Prefill, Request, Slot, check_request, choose_slot, next_request
from longspec_jax.sampling import SamplingParams


class Engine:
    """Slots, admission, prefix reuse and one decode step for all (module docstring).

    Args:
      target, draft: the models (draft None: autoregressive only).
      max_slots: B, requests decoded at once.
      max_context: most tokens (prompt + generated) per request; sets each slot's cache capacity.
      tree_shape: a fixed tree for every step, "ar" for none, or None (default) for the load tables
        of `longspec_jax/infer/defaults.py` (by device, target size and whether every row samples).
      draft_vocab, cache_dtype, prefill_chunk, mesh: as `Decoder`.
      steps_per_call: decode steps per device call while nothing loads (more amortise host work;
        fewer stream more smoothly); a call returns as soon as a request finishes (its last tokens
        are not held behind the other rows' steps, and a waiting request gets its slot).
      interrupt_on_arrival: a decode call asks the host after every step whether a request (or a
        cancel) arrived, and ends there if so (`loop.add_interrupt`): a new turn waits one step, not
        the rest of the call. Off by default: on an H100 it cost about 1 ms a step (`docs/perf_notes.md`
        "Ending a call on arrival"), and the decode calls are not kept in JAX's persistent compilation
        cache. One device only (every device would have to agree).
      prefill_tokens_per_step: prompt tokens prefilled between two decode calls, in whole chunks
        (default `defaults.prefill_tokens_per_step`: more admit waiting requests sooner, so they
        decode together; fewer keep the running requests' inter-token latency low meanwhile).
      fast_lane_tokens: a request with at most this many prompt tokens left to prefill after reuse
        may prefill in a second staging cache while a longer prompt loads (default: one chunk;
        0: no fast lane, which saves one slot's KV memory).
    """

    def __init__(self, target, draft=None, *, max_slots: int = 8, max_context: int = 32768,
                 tree_shape: Sequence[int] | str | None = None, draft_vocab=None, cache_dtype=None,
                 prefill_chunk: int | None = None, mesh=None, steps_per_call: int = 4,
                 prefill_tokens_per_step: int | None = None, fast_lane_tokens: int | None = None,
                 interrupt_on_arrival: bool = False,
                 compiler: runtime.Compiler | None = None):
        if min(max_slots, steps_per_call, 1 if prefill_tokens_per_step is None else prefill_tokens_per_step) < 1 \
                or max_context < 2:
            raise ValueError("max_slots, steps_per_call and prefill_tokens_per_step must be >= 1 and max_context "
                             f">= 2; got {max_slots}, {steps_per_call}, {prefill_tokens_per_step}, {max_context}")
        if interrupt_on_arrival and mesh is not None and mesh.size > 1:
            raise ValueError(f"interrupt_on_arrival (--interrupt-on-arrival) needs one device, the mesh has "
                             f"{mesh.size}: every device's loop would have to stop at the same step")
        if (fast_lane_tokens or 0) < 0:
            raise ValueError(f"fast_lane_tokens (--fast-lane-tokens) must be >= 0 (0: off), got {fast_lane_tokens}")
        limit = target.cfg.max_position_embeddings
        if limit and max_context > limit:
            raise ValueError(f"max_context (--max-context) {max_context} exceeds the model's limit "
                             f"(max_position_embeddings) {limit}; pass at most {limit}")
        if tree_shape == "ar":
            draft, tree_shape = None, None
        self.dec = Decoder(target, draft, tree_shape=tree_shape, draft_vocab=draft_vocab, sample_drafts=True,
                           cache_dtype=cache_dtype, prefill_chunk=prefill_chunk, mesh=mesh, compiler=compiler)
        dec = self.dec
        self.cfg = target.cfg
        if draft is None:
            self.tables = {False: ((None, None),)}
        elif dec.shape is not None:
            self.tables = {False: ((None, dec.shape.widths),)}
        else:
            self.tables = {s: defaults.load_table(dec.platform, dec.target_bytes, s) for s in (False, True)}
        self.tables.setdefault(True, self.tables[False])
        self.loops = loops_for(self.tables)
        self.max_accept = max(loop.max_accept for loop in self.loops.values())
        self.max_nodes = max(loop.num_nodes for loop in self.loops.values())
        self.B, self.max_context = max_slots, max_context
        bound = defaults.is_launch_bound(dec.platform, dec.target_bytes)
        self.plan = defaults.decode_calls(self.tables, max_slots, bound)  # (sampled, rows) -> (widths, rows run)
        self.row_buckets = tuple(sorted({b for _, b in self.plan.values()}))
        self._rows_on_device: dict[tuple[int, ...], jax.Array] = {}  # running slots -> bucket rows
        self.chunk = prefill_chunk = dec.prefill_chunk
        self.fast_lane_tokens = prefill_chunk if fast_lane_tokens is None else fast_lane_tokens
        # Each slot holds a request's context plus one step's nodes; rounded up for the kernels.
        self.capacity = runtime.capacity_bucket(max_context + self.max_nodes)
        self.out_size = max_context
        self.ring_slots = dec.ring_slots(self.max_accept)
        self.steps_per_call = steps_per_call
        if prefill_tokens_per_step is None:
            prefill_tokens_per_step = defaults.prefill_tokens_per_step(dec.platform, prefill_chunk)
        self.prefill_chunks_per_step = -(-prefill_tokens_per_step // prefill_chunk)
        self.slots = [Slot(i) for i in range(max_slots)]
        self.waiting: list[Request] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.interrupt = interrupt_on_arrival
        if interrupt_on_arrival:  # the poll holds the inbox, not the engine (it goes with the engine)
            add_interrupt(self, lambda inbox=self._inbox: not inbox.empty())
        self._ids = itertools.count()
        self._rng = np.random.default_rng()
        self._passed: dict[str, int] = {}  # waiting request id -> admissions that went before it
        self._main_waited = False  # the main lane's chunk waited for the fast lane last step
        self.stats = dict(requests=0, prompt_tokens=0, generated_tokens=0, prefix_hits=0, reused_tokens=0, fast_lane=0,
                          forwards=0, steps=0, host_busy_s=0.0, host_busy_steps=0, gap_s=0.0, gap_calls=0)
        self._blocked = 0.0  # seconds this step waited for the device (the call in flight, a read of tokens)
        self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-decode-call")
        self._inflight: concurrent.futures.Future | None = None  # the decode call running: its next state
        self._last_call_end: float | None = None  # when the previous decode call ended, if the last step made one
        # A GPU call returns when its loop ends (module docstring); elsewhere at dispatch: no gaps counted.
        self._calls_block = self.dec.platform == "gpu"
        with dec.mesh_context():
            self._build()

    # ---------------------------------------------------------------------------------------
    # device state and executables

    def _build_state(self):
        dec, cfg = self.dec, self.cfg
        state = DecodeState.initial(
            cfg, batch=self.B, capacity=self.capacity, out_size=self.out_size, max_accept=self.max_accept,
            ring_slots=self.ring_slots, draft_cfg=None if dec.draft is None else dec.draft.cfg, eos_slots=EOS_SLOTS,
            dtype=dec.cache_dtype)
        self.state = jax.device_put(state.replace(done=jnp.ones((self.B,), bool)), dec._rep)  # every slot free
        # A staging cache has `chunk` spare slots: the last chunk's padding is written past the prompt.
        limits = (None, self.fast_lane_tokens) if self.fast_lane_tokens else (None,)
        self.lanes = [Lane(kvc.KVCache.init(cfg, 1, self.capacity + self.chunk, dec.cache_dtype), limit)
                      for limit in limits]

    def _build(self):
        self._build_state()
        row = row_inputs(self.dec, Request(prompt=[0], max_tokens=1), np.zeros((1,), np.int64), 0, self.ring_slots)
        t0 = time.perf_counter()
        self.calls = compile_calls(self.dec, self.state, self.lanes[0].staging, row, self.plan, self.loops,
                                   chunk=self.chunk, steps_per_call=self.steps_per_call, max_accept=self.max_accept,
                                   out_size=self.out_size, ring_slots=self.ring_slots, interrupt=self.interrupt)
        self.compile_s = time.perf_counter() - t0  # lowering and compiling every executable (cache hits too)
        self.state, self.lanes[0].staging = warm_up(self.calls, self.dec, self.state, self.lanes[0].staging, row)

    # ---------------------------------------------------------------------------------------
    # requests (thread-safe: other threads call these; only the engine's thread calls step())

    def submit(self, req: Request) -> str:
        """Queue a request (checked here: a bad one raises ValueError and is not queued); returns its id."""
        self.check(req)
        if not req.id:
            req.id = f"req-{next(self._ids)}"
        self._inbox.put(("submit", req))
        return req.id

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step boundary (its slot is freed; an Event says "cancelled")."""
        self._inbox.put(("cancel", request_id))

    def check(self, req: Request) -> None:
        """Refuse a request the engine cannot run, with a message naming the limit."""
        check_request(req, max_context=self.max_context, vocab_size=self.cfg.vocab_size,
                      eos_ids=self.cfg.eos_token_ids, eos_slots=EOS_SLOTS)

    @property
    def running(self) -> int:
        return sum(s.request is not None for s in self.slots)

    @property
    def resident(self) -> int:
        return sum(s.request is None and s.valid > 0 for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting or self._loading() or self.running or not self._inbox.empty() or self._inflight)

    def _loading(self) -> list[Slot]:  # slots whose prompt is being prefilled
        return [lane.job.slot for lane in self.lanes if lane.job is not None]

    # ---------------------------------------------------------------------------------------
    # one engine step

    def step(self) -> list[Event]:
        """Admit, prefill a chunk, run one decode call, collect tokens. Returns this step's events."""
        with self.dec.mesh_context():
            t0 = time.perf_counter()
            self._blocked = 0.0
            events: list[Event] = []
            self._settle(events)
            self._drain(events)
            admitting = bool(self.waiting or self._loading())  # a request that just arrived is admitted now
            for lane in self.lanes:  # the main lane first: it takes the best waiting request
                try:  # a failure while admitting one request fails that request only
                    if lane.job is None and self.waiting:
                        self._admit(lane)
                except Exception as e:  # noqa: BLE001 (reported to the request, the engine goes on)
                    self._fail_admission(lane, e, events)
            # While the fast lane holds a prompt the main lane's chunks of a longer one (more than one chunk
            # left) wait a step (never two running), so that a short turn's first token is not held behind them.
            main = self.lanes[0].job
            fast = (len(self.lanes) > 1 and self.lanes[1].job is not None and not self._main_waited
                    and main is not None and main.chunks_left(self.chunk) > 1)
            self._main_waited = fast
            for lane in [ln for ln in self.lanes[fast:] if ln.job is not None]:
                try:
                    self._prefill_chunks(lane, events)
                except Exception as e:  # noqa: BLE001
                    self._fail_admission(lane, e, events)
            loading = self._loading()
            running = [s for s in self.slots if s.request is not None and s not in loading]
            if running:
                # Sampled drafts when every running row samples (a greedy row accepts more from a beam).
                sampled = all(s.request.sampling.temperature > 0 for s in running)
                (widths, b), dec = self.plan[sampled, len(running)], self.dec
                # One call of lag (JetStream's): enqueue the read of what the previous call emitted, start the
                # next call, then wait for the read: host work on those tokens overlaps the next call.
                window = self.calls.window(self.state)
                steps = 1 if loading else self.steps_per_call
                rows = () if b == self.B else (bucket_rows(self._rows_on_device, running, self.B, b, self.dec.put),)
                self._inflight = self._helper.submit(self._timed_call, not admitting, self.calls.run[widths, sampled, b],
                                                     dec.t_state, dec.d_state, self.state, *rows, dec.vocab,
                                                     *self.calls.scalars[steps])
                self.state = None  # donated to the call in flight; `_settle` sets the next one
                self._collect(running, events, window)
                self.stats["steps"] += 1
                if not admitting:  # host work of a plain decode step: its wall time minus the waits for the device
                    self.stats["host_busy_s"] += time.perf_counter() - t0 - self._blocked
                    self.stats["host_busy_steps"] += 1
            else:
                self._last_call_end = None
            return events

    def _timed_call(self, plain: bool, fn, *args):
        """A decode call on the helper thread; after another call, a plain step's time from that call's
        end to this one's start goes to `gap_s` (the device idles that long, and for the dispatch)."""
        start = time.perf_counter()
        if plain and self._last_call_end is not None:
            self.stats["gap_s"] += start - self._last_call_end
            self.stats["gap_calls"] += 1
        out = fn(*args)
        self._last_call_end = time.perf_counter() if self._calls_block else None
        return out

    def _settle(self, events):
        """Take the state of the decode call in flight; one that raised lost the batch's (donated) state."""
        call, self._inflight, t = self._inflight, None, time.perf_counter()
        try:
            self.state = self.state if call is None else call.result()
        except Exception as e:  # noqa: BLE001 (every running request fails; a fresh state is built)
            self._fail_running(e, events)
        self._blocked += time.perf_counter() - t

    def _fail_admission(self, lane: Lane, error: Exception, events):
        req, _ = lane.admitting, lane.clear()
        if req is not None:
            events.append(Event(req.id, [], "error", error=f"{type(error).__name__}: {error}"))

    def _fail_running(self, error: Exception, events):
        for slot in self.slots:  # the donated state is gone: every sequence in it, the admission's too
            if slot.request is not None:
                events.append(Event(slot.request.id, [], "error", error=f"{type(error).__name__}: {error}"))
            slot.clear()
        self._build_state()  # fresh lanes too

    def _drain(self, events):
        while not self._inbox.empty():  # this thread alone takes from the inbox
            kind, item = self._inbox.get_nowait()
            if kind == "submit":
                self.waiting.append(item)
                self.stats["requests"] += 1
            else:
                self._cancel_request(item, events)

    def _cancel_request(self, rid: str, events):
        for i, req in enumerate(self.waiting):
            if req.id == rid:
                del self.waiting[i]
                self._passed.pop(rid, None)
                events.append(Event(rid, [], "cancelled", prompt_tokens=len(req.prompt)))
                return
        for lane in self.lanes:
            if lane.job is not None and lane.job.request.id == rid:
                lane.clear()
                events.append(Event(rid, [], "cancelled"))
                return
        for slot in self.slots:
            if slot.request is not None and slot.request.id == rid:
                self.state = self.calls.stop_row(self.state, self.dec.put(np.int32(slot.index)))
                self._finish(slot, "cancelled", events)
                return

    def _admit(self, lane: Lane):
        """Start the prefill of the next waiting request (`slots.next_request`; one passed over
        `max_slots` times goes first) from the longest prefix any slot holds (`slots.choose_slot`);
        a fast lane takes only a request short enough for it, if any waits."""
        free, loading = [s for s in self.slots if s.request is None], self._loading()
        if not free:
            return
        head = self.waiting[0]
        busy = [(s, min(len(s.tokens) - 1, self.capacity - self.max_nodes)) for s in self.slots  # committed KV
                if s.request is not None and s not in loading]
        i = next_request(self.waiting, free, head_passes=self._passed.get(head.id, 0), patience=self.B,
                         max_suffix=lane.max_suffix, busy=busy)
        if i is None:
            return
        self._passed[head.id] = self._passed.get(head.id, 0) + (i > 0)
        req = lane.admitting = self.waiting.pop(i)
        self._passed.pop(req.id, None)
        prompt = np.asarray(req.prompt, np.int64)
        best, start, source = choose_slot(free, prompt, req.session, busy)
        if start > 0:
            self.stats["prefix_hits"] += 1
            self.stats["reused_tokens"] += start
            lane.staging = self.calls.take_row(self.state.cache, lane.staging, self.dec.put(np.int32(source.index)))
        best.request, best.tokens, best.valid, best.emitted, best.iters, best.session = (
            req, list(map(int, prompt)), start, 0, 0, req.session)
        full, rest = divmod(prompt.size - start, self.chunk)
        rows = np.zeros((1, full * self.chunk + (runtime.tail_bucket(rest, self.chunk) if rest else 0)), np.int32)
        rows[0, :prompt.size - start] = prompt[start:]
        lane.job = Prefill(req, best, rows, start)
        self.stats["prompt_tokens"] += int(prompt.size)
        self.stats["fast_lane"] += lane.max_suffix is not None

    def _prefill_chunks(self, lane: Lane, events):
        job, dec = lane.job, self.dec
        n = len(job.request.prompt)
        last = dec.put(np.array([n - 1], np.int32))
        for _ in range(min(self.prefill_chunks_per_step, job.chunks_left(self.chunk))):
            c = job.next_chunk
            tokens = job.rows[:, c * self.chunk:(c + 1) * self.chunk]
            lane.staging, lane.hidden = self.calls.prefill[tokens.shape[1]](
                dec.t_state, lane.staging, dec.put(tokens),
                dec.put(np.int32(job.start + c * self.chunk)), last,
                lane.hidden if c else dec.put(np.zeros((1, self.cfg.hidden_size), np.float32)))
            job.next_chunk += 1
        if job.chunks_left(self.chunk):
            return
        req, slot = job.request, job.slot
        seed = req.seed if req.seed is not None else int(self._rng.integers(2**31))
        prompt = np.asarray(req.prompt, np.int64)
        self.state, first = self.calls.insert(dec.t_state, dec.d_state, self.state, lane.staging, lane.hidden,
                                         *row_inputs(dec, req, prompt, seed, self.ring_slots), dec.put(np.int32(slot.index)))
        first, done, reason = jax.device_get(first)
        lane.job = lane.admitting = None
        slot.emitted = 1
        slot.tokens.append(int(first))
        self.stats["generated_tokens"] += 1
        events.append(Event(req.id, [int(first)], prompt_tokens=n, cached_tokens=job.start))
        if done:
            self._finish(slot, STOP_NAMES[int(reason)], events)

    def _collect(self, running, events, window):
        """Hand out the tokens a decode call emitted (`window`: `state.new_tokens` of its state, on the device)."""
        t = time.perf_counter()
        packed = np.asarray(jax.device_get(window))
        self._blocked += time.perf_counter() - t
        W = self.calls.width
        out, (out_len, done, reason, iters) = packed[:, :W], packed[:, W:].T
        for slot in running:
            b = slot.index
            n_new = int(out_len[b]) - slot.emitted
            new = out[b, W - n_new:].tolist() if n_new > 0 else []
            slot.emitted = int(out_len[b])
            self.stats["forwards"] += int(iters[b]) - slot.iters
            slot.iters = int(iters[b])
            slot.tokens.extend(new)
            self.stats["generated_tokens"] += len(new)
            if done[b]:
                self._finish(slot, STOP_NAMES[int(reason[b])], events, new)
            elif new:
                events.append(Event(slot.request.id, new))

    def _finish(self, slot: Slot, reason: str, events, new=()):
        req = slot.request
        events.append(Event(req.id, list(new), reason))
        slot.request = None
        # Everything but the last emitted token is in the cache; junk writes of masked rows can
        # only reach the last `max_nodes` slots.
        slot.valid = max(0, min(len(slot.tokens) - 1, self.capacity - self.max_nodes))
        slot.last_used = time.monotonic()
        if req.session is None:
            slot.session = None

    # ---------------------------------------------------------------------------------------
    # notebooks: run requests to completion

    def generate(self, prompts, *, max_new_tokens: int, sampling: SamplingParams | Sequence[SamplingParams] = None,
                 seed: int = 0, stop_ids=None, on_event: Callable[[Event], None] | None = None) -> list[list[int]]:
        """Submit every prompt (row b with seed + b) and step until all finish; returns the tokens."""
        prompts = runtime.as_rows(prompts)
        params = sampling if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * len(prompts)
        ids = [self.submit(Request(p.tolist(), max_new_tokens, params[b], stop_ids, seed + b))
               for b, p in enumerate(prompts)]
        out, pending = {i: [] for i in ids}, set(ids)
        while pending:
            for ev in self.step():
                if ev.error:
                    raise RuntimeError(f"request {ev.request_id} failed: {ev.error}")
                out[ev.request_id].extend(ev.tokens)
                if on_event is not None:
                    on_event(ev)
                if ev.finish_reason is not None:
                    pending.discard(ev.request_id)
        return [out[i] for i in ids]


__all__ = ["Engine", "Event", "Request"]
