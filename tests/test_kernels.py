"""Hybrid Tree Attention kernels against the float32 references (pallas_kernels/reference.py).

One parametrized body per kernel runs in two modes: "pallas_interpret" (Mosaic GPU interpret mode,
CPU, in CI) and "pallas" (native Hopper, @pytest.mark.gpu). Interpret mode is slow (seconds per
CTA), so its default cases use small caches and explicit small split counts; the wide sweep is
GPU-only or @pytest.mark.slow. Inputs are fresh normal draws (never zeros). Interpret mode fills
every buffer with NaN before the kernel runs, and every check requires all outputs finite (or
exactly -inf where the reference says so), so an unwritten element fails.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import api
from pallas_kernels import reference as ref

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


# ----------------------------------------------------------------------------- trees


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


# ----------------------------------------------------------------------------- bodies


def _impl_kwargs(impl):
    return dict(interpret=impl == "pallas_interpret")


def check_prefix(impl, dtype, B, T, N, K, H, S, lengths, window, seed=0, **knobs):
    from pallas_kernels import prefix_decode

    kq, kk, kv = _keys(seed, 3)
    q = _rand(kq, (B, T, N, H), dtype)
    k = _rand(kk, (B, S, K, H), dtype)
    v = _rand(kv, (B, S, K, H), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = prefix_decode.prefix_attention(q, k, v, lengths, window=window, **knobs, **_impl_kwargs(impl))
    assert out.shape == (B, T, N, H) and out.dtype == dtype and lse.shape == (B, T, N) and lse.dtype == jnp.float32
    r_out, r_lse = ref.prefix_attention_ref(q, k, v, lengths, window=window)
    _assert_close(out, lse, r_out, r_lse, dtype, f"prefix {impl} {dtype.__name__} T={T} G={N // K} len={lengths} W={window}")


def check_tree(impl, dtype, B, T, N, K, H, kind, seed=0, empty_row=None, **knobs):
    from pallas_kernels import tree_attn

    kq, kk, kv = _keys(seed + 1, 3)
    q = _rand(kq, (B, T, N, H), dtype)
    k = _rand(kk, (B, T, K, H), dtype)
    v = _rand(kv, (B, T, K, H), dtype)
    kinds = kind if isinstance(kind, list) else [kind] * B
    mask = np.stack([tree_mask(kinds[b], T, seed + b) for b in range(B)])
    if empty_row is not None:
        mask[:, empty_row] = False
    mask = jnp.asarray(mask)
    out, lse = tree_attn.tree_attention(q, k, v, mask, **knobs, **_impl_kwargs(impl))
    r_out, r_lse = ref.tree_attention_ref(q, k, v, mask)
    _assert_close(out, lse, r_out, r_lse, dtype, f"tree {impl} {kind} T={T} G={N // K}")


def check_hybrid(impl, dtype, B, T, N, K, H, S, lengths, window, kind, seed=0):
    kq, kk, kv, kt, kw = _keys(seed + 2, 5)
    q = _rand(kq, (B, T, N, H), dtype)
    kc = _rand(kk, (B, S, K, H), dtype)
    vc = _rand(kv, (B, S, K, H), dtype)
    kn = _rand(kt, (B, T, K, H), dtype)
    vn = _rand(kw, (B, T, K, H), dtype)
    mask = jnp.asarray(np.stack([tree_mask(kind, T, seed + b) for b in range(B)]))
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = api.hybrid_attention(q, kc, vc, lengths, kn, vn, mask, window=window, implementation=impl)
    r_out, r_lse = ref.dense_attention_ref(q, kc, vc, lengths, kn, vn, mask, window=window)
    _assert_close(out, lse, r_out, r_lse, dtype, f"hybrid {impl} {kind} len={lengths} W={window}")


# ----------------------------------------------------------------------------- interpret mode (CPU, CI)
# Small grids: K=1 and explicit 2 splits over 64-slot blocks keep each case to a few CTAs.

INTERPRET_PREFIX = [
    # dtype, B, T, N, K, H, S, lengths, window
    # G=5; row 0 wraps the 128-slot ring twice under a 100-slot window; row 1 empty; row 2 linear,
    # not block-divisible (77 = 64 + 13), shorter than the window.
    (jnp.float16, 3, 2, 5, 1, 64, 128, [300, 0, 77], 100),
]


@pytest.mark.parametrize("case", INTERPRET_PREFIX, ids=lambda c: f"{c[0].__name__}-T{c[2]}-G{c[3] // c[4]}-W{c[8]}")
def test_prefix_interpret(case):
    dtype, B, T, N, K, H, S, lengths, window = case
    check_prefix("pallas_interpret", dtype, B, T, N, K, H, S, lengths, window, block_kv=64, num_splits=2)


@pytest.mark.parametrize("pingpong", [False, True])
def test_prefix_interpret_padding_warpgroup(pingpong):
    """T * G = 140 rows in two 128-row CTAs: the second CTA's second warpgroup holds only padding and
    computes nothing, its partner still runs the whole pipeline; with and without the warpgroup
    ping-pong. Batch row 0 spreads 4 blocks as 2 + 2 + 0 over the 3 splits, row 1 2 blocks as
    1 + 1 + 0: the pipeline runs more than one step, and empty splits keep the protocol too."""
    check_prefix("pallas_interpret", jnp.float16, 2, 35, 4, 1, 64, 256, [250, 70], None, block_kv=64,
                 num_splits=3, num_wg=2, pingpong=pingpong)


@pytest.mark.parametrize("lone_splits,pingpong", [(2, True), pytest.param(4, False, marks=slow)])
def test_prefix_interpret_lone_tile_shared(lone_splits, pingpong):
    """The lone last tile's second warpgroup shares the first one's rows, each warpgroup taking one
    half of every block's keys; the second writes its partial into the tile's padding rows. 140
    rows: tile 1 is lone. The leading tile runs 3 splits, the lone tile `lone_splits` (2 or 4:
    batch row 0's 4 blocks as 2 + 2 or one each, row 1's 2 blocks with empty splits too); the
    masked first and last blocks of the ring interval fall in both key halves."""
    check_prefix("pallas_interpret", jnp.float16, 2, 35, 4, 1, 64, 256, [250, 70], None, block_kv=64,
                 num_splits=3, num_wg=2, pingpong=pingpong, lone_splits=lone_splits, lone_share=True)


@pytest.mark.parametrize("num_wg,pingpong,lone_share", [
    (2, True, False), pytest.param(1, False, False, marks=slow), pytest.param(2, False, True, marks=slow)])
def test_prefix_interpret_overlap(num_wg, pingpong, lone_share):
    """FA3's intra-warpgroup overlap (block j's QK^T issued with block j - 1's PV, block j's softmax
    under it): the 140-row, 3-split case of the padding-warpgroup test (splits of 2, 1 and 0 blocks:
    the one-block and empty splits skip the loop), two stages, so the pipeline's ring wraps while V
    is held one block longer; with the ping-pong, one warpgroup, and the lone tile sharing keys."""
    check_prefix("pallas_interpret", jnp.float16, 2, 35, 4, 1, 64, 256, [250, 70], None, block_kv=64, stages=2,
                 num_splits=3, num_wg=num_wg, pingpong=pingpong, lone_share=lone_share, overlap=True)


def test_prefix_interpret_overlap_ring_window():
    """The overlapped loop over a ring that wraps twice under a window (G = 5, the INTERPRET_PREFIX case):
    one split walks each row's two blocks (both masked: the interval's ends), an empty row."""
    check_prefix("pallas_interpret", jnp.float16, 3, 2, 5, 1, 64, 128, [300, 0, 77], 100, block_kv=64, num_splits=1,
                 stages=2, overlap=True)


@slow
@pytest.mark.parametrize("lone_splits", [1, 4])
def test_prefix_interpret_lone_tile_own_splits(lone_splits):
    """The lone tile (second warpgroup idle) at fewer or more splits than the leading tiles: the
    CTAs a tile does not run exit at once, and their unwritten partials get weight 0 in the merge."""
    check_prefix("pallas_interpret", jnp.float16, 2, 35, 4, 1, 64, 256, [250, 70], None, block_kv=64,
                 num_splits=3, num_wg=2, pingpong=True, lone_splits=lone_splits, lone_share=False)


@slow
@pytest.mark.parametrize("kind,T,N,block_k", [("chain", 5, 4, None), ("star", 9, 8, None), ("random", 70, 4, 64)])
def test_tree_interpret_slow(kind, T, N, block_k):
    # block_k=64 with Tk=70: two key blocks, online softmax across them.
    check_tree("pallas_interpret", jnp.bfloat16, 1, T, N, 1, 64, kind, empty_row=T - 1, block_k=block_k)


def test_tree_interpret():
    """One call covers the three tree shapes: batch rows are chain, star, random (G=4, 2 row tiles)."""
    check_tree("pallas_interpret", jnp.float16, 3, 20, 4, 1, 64, ["chain", "star", "random"], empty_row=3)


def test_hybrid_interpret():
    check_hybrid("pallas_interpret", jnp.float16, 1, 4, 4, 1, 64, 128, [77], None, "random")


@slow
@pytest.mark.parametrize("case", [
    (jnp.bfloat16, 2, 2, 5, 1, 64, 256, [300, 1], 100),  # bf16, len 1
    (jnp.bfloat16, 2, 16, 4, 1, 128, 512, [511, 64], None),
    (jnp.float16, 1, 17, 4, 1, 64, 256, [130], 64),  # 68 rows: two row tiles, 2 warpgroups
    (jnp.bfloat16, 1, 35, 4, 1, 64, 256, [200], None),  # 140 rows in 2 x 128: the last warpgroup is all padding
    (jnp.float16, 2, 1, 8, 2, 64, 384, [383, 129], 256),
    (jnp.float16, 1, 2, 8, 1, 64, 256, [256], None),  # full cache, G=8
])
def test_prefix_interpret_slow(case):
    dtype, B, T, N, K, H, S, lengths, window = case
    check_prefix("pallas_interpret", dtype, B, T, N, K, H, S, lengths, window, block_kv=64, num_splits=3)


# ----------------------------------------------------------------------------- xla path (f32, ring)


@pytest.mark.parametrize("window", [None, 5, 11])
def test_xla_prefix_ring_f32(window):
    """The xla path against an explicit token-order gather of the ring buffer, float32."""
    B, T, N, K, H, S = 3, 4, 8, 2, 16, 16
    kq, kk, kv = _keys(7, 3)
    q = _rand(kq, (B, T, N, H), jnp.float32)
    k = _rand(kk, (B, S, K, H), jnp.float32)
    v = _rand(kv, (B, S, K, H), jnp.float32)
    lengths = np.array([0, 9, 37])  # empty, linear, wrapped twice around the ring
    out, lse = api.prefix_attention(q, k, v, jnp.asarray(lengths, jnp.int32), window=window, implementation="xla")
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
    """The blockwise (online-softmax) XLA prefix attention against the dense float32 reference."""
    from pallas_kernels import xla_attention

    dtype, B, T, N, K, H, S, lengths, block = case
    ks = _keys(11, 3)
    q, k, v = _rand(ks[0], (B, T, N, H), dtype), _rand(ks[1], (B, S, K, H), dtype), _rand(ks[2], (B, S, K, H), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = xla_attention.prefix_attention_blockwise(q, k, v, lengths, block=block)
    r_out, r_lse = ref.prefix_attention_ref(q, k, v, lengths)
    _assert_close(out, lse, r_out, r_lse, dtype, f"blockwise {case}")


def test_xla_blockwise_refuses_capacity_without_a_block():
    from pallas_kernels import xla_attention

    q, kv = jnp.ones((1, 200, 4, 16)), jnp.ones((1, 1000, 2, 16))
    with pytest.raises(ValueError, match="not a multiple of a key block"):
        xla_attention.prefix_attention_blockwise(q, kv, kv, jnp.asarray([10], jnp.int32))


def test_xla_prefix_dispatch():
    """The xla path goes blockwise for many query rows over a linear cache only: never with a window
    (the ring's visibility is not a prefix), never for a few rows (decode and short chains), and
    never when no block size divides the capacity; both choices give the reference's result."""
    from pallas_kernels import xla_attention as xa

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
    out, lse = api.prefix_attention(q, k, v, lengths, implementation="xla")
    r_out, r_lse = ref.prefix_attention_ref(q, k, v, lengths)
    _assert_close(out, lse, r_out, r_lse, jnp.float32, "xla dispatch")


@pytest.mark.parametrize("kind", ["chain", "star", "random"])
def test_xla_hybrid_matches_dense_f32(kind):
    B, T, N, K, H, S = 2, 7, 10, 2, 16, 32
    ks = _keys(3, 5)
    q, kc, vc = _rand(ks[0], (B, T, N, H), jnp.float32), _rand(ks[1], (B, S, K, H), jnp.float32), _rand(ks[2], (B, S, K, H), jnp.float32)
    kn, vn = _rand(ks[3], (B, T, K, H), jnp.float32), _rand(ks[4], (B, T, K, H), jnp.float32)
    mask = np.stack([tree_mask(kind, T, b) for b in range(B)])
    mask[1, 2] = False  # an all-masked tree row: the prefix alone must carry it
    lengths = jnp.asarray([0, 45], jnp.int32)  # empty prefix; ring-wrapped prefix
    for window in (None, 20):
        out, lse = api.hybrid_attention(q, kc, vc, lengths, kn, vn, jnp.asarray(mask), window=window, implementation="xla")
        r_out, r_lse = ref.dense_attention_ref(q, kc, vc, lengths, kn, vn, jnp.asarray(mask), window=window)
        _assert_close(out, lse, r_out, r_lse, jnp.float32, f"xla hybrid {kind} W={window}")


# ----------------------------------------------------------------------------- native GPU sweep

GPU_PREFIX = [
    # dtype, B, T, N, K, H, S, lengths, window
    (jnp.bfloat16, 1, 1, 32, 8, 128, 4096, [4000], None),
    (jnp.bfloat16, 3, 6, 32, 8, 128, 2048, [0, 1, 2048], None),
    (jnp.bfloat16, 2, 16, 40, 8, 128, 4096, [1000, 4096], None),  # G=5
    (jnp.float16, 2, 74, 32, 8, 128, 2048, [1537, 333], None),
    (jnp.bfloat16, 1, 69, 40, 8, 128, 8192, [8000], None),
    (jnp.bfloat16, 2, 128, 8, 8, 64, 1024, [700, 1024], None),  # G=1, T=128, H=64
    (jnp.float16, 2, 5, 64, 8, 64, 1024, [1023, 64], 300),  # G=8, window
    (jnp.bfloat16, 2, 9, 32, 8, 128, 1024, [1500, 5000], 200),  # ring wraparound + window
    (jnp.bfloat16, 1, 16, 32, 8, 128, 131072, [777], None),  # huge capacity, short length
]


@gpu
@pytest.mark.parametrize("case", GPU_PREFIX, ids=lambda c: f"{c[0].__name__}-B{c[1]}-T{c[2]}-G{c[3] // c[4]}-S{c[6]}-W{c[8]}")
def test_prefix_gpu(case):
    dtype, B, T, N, K, H, S, lengths, window = case
    check_prefix("pallas", dtype, B, T, N, K, H, S, lengths, window)


@gpu
@pytest.mark.parametrize("case", [
    (jnp.bfloat16, 1, 69, 32, 8, 128, 8192, [8000], None),  # 276 rows: the third CTA's second warpgroup is padding
    (jnp.float16, 2, 74, 32, 8, 128, 2048, [1537, 333], None),
    (jnp.bfloat16, 2, 9, 32, 8, 128, 1024, [1500, 5000], 200),  # 36 rows: warpgroup 1 all padding
])
@pytest.mark.parametrize("pingpong", [False, True])
def test_prefix_gpu_two_warpgroups(case, pingpong):
    dtype, B, T, N, K, H, S, lengths, window = case
    check_prefix("pallas", dtype, B, T, N, K, H, S, lengths, window, num_wg=2, pingpong=pingpong)


@gpu
@pytest.mark.parametrize("case", [
    (jnp.bfloat16, 1, 69, 32, 8, 128, 32768, [32568], None),  # 276 rows: tile 2 is lone
    (jnp.float16, 2, 37, 32, 8, 128, 4096, [4000, 129], None),  # 148 rows: tile 1 is lone
    (jnp.bfloat16, 2, 9, 32, 8, 128, 1024, [1500, 5000], 200),  # 36 rows: the only tile is lone
])
@pytest.mark.parametrize("lone_splits,lone_share,pingpong", [(7, True, True), (3, True, False), (5, False, True)])
def test_prefix_gpu_lone_tile(case, lone_splits, lone_share, pingpong):
    dtype, B, T, N, K, H, S, lengths, window = case
    check_prefix("pallas", dtype, B, T, N, K, H, S, lengths, window, num_wg=2, block_kv=128, num_splits=13,
                 pingpong=pingpong, lone_splits=lone_splits, lone_share=lone_share)


@gpu
@pytest.mark.parametrize("case", [
    (jnp.bfloat16, 1, 69, 32, 8, 128, 32768, [32568], None),  # 276 rows, three row tiles
    (jnp.float16, 2, 37, 32, 8, 128, 4096, [4000, 129], None),  # 148 rows
    (jnp.bfloat16, 2, 9, 32, 8, 128, 1024, [1500, 5000], 200),  # ring wraparound + window, 36 rows
    (jnp.bfloat16, 2, 1, 32, 8, 128, 131072, [777, 131072], None),  # decode rows, one warpgroup
])
@pytest.mark.parametrize("pingpong,lone_share", [(True, False), (False, False), (True, True)])
def test_prefix_gpu_overlap(case, pingpong, lone_share):
    dtype, B, T, N, K, H, S, lengths, window = case
    check_prefix("pallas", dtype, B, T, N, K, H, S, lengths, window, block_kv=128, stages=2, num_splits=13,
                 pingpong=pingpong, lone_share=lone_share, overlap=True)


@gpu
@pytest.mark.parametrize("kind,T,N,K,H,dtype", [
    ("chain", 1, 32, 8, 128, jnp.bfloat16), ("star", 6, 32, 8, 128, jnp.float16),
    ("random", 16, 40, 8, 128, jnp.bfloat16), ("random", 74, 32, 8, 128, jnp.bfloat16),
    ("chain", 128, 8, 8, 64, jnp.float16), ("random", 69, 40, 8, 128, jnp.float16),
])
def test_tree_gpu(kind, T, N, K, H, dtype):
    check_tree("pallas", dtype, 2, T, N, K, H, kind, empty_row=T // 2 if T > 2 else None)


@gpu
@pytest.mark.parametrize("kind,T,N,lengths,window", [
    ("random", 74, 32, [32000, 0], None), ("chain", 16, 40, [5000, 1], None), ("star", 6, 32, [9000, 300], 512),
])
def test_hybrid_gpu(kind, T, N, lengths, window):
    check_hybrid("pallas", jnp.bfloat16, 2, T, N, 8, 128, 32768, lengths, window, kind)


def test_prefix_heuristic_pingpong():
    """The heuristic turns the warpgroup ping-pong on from three 128-row tiles (276 rows at T = 69,
    G = 4), where the H200 sweep measured it faster, and off below; the overlap with two warpgroups."""
    from pallas_kernels import prefix_decode as pd

    assert pd.heuristic_config(69, 4, 8, 1, 32768, 128)[:5] == (2, 128, 2, 11, True)
    assert pd.heuristic_config(37, 4, 8, 1, 32768, 128)[:5] == (2, 128, 2, 17, False)
    assert pd.heuristic_config(16, 4, 8, 1, 32768, 128)[4] is False
    # The intra-warpgroup overlap: on with two compute warpgroups (measured on an H200), off with one.
    assert pd.heuristic_config(69, 4, 8, 1, 32768, 128)[7] is True
    assert pd.heuristic_config(5, 4, 8, 1, 32768, 128)[7] is False


def test_prefix_bad_knobs():
    from pallas_kernels import prefix_decode as pd

    q = jnp.ones((1, 40, 4, 128), jnp.bfloat16)
    kv = jnp.ones((1, 256, 1, 128), jnp.bfloat16)
    lengths = jnp.asarray([100], jnp.int32)
    with pytest.raises(ValueError, match="exceeds shared memory"):
        pd.prefix_attention(q, kv, kv, lengths, num_wg=2, block_kv=128, stages=4, interpret=True)
    with pytest.raises(ValueError, match="1 or 2 compute warpgroups"):
        pd.prefix_attention(q, kv, kv, lengths, num_wg=3, interpret=True)
    with pytest.raises(ValueError, match="lone_splits=0 must be >= 1"):  # 160 rows: the second tile is lone
        pd.prefix_attention(q, kv, kv, lengths, num_wg=2, lone_splits=0, interpret=True)
    with pytest.raises(ValueError, match="overlap=True needs stages >= 2"):
        pd.prefix_attention(q, kv, kv, lengths, num_wg=2, stages=1, overlap=True, interpret=True)
    # Without overlap= the default's overlap gives way to a one-stage pipeline instead of failing.
    jax.eval_shape(lambda: pd.prefix_attention(q, kv, kv, lengths, num_wg=2, stages=1, interpret=True))


def test_tuning_table_lookup(tmp_path):
    """Measured tables are matched by head grouping, then the smallest tuned capacity and row count
    that cover the shape; anything else (other device, grouping, batch, short caches) gets None."""
    import json

    from pallas_kernels import tuning

    kind = "Test GPU 80GB"
    entries = [dict(G=4, K=8, B=1, H=128, T=T, S=S, config=cfg) for T, S, cfg in [
        (16, 32768, [1, 64, 4, 33]), (69, 32768, [2, 128, 2, 11]), (69, 131072, [1, 128, 3, 22]),
        (37, 131072, [2, 128, 2, 20, 1]),  # a five-number entry carries the ping-pong knob
        (37, 65536, [2, 128, 2, 22, 1, 11, 1]),  # seven numbers: the lone tile's knobs too
        (69, 65536, [2, 128, 2, 22, 1, 22, 0, 1])]]  # eight: the intra-warpgroup overlap
    (tmp_path / tuning.device_file_name(kind)).write_text(json.dumps({"entries": entries}))
    look = lambda T, S, **kw: tuning.lookup(T, kw.get("G", 4), 8, kw.get("B", 1), S, 128, device_kind=kind,  # noqa: E731
                                            table_dir=str(tmp_path))
    assert look(69, 32768) == (2, 128, 2, 11, False, 11, False, False)  # four numbers: measured without ping-pong
    assert look(37, 20480) == (2, 128, 2, 11, False, 11, False, False)  # rows 148 -> the 276-row entry of the 32k table
    assert look(37, 33536) == (2, 128, 2, 22, True, 11, True, False)  # capacity above 32k -> the 64k table
    assert look(37, 65536 + 128) == (2, 128, 2, 20, True, 20, False, False)  # five numbers: lone tile as before
    assert look(69, 65536) == (2, 128, 2, 22, True, 22, False, True)  # eight numbers: the overlap on
    assert look(5, 33536) is None                     # 20 rows: no one-warpgroup entry in that table
    assert look(1, 32768) == (1, 64, 4, 33, False, 33, False, False)
    assert look(69, 1 << 20) == (1, 128, 3, 22, False, 22, False, False)  # beyond every tuned capacity: the largest rows
    assert look(69, 4096 + 64) is None           # 4160 % 128 != 0: the table's block does not tile it
    assert look(1, 32768)[3] <= 32768 // 64
    assert look(69, 2048) is None                # below MIN_TUNED_CAPACITY
    assert look(1, 131072) is None               # the 128k sweep has no entry of <= 64 rows: the heuristic
    assert look(69, 32768, G=5) is None and look(69, 32768, B=2) is None
    assert tuning.lookup(69, 4, 8, 1, 32768, 128, device_kind="Other GPU", table_dir=str(tmp_path)) is None
