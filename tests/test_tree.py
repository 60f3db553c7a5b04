"""Static tree shapes and the global beam-search expansion (spec 3.1) against a NumPy brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longspec_jax.tree import TreeShape, expand, init_tree

# Tolerances: scores are sums of float32 log-probs; exact equality is expected for the same
# additions, 1e-6 leaves room for XLA reassociation.
SCORE_ATOL = 1e-6


def test_shape_properties():
    s = TreeShape.parse("4 16 16 16 16")
    assert s.widths == (4, 16, 16, 16, 16)
    assert s.depth == 5 and s.num_nodes == 69 and s.max_accept == 6
    assert s.offsets == (0, 1, 5, 21, 37, 53)  # spec: depth ranges 1-4, 5-20, 21-36, 37-52, 53-68
    assert s.node_depths.tolist() == [0] + [1] * 4 + [2] * 16 + [3] * 16 + [4] * 16 + [5] * 16
    assert TreeShape.parse([1, 1, 1, 1]) == TreeShape.parse("1,1,1,1") == TreeShape((1, 1, 1, 1))
    assert hash(TreeShape((2, 3))) == hash(TreeShape.parse("2 3"))


@pytest.mark.parametrize("bad", ["", "4 x", [4, 0], [-1]])
def test_shape_rejects(bad):
    with pytest.raises(ValueError, match="tree shape|node"):
        TreeShape.parse(bad)


def test_check_vocab():
    TreeShape((4, 16)).check_vocab(4)
    with pytest.raises(ValueError, match="depth 1 asks for 5 nodes"):
        TreeShape((5,)).check_vocab(4)


def _numpy_beam(shape, logqs, root):
    """Brute-force global beam search: tokens, parents, scores per node (BFS layout)."""
    tokens, parents, scores = [root], [0], [0.0]
    for level, logq in enumerate(logqs):
        o, n = shape.offsets[level], shape.level_sizes[level]
        cands = []
        for i in range(n):
            for v in range(logq.shape[1]):
                cands.append((scores[o + i] + float(logq[i, v]), (o + i) * logq.shape[1] + v, o + i, v))
        # top-k: highest score first, lowest flat index on ties (lax.top_k's order)
        cands.sort(key=lambda c: (-c[0], c[1]))
        for sc, _, par, tok in cands[: shape.level_sizes[level + 1]]:
            tokens.append(tok)
            parents.append(par)
            scores.append(sc)
    return np.array(tokens), np.array(parents), np.array(scores, np.float32)


@pytest.mark.parametrize("widths", [(1, 1, 1), (3, 5, 2), (4, 16, 16)])
def test_expand_matches_bruteforce(widths):
    shape = TreeShape(widths)
    V, B = 7, 2
    rng = np.random.default_rng(sum(widths))
    root = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    tree = init_tree(shape, root)
    logqs = []
    for level in range(shape.depth):
        logits = rng.normal(size=(B, shape.level_sizes[level], V)).astype(np.float32)
        logq = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
        logqs.append(logq)
        tree = expand(tree, shape, level, jnp.asarray(logq))
    for b in range(B):
        tok, par, sc = _numpy_beam(shape, [lq[b] for lq in logqs], int(root[b]))
        np.testing.assert_array_equal(np.asarray(tree.tokens[b]), tok)
        np.testing.assert_array_equal(np.asarray(tree.parents[b]), par)
        np.testing.assert_allclose(np.asarray(tree.scores[b]), sc, atol=SCORE_ATOL)
        # ancestor mask from the parent chain
        mask = np.asarray(tree.mask[b])
        depths = shape.node_depths
        for u in range(shape.num_nodes):
            anc = {u}
            w = u
            while w != 0:
                w = par[w]
                anc.add(w)
            assert set(np.nonzero(mask[u])[0]) == anc
            assert depths[par[u]] == max(depths[u] - 1, 0)
        assert np.all(np.triu(mask, 1) == 0)
        # siblings carry distinct tokens (what makes the accepted path unique)
        for p in set(par[1:].tolist()):
            kids = [tok[u] for u in range(1, shape.num_nodes) if par[u] == p]
            assert len(kids) == len(set(kids))


def test_positions():
    shape = TreeShape((2, 3))
    tree = init_tree(shape, jnp.array([5, 6]))
    pos = tree.positions(shape, jnp.array([10, 20]))
    assert pos.tolist() == [[10, 11, 11, 12, 12, 12], [20, 21, 21, 22, 22, 22]]


def test_two_stage_topk_equals_flat_topk_with_ties():
    """expand's per-parent-then-global top-k picks exactly the flat top-k over parents x vocab,
    including tie order (lower parent, then lower token), on quantized scores that force ties."""
    shape = TreeShape.parse("4 16 16 16")
    for V, seed in ((50, 0), (50, 1), (700, 2)):
        key = jax.random.key(seed)
        tree = init_tree(shape, jnp.array([3, 4]))
        for lvl in range(shape.depth):
            n_par, n_child = shape.level_sizes[lvl], shape.level_sizes[lvl + 1]
            o_par, o_child = shape.offsets[lvl], shape.offsets[lvl + 1]
            logq = jnp.round(jax.random.normal(jax.random.fold_in(key, lvl), (2, n_par, V)) * 2) / 2
            flat = (tree.scores[:, o_par:o_par + n_par, None] + logq).reshape(2, -1)
            best, idx = jax.lax.top_k(flat, n_child)
            tree = expand(tree, shape, lvl, logq)
            np.testing.assert_array_equal(tree.tokens[:, o_child:o_child + n_child], idx % V)
            np.testing.assert_array_equal(tree.parents[:, o_child:o_child + n_child], o_par + idx // V)
            np.testing.assert_allclose(tree.scores[:, o_child:o_child + n_child], best)



@pytest.mark.parametrize("V,k,chunk", [(128256, 16, 4096), (10000, 4, 1024), (9000, 16, 4096), (2000, 5, 128)])
def test_row_top_k_equals_lax_top_k(V, k, chunk):
    """The two-stage top-k returns exactly lax.top_k's values and indices, ties and -inf included."""
    from longspec_jax.tree import row_top_k

    rng = np.random.default_rng(V + k)
    x = np.round(rng.standard_normal((2, 3, V)), 1).astype(np.float32)  # coarse values: many ties
    x[0, 0, : V // 3] = -np.inf
    x[1, 2, :] = -np.inf  # a row of -inf only: indices 0..k-1, as lax.top_k gives
    ref_v, ref_i = jax.lax.top_k(jnp.asarray(x), k)
    v, i = row_top_k(jnp.asarray(x), k, chunk)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_v))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ref_i))
