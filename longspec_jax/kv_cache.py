"""Static-shape target KV cache and its row helpers (spec sections 3-4: hybrid attention reads the
committed prefix from here; accepted tree rows are compacted into place after verification).

Layout: `k[l]`, `v[l]` are separate per-layer buffers [B, S, K, H] so that, when the cache is donated
into a jitted step, XLA updates each with an in-place dynamic_update_slice (stacking layers or
slicing around the update would force copies; see NOTES_GPU.md B3). The cache does not store
lengths: the caller owns `lengths [B]` and decides what is committed.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from longspec_jax.configs import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value buffers.

    Attributes:
      k: tuple of L arrays [B, S, K, H], post-RoPE keys; slot s of row b holds position-ordered token s.
      v: tuple of L arrays [B, S, K, H], values.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16, sharding=None) -> "KVCache":
        """Zero-filled cache of `capacity` slots per row; `sharding` (optional) places every buffer."""
        shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)

        def zeros():
            z = jnp.zeros(shape, dtype)
            return jax.device_put(z, sharding) if sharding is not None else z

        return cls(k=tuple(zeros() for _ in range(cfg.num_layers)),
                   v=tuple(zeros() for _ in range(cfg.num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def dtype(self):
        return self.k[0].dtype


def write_rows(buf: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
    """buf[b, offsets[b] + t] = new[b, t] for t < T; buf [B, S, ...], new [B, T, ...], offsets [B].

    The caller guarantees offsets[b] + T <= S: dynamic_update_slice clamps out-of-range starts,
    which would silently overwrite earlier rows.
    """

    def one(row, upd, off):  # row [S, K, H], upd [T, K, H]
        start = (off.astype(jnp.int32),) + (jnp.int32(0),) * (row.ndim - 1)
        return jax.lax.dynamic_update_slice(row, upd.astype(row.dtype), start)

    return jax.vmap(one)(buf, new, offsets)


def write_layer(cache: KVCache, layer: int, k: jax.Array, v: jax.Array, lengths: jax.Array) -> KVCache:
    """Write one layer's new K/V [B, T, K, H] at slots lengths[b] + [0, T)."""
    ks, vs = list(cache.k), list(cache.v)
    ks[layer] = write_rows(ks[layer], k, lengths)
    vs[layer] = write_rows(vs[layer], v, lengths)
    return cache.replace(k=tuple(ks), v=tuple(vs))


def _compact_buffer(buf: jax.Array, base: jax.Array, src: jax.Array, count: jax.Array) -> jax.Array:
    """Row b: buf[base+j] <- buf[base+src[j]] for j < count[b]; other slots unchanged."""
    A = src.shape[1]

    def one(row, b0, s, n):  # row [S, K, H], s [A]
        b0 = b0.astype(jnp.int32)
        # Gather every source first so that overlapping moves (src[j] > j) read pre-move data.
        gathered = jnp.take(row, b0 + s.astype(jnp.int32), axis=0, mode="clip")  # [A, K, H]
        current = jax.lax.dynamic_slice_in_dim(row, b0, A, axis=0)  # [A, K, H]
        keep = (jnp.arange(A) < n)[:, None, None]
        return jax.lax.dynamic_update_slice_in_dim(row, jnp.where(keep, gathered, current), b0, axis=0)

    return jax.vmap(one)(buf, base, src, count)


def compact(cache: KVCache, base: jax.Array, src: jax.Array, count: jax.Array) -> KVCache:
    """Move accepted tree rows to their final slots in every layer.

    For each row b and j < count[b]: slot base[b] + j receives slot base[b] + src[b, j] (all reads
    happen before any write). Slots base[b] + j for j >= count[b] and everything outside
    [base[b], base[b] + A) are unchanged. Requires base[b] + A <= S (A = src.shape[1]).

    Args:
      cache: the KV cache after a verification call wrote the tree at slots base + [0, T).
      base: [B] int32, the committed length before the tree (slot of the tree's first token).
      src: [B, A] int32, tree-relative slot of the j-th accepted token (src[b, 0] is usually 0).
      count: [B] int32, number of accepted tokens to move.

    Returns:
      The cache with the same buffers updated (in place under donation).
    """
    return cache.replace(
        k=tuple(_compact_buffer(k, base, src, count) for k in cache.k),
        v=tuple(_compact_buffer(v, base, src, count) for v in cache.v),
    )
