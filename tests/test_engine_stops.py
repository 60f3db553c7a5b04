"""When the serving engine's decode calls return: as soon as a request finishes, so its last tokens
are not held behind the other rows' steps (`Engine(steps_per_call=...)`)."""

import jax
import numpy as np

from longspec_jax.infer.engine import Engine, Request
from tests.test_engine import CHAIN, _greedy
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
    ids = [eng.submit(Request(p, n, stop_ids=())) for p, n in zip(prompts, lengths)]
    out = {i: [] for i in ids}
    while eng.has_work():
        for ev in eng.step():
            out[ev.request_id].extend(ev.tokens)
    assert [out[i] for i in ids] == [g[:n] for g, n in zip(_greedy(target, prompts, 40), lengths)]
    finishing = 0
    for it0, done0, it1, done1 in calls:
        ran = it1 - it0
        newly = np.flatnonzero(done1 & ~done0)
        if newly.size:  # every row advanced as many steps as the one that finished: the call stopped there
            finishing += 1
            assert (ran[newly] == ran.max()).all(), (ran, newly)
    assert finishing >= 2


def test_calls_after_a_finish_run_one_step():
    """After a request finishes, the next calls run one step (an agent's next turn waits one step, not
    a call): from the call after the finish where the host reads the finish before it starts (GPUs:
    `blocking`), else from the one after that. Off (0) the long row's calls go on running many steps.
    One engine (one compile) runs the three settings; the output stays each request's greedy output."""
    target, draft = agreeing_models(5)
    eng = Engine(target, draft, max_slots=2, max_context=160, tree_shape=CHAIN, prefill_chunk=16, steps_per_call=8)
    prompts = _prompts(37, (12, 16))
    eng.generate(prompts, max_new_tokens=8, stop_ids=())  # compile
    calls = _recorded_calls(eng)
    lengths = (40, 110)
    want = [g[:n] for g, n in zip(_greedy(target, prompts, 110), lengths)]
    for follow_up_s, blocking in [(60.0, False), (60.0, True), (0.0, True)]:
        eng.follow_up_s, eng._follow_until = follow_up_s, 0.0
        eng._calls_block = blocking  # the read-first path runs on any device; only the call's timing differs
        calls.clear()
        ids = [eng.submit(Request(p, n, stop_ids=())) for p, n in zip(prompts, lengths)]
        out = {i: [] for i in ids}
        while eng.has_work():
            for ev in eng.step():
                out[ev.request_id].extend(ev.tokens)
        assert [out[i] for i in ids] == want
        ran = [int((it1 - it0).max()) for it0, _, it1, _ in calls]
        finished = next(i for i, (_, d0, _, d1) in enumerate(calls) if (d1 & ~d0).any())
        assert max(ran[:finished + 1]) > 1, ran  # up to the finish calls run many steps
        after = [n for n in ran[finished + (1 if blocking else 2):] if n]  # the last call may find all done
        assert after, ran
        if follow_up_s:
            assert set(after) == {1}, (follow_up_s, blocking, ran)
        else:
            assert max(after) > 1, ran
