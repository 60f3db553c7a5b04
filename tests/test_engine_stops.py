"""When the serving engine's decode calls return: as soon as a request finishes, so its last tokens
are not held behind the other rows' steps (`Engine(steps_per_call=...)`)."""

import jax
import numpy as np

from longspec_jax.infer.engine import Engine, Request
from tests.test_engine import CHAIN, _greedy
from tests.test_speculative import _prompts, agreeing_models


def test_a_call_stops_at_the_step_a_request_finishes():
    target, draft = agreeing_models(5)
    eng = Engine(target, draft, max_slots=3, max_context=160, tree_shape=CHAIN, prefill_chunk=16, steps_per_call=8)
    calls = []  # per decode call: (iterations before, done before, iterations after, done after) by row
    for key, exe in list(eng.calls.run.items()):
        def wrapped(*args, _exe=exe):
            before = jax.device_get((args[2].iters, args[2].done))  # the state is donated: read it first
            out = _exe(*args)
            calls.append((*before, *jax.device_get((out.iters, out.done))))
            return out
        eng.calls.run[key] = wrapped
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
