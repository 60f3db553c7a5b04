"""KVCache: init, per-row writes at offsets, and `compact` (accepted tree rows -> final slots)
against numpy references, eagerly and under jit with the cache donated."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longspec_jax import kv_cache as kvc
from longspec_jax.configs import tiny_config
from longspec_jax.kv_cache import KVCache

# Pure data movement: results must be bit-exact.
CFG = tiny_config(num_layers=3)


def random_cache(seed, batch=3, capacity=24):
    keys = jax.random.split(jax.random.key(seed), 2 * CFG.num_layers)
    shape = (batch, capacity, CFG.num_kv_heads, CFG.head_dim)
    return KVCache(k=tuple(jax.random.normal(keys[i], shape) for i in range(CFG.num_layers)),
                   v=tuple(jax.random.normal(keys[CFG.num_layers + i], shape) for i in range(CFG.num_layers)))


def test_init_shapes_and_dtype():
    cache = KVCache.init(CFG, batch=2, capacity=10, dtype=jnp.bfloat16)
    assert len(cache.k) == len(cache.v) == CFG.num_layers
    for buf in cache.k + cache.v:
        assert buf.shape == (2, 10, CFG.num_kv_heads, CFG.head_dim) and buf.dtype == jnp.bfloat16
    assert (cache.num_layers, cache.batch, cache.capacity) == (CFG.num_layers, 2, 10)
    # A pytree with one leaf per layer buffer (what jit donates).
    assert len(jax.tree.leaves(cache)) == 2 * CFG.num_layers


def test_write_rows_at_per_row_offsets():
    buf = jax.random.normal(jax.random.key(0), (3, 12, 2, 4))
    new = jax.random.normal(jax.random.key(1), (3, 4, 2, 4))
    offsets = np.array([0, 5, 8])
    out = np.asarray(kvc.write_rows(buf, new, jnp.asarray(offsets)))
    ref = np.array(buf)
    for b, o in enumerate(offsets):
        ref[b, o:o + 4] = np.asarray(new[b])
    np.testing.assert_array_equal(out, ref)


def test_write_layer_touches_only_that_layer():
    cache = random_cache(1)
    k = jax.random.normal(jax.random.key(2), (3, 2, CFG.num_kv_heads, CFG.head_dim))
    out = kvc.write_layer(cache, 1, k, -k, jnp.array([0, 3, 7]))
    for l in (0, 2):
        np.testing.assert_array_equal(np.asarray(out.k[l]), np.asarray(cache.k[l]))
    np.testing.assert_array_equal(np.asarray(out.v[1][1, 3:5]), -np.asarray(k[1]))


def compact_ref(buf, base, src, count):
    out = np.array(buf)
    for b in range(buf.shape[0]):
        rows = [np.array(buf[b, base[b] + src[b, j]]) for j in range(count[b])]
        for j, r in enumerate(rows):
            out[b, base[b] + j] = r
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_matches_reference(seed):
    rng = np.random.default_rng(seed)
    cache = random_cache(seed + 10)
    A = 6
    base = rng.integers(0, 24 - 10, size=3)
    # Increasing tree slots starting at the root (0), like an accepted root-to-leaf path; row 1 has
    # count 0 (nothing accepted), row 2 moves rows onto slots that are themselves sources.
    src = np.stack([np.sort(rng.choice(np.arange(1, 10), A - 1, replace=False)) for _ in range(3)])
    src = np.concatenate([np.zeros((3, 1), int), src], axis=1)
    count = np.array([4, 0, A])
    out = kvc.compact(cache, jnp.asarray(base), jnp.asarray(src, jnp.int32), jnp.asarray(count))
    for l in range(CFG.num_layers):
        np.testing.assert_array_equal(np.asarray(out.k[l]), compact_ref(np.asarray(cache.k[l]), base, src, count))
        np.testing.assert_array_equal(np.asarray(out.v[l]), compact_ref(np.asarray(cache.v[l]), base, src, count))


def test_compact_under_jit_with_donation():
    cache = random_cache(5)
    expected = [np.asarray(k) for k in cache.k]
    base, src, count = np.array([2, 0, 10]), np.array([[0, 2, 5], [0, 1, 2], [0, 3, 4]]), np.array([3, 2, 1])
    fn = jax.jit(kvc.compact, donate_argnums=(0,))
    out = fn(cache, jnp.asarray(base), jnp.asarray(src, jnp.int32), jnp.asarray(count))
    for l in range(CFG.num_layers):
        np.testing.assert_array_equal(np.asarray(out.k[l]), compact_ref(expected[l], base, src, count))
    # Compiles once per shape: a second call with new values reuses the executable.
    before = fn._cache_size()
    fn(out, jnp.asarray(base + 1), jnp.asarray(src, jnp.int32), jnp.asarray(count))
    assert fn._cache_size() == before


def test_write_then_compact_in_one_jitted_step():
    """The verification pattern: write T tree rows at lengths, compact the accepted ones."""
    cache = KVCache.init(CFG, batch=2, capacity=16, dtype=jnp.float32)
    tree = jax.random.normal(jax.random.key(3), (2, 5, CFG.num_kv_heads, CFG.head_dim))
    lengths = jnp.array([3, 6])

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(cache, tree, lengths, src, count):
        for l in range(cache.num_layers):
            cache = kvc.write_layer(cache, l, tree, tree, lengths)
        return kvc.compact(cache, lengths, src, count)

    out = step(cache, tree, lengths, jnp.array([[0, 2, 4], [0, 1, 3]], jnp.int32), jnp.array([3, 2]))
    k = np.asarray(out.k[2])
    np.testing.assert_array_equal(k[0, 3:6], np.asarray(tree[0, [0, 2, 4]]))
    np.testing.assert_array_equal(k[1, 6:8], np.asarray(tree[1, [0, 1]]))
    np.testing.assert_array_equal(k[1, 8:11], np.asarray(tree[1, 2:5]))  # beyond count: untouched
    assert not k[0, :3].any()
