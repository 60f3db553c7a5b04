"""Sampled draft trees: the static topology, and children that are draws of the processed draft
distribution without replacement (what `verify.accept_sampled`'s exactness rests on)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from longspec_jax import sampled_tree
from longspec_jax.sampling import RowSampling, SamplingParams, process_logits
from longspec_jax.tree import TreeShape


@pytest.mark.parametrize("widths", [(1, 1, 1, 1, 1), (2, 2, 2), (3, 2), (2, 4, 4, 4, 4), (4, 16, 16, 16, 16)])
def test_topology_is_breadth_first_with_first_children_deepest(widths):
    shape = TreeShape(widths)
    topo = sampled_tree.topology(shape)
    depths = shape.node_depths
    parents = topo.parents
    assert parents.shape == (shape.num_nodes,) and parents[0] == 0
    assert all(depths[parents[u]] == depths[u] - 1 for u in range(1, shape.num_nodes))
    for d, table in enumerate(topo.children):
        o, n = shape.offsets[d], shape.level_sizes[d]
        assert table.shape[0] == n and np.count_nonzero(table >= 0) == widths[d]
        kids = table[table >= 0]
        assert kids.tolist() == list(range(shape.offsets[d + 1], shape.offsets[d + 1] + widths[d]))  # contiguous
        for i, row in enumerate(table):
            assert all(parents[c] == o + i for c in row if c >= 0)
            assert np.all(np.diff((row >= 0).astype(int)) <= 0)  # a prefix of draw slots is used
    mask = topo.mask
    for u in range(shape.num_nodes):  # mask = ancestors and self
        anc, v = {u}, u
        while v:
            v = int(parents[v])
            anc.add(v)
        assert set(np.flatnonzero(mask[u]).tolist()) == anc
    size = mask.sum(axis=0)  # subtree sizes: a family's earlier-drawn children never get less below them
    for table in topo.children:
        for row in table:
            kids = row[row >= 0]
            assert np.all(np.diff(size[kids]) <= 0), (widths, kids, size[kids])
    if shape.is_chain:
        assert parents.tolist() == [0] + list(range(shape.depth))


def _level_draws(shape, logits, params, n_rows, seed):
    tree = sampled_tree.init_tree(shape, jnp.zeros((n_rows,), jnp.int32))
    keys = jax.random.split(jax.random.key(seed), n_rows)
    tree, q = sampled_tree.expand(tree, shape, 0, jnp.broadcast_to(logits, (n_rows, 1, logits.shape[-1])),
                                  RowSampling.rows(params, n_rows), keys)
    return np.asarray(tree.tokens[:, 1:1 + shape.widths[0]]), np.asarray(tree.scores[:, 1:1 + shape.widths[0]]), q


def test_children_are_draws_without_replacement_from_the_processed_draft():
    """The root's three children, ordered: their joint law is sequential sampling without
    replacement from q = exp(process_logits(draft logits)) (chi-square over all V*(V-1)*(V-2)
    ordered triples), q comes back as drawn from, and scores are log q."""
    V, n = 6, 30000
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(V,)) * 1.5, jnp.float32)
    params = SamplingParams(temperature=0.7, top_p=0.97)
    shape = TreeShape((3, 1))
    toks, scores, q = _level_draws(shape, logits, params, n, seed=1)
    q_exact = np.exp(np.asarray(process_logits(logits[None], params), np.float64))[0]
    np.testing.assert_allclose(np.asarray(q[0, 0]), q_exact, rtol=1e-5, atol=1e-7)
    assert np.all(toks[:, 0] != toks[:, 1]) and np.all(toks[:, 1] != toks[:, 2]) and np.all(toks[:, 0] != toks[:, 2])
    np.testing.assert_allclose(scores, np.log(q_exact)[toks], rtol=1e-5)
    cells = list(itertools.permutations(range(V), 3))
    exact = np.array([q_exact[a] * q_exact[b] / (1 - q_exact[a]) * q_exact[c] / (1 - q_exact[a] - q_exact[b])
                      for a, b, c in cells])
    index = {c: i for i, c in enumerate(cells)}
    counts = np.bincount([index[tuple(t)] for t in toks.tolist()], minlength=len(cells))
    assert counts[exact == 0].sum() == 0  # nothing top-p removed was ever drawn
    keep = exact * n >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(exact[keep], exact[~keep].sum()) * n
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert len(obs) > 50 and stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_children_past_the_support_are_not_drawn_and_greedy_rows_take_the_top():
    """top_k = 2 leaves two tokens to draw: the third child is never drawn (score -inf, never
    accepted). Greedy rows take the draft's top three by logit, in order, all drawn."""
    V = 9
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(V,)), jnp.float32)
    shape = TreeShape((3,))
    toks, scores, _ = _level_draws(shape, logits, SamplingParams(temperature=1.0, top_k=2), 512, seed=2)
    top = np.argsort(-np.asarray(logits))
    assert set(np.unique(toks[:, :2])) == set(top[:2].tolist())
    assert np.all(np.isfinite(scores[:, :2])) and np.all(scores[:, 2] == -np.inf)
    toks, scores, _ = _level_draws(shape, logits, SamplingParams(), 4, seed=3)
    assert np.all(toks == top[:3]) and np.all(np.isfinite(scores))
