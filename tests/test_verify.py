"""Lossless acceptance ("sample from the target, then match a child") against a NumPy walker."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longspec_jax import verify
from longspec_jax.sampling import RowSampling, SamplingParams
from longspec_jax.tree import TreeShape, expand, init_tree


def _random_tree(shape, V, B, seed):
    rng = np.random.default_rng(seed)
    tree = init_tree(shape, jnp.asarray(rng.integers(0, V, B), jnp.int32))
    for level in range(shape.depth):
        logits = rng.normal(size=(B, shape.level_sizes[level], V)).astype(np.float32)
        tree = expand(tree, shape, level, jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    return tree


def _walk(tokens, parents, choices):
    """Reference: emit choices[u]; move to the child of u whose token equals it; else stop."""
    u, path, out = 0, [0], []
    while True:
        out.append(int(choices[u]))
        kids = [c for c in range(1, len(tokens)) if parents[c] == u and tokens[c] == choices[u]]
        assert len(kids) <= 1
        if not kids:
            return len(path) - 1, path, out
        u = kids[0]
        path.append(u)


@pytest.mark.parametrize("widths", [(1, 1, 1, 1), (3, 4, 2), (4, 16, 16, 16, 16)])
def test_accept_matches_walker(widths):
    shape = TreeShape(widths)
    V, B = 6, 64
    tree = _random_tree(shape, V, B, seed=len(widths))
    rng = np.random.default_rng(1)
    tokens, parents = np.asarray(tree.tokens), np.asarray(tree.parents)
    # Choices that follow some child with probability 0.8, so deep paths occur.
    choices = rng.integers(0, V, (B, shape.num_nodes))
    for b in range(B):
        for u in range(shape.num_nodes):
            kids = [c for c in range(1, shape.num_nodes) if parents[b, c] == u]
            if kids and rng.random() < 0.8:
                choices[b, u] = tokens[b, kids[rng.integers(len(kids))]]
    acc = verify.accept(tree, shape, jnp.asarray(choices, jnp.int32))
    depths_seen = set()
    for b in range(B):
        k, path, out = _walk(tokens[b], parents[b], choices[b])
        depths_seen.add(k)
        assert int(acc.num_accepted[b]) == k
        assert np.asarray(acc.path[b, : k + 1]).tolist() == path
        assert np.asarray(acc.tokens[b, : k + 1]).tolist() == out
        # accepted draft tokens are the path's tokens; the last is the bonus
        assert out[:k] == [int(tokens[b, u]) for u in path[1:]]
    assert 0 in depths_seen and max(depths_seen) >= min(2, shape.depth)


def test_greedy_choices_are_argmax_and_sampled_choices_independent():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 9))
    np.testing.assert_array_equal(verify.target_choices(None, logits, SamplingParams()),
                                  jnp.argmax(logits, -1))
    # identical rows must still get independent draws at T > 0
    same = jnp.zeros((1, 400, 9))
    draws = np.asarray(verify.target_choices(jax.random.key(1), same, SamplingParams(temperature=1.0)))
    assert len(set(draws[0].tolist())) == 9


def test_filtered_tokens_never_chosen():
    logits = jax.random.normal(jax.random.key(2), (4, 7, 50)) * 3
    params = SamplingParams(temperature=0.8, top_k=3)
    ch = np.asarray(verify.target_choices(jax.random.key(3), logits, params))
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    assert all(ch[b, u] in top3[b, u] for b in range(4) for u in range(7))


# ------------------------------------------------------------------------------------------------
# Chains at T > 0 with sampled drafts: speculative sampling (min(1, p/q), residual draw)


def _chain(tokens, V):
    """A chain Tree whose node d (d >= 1) carries tokens[:, d] (built with the beam step on one-hot scores)."""
    B, Nn = tokens.shape
    shape = TreeShape((1,) * (Nn - 1))
    tree = init_tree(shape, tokens[:, 0])
    for level in range(shape.depth):
        onehot = jnp.where(jnp.arange(V)[None, None, :] == tokens[:, level + 1, None, None], 0.0, -jnp.inf)
        tree = expand(tree, shape, level, onehot)
    return tree, shape


def _chi2(counts, probs):
    from scipy import stats

    counts, probs = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel()
    keep = probs * counts.sum() >= 5
    exp = probs[keep] * counts.sum()
    obs = counts[keep]
    obs = np.append(obs, counts.sum() - obs.sum())
    exp = np.append(exp, counts.sum() - exp.sum())
    ok = exp > 0
    return stats.chi2.sf(np.sum((obs[ok] - exp[ok]) ** 2 / exp[ok]), ok.sum() - 1)


def test_sampled_chain_two_tokens_follow_the_target():
    """Exact joint law of the first two emitted tokens, residual draws and bonus tokens included:
    a one-draft chain at prefix (), then, for rows that emitted only one token, a second iteration
    at prefix (y1,). Target conditionals P0, P1[y1], P2[y1, y2] and draft q's are random."""
    V, n = 8, 40000
    rng = np.random.default_rng(0)
    P0, P1, P2 = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V), V), rng.dirichlet(np.ones(V), (V, V))
    Q1 = rng.dirichlet(np.ones(V))
    Q1[3] = 0.0  # the draft never proposes token 3: only the residual can emit it
    Q1 /= Q1.sum()
    Q2 = rng.dirichlet(np.ones(V), V)
    params = SamplingParams(temperature=1.0)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)

    def one_iteration(key_draft, key_acc, prefix_p, next_p, q):
        x = jax.random.categorical(key_draft, jnp.log(q), axis=-1).astype(jnp.int32)  # [n]
        tree, shape = _chain(jnp.stack([jnp.zeros_like(x), x], axis=1), V)
        logits = jnp.log(jnp.stack([prefix_p, next_p(x)], axis=1))
        acc = verify.accept_sampled_chain(key_acc, tree, shape, logits, q[:, None, :], params)
        return np.asarray(acc.num_accepted), np.asarray(acc.tokens)

    q1 = jnp.broadcast_to(jnp.asarray(Q1, jnp.float32), (n, V))
    k, toks = one_iteration(k1, k2, jnp.broadcast_to(jnp.asarray(P0, jnp.float32), (n, V)),
                            lambda x: jnp.asarray(P1, jnp.float32)[x], q1)
    y1 = toks[:, 0]
    y2 = toks[:, 1].copy()
    again = k == 0  # one token emitted: the next iteration starts at prefix (y1,)
    k_, toks_ = one_iteration(k3, k4, jnp.asarray(P1, jnp.float32)[y1], lambda x: jnp.asarray(P2, jnp.float32)[y1, x],
                              jnp.asarray(Q2, jnp.float32)[y1])
    y2[again] = toks_[again, 0]
    assert 0.2 < k.mean() < 0.95  # both branches exercised
    counts = np.zeros((V, V))
    np.add.at(counts, (y1, y2), 1)
    assert _chi2(counts, P0[:, None] * P1) > 1e-3
    assert counts[3].sum() > 0  # token 3 reached through the residual


def test_sampled_chain_refuses_trees():
    tree_shape = TreeShape((2, 2))
    tree = init_tree(tree_shape, jnp.zeros((1,), jnp.int32))
    logits, q = jnp.zeros((1, 5, 8)), jnp.full((1, 2, 8), 1 / 8)
    with pytest.raises(ValueError, match="chain"):
        verify.accept_sampled_chain(jax.random.key(0), tree, tree_shape, logits, q, SamplingParams(temperature=1.0))


def test_sampled_chain_is_greedy_acceptance_for_greedy_rows():
    """Rows at temperature 0 in a sampled chain (a mixed serving batch): with one-hot q (the draft's
    argmax) the rule accepts exactly the drafts that equal the target's argmax and emits the
    target's argmax after them, like `accept` with greedy choices, whatever the keys."""
    V, B, D = 11, 64, 3
    rng = np.random.default_rng(1)
    target_logits = jnp.asarray(rng.normal(size=(B, D + 1, V)), jnp.float32)
    argmax = np.asarray(target_logits).argmax(-1)  # [B, D + 1]
    # drafts: the target's argmax at the previous node, corrupted at a random depth per row
    drafts = argmax[:, :D].copy()
    cut = rng.integers(0, D + 1, B)
    for b in range(B):
        if cut[b] < D:
            drafts[b, cut[b]] = (drafts[b, cut[b]] + 1) % V
    tokens = jnp.asarray(np.concatenate([np.zeros((B, 1), np.int64), drafts], axis=1), jnp.int32)
    tree, shape = _chain(tokens, V)
    q = jax.nn.one_hot(tokens[:, 1:], V)  # [B, D, V]
    rows = RowSampling.rows([SamplingParams(), SamplingParams(temperature=1.0)] * (B // 2), B)
    keys = jax.random.split(jax.random.key(5), B)
    acc = verify.accept_sampled_chain(keys, tree, shape, target_logits, q, rows)
    want = verify.accept(tree, shape, verify.target_choices(None, target_logits, SamplingParams()))
    greedy_rows = np.arange(B) % 2 == 0
    k = np.asarray(acc.num_accepted)
    np.testing.assert_array_equal(k[greedy_rows], np.asarray(want.num_accepted)[greedy_rows])
    np.testing.assert_array_equal(k[greedy_rows], np.minimum(cut, D)[greedy_rows])
    for b in np.flatnonzero(greedy_rows):
        np.testing.assert_array_equal(np.asarray(acc.tokens)[b, :k[b] + 1], np.asarray(want.tokens)[b, :k[b] + 1])
