"""Float32 pure-jnp twins of the Hybrid Tree Attention kernels (spec section 4).

These are the independent references every Pallas kernel is tested against, and the
`implementation="xla"` path used on CPU and pre-Hopper GPUs. Layouts (shape alphabet of STYLE.md):

  q        [B, T, N, H]   T query tokens (decode token, chain, or verification tree)
  k_cache  [B, S, K, H]   static-capacity cache; N = G * K (GQA)
  lengths  [B] int32      valid length of each row's cache (run-time value)
  k, v     [B, Tk, K, H]  the tree's own keys / values
  mask     [B, T, Tk] bool  True = query may attend to key
  out      [B, T, N, H]   in q.dtype
  lse      [B, T, N]      float32 natural-log log-sum-exp of the scaled scores (-inf if no key)

Cache slots are read as a ring of size S: slot s holds the token `d(s) = (len - 1 - s) mod S`
steps back from the newest one. A key is visible iff d(s) < len and (no window or d(s) < window).
For an ordinary linear cache (len <= S) this is exactly "slots [max(0, len - W), len)"; for the
draft's ring buffer it selects the last W tokens wherever they sit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def _scale(q, sm_scale):
    return (1.0 / (q.shape[-1] ** 0.5)) if sm_scale is None else sm_scale


def prefix_visibility(lengths: jax.Array, capacity: int, window: int | None) -> jax.Array:
    """Boolean [B, S]: which cache slots are visible to every query of the row (no intra-prefix mask)."""
    s = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    lengths = lengths.astype(jnp.int32)[:, None]
    back = jnp.mod(lengths - 1 - s, capacity)  # steps back from the newest token
    visible = back < lengths
    if window is not None:
        visible &= back < window
    return visible


def _masked_attention_f32(q, k, v, mask, sm_scale):
    """Dense masked attention in float32. mask: [B, T, Tk] bool. Returns (out f32, lse f32).

    Laid out as batched [G*T, H] x [H, Tk] matmuls with the (B, K) batch dimensions leading, the
    form XLA's CPU backend turns into fast GEMMs (the [B, T, K, G, H] x [B, S, K, H] einsum was 4x
    slower there at T = 69 .. 512).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    Tk = k.shape[1]
    qf = q.astype(jnp.float32).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    kf = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, K, Tk, H]
    vf = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    s = jnp.einsum("bkqh,bksh->bkqs", qf, kf).reshape(B, K, G, T, Tk) * _scale(q, sm_scale)
    s = jnp.where(mask[:, None, None, :, :], s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = (p / jnp.where(l > 0, l, 1.0)).reshape(B, K, G * T, Tk)
    o = jnp.einsum("bkqs,bksh->bkqh", p, vf).reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4)
    lse = jnp.where(l[..., 0] > 0, m_safe[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), NEG_INF)
    # lse: [B, K, G, T] -> [B, T, N]
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, N)
    return o.reshape(B, T, N, H), lse


def prefix_attention_ref(q, k_cache, v_cache, lengths, *, window: int | None = None, sm_scale=None):
    """Unmasked attention of T queries over the valid part of a static-capacity cache."""
    B, T = q.shape[:2]
    vis = prefix_visibility(lengths, k_cache.shape[1], window)  # [B, S]
    mask = jnp.broadcast_to(vis[:, None, :], (B, T, k_cache.shape[1]))
    o, lse = _masked_attention_f32(q, k_cache, v_cache, mask, sm_scale)
    return o.astype(q.dtype), lse


def tree_attention_ref(q, k, v, mask, *, sm_scale=None):
    """Attention of T tree queries over Tk tree keys under a boolean ancestor mask [B, T, Tk]."""
    o, lse = _masked_attention_f32(q, k, v, mask.astype(bool), sm_scale)
    return o.astype(q.dtype), lse


def merge_attention(part1, part2):
    """Exact log-sum-exp merge of two attention parts over disjoint key sets, in float32.

    Each part is (out [B, T, N, H], lse [B, T, N]). A part with lse = -inf (no keys) contributes
    nothing; if both are empty the output is 0 and lse is -inf (never NaN).
    """
    (o1, l1), (o2, l2) = part1, part2
    lse = jnp.logaddexp(l1, l2)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1 = jnp.where(jnp.isfinite(l1), jnp.exp(l1 - lse_safe), 0.0)[..., None]
    w2 = jnp.where(jnp.isfinite(l2), jnp.exp(l2 - lse_safe), 0.0)[..., None]
    o = o1.astype(jnp.float32) * w1 + o2.astype(jnp.float32) * w2
    return o.astype(o1.dtype), lse


def dense_attention_ref(q, k_cache, v_cache, lengths, k, v, mask, *, window=None, sm_scale=None):
    """One dense masked attention over [prefix ; tree] keys: the "HF" baseline and the test oracle."""
    B, T = q.shape[:2]
    vis = prefix_visibility(lengths, k_cache.shape[1], window)
    full_mask = jnp.concatenate([jnp.broadcast_to(vis[:, None, :], (B, T, vis.shape[1])), mask.astype(bool)], axis=-1)
    kk = jnp.concatenate([k_cache, k.astype(k_cache.dtype)], axis=1)
    vv = jnp.concatenate([v_cache, v.astype(v_cache.dtype)], axis=1)
    o, lse = _masked_attention_f32(q, kk, vv, full_mask, sm_scale)
    return o.astype(q.dtype), lse
