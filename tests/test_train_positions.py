"""Anchor-Offset indices (spec 2.1): property tests over random keys and lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from longspec_jax.train.positions import anchor_offset_positions, max_offset_for


def _sinks_and_offset(pos: np.ndarray) -> tuple[int, int]:
    """Recover (s, o) from a position row: s = length of the initial run equal to arange."""
    T = len(pos)
    jumps = np.nonzero(pos != np.arange(T))[0]
    if len(jumps) == 0:
        return T, 0  # o == 0 (or all sinks): indistinguishable from vanilla
    s = int(jumps[0])
    return s, int(pos[s] - s)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(2, 1200), max_offset=st.integers(0, 5000),
       sinks=st.one_of(st.just("random"), st.integers(0, 6)))
def test_properties(seed, T, max_offset, sinks):
    pos = np.asarray(anchor_offset_positions(jax.random.key(seed), 3, T, sinks=sinks, max_offset=max_offset,
                                             switch_off_len=1200))
    assert pos.shape == (3, T) and pos.dtype == np.int32
    assert (pos == pos[:1]).all(), "one draw shared across the batch"
    row = pos[0]
    assert (np.diff(row) > 0).all(), "strictly increasing"
    assert (np.diff(row) >= 1).all()
    s, o = _sinks_and_offset(row)
    assert 0 <= o <= max_offset
    if o > 0:
        n_sinks = sinks if sinks != "random" else None
        if n_sinks is not None:
            assert s == min(n_sinks, T)
        else:
            assert 0 <= s <= 4
        np.testing.assert_array_equal(row[:s], np.arange(s))  # the sinks are [0..s-1]
        np.testing.assert_array_equal(row[s:], np.arange(s, T) + o)  # then a contiguous shifted run


def test_random_sinks_cover_0_to_4_and_offsets_spread():
    seen_s, offsets = set(), []
    for seed in range(200):
        row = np.asarray(anchor_offset_positions(jax.random.key(seed), 1, 64, max_offset=1000))[0]
        s, o = _sinks_and_offset(row)
        if o > 0:
            seen_s.add(s)
            offsets.append(o)
    assert seen_s == {0, 1, 2, 3, 4}
    assert max(offsets) > 800 and min(offsets) < 200


def test_switch_off_and_disabled_give_arange():
    key = jax.random.key(0)
    np.testing.assert_array_equal(
        anchor_offset_positions(key, 2, 1201, max_offset=10_000, switch_off_len=1200),
        np.broadcast_to(np.arange(1201), (2, 1201)))
    # At exactly the switch-off length the indices are still randomised (released: L > 1200 is vanilla).
    rows = [np.asarray(anchor_offset_positions(jax.random.key(k), 1, 1200, sinks=0, max_offset=10_000,
                                               switch_off_len=1200))[0] for k in range(3)]
    assert any(r[0] > 0 for r in rows)
    np.testing.assert_array_equal(
        anchor_offset_positions(key, 1, 16, max_offset=100, enabled=False), np.arange(16)[None])


def test_jit_traced_draws_are_deterministic():
    f = jax.jit(lambda k: anchor_offset_positions(k, 2, 32, sinks="random", max_offset=77))
    a, b = f(jax.random.key(3)), f(jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    assert int(jnp.max(a)) <= 31 + 77


@pytest.mark.parametrize("T,maxpos,cap,expected", [
    (1024, 262144, None, 30000 - 1024),      # released: min(30000, model_max_length - 1000) - L
    (1024, 16384, None, 16384 - 1000 - 1024),
    (1024, 1500, None, 0),                   # floored at zero
    (64, 2048, 512, 512),
    (64, 300, 512, 300 - 64),                # a given cap still keeps the last position in range
])
def test_max_offset_for(T, maxpos, cap, expected):
    assert max_offset_for(T, maxpos, cap) == expected
