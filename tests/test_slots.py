"""Host-side bookkeeping of the serving engine (`longspec_jax/infer/slots.py`): which prefix a request
reuses and which slot it takes, which waiting request goes first, which lane takes it."""

import numpy as np

from longspec_jax.infer.slots import PROBE, Request, Slot, choose_slot, common_prefix, next_request


def test_common_prefix_and_slot_choice():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    a = Slot(0, tokens=[1, 2, 3, 4, 5], valid=4, last_used=5.0)
    b = Slot(1, tokens=[9, 9], valid=1, last_used=1.0)
    c = Slot(2, tokens=[1, 2, 3, 4, 5, 6], valid=5, last_used=9.0, session="other")
    prompt = np.array([1, 2, 3, 4, 5, 6, 7])
    assert choose_slot([a, b], prompt, None) == (a, 4, a)  # extends a's whole sequence: takes a
    assert choose_slot([a, b], np.array([7, 7]), None)[:2] == (b, 0)  # nothing to reuse: least recently used
    # c holds the longest prefix but is pinned to another session: copied into a, whose sequence the
    # request extends whole (the new one holds all of it)
    assert choose_slot([a, b, c], prompt, None) == (a, 5, c)
    assert choose_slot([b, c], prompt, None) == (b, 5, c)  # else into the least recently used slot
    assert choose_slot([a, b, c], prompt, "other") == (c, 5, c)
    assert choose_slot([c], prompt, None) == (c, 5, c)  # ... and taken when nothing else is free
    assert choose_slot([a], np.array([1, 2, 3, 4]), None) == (a, 3, a)  # the last prompt token is never reused
    # a prompt that shares part of a's sequence (another question over a document) leaves a resident
    diverging = np.array([1, 2, 3, 9, 9])
    assert choose_slot([a, b], diverging, None) == (b, 3, a)
    assert choose_slot([a, b, Slot(3)], diverging, None) == (Slot(3), 3, a)  # an empty slot is worth least
    # a running request's committed tokens are a source too (here 5 of them)
    running = Slot(4, request=Request([1], 1), tokens=[1, 2, 3, 4, 5, 6, 7], valid=3)
    assert choose_slot([b], prompt, None, busy=[(running, 5)]) == (b, 5, running)
    assert choose_slot([a, b], prompt, None, busy=[(running, 5)]) == (a, 5, running)  # a's sequence is superseded


def test_next_request_prefers_a_waiting_turn_that_reuses_a_free_slot():
    ctx = list(range(100, 100 + 2 * PROBE))
    other = list(range(500, 500 + 2 * PROBE))
    free = [Slot(0, tokens=ctx, valid=len(ctx) - 1), Slot(1, tokens=other[:PROBE + 5], valid=PROBE + 4)]
    cold = Request(prompt=[7] * 80, max_tokens=4)
    turn = Request(prompt=ctx + [1, 2], max_tokens=4)
    shorter = Request(prompt=other[:PROBE + 3], max_tokens=4)
    assert next_request([cold, turn], free) == 1
    assert next_request([cold, shorter, turn], free) == 2  # the longest reuse wins
    assert next_request([cold, turn], free, window=1) == 0  # only the first `window` are looked at
    assert next_request([cold, turn], [Slot(2)]) == 0  # nothing resident: first come, first served
    assert next_request([cold, turn], free, head_passes=3, patience=3) == 0  # the oldest waited long enough


def test_a_fast_lane_takes_only_a_short_request():
    ctx = list(range(100, 100 + 2 * PROBE))
    free = [Slot(0, tokens=ctx, valid=len(ctx) - 1), Slot(1)]
    cold = Request(prompt=[7] * 80, max_tokens=4)
    turn = Request(prompt=ctx + [1, 2, 3], max_tokens=4)   # 4 tokens left to prefill
    short = Request(prompt=[5] * 10, max_tokens=4)
    assert next_request([cold, turn, short], free, max_suffix=16) == 1    # the longest reuse among the short
    assert next_request([cold, short], free, max_suffix=16) == 1
    assert next_request([cold], free, max_suffix=16) is None              # nothing fits: the lane stays idle
    assert next_request([cold, turn], free, max_suffix=16, head_passes=8, patience=8) is None  # the head's turn
    assert next_request([short, turn], free, max_suffix=16, head_passes=8, patience=8) == 0
    # a question over a document a running request holds has little left to prefill: the fast lane takes it
    doc = list(range(300, 300 + 3 * PROBE))
    question = Request(prompt=doc + [1, 2, 3], max_tokens=4)
    running = Slot(5, request=Request([1], 1), tokens=doc + [7, 8], valid=0)
    assert next_request([cold, question], free, max_suffix=16) is None
    assert next_request([cold, question], free, max_suffix=16, busy=[(running, len(doc) + 1)]) == 1
