"""Where and when the serving engine's decode calls run: on its helper thread a step ahead, until
a request finishes (its last tokens are not held behind the other rows' steps), or with
`Engine(interrupt_on_arrival=True)` until a request arrives; and each once before any request."""

import collections
import dataclasses
import threading

import jax
import numpy as np

from longspec_jax.infer.engine import Engine, Request
from longspec_jax.infer.engine_calls import row_inputs, warm_up
from tests.test_engine import CHAIN, _greedy, _run_requests
from tests.test_speculative import _prompts, agreeing_models


def _recorded_calls(eng):
    """Per decode call, (iterations before, done before, iterations after, done after) by row."""
    calls = []
    for key, exe in list(eng.calls.run.items()):
        def wrapped(*args, _exe=exe):
            before = jax.device_get((args[2].iters, args[2].done))  # the state is donated: read it first
            out = _exe(*args)
            calls.append((*before, *jax.device_get((out.iters, out.done))))
            return out
        eng.calls.run[key] = wrapped
    return calls


def test_a_call_stops_at_the_step_a_request_finishes():
    target, draft = agreeing_models(5)
    eng = Engine(target, draft, max_slots=3, max_context=160, tree_shape=CHAIN, prefill_chunk=16, steps_per_call=8)
    calls = _recorded_calls(eng)
    prompts = _prompts(31, (12, 14, 16))
    got = eng.generate(prompts, max_new_tokens=40, stop_ids=())  # warm: every row runs to its limit
    assert got == _greedy(target, prompts, 40)
    calls.clear()
    lengths = (9, 23, 40)
    assert _run_requests(eng, prompts, lengths) == [g[:n] for g, n in zip(_greedy(target, prompts, 40), lengths)]
    finishing = 0
    for it0, done0, it1, done1 in calls:
        ran = it1 - it0
        newly = np.flatnonzero(done1 & ~done0)
        if newly.size:  # every row advanced as many steps as the one that finished: the call stopped there
            finishing += 1
            assert (ran[newly] == ran.max()).all(), (ran, newly)
    assert finishing >= 2


def test_decode_calls_run_on_the_helper_thread_a_step_ahead():
    """Each decode call runs on the engine's helper thread and is still in flight when its step
    returns (the next step takes its state); the tokens stay the target's greedy ones."""
    target, draft = agreeing_models(5)
    eng = Engine(target, draft, max_slots=2, max_context=160, tree_shape=CHAIN, prefill_chunk=16)
    assert not eng._calls_block  # a CPU call returns at dispatch: no gaps are counted here ...
    eng._calls_block = True  # ... so count them as a GPU's engine would, to check the bookkeeping
    threads = set()
    for k, exe in list(eng.calls.run.items()):
        eng.calls.run[k] = lambda *a, _exe=exe: (threads.add(threading.current_thread().name), _exe(*a))[1]
    p = _prompts(15, (19,))
    rid = eng.submit(Request(p[0], 24, stop_ids=()))
    out, in_flight = [], 0
    while eng.has_work():
        out += [t for ev in eng.step() if ev.request_id == rid for t in ev.tokens]
        assert (eng.state is None) == (eng._inflight is not None)  # the state is the call's while it runs
        in_flight += eng._inflight is not None
    assert out == _greedy(target, p, 24)[0]
    assert in_flight >= 2
    assert threads and all(name.startswith("engine-decode-call") for name in threads)
    # the host's time between two decode calls of plain steps is counted
    assert 0 < eng.stats["gap_calls"] < eng.stats["steps"] and 0 < eng.stats["gap_s"]


def test_a_request_that_arrives_ends_the_running_call_after_one_step():
    """With `interrupt_on_arrival` a decode call asks the host after every step whether a request
    arrived: one submitted while a call runs ends it after that step (the call would run eight),
    the calls before and after run many steps, and both requests keep their greedy output. A call
    on an engine without it runs on (its executable has no callback)."""
    target, draft = agreeing_models(5)
    eng = Engine(target, draft, max_slots=2, max_context=160, tree_shape=CHAIN, prefill_chunk=16, steps_per_call=8,
                 interrupt_on_arrival=True)
    prompts = _prompts(41, (12, 16))
    eng.generate(prompts, max_new_tokens=8, stop_ids=())  # compile
    compiled = list(eng.calls.run.values())
    calls = _recorded_calls(eng)
    late = Request(prompts[1], 30, stop_ids=())
    arrivals = []
    for key, exe in list(eng.calls.run.items()):
        def arrive_during(*args, _exe=exe):
            if len(calls) == 2 and not arrivals:  # while the third call runs, the second request arrives
                arrivals.append(eng.submit(late))
            return _exe(*args)
        eng.calls.run[key] = arrive_during
    first = eng.submit(Request(prompts[0], 90, stop_ids=()))
    out = {first: []}
    while eng.has_work():
        for ev in eng.step():
            out.setdefault(ev.request_id, []).extend(ev.tokens)
    want = _greedy(target, prompts, 90)
    assert out[first] == want[0] and out[arrivals[0]] == want[1][:30]
    ran = [int((it1 - it0).max()) for it0, _, it1, _ in calls]
    assert ran[:2] == [8, 8] and ran[2] == 1 and max(ran[3:]) > 1, ran  # (a call stops at a finish too)

    plain = Engine(target, draft, max_slots=2, max_context=160, tree_shape=CHAIN, prefill_chunk=16, steps_per_call=8)
    assert not any("callback" in exe.as_text() for exe in plain.calls.run.values())
    assert all("callback" in exe.as_text() for exe in compiled)


def test_every_executable_runs_once_before_any_request():
    """`warm_up` (run when the engine is built) runs every executable once on free slots and a
    staging cache: no decode step, every slot still free, and requests after it decode exactly."""
    target, draft = agreeing_models(5)
    eng = Engine(target, draft, max_slots=2, max_context=160, tree_shape=CHAIN, prefill_chunk=128)
    ran, calls = collections.Counter(), eng.calls

    def counted(name, fn):
        return lambda *args: (ran.update([name]), fn(*args))[1]

    counting = dataclasses.replace(
        calls, run={k: counted(("run", k), f) for k, f in calls.run.items()},
        prefill={w: counted(("prefill", w), f) for w, f in calls.prefill.items()},
        **{name: counted(name, getattr(calls, name)) for name in ("insert", "take_row", "stop_row", "window")})
    iters = jax.device_get(eng.state.iters)
    row = row_inputs(eng.dec, Request([0], 1), np.zeros((1,), np.int64), 0, eng.ring_slots)
    eng.state, eng.lanes[0].staging = warm_up(counting, eng.dec, eng.state, eng.lanes[0].staging, row)
    assert set(ran) == ({("run", k) for k in calls.run} | {("prefill", w) for w in calls.prefill}
                        | {"insert", "take_row", "stop_row", "window"})
    assert len(calls.run) >= 2 and len(calls.prefill) >= 2
    assert jax.device_get(eng.state.done).all() and (jax.device_get(eng.state.iters) == iters).all()
    prompts = _prompts(43, (12, 20))
    assert eng.generate(prompts, max_new_tokens=24, stop_ids=()) == _greedy(target, prompts, 24)
