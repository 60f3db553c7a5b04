"""The LongSpec draft block: tree step vs a dense float32 reference, ring buffer invariances,
training forward (window + noisy lag) vs a per-query reference, and train/inference agreement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longspec_jax import init
from longspec_jax.configs import DraftConfig, tiny_config
from longspec_jax.draft import DraftCache, ring_capacity
from longspec_jax.tree import TreeShape, expand, init_tree

# float32 everywhere, matmul precision "highest" (conftest): reference vs module differ only by
# summation order.
ATOL = {
    "block": 2e-5,
    "train": 2e-5,
    # Two ring sizes: same maths, but the float32 softmax sums run over different (masked) key
    # counts, so they round differently in the last bits (1.3e-6 seen); relative and absolute.
    "ring_sizes": 1e-5,
}

W = 6  # small window so the ring wraps in short tests


def _models(seed=0, window=W):
    cfg = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8)
    target = init.random_target(cfg, seed=seed)
    # Larger random weights than the usual 0.02 so attention patterns are not uniform.
    draft = init.random_draft(DraftConfig.from_target(cfg, intermediate_size=40, window=window), cfg.rope,
                              seed=seed + 100, std=0.2)
    return cfg, target, draft


def _np(p):
    return np.asarray(p.value, np.float64)


def _ref_block(draft, cfg, x, pos, self_keys, cross_k, cross_v):
    """Dense float64 reference of one draft query.

    x [D] embedding at position pos; self_keys: list of (embedding [D], position) the query sees
    (itself included); cross_k/v [S, K, H] the target keys/values it sees.
    """
    dc = draft.cfg
    N, K, H = dc.num_heads, dc.num_kv_heads, dc.head_dim
    G = N // K
    eps = dc.rms_norm_eps

    def norm(v, w):
        return v / np.sqrt(np.mean(v * v) + eps) * w

    def rope(v, p):  # v [heads, H]; default-kind RoPE in float64 (tiny_config uses theta only)
        assert cfg.rope.kind == "default"
        inv = 1.0 / cfg.rope.theta ** (np.arange(0, H, 2) / H)
        ang = np.concatenate([p * inv, p * inv])
        cos, sin = np.cos(ang), np.sin(ang)
        rot = np.concatenate([-v[:, H // 2:], v[:, :H // 2]], axis=-1)
        return v * cos + rot * sin

    def attend(q, ks, vs):  # q [N, H], ks/vs [S, K, H]
        out = np.zeros((N, H))
        for n in range(N):
            s = ks[:, n // G] @ q[n] / np.sqrt(H)
            p = np.exp(s - s.max())
            out[n] = (p / p.sum()) @ vs[:, n // G]
        return out

    sa, ca = draft.self_attn, draft.cross_attn
    w_in = _np(draft.input_layernorm.scale)
    xn = norm(x, w_in)
    q = rope(np.einsum("d,dnh->nh", xn, _np(sa.q_kernel)) + _np(sa.q_bias), pos)
    ks, vs = [], []
    for e, p in self_keys:
        en = norm(e, w_in)
        ks.append(rope(np.einsum("d,dkh->kh", en, _np(sa.k_kernel)) + _np(sa.k_bias), p))
        vs.append(np.einsum("d,dkh->kh", en, _np(sa.v_kernel)) + _np(sa.v_bias))
    h = x + np.einsum("nh,nhd->d", attend(q, np.stack(ks), np.stack(vs)), _np(sa.o_kernel))
    hn = norm(h, _np(draft.post_self_attention_layernorm.scale))
    q = rope(np.einsum("d,dnh->nh", hn, _np(ca.q_kernel)) + _np(ca.q_bias), pos)
    if len(cross_k):
        h = h + np.einsum("nh,nhd->d", attend(q, cross_k, cross_v), _np(ca.o_kernel))
    hn = norm(h, _np(draft.post_cross_attention_layernorm.scale))
    m = draft.mlp
    g = hn @ _np(m.gate_kernel)
    u = hn @ _np(m.up_kernel)
    return h + (g / (1 + np.exp(-g)) * u) @ _np(m.down_kernel)


def _draft_tree(target, draft, ring, c, tree_shape, k_last, v_last, root_tokens, seed):
    """Run every draft level like the decoder does (one jit), with random beam choices."""
    B = root_tokens.shape[0]
    rng = np.random.default_rng(seed)
    logqs = [jax.nn.log_softmax(jnp.asarray(rng.normal(size=(B, n, 64)), jnp.float32), -1)
             for n in tree_shape.level_sizes[:-1]]
    t_graph, t_state = nnx.split(target)
    d_graph, d_state = nnx.split(draft)

    @jax.jit
    def run(t_state, d_state, ring, c, k_last, v_last, root_tokens, logqs):
        tgt, drf = nnx.merge(t_graph, t_state), nnx.merge(d_graph, d_state)
        tree = init_tree(tree_shape, root_tokens)
        positions = tree.positions(tree_shape, c)
        K, H = drf.cfg.num_kv_heads, drf.cfg.head_dim
        tk = jnp.zeros((B, tree_shape.num_nodes, K, H), jnp.float32)
        tv = jnp.zeros_like(tk)
        outs = []
        for level in range(tree_shape.depth):
            o, n = tree_shape.offsets[level], tree_shape.level_sizes[level]
            h, tk, tv = drf.tree_step(tgt.embed(tree.tokens[:, o:o + n]), positions[:, o:o + n], ring, c, tk, tv,
                                      o, tree.mask[:, o:o + n], k_last, v_last, c)
            outs.append(h)
            tree = expand(tree, tree_shape, level, logqs[level])
        return tree, positions, outs

    return run(t_state, d_state, ring, c, k_last, v_last, root_tokens, logqs)


@pytest.mark.parametrize("committed", [[3, 5], [20, 37]])  # short, and long enough for the ring to wrap
def test_tree_step_matches_dense_reference(committed):
    cfg, target, draft = _models()
    shape = TreeShape((2, 3, 2))
    B, S = 2, 64
    rng = np.random.default_rng(0)
    c = jnp.asarray(committed, jnp.int32)
    hist = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 48)), jnp.int32)  # tokens at positions 0..47
    R = ring_capacity(W, shape.max_accept, multiple=8)  # 16 slots: the ring wraps below
    # Ring = what the decoder holds: committed tokens written one block at a time (wrapping).
    ring = DraftCache.init(draft.cfg, B, R, jnp.float32)
    x_hist = target.embed(hist)
    k_hist, v_hist = draft.self_kv(x_hist, jnp.broadcast_to(jnp.arange(48), (B, 48)))
    for start in range(0, 48, 4):
        pos = jnp.broadcast_to(jnp.arange(start, start + 4), (B, 4))
        ring = ring.write(k_hist[:, start:start + 4], v_hist[:, start:start + 4], pos, pos < c[:, None])
    k_last = jax.random.normal(jax.random.key(1), (B, S, cfg.num_kv_heads, cfg.head_dim))
    v_last = jax.random.normal(jax.random.key(2), (B, S, cfg.num_kv_heads, cfg.head_dim))
    roots = hist[jnp.arange(B), c]
    tree, positions, outs = _draft_tree(target, draft, ring, c, shape, k_last, v_last, roots, seed=3)
    x_tree = np.asarray(target.embed(tree.tokens), np.float64)
    for b in range(B):
        cb = int(c[b])
        committed_keys = [(np.asarray(x_hist[b, p], np.float64), p) for p in range(max(0, cb - W), cb)]
        for level in range(shape.depth):
            o, n = shape.offsets[level], shape.level_sizes[level]
            for i in range(n):
                u = o + i
                anc = np.nonzero(np.asarray(tree.mask[b, u]))[0]
                keys = committed_keys + [(x_tree[b, a], int(positions[b, a])) for a in anc]
                ref = _ref_block(draft, cfg, x_tree[b, u], int(positions[b, u]), keys,
                                 np.asarray(k_last[b, :cb], np.float64), np.asarray(v_last[b, :cb], np.float64))
                np.testing.assert_allclose(np.asarray(outs[level][b, i]), ref, atol=ATOL["block"], rtol=1e-4)


def test_ring_capacity_does_not_change_results_and_is_context_independent():
    cfg, target, draft = _models(seed=1)
    shape = TreeShape((3, 2))
    B = 1
    rng = np.random.default_rng(1)
    hist = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 40)), jnp.int32)
    c = jnp.array([33], jnp.int32)
    k_last = jax.random.normal(jax.random.key(3), (B, 48, cfg.num_kv_heads, cfg.head_dim))
    pos = jnp.broadcast_to(jnp.arange(40), (B, 40))
    outs = []
    for R in (ring_capacity(W, shape.max_accept, multiple=8), ring_capacity(W, shape.max_accept)):
        # init_ring takes the last R prompt tokens, exactly as the decoder's prefill does
        tail = pos[:, int(c[0]) - R:int(c[0])] if int(c[0]) >= R else pos[:, :int(c[0])]
        ring = draft.init_ring(target.embed(jnp.take_along_axis(hist, tail, 1)), tail, tail >= 0, R, jnp.float32)
        outs.append(_draft_tree(target, draft, ring, c, shape, k_last, k_last, hist[:, 33], seed=0)[2])
    for a, b in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL["ring_sizes"], rtol=ATOL["ring_sizes"])
    # The ring's shape depends on window and tree only, never on the context length.
    small = jax.eval_shape(lambda: DraftCache.init(draft.cfg, 2, ring_capacity(512, 6)))
    assert small.k.shape == (2, 640, cfg.num_kv_heads, cfg.head_dim)
    with pytest.raises(ValueError, match="must exceed the window"):
        DraftCache.init(draft.cfg, 1, W)


def test_forward_train_matches_reference_and_lag_is_runtime():
    cfg, target, draft = _models(seed=2)
    B, T = 2, 14
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    # anchor-offset style positions: a jump after 2 anchors (windows are by index, not position)
    positions = jnp.asarray(np.concatenate([np.arange(2), np.arange(2, T) + 100])[None].repeat(B, 0), jnp.int32)
    _, (k_last, v_last) = target.forward_train(tokens, positions)
    fwd = jax.jit(lambda t, p, k, v, lag: draft.forward_train(t, p, k, v, lag, embed=target.embed))
    x = np.asarray(target.embed(tokens), np.float64)
    for lag in (1, 3):
        h = np.asarray(fwd(tokens, positions, k_last, v_last, jnp.int32(lag)))
        for b in range(B):
            for i in range(T):
                keys = [(x[b, s], int(positions[b, s])) for s in range(max(0, i - W), i + 1)]
                n_cross = max(0, i - lag + 1)
                ref = _ref_block(draft, cfg, x[b, i], int(positions[b, i]), keys,
                                 np.asarray(k_last[b, :n_cross], np.float64),
                                 np.asarray(v_last[b, :n_cross], np.float64))
                np.testing.assert_allclose(h[b, i], ref, atol=ATOL["train"], rtol=1e-4)
    assert fwd._cache_size() == 1  # the lag is a run-time value: one compile for every lag


def test_root_step_equals_training_forward_at_lag_1():
    """The inference root query sees the last W committed tokens + itself and the target cache
    [0, c): exactly the training visibility at lag 1 (so trained drafts see what they learned)."""
    cfg, target, draft = _models(seed=3)
    B, c = 1, 17
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, c + 1)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(c + 1), (B, c + 1))
    _, (k_last, v_last) = target.forward_train(tokens, pos)
    h_train = draft.forward_train(tokens, pos, k_last, v_last, 1, embed=target.embed)[:, c]
    R = ring_capacity(W, 2, multiple=8)
    tail = pos[:, c - R:c] if c >= R else pos[:, :c]
    ring = draft.init_ring(target.embed(jnp.take_along_axis(tokens, tail, 1)), tail, tail >= 0, R, jnp.float32)
    shape = TreeShape((1,))
    cc = jnp.array([c], jnp.int32)
    # the target cache holds the committed tokens [0, c) (slots beyond are never read)
    pad = ((0, 0), (0, 8), (0, 0), (0, 0))
    tree, _, outs = _draft_tree(target, draft, ring, cc, shape, jnp.pad(k_last[:, :c], pad),
                                jnp.pad(v_last[:, :c], pad), tokens[:, c], seed=0)
    np.testing.assert_allclose(np.asarray(outs[0][:, 0]), np.asarray(h_train), atol=ATOL["block"], rtol=1e-4)


def test_draft_state_holds_only_the_block():
    cfg, target, draft = _models()
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(draft, nnx.Param))}
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert "cross_attn/q_kernel" in names and not any("cross_attn/k_" in n for n in names)
