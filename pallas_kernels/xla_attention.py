"""The `implementation="xla"` Hybrid Tree Attention parts: what CPUs and non-Hopper GPUs run.

Backend: plain XLA (any platform), float32 maths. The tree part is one dense masked softmax
(`tree_attention`). The prefix part has two algorithms, picked per call from static shapes
(`use_blockwise`):

  dense      one masked softmax over all S cache slots under `prefix_visibility`. Best for a
             handful of query rows (decode, short chains), where the score matrix is small.
  blockwise  flash-style online softmax over key blocks of the cache, in a `lax.fori_loop` whose
             trip count is a run-time value, ceil(max(lengths) / block): only blocks holding
             visible slots are read and multiplied. For many query rows (prefill chunks, wide
             verification trees) the dense form computes and materialises a [B, K, G*T, S] score
             matrix over the whole static capacity; at a 512-token prefill chunk of a 16k cache
             that is 200 MB per layer, most of it for slots the chunk cannot see yet. Blockwise
             work grows with the visible prefix instead, so a chunked prefill costs ~P^2/2 score
             entries instead of P * S.

Layouts (shape alphabet: B batch, T queries, S cache slots, N query heads, K KV heads, G = N / K,
H head dim): q [B, T, N, H]; k_cache, v_cache [B, S, K, H]; lengths [B] int32; tree k, v
[B, Tk, K, H] and mask [B, T, Tk] bool; returns (out [B, T, N, H] in q.dtype, lse [B, T, N]
float32, natural log, -inf where no key). Any dtype (computed in float32), any head dim.

Blockwise handles linear caches only (visible = slots [0, lengths)); a sliding window over a ring
buffer (the draft's self-attention) always takes the dense path, whose visibility rule covers it.
Both equal the float32 oracles of `reference.py` up to summation order (tests/test_kernels.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")
BLOCKS = (512, 256, 128)  # key block sizes tried, largest first; one must divide the capacity
# G * T query rows per KV head from which blockwise is used: prefill chunks go blockwise, decode and
# verification keep the dense single pass, where blockwise was no faster (docs/perf_notes.md, "Kernels").
MIN_ROWS = 384


def scale(q, sm_scale=None) -> float:
    """The softmax scale: `sm_scale`, or 1 / sqrt(H) for q [..., H]."""
    return (1.0 / (q.shape[-1] ** 0.5)) if sm_scale is None else sm_scale


def prefix_visibility(lengths: jax.Array, capacity: int, window: int | None) -> jax.Array:
    """Boolean [B, S]: the cache slots every query of a row sees (the ring rule of `pallas_kernels.hybrid`).

    Slot s holds the token `d(s) = (len - 1 - s) mod S` steps back from the newest one; it is
    visible iff d(s) < len and (no window or d(s) < window). For a linear cache (len <= S) this is
    slots [max(0, len - W), len); for the draft's ring buffer it selects the last W tokens.
    """
    s = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    lengths = lengths.astype(jnp.int32)[:, None]
    back = jnp.mod(lengths - 1 - s, capacity)  # steps back from the newest token
    visible = back < lengths
    if window is not None:
        visible &= back < window
    return visible


def masked_attention(q, k, v, mask, *, sm_scale=None):
    """Dense masked attention in float32: q [B, T, N, H] over k, v [B, Tk, K, H] under mask
    [B, T, Tk] bool. Returns (out [B, T, N, H] float32, lse [B, T, N] float32); rows with no key
    give out 0 and lse -inf, never NaN.

    Laid out as batched [G*T, H] x [H, Tk] matmuls with the (B, K) batch dimensions leading, the
    form XLA's CPU backend turns into fast GEMMs (docs/perf_notes.md, "Kernels").
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    Tk = k.shape[1]
    qf = q.astype(jnp.float32).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    kf = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, K, Tk, H]
    vf = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    s = jnp.einsum("bkqh,bksh->bkqs", qf, kf).reshape(B, K, G, T, Tk) * scale(q, sm_scale)
    s = jnp.where(mask[:, None, None, :, :], s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = (p / jnp.where(l > 0, l, 1.0)).reshape(B, K, G * T, Tk)
    o = jnp.einsum("bkqs,bksh->bkqh", p, vf).reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4)
    lse = jnp.where(l[..., 0] > 0, m_safe[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), NEG_INF)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, N)  # [B, K, G, T] -> [B, T, N]
    return o.reshape(B, T, N, H), lse


def tree_attention(q, k, v, mask, *, sm_scale=None):
    """Attention of T tree queries over Tk tree keys under a boolean ancestor mask [B, T, Tk]."""
    o, lse = masked_attention(q, k, v, mask.astype(bool), sm_scale=sm_scale)
    return o.astype(q.dtype), lse


def prefix_attention_dense(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None):
    """Unmasked attention of T queries over the visible slots of a cache, one softmax over all S."""
    B, T = q.shape[:2]
    vis = prefix_visibility(lengths, k_cache.shape[1], window)  # [B, S]
    mask = jnp.broadcast_to(vis[:, None, :], (B, T, k_cache.shape[1]))
    o, lse = masked_attention(q, k_cache, v_cache, mask, sm_scale=sm_scale)
    return o.astype(q.dtype), lse


def block_for(capacity: int) -> int | None:
    """The key block for a cache of `capacity` slots: the largest of BLOCKS dividing it, or None."""
    return next((b for b in BLOCKS if capacity % b == 0 and capacity >= b), None)


def use_blockwise(q_shape, k_shape, window) -> bool:
    """Static choice of algorithm: blockwise for at least MIN_ROWS query rows per KV head
    (G * T) over a linear cache (no window) of more than one block that a block size divides."""
    T, N = q_shape[1], q_shape[2]
    S, K = k_shape[1], k_shape[2]
    block = block_for(S)
    return window is None and block is not None and S > block and (N // K) * T >= MIN_ROWS


def prefix_attention_blockwise(q, k_cache, v_cache, lengths, *, sm_scale=None, block: int | None = None):
    """Attention of T queries over cache slots [0, lengths) by online softmax over key blocks.

    Args:
      q: [B, T, N, H] queries.
      k_cache, v_cache: [B, S, K, H]; S must be a multiple of `block`.
      lengths: [B] int32, visible prefix per row (0 allowed: that row's output is 0, lse -inf).
      sm_scale: softmax scale (default 1/sqrt(H)).
      block: key block (default `block_for(S)`).
    Returns:
      (out [B, T, N, H] in q.dtype, lse [B, T, N] float32).
    """
    B, T, N, H = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    G = N // K
    block = block or block_for(S)
    if block is None or S % block:
        raise ValueError(f"cache capacity {S} is not a multiple of a key block {BLOCKS}; use the dense path")
    lengths = lengths.astype(jnp.int32)
    # [B, K, G*T, H]: query rows grouped under their KV head; the scale folded in once.
    qf = q.astype(jnp.float32) * scale(q, sm_scale)
    qf = qf.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    trips = (jnp.max(lengths) + block - 1) // block  # run-time: blocks past every row's length are skipped
    trips = jnp.minimum(trips, S // block)

    def body(j, carry):
        m, l, acc = carry  # [B, K, GT], [B, K, GT], [B, K, GT, H]
        start = j * block
        kb = jax.lax.dynamic_slice_in_dim(k_cache, start, block, axis=1).astype(jnp.float32)  # [B, blk, K, H]
        vb = jax.lax.dynamic_slice_in_dim(v_cache, start, block, axis=1).astype(jnp.float32)
        s = jnp.einsum("bkqh,bskh->bkqs", qf, kb)  # [B, K, GT, blk]
        visible = (start + jnp.arange(block, dtype=jnp.int32))[None, :] < lengths[:, None]  # [B, blk]
        s = jnp.where(visible[:, None, None, :], s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet stay at 0
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)  # exp(-inf) = 0 for the first visible block
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkqs,bskh->bkqh", p, vb)
        return m_new, l, acc

    init = (jnp.full((B, K, G * T), NEG_INF, jnp.float32), jnp.zeros((B, K, G * T), jnp.float32),
            jnp.zeros((B, K, G * T, H), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, trips, body, init)
    has = l > 0
    o = acc / jnp.where(has, l, 1.0)[..., None]  # rows with no visible key: acc = 0 -> out 0
    lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), NEG_INF)
    o = o.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    lse = lse.reshape(B, K, G, T).transpose(0, 3, 1, 2).reshape(B, T, N)
    return o.astype(q.dtype), lse


def prefix_attention(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None):
    """The XLA prefix attention: blockwise where `use_blockwise`, else dense."""
    if use_blockwise(q.shape, k_cache.shape, window):
        return prefix_attention_blockwise(q, k_cache, v_cache, lengths, sm_scale=sm_scale)
    return prefix_attention_dense(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale)
