"""Hybrid Tree Attention (LongSpec section 4): T new tokens attend to the committed cache and to
each other, as two attention parts merged exactly.

  prefix part  every new token over the committed cache, no mask between them (all see the same
               slots), optional sliding window: flash decoding over a long static-capacity cache.
  tree part    every new token over the new tokens' own keys under the tree mask (ancestor or
               self; causal for a chain). Small: T keys.
  merge        the parts see disjoint keys, so with each part's (out, lse) the exact result is
               out = (e^lse1 out1 + e^lse2 out2) / (e^lse1 + e^lse2), lse = logaddexp(lse1, lse2).

Visibility of cache slot s of a row with committed length len and capacity S: it holds the token
(len - 1 - s) mod S steps back from the newest; visible iff that is < len and < the window (for
len <= S: slots [max(0, len - W), len)). The new tokens count only in the tree part.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels import api, cudnn_chunk


def causal_mask(batch: int, T: int):
    """[B, T, T] bool lower-triangular: token t sees new tokens 0..t."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (batch, T, T))


def merge_attention(part1, part2):
    """Exact log-sum-exp merge of two attention parts over disjoint key sets, in float32.

    Each part is (out [B, T, N, H], lse [B, T, N]). A part with lse = -inf (no keys) contributes
    nothing; if both are empty the output is 0 and lse is -inf (never NaN). Returns out in part1's
    dtype and lse float32.
    """
    (o1, l1), (o2, l2) = part1, part2
    lse = jnp.logaddexp(l1, l2)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1 = jnp.where(jnp.isfinite(l1), jnp.exp(l1 - lse_safe), 0.0)[..., None]
    w2 = jnp.where(jnp.isfinite(l2), jnp.exp(l2 - lse_safe), 0.0)[..., None]
    o = o1.astype(jnp.float32) * w1 + o2.astype(jnp.float32) * w2
    return o.astype(o1.dtype), lse


def hybrid_attention(q, k_cache, v_cache, lengths, k, v, mask, *, window=None, sm_scale=None, implementation="xla",
                     head_axis="tensor"):
    """Attention of T new tokens over the visible cache slots and, under `mask`, each other.

    Args:
      q: [B, T, N, H] queries of the new tokens.
      k_cache, v_cache: [B, S, K, H] the committed cache; lengths: [B] int32 committed lengths
        (the visibility rule of the module docstring; the new tokens' own slots are not read).
      k, v: [B, T, K, H] the new tokens' keys and values; mask: [B, T, T] bool tree mask, or None
        for a causal chunk (a prefill: on a GPU a wide one runs on cuDNN, `cudnn_chunk`).
      window: static sliding window over the cache (None = unlimited); sm_scale: softmax scale
        (default 1/sqrt(H)).
      implementation, head_axis: as `api.prefix_attention`; under an ambient head-splitting mesh
        both parts and the merge run per device under one `shard_map`.

    Returns:
      (out [B, T, N, H] in q.dtype, lse [B, T, N] float32).
    """
    def parts(q, k_cache, v_cache, lengths, k, v, mask):
        prefix = api.prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale,
                                      implementation=implementation, head_axis=head_axis)
        tree = api.tree_attention(q, k, v, mask, sm_scale=sm_scale, implementation=implementation,
                                  head_axis=head_axis)
        return merge_attention(prefix, tree)

    impl = api.resolve_implementation(implementation, q, k_cache, capacity_multiple=128)
    mesh = api.head_parallel_mesh(head_axis) if impl != "xla" else None
    if mask is None:
        if impl == "pallas" and cudnn_chunk.applies(q, k_cache, window):
            chunk = functools.partial(cudnn_chunk.chunk_attention, sm_scale=sm_scale)
            if mesh is not None:
                chunk = api.per_device_heads(chunk, mesh, head_axis, (True, True, True, False, True, True))
            return chunk(q, k_cache, v_cache, lengths, k, v)
        mask = causal_mask(*q.shape[:2])
    if mesh is not None:
        parts = api.per_device_heads(parts, mesh, head_axis, (True, True, True, False, True, True, False))
    return parts(q, k_cache, v_cache, lengths, k, v, mask)
