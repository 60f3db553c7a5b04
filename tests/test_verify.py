"""Lossless acceptance: sample-and-match against a NumPy walker; rejection sampling of sampled
trees (token-wise and block) by the exact law of one verification step, every draft outcome
enumerated, and by sampling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longspec_jax import sampled_tree, verify
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
# Sampled drafts at T > 0: rejection sampling (token-wise: min(1, p/q) and residual draws; block)


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


@pytest.mark.parametrize("block", [False, True], ids=["token", "block"])
def test_sampled_chain_two_tokens_follow_the_target(block):
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
        acc = verify.accept_sampled(key_acc, tree, shape, logits, q[:, None, :], params, block=block)
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


@pytest.mark.parametrize("block", [False, True], ids=["token", "block"])
def test_sampled_chain_is_greedy_acceptance_for_greedy_rows(block):
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
    acc = verify.accept_sampled(keys, tree, shape, target_logits, q, rows, block=block)
    want = verify.accept(tree, shape, verify.target_choices(None, target_logits, SamplingParams()))
    greedy_rows = np.arange(B) % 2 == 0
    k = np.asarray(acc.num_accepted)
    np.testing.assert_array_equal(k[greedy_rows], np.asarray(want.num_accepted)[greedy_rows])
    np.testing.assert_array_equal(k[greedy_rows], np.minimum(cut, D)[greedy_rows])
    for b in np.flatnonzero(greedy_rows):
        np.testing.assert_array_equal(np.asarray(acc.tokens)[b, :k[b] + 1], np.asarray(want.tokens)[b, :k[b] + 1])


# ------------------------------------------------------------------------------------------------
# Sampled trees: the exact law of one verification step, every draft outcome enumerated


def _laws(rng, V, depth, zero_frac):
    """A random next-token law for every prefix of up to `depth` tokens ({prefix: float64 [V]});
    with zero_frac, entries dropped at random (as top-k / top-p filtering does), one always kept."""
    laws = {}
    for n in range(depth + 1):
        for prefix in itertools.product(range(V), repeat=n):
            law = rng.dirichlet(np.full(V, 0.7))
            drop = rng.random(V) < zero_frac
            drop[rng.integers(V)] = False
            laws[prefix] = np.where(drop, 0.0, law) / np.where(drop, 0.0, law).sum()
    return laws


def _drafts(shape, Q):
    """Every way the sampled tree of `shape` can be drawn (children of each node without replacement
    from Q[its path], in draw order; children past Q's support are not drawn):
    yields (tokens [Nn], drawn bool [Nn], paths [Nn] of token tuples, probability)."""
    topo = sampled_tree.topology(shape)
    kids = [[] for _ in range(shape.num_nodes)]
    for d, table in enumerate(topo.children):
        for i, row in enumerate(table):
            kids[shape.offsets[d] + i] = [int(c) for c in row if c >= 0]
    Nn = shape.num_nodes

    def rec(u, tokens, drawn, paths, prob):
        if u == Nn:
            yield list(tokens), list(drawn), list(paths), prob
            return
        q = Q[paths[u]] if drawn[u] else None
        m = len(kids[u]) if drawn[u] else 0
        n = min(m, int(np.count_nonzero(q))) if m else 0
        for seq in itertools.permutations(np.flatnonzero(q) if m else [], n):
            pr, used = prob, 0.0
            t, dr, pa = list(tokens), list(drawn), list(paths)
            for c, x in zip(kids[u], seq):
                pr *= q[x] / (1.0 - used)
                used += q[x]
                t[c], pa[c] = int(x), paths[u] + (int(x),)
            for c in kids[u][n:]:  # q's support is exhausted: these children are never drawn
                dr[c] = False
            yield from rec(u + 1, t, dr, pa, pr)

    yield from rec(0, [0] * Nn, [True] * Nn, [()] + [None] * (Nn - 1), 1.0)


def _step_law(shape, w, demand, block):
    """{emitted tokens: probability} of one verification step of one drawn tree, from the node
    weights and demands of `verify.sampled_weights` combined by `accept_sampled`'s decision rule
    (token-wise: each child's own coin w; block: a subtree is taken with probability T(u) =
    1 - prod(1 - T(children)) * (1 - |demand(u)|); the path follows first taken children)."""
    topo = sampled_tree.topology(shape)
    Nn = shape.num_nodes
    kids = [[] for _ in range(Nn)]
    for d, table in enumerate(topo.children):
        for i, row in enumerate(table):
            kids[shape.offsets[d] + i] = [int(c) for c in row if c >= 0]
    mass = demand.sum(-1)
    taken = np.zeros(Nn)
    for u in reversed(range(Nn)):
        taken[u] = 1 - np.prod([1 - taken[c] for c in kids[u]]) * (1 - mass[u])
    refuse = (lambda c: 1 - taken[c]) if block else (lambda c: 1 - w[c])
    out = {}

    def walk(u, emitted, prob):
        end = prob * np.prod([refuse(c) for c in kids[u]]) * (mass[u] if block and u else 1.0)
        for y in np.flatnonzero(demand[u] > 0):
            out[emitted + (int(y),)] = out.get(emitted + (int(y),), 0.0) + end * demand[u, y] / mass[u]
        before = 1.0
        for c in kids[u]:
            walk(c, emitted + (c,), prob * before * (1.0 if block else w[c]))
            before *= refuse(c)

    walk(0, (), 1.0)
    return out


def _verification_law(shape, P, Q, V, block):
    """The exact law of (one verification step, then the target) over V^(D+1), and the expected
    number of accepted drafts, every draft outcome of the sampled tree enumerated."""
    G = shape.max_accept
    outcomes = list(_drafts(shape, Q))
    B, inner = len(outcomes), shape.num_nodes - shape.widths[-1]
    tokens = np.array([o[0] for o in outcomes], np.int32)
    drawn = np.array([o[1] for o in outcomes])
    p = np.array([[P[pa] if pa is not None else np.full(V, 1 / V) for pa in o[2]] for o in outcomes], np.float32)
    q = np.array([[Q[pa] if pa is not None else np.full(V, 1 / V) for pa in o[2][:inner]] for o in outcomes], np.float32)
    tree = sampled_tree.init_tree(shape, jnp.asarray(tokens[:, 0])).replace(
        tokens=jnp.asarray(tokens), scores=jnp.where(jnp.asarray(drawn), 0.0, -jnp.inf))
    w, demand = jax.device_get(verify.sampled_weights(tree, shape, jnp.asarray(p), jnp.asarray(q),
                                                      jnp.zeros((B,), bool), block))
    target = np.zeros((V,) * G)
    for seq in itertools.product(range(V), repeat=G):
        target[seq] = np.prod([P[seq[:i]][seq[i]] for i in range(G)])
    law, accepted = np.zeros_like(target), 0.0
    for b, (toks, _, paths, prob) in enumerate(outcomes):
        for emitted, pr in _step_law(shape, w[b].astype(np.float64), demand[b].astype(np.float64), block).items():
            seq = tuple(toks[u] for u in emitted[:-1]) + emitted[-1:]  # node ids -> tokens, then the bonus
            accepted += prob * pr * (len(seq) - 1)
            prefix = np.prod([P[seq[:i]][seq[i]] for i in range(len(seq))])
            assert prefix > 0 or pr < 1e-6, f"emitted {seq}, impossible under the target"
            if prefix > 0:  # then the target continues: target[seq, ...] / P(seq) is its law
                law[seq] += prob * pr * target[seq] / prefix
    return law, target, accepted


@pytest.mark.parametrize("widths,V", [((1, 1, 1), 4), ((2, 2), 5), pytest.param((3, 2), 5, marks=pytest.mark.slow),
                                      pytest.param((2, 2, 2), 3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("block", [False, True], ids=["token", "block"])
def test_sampled_verification_law_is_the_targets(widths, V, block):
    """One verification step of a sampled tree, then the target: the law of the first D + 1
    tokens equals the target's to 1e-6, with target and draft laws that drop tokens (top-k /
    top-p), so children past the draft's support and residuals onto tokens q lacks occur."""
    shape = TreeShape(widths)
    rng = np.random.default_rng(len(widths) + V)
    for zero_frac in (0.0, 0.4):
        P, Q = _laws(rng, V, shape.depth, zero_frac), _laws(rng, V, shape.depth, zero_frac)
        law, target, accepted = _verification_law(shape, P, Q, V, block)
        np.testing.assert_allclose(law, target, atol=1e-6, rtol=0)
        assert accepted > 0.2


@pytest.mark.parametrize("widths,V", [((1, 1, 1), 4), pytest.param((1, 1, 1, 1), 3, marks=pytest.mark.slow),
                                      pytest.param((2, 2), 5, marks=pytest.mark.slow)])
def test_block_verification_accepts_at_least_token_wise(widths, V):
    """Expected accepted drafts, exact over every draft outcome, on random (p, q) pairs: block >=
    token-wise (a theorem on chains, Sun et al. 2024), strictly more on some."""
    shape = TreeShape(widths)
    rng = np.random.default_rng(7)
    gains = []
    for trial in range(4):
        P, Q = _laws(rng, V, shape.depth, 0.3 * (trial % 2)), _laws(rng, V, shape.depth, 0.3 * (trial % 2))
        token = _verification_law(shape, P, Q, V, block=False)[2]
        block = _verification_law(shape, P, Q, V, block=True)[2]
        gains.append(block - token)
    assert min(gains) >= -1e-6 and max(gains) > 1e-3, gains


@pytest.mark.parametrize("block", [False, True], ids=["token", "block"])
def test_sampled_tree_greedy_rows_match_the_targets_argmax(block):
    """Rows at temperature 0 beside sampled rows on a sampled tree: whatever the keys, they emit
    exactly what walking the tree along the target's argmax emits (sample-and-match, greedy)."""
    V, B = 7, 64
    shape = TreeShape((2, 3, 2))
    topo = sampled_tree.topology(shape)
    rng = np.random.default_rng(3)
    tokens = np.zeros((B, shape.num_nodes), np.int64)
    argmax_child = np.zeros((B, shape.num_nodes), np.int64)  # the target's argmax at every node
    for b in range(B):
        for d, table in enumerate(topo.children):
            for i, row in enumerate(table):
                kids = row[row >= 0]
                tokens[b, kids] = rng.choice(V, len(kids), replace=False)
                u = shape.offsets[d] + i
                # follow some child most of the time, so that deep paths occur
                argmax_child[b, u] = tokens[b, rng.choice(kids)] if len(kids) and rng.random() < 0.8 else rng.integers(V)
        argmax_child[b, shape.offsets[-1]:] = rng.integers(V, size=shape.widths[-1])
    logits = rng.normal(size=(B, shape.num_nodes, V))
    np.put_along_axis(logits, argmax_child[:, :, None], 10.0, axis=-1)
    tree = sampled_tree.init_tree(shape, jnp.asarray(tokens[:, 0], jnp.int32)).replace(
        tokens=jnp.asarray(tokens, jnp.int32), scores=jnp.zeros((B, shape.num_nodes)))
    q = jnp.asarray(rng.dirichlet(np.ones(V), (B, shape.num_nodes - shape.widths[-1])), jnp.float32)
    rows = RowSampling.rows([SamplingParams(), SamplingParams(temperature=1.0)] * (B // 2), B)
    logits = jnp.asarray(logits, jnp.float32)
    want = verify.accept(tree, shape, verify.target_choices(None, logits, SamplingParams()))
    greedy_rows = np.flatnonzero(np.arange(B) % 2 == 0)
    for seed in range(3):
        acc = verify.accept_sampled(jax.random.split(jax.random.key(seed), B), tree, shape, logits, q, rows,
                                    block=block)
        k = np.asarray(acc.num_accepted)
        np.testing.assert_array_equal(k[greedy_rows], np.asarray(want.num_accepted)[greedy_rows])
        for b in greedy_rows:
            np.testing.assert_array_equal(np.asarray(acc.path)[b], np.asarray(want.path)[b])
            np.testing.assert_array_equal(np.asarray(acc.tokens)[b, :k[b] + 1], np.asarray(want.tokens)[b, :k[b] + 1])
    assert np.asarray(want.num_accepted)[greedy_rows].max() == shape.depth
