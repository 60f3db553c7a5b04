"""The serving engine without HTTP: slot bookkeeping, continuous batching, prefix reuse, per-row
sampling, cancellation and failure isolation.

Lossless is checked against the single-request decoder (`longspec_jax.infer.decoder`), itself checked against
AR and naive references in test_speculative.py / test_ar_decode.py: at T = 0 every request's
tokens equal its own greedy output whatever runs beside it (also while the tree shape changes with
the load), and at T > 0 a request's tokens equal the single-request decoder's for the same seed
(so its distribution is the one the decoder's tests prove to be the target's).
"""

import numpy as np
import pytest

from longspec_jax.infer.decoder import Decoder, generate_ar
from longspec_jax.infer.engine import Engine, Request
from longspec_jax.infer.runtime import tail_bucket
from longspec_jax.sampling import SamplingParams
from tests.test_speculative import _prompts, agreeing_models, random_models

CHAIN = (1, 1, 1, 1)
HOT = SamplingParams(temperature=1.0, top_k=20)


@pytest.fixture(scope="module")
def models():
    return agreeing_models(5)


@pytest.fixture(scope="module")
def engine(models):
    target, draft = models
    return Engine(target, draft, max_slots=3, max_context=160, tree_shape=CHAIN, prefill_chunk=16)


def _greedy(target, prompts, n):
    return generate_ar(target, prompts, max_new_tokens=n, eos_ids=()).tokens


def _step_until_done(eng, out: dict) -> dict:
    """Step until the engine has no work, appending each request's tokens to `out[request id]`."""
    while eng.has_work():
        for ev in eng.step():
            out[ev.request_id].extend(ev.tokens)
    return out


def _run_requests(eng, prompts, lengths) -> list[list[int]]:
    """One request per prompt (`lengths[i]` new tokens, no stop ids) run to the end; their tokens."""
    ids = [eng.submit(Request(p, n, stop_ids=())) for p, n in zip(prompts, lengths)]
    out = _step_until_done(eng, {i: [] for i in ids})
    return [out[i] for i in ids]


def _count_decode_calls(eng) -> dict:
    """Wrap each of the engine's decode calls; the returned dict counts the calls per key."""
    calls = {k: 0 for k in eng.calls.run}
    for k, exe in list(eng.calls.run.items()):
        eng.calls.run[k] = lambda *a, _exe=exe, _k=k: (calls.__setitem__(_k, calls[_k] + 1), _exe(*a))[1]
    return calls


def test_a_short_turn_overtakes_a_long_prefill(models):
    """An agent's next turn that arrives while a cold prompt loads prefills in the fast lane and
    streams at once; both stay exact. Without the lane it waits for the cold prompt's prefill."""
    target, draft = models
    first, cold = _prompts(13, (40, 120))
    for lane_tokens, overtakes in ((None, True), (0, False)):
        eng = Engine(target, draft, max_slots=3, max_context=160, tree_shape=CHAIN, prefill_chunk=16,
                     fast_lane_tokens=lane_tokens)
        turn1 = eng.generate([first], max_new_tokens=12, stop_ids=())[0]
        turn2 = np.concatenate([first, turn1, [3, 4, 5]])
        c = eng.submit(Request(cold, 8, stop_ids=()))
        eng.step()
        t = eng.submit(Request(turn2.tolist(), 12, stop_ids=()))
        firsts, out = [], {c: [], t: []}
        if overtakes:  # the turn starts in the next step, while the cold prompt's next chunk waits for it
            events = eng.step()
            assert [e.request_id for e in events] == [t] and eng.lanes[0].job.next_chunk == 1
            firsts, out[t] = [t], events[0].tokens
        while eng.has_work():
            for ev in eng.step():
                assert ev.error is None
                if not out[ev.request_id] and ev.tokens:
                    firsts.append(ev.request_id)
                    assert ev.request_id != t or ev.cached_tokens == len(turn2) - 4
                out[ev.request_id].extend(ev.tokens)
        assert firsts == ([t, c] if overtakes else [c, t])
        assert eng.stats["fast_lane"] == int(overtakes) and len(eng.lanes) == (2 if overtakes else 1)
        assert out[t] == _greedy(target, [turn2], 12)[0]
        assert out[c] == _greedy(target, [np.asarray(cold)], 8)[0]


def test_a_short_turn_overtakes_the_last_chunks_of_a_long_prefill(models):
    """With several chunks a step, a turn that arrives while a cold prompt has a step's worth of
    chunks left still starts first: those chunks wait one step for it."""
    target, draft = models
    first, cold = _prompts(17, (40, 120))
    eng = Engine(target, draft, max_slots=3, max_context=160, tree_shape=CHAIN, prefill_chunk=16,
                 prefill_tokens_per_step=64)
    turn2 = np.concatenate([first, eng.generate([first], max_new_tokens=12, stop_ids=())[0], [3, 4, 5]])
    c = eng.submit(Request(cold, 8, stop_ids=()))
    eng.step()  # 4 of the cold prompt's 8 chunks
    t = eng.submit(Request(turn2.tolist(), 12, stop_ids=()))
    events = eng.step()
    assert [e.request_id for e in events] == [t] and eng.lanes[0].job.next_chunk == 4
    out = _step_until_done(eng, {t: events[0].tokens, c: []})
    assert out[t] == _greedy(target, [turn2], 12)[0] and out[c] == _greedy(target, [np.asarray(cold)], 8)[0]


def test_a_cold_request_does_not_evict_the_context_of_a_waiting_turn(models):
    """Both slots hold finished agents; a cold prompt queued before agent A's next turn waits, so A's
    turn reuses its context."""
    target, draft = models
    eng = Engine(target, draft, max_slots=2, max_context=200, tree_shape=CHAIN, prefill_chunk=16)
    a, b = _prompts(11, (50, 50))
    replies = [eng.generate([p], max_new_tokens=6, stop_ids=())[0] for p in (a, b)]  # a's slot: least recently used
    events = []
    cold, turn = _prompts(12, (45,))[0], a + replies[0] + [3, 4]
    got = eng.generate([cold, turn], max_new_tokens=6, stop_ids=(), on_event=events.append)
    assert got == _greedy(target, [cold, turn], 6)
    cached = {e.prompt_tokens: e.cached_tokens for e in events if e.prompt_tokens}
    assert cached[len(turn)] == len(a) + len(replies[0]) - 1 and cached[len(cold)] == 0
    assert eng.stats["prefix_hits"] == 1


def test_more_requests_than_slots_each_equals_its_greedy_output(models, engine):
    target, _ = models
    prompts = _prompts(1, (5, 40, 16, 23, 9, 31, 12))
    want = _greedy(target, prompts, 30)
    got = engine.generate(prompts, max_new_tokens=30, stop_ids=())
    assert got == want
    assert engine.running == 0 and not engine.waiting


def test_staggered_arrivals_and_mixed_sampling(models, engine):
    """Requests join between steps; greedy rows stay exact beside sampled ones; a sampled request
    gives the single-request decoder's tokens for its seed."""
    target, draft = models
    prompts = _prompts(2, (7, 33, 18, 11))
    want = _greedy(target, prompts, 24)
    hot = Decoder(target, draft, tree_shape=CHAIN).generate([prompts[1]], max_new_tokens=24, sampling=HOT, seed=11,
                                                           eos_ids=()).tokens[0]
    ids = [engine.submit(Request(prompts[0], 24, stop_ids=()))]
    out, done = {}, {}
    for i, p in enumerate(prompts[1:], 1):
        for _ in range(2):
            for ev in engine.step():
                out.setdefault(ev.request_id, []).extend(ev.tokens)
                done[ev.request_id] = ev.finish_reason
        sampling, seed = (HOT, 11) if i == 1 else (SamplingParams(), None)
        ids.append(engine.submit(Request(p, 24, sampling, stop_ids=(), seed=seed)))
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.request_id, []).extend(ev.tokens)
            done[ev.request_id] = ev.finish_reason
    assert [out[i] for i in ids] == [want[0], hot, want[2], want[3]]
    assert [done[i] for i in ids] == ["max_new_tokens"] * 4


def test_steps_that_admit_are_not_counted_as_plain_decode_steps(models):
    """Host work and call gaps are counted over plain decode steps only: a step that admits a request
    which arrived just before it (and waits for its prefill) is not one."""
    target, draft = models
    eng = Engine(target, draft, max_slots=2, max_context=160, tree_shape=CHAIN, prefill_chunk=16)
    eng._calls_block = True  # count gaps as on a GPU (see the test above)
    a, b = _prompts(16, (19, 40))
    eng.submit(Request(a, 120, stop_ids=()))
    while not eng.running or eng._loading():
        eng.step()
    def counts():  # a gap is counted when the helper thread starts the call: wait for the call in flight
        if eng._inflight is not None:
            eng._inflight.result()
        return eng.stats["host_busy_steps"], eng.stats["gap_calls"]

    for _ in range(2):
        eng.step()
    plain, gaps = counts()
    assert plain >= 1 and gaps >= 1
    eng.submit(Request(b, 4, stop_ids=()))
    for _ in range(3):  # b's three chunks, its first token and insert
        eng.step()
    assert counts() == (plain, gaps) and eng.running == 2
    eng.step()
    assert counts() == (plain + 1, gaps + 1)


def test_row_buckets_run_only_the_running_rows(models):
    """On a CPU a decode call runs the smallest bucket holding the running slots: one request on four
    slots runs in the 1-row bucket, three in the 4-row one (the whole batch), two in the 2-row one;
    outputs stay greedy."""
    target, draft = models
    eng = Engine(target, draft, max_slots=4, max_context=160, tree_shape=CHAIN, prefill_chunk=16)
    assert eng.row_buckets == (1, 2, 4)
    calls = _count_decode_calls(eng)
    by_bucket = lambda b: sum(n for k, n in calls.items() if k[2] == b)  # noqa: E731
    one = _prompts(13, (21,))
    assert eng.generate(one, max_new_tokens=16, stop_ids=()) == _greedy(target, one, 16)
    assert by_bucket(1) > 0 and by_bucket(2) == by_bucket(4) == 0
    three = _prompts(14, (9, 30, 17))
    assert eng.generate(three, max_new_tokens=80, stop_ids=()) == _greedy(target, three, 80)
    assert by_bucket(4) > 0
    two = _prompts(15, (11, 26))  # two rows moved in and out of the batch by slices
    assert eng.generate(two, max_new_tokens=40, stop_ids=()) == _greedy(target, two, 40)
    assert by_bucket(2) > 0


@pytest.mark.parametrize("chunk", [16, 128])  # 128: prompts end in a narrower last chunk (64 wide)
def test_prefix_reuse_across_turns(models, chunk):
    target, draft = models
    eng = Engine(target, draft, max_slots=2, max_context=200, tree_shape=CHAIN, prefill_chunk=chunk)
    assert sorted(eng.calls.prefill) == ([16] if chunk == 16 else [64, 128])
    first = _prompts(3, (41,))[0]
    reply = eng.generate([first], max_new_tokens=20, stop_ids=())[0]
    assert reply == _greedy(target, [first], 20)[0]
    second = first + reply + [5, 6, 7]  # the agent's next turn over the same context
    events = []
    got = eng.generate([second], max_new_tokens=20, stop_ids=(), on_event=events.append)[0]
    assert got == _greedy(target, [second], 20)[0]
    cached = max(e.cached_tokens for e in events)
    assert cached == len(first) + len(reply) - 1  # everything but the last reply token was in the cache
    assert eng.stats["prefix_hits"] == 1 and eng.stats["reused_tokens"] == cached
    # a prompt that shares nothing prefills everything, and its output is right
    other = _prompts(4, (150,))[0]  # one full chunk and a narrower last one at chunk 128
    assert eng.generate([other], max_new_tokens=10, stop_ids=())[0] == _greedy(target, [other], 10)[0]


def test_requests_over_one_document_share_it_and_keep_it_resident(models):
    """B's prompt shares a document with A's, which is still running: B copies A's committed KV and
    prefills only its question. C, after both finished, copies the document into the empty slot
    instead of evicting A's or B's sequence, so both agents' next turns reuse their whole context.
    Every output equals its own greedy output."""
    target, draft = models
    eng = Engine(target, draft, max_slots=3, max_context=200, tree_shape=CHAIN, prefill_chunk=16)
    doc = _prompts(21, (48,))[0]
    prompts = {"a": doc + [3, 4, 5], "b": doc + [6, 7], "c": doc + [8, 9, 10, 11]}
    out, cached, ids = {}, {}, {}

    def run(name, n):
        ids[name] = eng.submit(Request(prompts[name], n, stop_ids=()))
        out[name] = []

    def step():
        for ev in eng.step():
            name = next(k for k, v in ids.items() if v == ev.request_id)
            out[name].extend(ev.tokens)
            cached[name] = max(cached.get(name, 0), ev.cached_tokens)

    run("a", 30)
    while not out["a"]:
        step()
    for name in ("b", "c"):
        run(name, 6)
        while eng.has_work():
            step()
    assert cached == {"a": 0, "b": len(doc), "c": len(doc)}
    for name in ("a", "b"):  # each agent's next turn
        prompts[name + "2"] = prompts[name] + out[name] + [12, 13]
        run(name + "2", 6)
        while eng.has_work():
            step()
        assert cached[name + "2"] == len(prompts[name]) + len(out[name]) - 1
    for name, p in prompts.items():
        assert out[name] == _greedy(target, [p], len(out[name]))[0], name


def test_tail_bucket():
    assert [tail_bucket(n, 512) for n in (1, 64, 65, 128, 129, 300, 512)] == [64, 64, 128, 128, 256, 512, 512]
    assert [tail_bucket(n, 16) for n in (1, 16)] == [16, 16]


def test_tree_shape_follows_the_load_and_stays_exact():
    """The CPU load table switches between chains and AR as requests come and go; every request
    stays exact (AR steps keep the draft ring current for the tree steps after them)."""
    target, draft = random_models(6)
    eng = Engine(target, draft, max_slots=5, max_context=120, prefill_chunk=16)
    assert len(eng.loops) > 1 and (None, False) in eng.loops  # several shapes and plain AR
    prompts = _prompts(6, (9, 20, 14, 5, 27, 8, 16))
    lengths = [12, 30, 6, 25, 18, 9, 22]
    want = [_greedy(target, [p], n)[0] for p, n in zip(prompts, lengths)]
    assert _run_requests(eng, prompts, lengths) == want


def test_a_tree_samples_its_drafts_when_every_row_samples(models):
    """A tree engine runs sampled drafts while every running request samples (each request then
    gives the single-request decoder's tokens for its seed, whose distribution test_sampled_tree.py
    checks), and beam drafts while a greedy one runs beside them (which stays exact)."""
    target, draft = models
    tree = (2, 2)
    eng = Engine(target, draft, max_slots=2, max_context=160, tree_shape=tree, prefill_chunk=16)
    assert sorted(eng.loops) == [(tree, False), (tree, True)]
    calls = _count_decode_calls(eng)
    prompts = _prompts(8, (13, 29))
    dec = Decoder(target, draft, tree_shape=tree)
    want = [dec.generate([p], max_new_tokens=20, sampling=HOT, seed=5 + b, eos_ids=()).tokens[0]
            for b, p in enumerate(prompts)]
    assert eng.generate(prompts, max_new_tokens=20, sampling=HOT, seed=5, stop_ids=()) == want
    used = lambda sampled: sum(n for k, n in calls.items() if k[:2] == (tree, sampled))  # noqa: E731
    assert used(True) > 0 and used(False) == 0
    got = eng.generate(prompts, max_new_tokens=20, sampling=[SamplingParams(), HOT], seed=5, stop_ids=())
    assert got[0] == _greedy(target, prompts[:1], 20)[0]
    assert used(False) > 0


def test_steps_whose_every_row_samples_take_the_sampled_table(models, monkeypatch):
    """With the load tables of a large target on a GPU (here small stand-ins), a lone sampled
    request decodes with the sampled table's shape and gives the single-request decoder's tokens for
    its seed with that shape; a greedy request takes the greedy table's tree and stays exact."""
    from longspec_jax.infer import defaults

    target, draft = models
    tables = {False: ((1, (2, 2)), (None, None)), True: ((1, (1, 1, 1)), (None, None))}
    monkeypatch.setattr(defaults, "load_table", lambda platform, nbytes, sampled=False: tables[sampled])
    eng = Engine(target, draft, max_slots=2, max_context=160, prefill_chunk=16)
    assert sorted(eng.loops, key=str) == sorted([((2, 2), False), ((1, 1, 1), True), (None, False), (None, True)],
                                                key=str)
    p = _prompts(10, (17,))
    want = Decoder(target, draft, tree_shape=(1, 1, 1)).generate(p, max_new_tokens=20, sampling=HOT, seed=3,
                                                                  eos_ids=()).tokens[0]
    assert eng.generate(p, max_new_tokens=20, sampling=HOT, seed=3, stop_ids=())[0] == want
    assert eng.generate(p, max_new_tokens=20, stop_ids=())[0] == _greedy(target, p, 20)[0]


def test_cancel_running_and_waiting(models):
    target, draft = models
    eng = Engine(target, draft, max_slots=1, max_context=120, tree_shape=CHAIN, prefill_chunk=16)
    p = _prompts(7, (10, 12))
    a = eng.submit(Request(p[0], 60, stop_ids=()))
    b = eng.submit(Request(p[1], 10, stop_ids=()))
    events = eng.step() + eng.step()
    eng.cancel(b)  # waiting
    eng.cancel(a)  # running
    while eng.has_work():
        events += eng.step()
    reasons = {e.request_id: e.finish_reason for e in events if e.finish_reason}
    assert reasons == {a: "cancelled", b: "cancelled"}
    assert sum(len(e.tokens) for e in events if e.request_id == a) < 60
    # the slot is free again and decodes the next request exactly
    assert eng.generate([p[1]], max_new_tokens=10, stop_ids=())[0] == _greedy(target, [p[1]], 10)[0]


def test_a_failing_request_fails_alone(models, engine, monkeypatch):
    target, _ = models
    prompts = _prompts(8, (6, 13, 9))
    real_insert = engine.calls.insert
    calls = []

    def insert(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real_insert(*args)

    monkeypatch.setattr(engine.calls, "insert", insert)
    ids = [engine.submit(Request(p, 16, stop_ids=())) for p in prompts]
    out, errors = {i: [] for i in ids}, {}
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id].extend(ev.tokens)
            if ev.error:
                errors[ev.request_id] = ev.error
    assert list(errors) == [ids[1]] and "injected failure" in errors[ids[1]]
    want = _greedy(target, prompts, 16)
    assert out[ids[0]] == want[0] and out[ids[2]] == want[2]


def test_a_failing_decode_call_fails_its_batch_and_the_engine_goes_on(models, engine, monkeypatch):
    """A decode call that raises loses the batch's donated state: every running request and the one
    being prefilled end with an error event (none waits forever), and the next request is exact."""
    target, _ = models
    prompts = _prompts(9, (8, 70, 11))
    a = engine.submit(Request(prompts[0], 40, stop_ids=()))
    while engine.running == 0:
        engine.step()
    b = engine.submit(Request(prompts[1], 10, stop_ids=()))  # 70 tokens: 5 chunks of 16
    engine.step()
    assert engine.lanes[0].job is not None and engine.lanes[0].job.request.id == b

    def broken(*args):
        raise RuntimeError("injected device failure")

    for key in engine.calls.run:
        monkeypatch.setitem(engine.calls.run, key, broken)
    errors = {e.request_id: e.error for e in engine.step() + engine.step() if e.error}  # the call runs a step late
    assert set(errors) == {a, b} and all("injected device failure" in m for m in errors.values())
    assert not engine.has_work() and engine.running == 0 and engine.resident == 0
    monkeypatch.undo()
    assert engine.generate([prompts[2]], max_new_tokens=12, stop_ids=())[0] == _greedy(target, prompts[2:], 12)[0]


def test_prefill_tokens_per_step_load_whole_chunks_between_decode_calls(models):
    """A cold prompt loads `prefill_tokens_per_step` (rounded up to whole chunks) per step while
    another request decodes; both stay exact. On a GPU the default admits 8192 tokens a step."""
    from longspec_jax.infer import defaults

    target, draft = models
    eng = Engine(target, draft, max_slots=2, max_context=160, tree_shape=CHAIN, prefill_chunk=16,
                 prefill_tokens_per_step=40, fast_lane_tokens=0)
    run, cold = _prompts(14, (20, 120))
    r = eng.submit(Request(run, 30, stop_ids=()))
    out = {r: eng.step()[0].tokens}
    c = eng.submit(Request(cold, 8, stop_ids=()))
    out[c] = []
    for done in (3, 6):  # the running request streams meanwhile
        events = eng.step()
        for ev in events:
            out[ev.request_id].extend(ev.tokens)
        assert eng.lanes[0].job.next_chunk == done and [e.request_id for e in events] == [r]
    _step_until_done(eng, out)
    assert out[r] == _greedy(target, [np.asarray(run)], 30)[0] and out[c] == _greedy(target, [np.asarray(cold)], 8)[0]
    assert defaults.prefill_tokens_per_step("gpu", 512) == 8192 == defaults.GPU_PREFILL_TOKENS_PER_STEP
    assert defaults.prefill_tokens_per_step("cpu", 512) == 512
    with pytest.raises(ValueError, match="prefill_tokens_per_step must be >= 1.*got .*0"):
        Engine(target, draft, max_slots=2, max_context=64, prefill_tokens_per_step=0)


def test_a_negative_fast_lane_or_an_interrupt_over_devices_is_refused(models):
    from longspec_jax import sharding

    with pytest.raises(ValueError, match=r"fast_lane_tokens \(--fast-lane-tokens\) must be >= 0.*got -1"):
        Engine(*models, max_slots=2, max_context=64, fast_lane_tokens=-1)
    with pytest.raises(ValueError, match=r"interrupt_on_arrival \(--interrupt-on-arrival\) needs one device, the "
                                         r"mesh has 2"):
        Engine(*models, max_slots=2, max_context=64, mesh=sharding.make_mesh(tensor=2), interrupt_on_arrival=True)


def test_refusals(engine):
    with pytest.raises(ValueError, match="maximum context length is 160 tokens"):
        engine.submit(Request([1] * 150, 20))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], 4))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        engine.submit(Request([3, 200], 4))
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        engine.submit(Request([3], 0))
