"""Hybrid Tree Attention kernels against the float32 oracles (pallas_kernels/reference.py).

One case list per kernel; every case runs natively on a Hopper GPU ("pallas", @pytest.mark.gpu)
and, unless it is too large for the interpreter, in Mosaic GPU interpret mode on the CPU
("pallas_interpret"; the slower ones @pytest.mark.slow). Interpret mode is slow (seconds per CTA),
so its cases use small caches and explicit small split counts. Inputs are fresh normal draws
(never zeros). Interpret mode fills every buffer with NaN before the kernel runs, and every check
requires all outputs finite (or exactly -inf where the oracle says so), so an unwritten element
fails. The XLA implementation is tested below the kernels; the tuning tables in test_tuning.py.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import reference as ref
from pallas_kernels import xla_attention

# dtype -> (out atol, out rtol, lse atol). Outputs are rounded to the input dtype (and the prefix
# kernel's per-split partials too), so the tolerance is a few ulps of that dtype near 1.
TOL = {
    jnp.float32: (2e-5, 1e-5, 1e-5),
    jnp.float16: (3e-3, 1e-2, 2e-3),
    jnp.bfloat16: (2e-2, 2e-2, 2e-3),
}

gpu = pytest.mark.gpu
slow = pytest.mark.slow


def _keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _assert_close(out, lse, ref_out, ref_lse, dtype, what):
    atol, rtol, lse_atol = TOL[dtype]
    out = np.asarray(out, np.float32)
    ref_out = np.asarray(ref_out, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert np.isfinite(out).all(), f"{what}: non-finite output (unwritten or NaN)"
    empty = ref_lse == -np.inf
    assert np.array_equal(lse == -np.inf, empty), f"{what}: -inf pattern of lse differs"
    assert np.isfinite(lse[~empty]).all(), f"{what}: non-finite lse"
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], atol=lse_atol, rtol=0, err_msg=what)
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=rtol, err_msg=what)
    if empty.any():  # no visible key: out exactly 0
        rows = np.broadcast_to(empty[..., None], out.shape)
        assert (out[rows] == 0).all(), f"{what}: rows with no key must be 0"


def tree_mask(kind, T, seed=0):
    """[T, T] bool ancestor-or-self mask of a chain, star, or random tree (parents precede children)."""
    if kind == "chain":
        return np.tril(np.ones((T, T), bool))
    rng = np.random.default_rng(seed)
    parent = np.zeros(T, int) - 1
    for i in range(1, T):
        parent[i] = 0 if kind == "star" else rng.integers(0, i)
    m = np.eye(T, dtype=bool)
    for i in range(1, T):
        m[i] |= m[parent[i]]
    return m


# ----------------------------------------------------------------------------- cases
# `interpret`: "ci" runs in the default (CPU) run too, "slow" in interpret mode only with -m slow,
# None natively only (too many CTAs for the interpreter).


class PrefixCase(NamedTuple):
    dtype: type
    B: int
    T: int
    N: int
    K: int
    H: int
    S: int
    lengths: list
    window: int | None
    knobs: dict
    interpret: str | None


class TreeCase(NamedTuple):
    dtype: type
    B: int
    T: int
    N: int
    K: int
    H: int
    kinds: list  # one tree shape per batch row
    empty_row: int | None  # a query row with no visible key
    knobs: dict
    interpret: str | None


class HybridCase(NamedTuple):
    dtype: type
    B: int
    T: int
    N: int
    K: int
    H: int
    S: int
    lengths: list
    window: int | None
    kind: str
    interpret: str | None


SMALL = dict(block_kv=64, num_splits=3)  # interpret mode: few CTAs per case
PADDED = dict(block_kv=64, num_splits=3, num_wg=2)  # 140 rows in 2 x 128: warpgroup 1 of tile 1 is padding
BIG_OVERLAP = dict(block_kv=128, stages=2, num_splits=13, overlap=True)

PREFIX_CASES = [
    # G=5; row 0 wraps the 128-slot ring twice under a 100-slot window; row 1 empty; row 2 linear,
    # not block-divisible (77 = 64 + 13), shorter than the window.
    PrefixCase(jnp.float16, 3, 2, 5, 1, 64, 128, [300, 0, 77], 100, dict(block_kv=64, num_splits=2), "ci"),
    # Padding warpgroup (computes nothing, keeps the pipeline protocol), with and without the
    # ping-pong. Row 0 spreads 4 blocks as 2 + 2 + 0 over the 3 splits, row 1 2 blocks as 1 + 1 + 0:
    # the pipeline runs more than one step, and empty splits keep the protocol too.
    PrefixCase(jnp.float16, 2, 35, 4, 1, 64, 256, [250, 70], None, dict(PADDED, pingpong=False), "ci"),
    PrefixCase(jnp.float16, 2, 35, 4, 1, 64, 256, [250, 70], None, dict(PADDED, pingpong=True), "ci"),
    # FA3's intra-warpgroup overlap on the same grid (splits of 2, 1 and 0 blocks: the one-block and
    # empty splits skip the loop), two stages, so the pipeline's ring wraps while V is held one
    # block longer; with the ping-pong, and with one warpgroup.
    PrefixCase(jnp.float16, 2, 35, 4, 1, 64, 256, [250, 70], None,
               dict(PADDED, stages=2, pingpong=True, overlap=True), "ci"),
    PrefixCase(jnp.float16, 2, 35, 4, 1, 64, 256, [250, 70], None,
               dict(SMALL, num_wg=1, stages=2, overlap=True), "slow"),
    # The overlapped loop over a ring that wraps twice under a window: one split walks each row's
    # two blocks (both masked: the interval's ends), an empty row.
    PrefixCase(jnp.float16, 3, 2, 5, 1, 64, 128, [300, 0, 77], 100,
               dict(block_kv=64, num_splits=1, stages=2, overlap=True), "ci"),
    PrefixCase(jnp.bfloat16, 2, 2, 5, 1, 64, 256, [300, 1], 100, SMALL, "slow"),  # bf16, length 1
    PrefixCase(jnp.bfloat16, 2, 16, 4, 1, 128, 512, [511, 64], None, SMALL, "slow"),
    PrefixCase(jnp.float16, 1, 17, 4, 1, 64, 256, [130], 64, SMALL, "slow"),  # 68 rows: two row tiles
    PrefixCase(jnp.bfloat16, 1, 35, 4, 1, 64, 256, [200], None, SMALL, "slow"),  # last warpgroup all padding
    PrefixCase(jnp.float16, 2, 1, 8, 2, 64, 384, [383, 129], 256, SMALL, "slow"),
    PrefixCase(jnp.float16, 1, 2, 8, 1, 64, 256, [256], None, SMALL, "slow"),  # full cache, G=8
    # Native only, at the default (tuned) knobs.
    PrefixCase(jnp.bfloat16, 1, 1, 32, 8, 128, 4096, [4000], None, {}, None),
    PrefixCase(jnp.bfloat16, 3, 6, 32, 8, 128, 2048, [0, 1, 2048], None, {}, None),
    PrefixCase(jnp.bfloat16, 2, 16, 40, 8, 128, 4096, [1000, 4096], None, {}, None),  # G=5
    PrefixCase(jnp.float16, 2, 74, 32, 8, 128, 2048, [1537, 333], None, {}, None),
    PrefixCase(jnp.bfloat16, 1, 69, 40, 8, 128, 8192, [8000], None, {}, None),
    PrefixCase(jnp.bfloat16, 2, 128, 8, 8, 64, 1024, [700, 1024], None, {}, None),  # G=1, T=128, H=64
    PrefixCase(jnp.float16, 2, 5, 64, 8, 64, 1024, [1023, 64], 300, {}, None),  # G=8, window
    PrefixCase(jnp.bfloat16, 2, 9, 32, 8, 128, 1024, [1500, 5000], 200, {}, None),  # ring wraparound + window
    PrefixCase(jnp.bfloat16, 1, 16, 32, 8, 128, 131072, [777], None, {}, None),  # huge capacity, short length
    # Two compute warpgroups, ping-pong off and on: 276 rows (the third tile's second warpgroup is
    # padding), 296 rows, 36 rows (warpgroup 1 all padding).
    *[PrefixCase(dtype, B, T, 32, 8, 128, S, lengths, window, dict(num_wg=2, pingpong=pp), None)
      for dtype, B, T, S, lengths, window in [(jnp.bfloat16, 1, 69, 8192, [8000], None),
                                              (jnp.float16, 2, 74, 2048, [1537, 333], None),
                                              (jnp.bfloat16, 2, 9, 1024, [1500, 5000], 200)]
      for pp in (False, True)],
    # The intra-warpgroup overlap, ping-pong on and off: 276 rows (three row tiles), 148 rows, a
    # wrapping ring under a window, decode rows (one warpgroup).
    *[PrefixCase(dtype, B, T, 32, 8, 128, S, lengths, window, dict(BIG_OVERLAP, pingpong=pp), None)
      for dtype, B, T, S, lengths, window in [(jnp.bfloat16, 1, 69, 32768, [32568], None),
                                              (jnp.float16, 2, 37, 4096, [4000, 129], None),
                                              (jnp.bfloat16, 2, 9, 1024, [1500, 5000], 200),
                                              (jnp.bfloat16, 2, 1, 131072, [777, 131072], None)]
      for pp in (True, False)],
]

TREE_CASES = [
    # One call covers the three tree shapes: batch rows are chain, star, random (G=4, 2 row tiles).
    TreeCase(jnp.float16, 3, 20, 4, 1, 64, ["chain", "star", "random"], 3, {}, "ci"),
    TreeCase(jnp.bfloat16, 1, 5, 4, 1, 64, ["chain"], 4, {}, "slow"),
    TreeCase(jnp.bfloat16, 1, 9, 8, 1, 64, ["star"], 8, {}, "slow"),
    TreeCase(jnp.bfloat16, 1, 70, 4, 1, 64, ["random"], 69, dict(block_k=64), "slow"),  # two key blocks
    *[TreeCase(dtype, 2, T, N, 8, H, [kind] * 2, T // 2 if T > 2 else None, {}, None)
      for kind, T, N, H, dtype in [("chain", 1, 32, 128, jnp.bfloat16), ("star", 6, 32, 128, jnp.float16),
                                   ("random", 16, 40, 128, jnp.bfloat16), ("random", 74, 32, 128, jnp.bfloat16),
                                   ("chain", 128, 8, 64, jnp.float16), ("random", 69, 40, 128, jnp.float16)]],
]

HYBRID_CASES = [
    HybridCase(jnp.float16, 1, 4, 4, 1, 64, 128, [77], None, "random", "ci"),
    HybridCase(jnp.bfloat16, 2, 74, 32, 8, 128, 32768, [32000, 0], None, "random", None),
    HybridCase(jnp.bfloat16, 2, 16, 40, 8, 128, 32768, [5000, 1], None, "chain", None),
    HybridCase(jnp.bfloat16, 2, 6, 32, 8, 128, 32768, [9000, 300], 512, "star", None),
]


def _case_id(case) -> str:
    """e.g. 'float16-B3-T2-N5-K1-H64-S128-L300_0_77-W100-block_kv64-num_splits2'."""
    parts = [case.dtype.__name__]
    for name, value in case._asdict().items():
        if name in ("dtype", "interpret", "knobs") or value is None:
            continue
        if isinstance(value, list):
            value = "_".join(map(str, value))
        parts.append(f"{'L' if name == 'lengths' else 'W' if name == 'window' else name}{value}")
    parts += [f"{k}{v}" for k, v in getattr(case, "knobs", {}).items()]
    return "-".join(parts)


def modes(cases):
    """(implementation, case) params: natively on a GPU, and in interpret mode where the case allows."""
    params = []
    for c in cases:
        params.append(pytest.param("pallas", c, marks=gpu, id="gpu-" + _case_id(c)))
        if c.interpret is not None:
            params.append(pytest.param("pallas_interpret", c, marks=[slow] if c.interpret == "slow" else [],
                                       id="interpret-" + _case_id(c)))
    return params


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("impl,case", modes(PREFIX_CASES))
def test_prefix(impl, case):
    from pallas_kernels import prefix_decode

    B, T, N, K, H, S, dtype = case.B, case.T, case.N, case.K, case.H, case.S, case.dtype
    kq, kk, kv = _keys(0, 3)
    q = _rand(kq, (B, T, N, H), dtype)
    k = _rand(kk, (B, S, K, H), dtype)
    v = _rand(kv, (B, S, K, H), dtype)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    out, lse = prefix_decode.prefix_attention(q, k, v, lengths, window=case.window,
                                              interpret=impl == "pallas_interpret", **case.knobs)
    assert out.shape == (B, T, N, H) and out.dtype == dtype and lse.shape == (B, T, N) and lse.dtype == jnp.float32
    r_out, r_lse = ref.prefix_attention_ref(q, k, v, lengths, window=case.window)
    _assert_close(out, lse, r_out, r_lse, dtype, f"prefix {impl} {_case_id(case)}")


@pytest.mark.parametrize("impl,case", modes(TREE_CASES))
def test_tree(impl, case):
    from pallas_kernels import tree_attn

    B, T, N, K, H, dtype = case.B, case.T, case.N, case.K, case.H, case.dtype
    kq, kk, kv = _keys(1, 3)
    q = _rand(kq, (B, T, N, H), dtype)
    k = _rand(kk, (B, T, K, H), dtype)
    v = _rand(kv, (B, T, K, H), dtype)
    mask = np.stack([tree_mask(case.kinds[b], T, b) for b in range(B)])
    if case.empty_row is not None:
        mask[:, case.empty_row] = False
    mask = jnp.asarray(mask)
    out, lse = tree_attn.tree_attention(q, k, v, mask, interpret=impl == "pallas_interpret", **case.knobs)
    r_out, r_lse = ref.tree_attention_ref(q, k, v, mask)
    _assert_close(out, lse, r_out, r_lse, dtype, f"tree {impl} {_case_id(case)}")


@pytest.mark.parametrize("impl,case", modes(HYBRID_CASES))
def test_hybrid(impl, case):
    B, T, N, K, H, S, dtype = case.B, case.T, case.N, case.K, case.H, case.S, case.dtype
    kq, kk, kv, kt, kw = _keys(2, 5)
    q = _rand(kq, (B, T, N, H), dtype)
    kc = _rand(kk, (B, S, K, H), dtype)
    vc = _rand(kv, (B, S, K, H), dtype)
    kn = _rand(kt, (B, T, K, H), dtype)
    vn = _rand(kw, (B, T, K, H), dtype)
    mask = jnp.asarray(np.stack([tree_mask(case.kind, T, b) for b in range(B)]))
    lengths = jnp.asarray(case.lengths, jnp.int32)
    out, lse = pallas_kernels.hybrid_attention(q, kc, vc, lengths, kn, vn, mask, window=case.window,
                                               implementation=impl)
    r_out, r_lse = ref.dense_attention_ref(q, kc, vc, lengths, kn, vn, mask, window=case.window)
    _assert_close(out, lse, r_out, r_lse, dtype, f"hybrid {impl} {_case_id(case)}")


def test_prefix_bad_knobs():
    from pallas_kernels import prefix_decode as pd

    q = jnp.ones((1, 40, 4, 128), jnp.bfloat16)
    kv = jnp.ones((1, 256, 1, 128), jnp.bfloat16)
    lengths = jnp.asarray([100], jnp.int32)
    with pytest.raises(ValueError, match="exceeds shared memory"):
        pd.prefix_attention(q, kv, kv, lengths, num_wg=2, block_kv=128, stages=4, interpret=True)
    with pytest.raises(ValueError, match="1 or 2 compute warpgroups"):
        pd.prefix_attention(q, kv, kv, lengths, num_wg=3, interpret=True)
    with pytest.raises(ValueError, match="num_splits=0 must be >= 1"):
        pd.prefix_attention(q, kv, kv, lengths, num_splits=0, interpret=True)
    with pytest.raises(ValueError, match="overlap=True needs stages >= 2"):
        pd.prefix_attention(q, kv, kv, lengths, num_wg=2, stages=1, overlap=True, interpret=True)
    with pytest.raises(ValueError, match="multiple of block_kv=128"):
        pd.prefix_attention(q, kv[:, :192], kv[:, :192], lengths, block_kv=128, interpret=True)
    # Without overlap= the default's overlap gives way to a one-stage pipeline instead of failing.
    jax.eval_shape(lambda: pd.prefix_attention(q, kv, kv, lengths, num_wg=2, stages=1, interpret=True))


# ----------------------------------------------------------------------------- xla implementation (f32, ring)


@pytest.mark.parametrize("window", [None, 5, 11])
def test_xla_prefix_ring_f32(window):
    """The xla path against an explicit token-order gather of the ring buffer, float32."""
    B, T, N, K, H, S = 3, 4, 8, 2, 16, 16
    kq, kk, kv = _keys(7, 3)
    q = _rand(kq, (B, T, N, H), jnp.float32)
    k = _rand(kk, (B, S, K, H), jnp.float32)
    v = _rand(kv, (B, S, K, H), jnp.float32)
    lengths = np.array([0, 9, 37])  # empty, linear, wrapped twice around the ring
    out, lse = pallas_kernels.prefix_attention(q, k, v, jnp.asarray(lengths, jnp.int32), window=window,
                                               implementation="xla")
    for b, n in enumerate(lengths):
        c = min(n, S, window or S)
        slots = [(n - 1 - j) % S for j in range(c)]  # newest first
        if not slots:
            assert (np.asarray(out[b]) == 0).all() and (np.asarray(lse[b]) == -np.inf).all()
            continue
        kb = np.asarray(k[b])[slots]
        vb = np.asarray(v[b])[slots]
        qb = np.asarray(q[b]).reshape(T, K, N // K, H)
        s = np.einsum("tkgh,skh->tkgs", qb, kb) / np.sqrt(H)
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        o = np.einsum("tkgs,skh->tkgh", p / p.sum(-1, keepdims=True), vb).reshape(T, N, H)
        l_ = (m[..., 0] + np.log(p.sum(-1))).reshape(T, N)
        atol, rtol, latol = TOL[jnp.float32]
        np.testing.assert_allclose(np.asarray(out[b]), o, atol=atol, rtol=rtol)
        np.testing.assert_allclose(np.asarray(lse[b]), l_, atol=latol)


BLOCKWISE = [
    # dtype, B, T, N, K, H, S, lengths, block: lengths empty, one slot, off-block, one block,
    # the whole capacity, and rows of different lengths (the loop runs to the longest)
    (jnp.float32, 3, 130, 6, 2, 16, 1024, [0, 1, 1023], 256),
    (jnp.float32, 2, 200, 4, 2, 32, 768, [768, 256], 256),
    (jnp.float32, 1, 96, 8, 2, 64, 1536, [700], 512),
    (jnp.bfloat16, 2, 130, 6, 2, 64, 512, [300, 512], 128),
]


@pytest.mark.parametrize("case", BLOCKWISE, ids=lambda c: f"{c[0].__name__}-T{c[2]}-S{c[6]}-L{c[7]}-blk{c[8]}")
def test_xla_blockwise_prefix_matches_reference(case):
    """The blockwise (online-softmax) XLA prefix attention against the dense float32 oracle."""
    dtype, B, T, N, K, H, S, lengths, block = case
    ks = _keys(11, 3)
    q, k, v = _rand(ks[0], (B, T, N, H), dtype), _rand(ks[1], (B, S, K, H), dtype), _rand(ks[2], (B, S, K, H), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = xla_attention.prefix_attention_blockwise(q, k, v, lengths, block=block)
    r_out, r_lse = ref.prefix_attention_ref(q, k, v, lengths)
    _assert_close(out, lse, r_out, r_lse, dtype, f"blockwise {case}")


def test_xla_blockwise_refuses_capacity_without_a_block():
    q, kv = jnp.ones((1, 200, 4, 16)), jnp.ones((1, 1000, 2, 16))
    with pytest.raises(ValueError, match="not a multiple of a key block"):
        xla_attention.prefix_attention_blockwise(q, kv, kv, jnp.asarray([10], jnp.int32))


def test_xla_prefix_dispatch():
    """The xla path goes blockwise for many query rows over a linear cache only: never with a window
    (the ring's visibility is not a prefix), never for a few rows (decode and short chains), and
    never when no block size divides the capacity; both choices give the oracle's result."""
    xa = xla_attention
    rows = xa.MIN_ROWS
    assert xa.use_blockwise((1, rows // 2, 4, 64), (1, 1024, 2, 64), None)  # G = 2: T * G = MIN_ROWS
    assert not xa.use_blockwise((1, rows // 2, 4, 64), (1, 1024, 2, 64), 512)  # window: dense
    assert not xa.use_blockwise((1, rows // 2 - 1, 4, 64), (1, 1024, 2, 64), None)  # too few rows
    assert not xa.use_blockwise((1, rows, 4, 64), (1, 1000, 2, 64), None)  # no block divides 1000
    assert not xa.use_blockwise((1, rows, 4, 64), (1, 512, 2, 64), None)  # a single block: nothing to skip
    B, T, N, K, H, S = 2, rows // 2, 4, 2, 16, 1024
    ks = _keys(12, 3)
    q, k, v = (_rand(ks[0], (B, T, N, H), jnp.float32), _rand(ks[1], (B, S, K, H), jnp.float32),
               _rand(ks[2], (B, S, K, H), jnp.float32))
    lengths = jnp.asarray([5, 900], jnp.int32)
    out, lse = pallas_kernels.prefix_attention(q, k, v, lengths, implementation="xla")
    r_out, r_lse = ref.prefix_attention_ref(q, k, v, lengths)
    _assert_close(out, lse, r_out, r_lse, jnp.float32, "xla dispatch")


@pytest.mark.parametrize("kind", ["chain", "star", "random"])
def test_xla_hybrid_matches_dense_f32(kind):
    B, T, N, K, H, S = 2, 7, 10, 2, 16, 32
    ks = _keys(3, 5)
    q, kc, vc = (_rand(ks[0], (B, T, N, H), jnp.float32), _rand(ks[1], (B, S, K, H), jnp.float32),
                 _rand(ks[2], (B, S, K, H), jnp.float32))
    kn, vn = _rand(ks[3], (B, T, K, H), jnp.float32), _rand(ks[4], (B, T, K, H), jnp.float32)
    mask = np.stack([tree_mask(kind, T, b) for b in range(B)])
    mask[1, 2] = False  # an all-masked tree row: the prefix alone must carry it
    lengths = jnp.asarray([0, 45], jnp.int32)  # empty prefix; ring-wrapped prefix
    for window in (None, 20):
        out, lse = pallas_kernels.hybrid_attention(q, kc, vc, lengths, kn, vn, jnp.asarray(mask), window=window,
                                                   implementation="xla")
        r_out, r_lse = ref.dense_attention_ref(q, kc, vc, lengths, kn, vn, jnp.asarray(mask), window=window)
        _assert_close(out, lse, r_out, r_lse, jnp.float32, f"xla hybrid {kind} W={window}")


def test_merge_attention_of_empty_parts():
    """A part without keys (lse -inf) contributes nothing; two empty parts give 0 and -inf, not NaN."""
    ks = _keys(4, 2)
    o1, o2 = _rand(ks[0], (1, 2, 3, 8), jnp.float32), _rand(ks[1], (1, 2, 3, 8), jnp.float32)
    l1 = jnp.asarray([[[0.5, -jnp.inf, -jnp.inf], [1.0, 2.0, -jnp.inf]]])
    l2 = jnp.asarray([[[-jnp.inf, 0.3, -jnp.inf], [0.0, -1.0, -jnp.inf]]])
    o, lse = pallas_kernels.merge_attention((o1, l1), (o2, l2))
    np.testing.assert_array_equal(np.asarray(o[0, 0, 0]), np.asarray(o1[0, 0, 0]))
    np.testing.assert_array_equal(np.asarray(o[0, 0, 1]), np.asarray(o2[0, 0, 1]))
    assert (np.asarray(o[0, :, 2]) == 0).all() and (np.asarray(lse[0, :, 2]) == -np.inf).all()
    w1 = np.exp(1.0) / (np.exp(1.0) + np.exp(0.0))
    mixed = w1 * np.asarray(o1[0, 1, 0]) + (1 - w1) * np.asarray(o2[0, 1, 0])
    np.testing.assert_allclose(np.asarray(o[0, 1, 0]), mixed, rtol=1e-6)
    np.testing.assert_allclose(float(lse[0, 1, 0]), np.logaddexp(1.0, 0.0), rtol=1e-6)
