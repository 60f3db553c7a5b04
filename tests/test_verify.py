"""Lossless acceptance ("sample from the target, then match a child") against a NumPy walker."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longspec_jax import verify
from longspec_jax.sampling import SamplingParams
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
