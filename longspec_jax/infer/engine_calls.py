"""What the serving engine compiles when it starts, for the shapes its slots, lanes and load plan
fix: one decode loop per planned (shape, sampled, rows) call (`defaults.decode_calls`; the whole
batch, or a bucket of rows through `run_rows_jit`), the admission's prefill chunk of every width
and its insert, the copy of a resident row into a staging cache, the stop of a row, and the read of
each call's new tokens; then runs each once (`warm_up`). `longspec_jax/infer/engine.py` schedules them."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from longspec_jax.infer import runtime
from longspec_jax.infer.loop import insert_row_jit, run_jit, run_rows_jit
from longspec_jax.infer.state import copy_row, eos_array, new_tokens, stop_row
from longspec_jax.sampling import RowSampling

EOS_SLOTS = 8  # stop ids per request


@dataclasses.dataclass
class EngineCalls:
    """The engine's executables (each compiled once) and the device scalars its decode calls take."""

    run: dict[tuple, Callable]       # (widths or None, sampled, rows) -> decode loop call
    insert: Callable                 # a prefilled request's first token and row into its slot
    take_row: Callable               # a resident row's KV into a staging cache (prefix reuse)
    stop_row: Callable               # a cancelled row marked done
    window: Callable                 # every row's last `width` emitted tokens and counters, packed
    width: int                       # steps per call x the most tokens a step emits
    prefill: dict[int, Callable]     # chunk width -> prefill forward into a staging cache
    scalars: dict[int, tuple]        # steps -> (steps, stop when a row finishes: True), on the device


def compile_calls(dec, state, staging, row, plan, loops, *, chunk: int, steps_per_call: int, max_accept: int,
                  out_size: int, ring_slots: int | None, interrupt: bool = False) -> EngineCalls:
    """Compile for `state` (the slots) and `staging` (a lane's cache); `row` is one request's
    admission inputs (shapes only); `plan` is `defaults.decode_calls`'s, `loops` `loop.loops_for`'s;
    `interrupt`: decode calls end early when the engine's poll says so (`loop.add_interrupt`)."""
    put, B = dec.put, state.committed.shape[0]
    graphs = dict(t_graph=dec.t_graph, d_graph=dec.d_graph)
    budget = (dec.vocab, put(np.int32(1)), put(np.bool_(False)))
    jobs = {}
    for w, s, b in {(w, s, b) for (s, _), (w, b) in plan.items()}:
        statics = dict(graphs, loop=loops[w, s], interrupt=interrupt)
        jobs["run", w, s, b] = (("engine_run", run_jit, (dec.t_state, dec.d_state, state, *budget), statics)
                                if b == B else ("engine_run_rows", run_rows_jit, (
                                    dec.t_state, dec.d_state, state, put(np.zeros(b, np.int32)), *budget), statics))
    hidden = put(np.zeros((1, dec.target.cfg.hidden_size), np.float32))
    widest = max(loops.values(), key=lambda lp: lp.num_nodes)
    jobs["insert"] = ("engine_insert", insert_row_jit, (dec.t_state, dec.d_state, state, staging, hidden, *row,
                                                         put(np.int32(0))),
                      dict(graphs, loop=widest, out_size=out_size, max_accept=max_accept, ring_slots=ring_slots))
    width = steps_per_call * max_accept
    # One prefill executable per chunk width: full chunks, and smaller last chunks, so that a reused
    # turn's short suffix is not padded to a whole chunk.
    for w in {runtime.tail_bucket(n, chunk) for n in range(1, chunk + 1)}:
        jobs["prefill", w] = ("prefill", runtime.prefill_chunk_jit, (
            dec.t_graph, dec.t_state, staging, put(np.zeros((1, w), np.int32)), put(np.int32(0)),
            put(np.zeros(1, np.int32)), hidden), {})
    jobs["take_row"] = ("engine_copy_row", copy_row, (state.cache, staging, put(np.int32(0))), {})
    jobs["stop_row"] = ("engine_stop_row", stop_row, (state, put(np.int32(0))), {})
    jobs["window"] = ("engine_new_tokens", new_tokens, (state,), dict(width=width))
    exe = dec.compiler.get_many(jobs)  # compiled side by side (`Compiler.get_many`)
    return EngineCalls(
        run={k[1:]: e for k, e in exe.items() if k[0] == "run"}, insert=exe["insert"], take_row=exe["take_row"],
        stop_row=exe["stop_row"], window=exe["window"], width=width,
        prefill={k[1]: e for k, e in exe.items() if k[0] == "prefill"},
        scalars={n: (put(np.int32(n)), put(np.bool_(True))) for n in {1, steps_per_call}})


def row_inputs(dec, req, prompt: np.ndarray, seed: int, ring_slots: int | None):
    """One request's arrays for `insert` on the device: the prompt's tail for the draft ring, its
    length, key, token budget, stop ids and sampling settings."""
    put = dec.put
    stop = dec.target.cfg.eos_token_ids if req.stop_ids is None else req.stop_ids
    return (put(runtime.tail_tokens([prompt], ring_slots or 1)), put(np.array([prompt.size], np.int32)),
            put(jax.random.key(seed)[None]), put(np.array([req.max_tokens], np.int32)),
            put(eos_array(stop, EOS_SLOTS)[None]), jax.tree.map(put, RowSampling.of([req.sampling])))


def bucket_rows(cached: dict, running, B: int, b: int, put):
    """The running slots' rows on the device, padded to `b` distinct rows with idle ones (which a
    step leaves as they are); one copy per set of rows (kept in `cached`), not one per call."""
    key = tuple(s.index for s in running)
    if key not in cached:
        pad = [i for i in range(B) if i not in key][:b - len(key)]
        cached[key] = put(np.array(key + tuple(pad), np.int32))
    return cached[key]


def warm_up(calls: EngineCalls, dec, state, staging, row):
    """Run every executable once, before any request: a GPU loads an executable's kernels on its
    first run, and that should not land on a user's first token (on an H100 a cold prompt whose last
    chunk was the first of its width took 0.6 s where other cold turns took 0.23 s). Runs on free
    slots (a decode call on them steps nothing; the row written by `insert` is stopped again) and on
    a staging cache, whose contents mean nothing until a prefill writes them. Returns (state, staging)."""
    put, B = dec.put, state.done.shape[0]
    zero, last = put(np.int32(0)), put(np.zeros(1, np.int32))
    hidden = put(np.zeros((1, dec.target.cfg.hidden_size), np.float32))
    for w, exe in calls.prefill.items():  # (the hidden state is donated: each run takes the previous one's)
        staging, hidden = exe(dec.t_state, staging, put(np.zeros((1, w), np.int32)), zero, last, hidden)
    staging = calls.take_row(state.cache, staging, zero)
    state, _ = calls.insert(dec.t_state, dec.d_state, state, staging, hidden, *row, zero)
    state = calls.stop_row(state, zero)
    for (_, _, b), exe in calls.run.items():  # every row is done: the loop runs no step
        rows = () if b == B else (put(np.arange(b, dtype=np.int32)),)
        state = exe(dec.t_state, dec.d_state, state, *rows, dec.vocab, *calls.scalars[1])
    jax.block_until_ready(calls.window(state))
    return state, staging
