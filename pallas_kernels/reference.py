"""Float32 test oracles of the Hybrid Tree Attention parts: the definitions, written plainly.

Every kernel and every `implementation` of `pallas_kernels` is tested against these; production
code does not call them (the "xla" implementation is `xla_attention`). They share no code with
the implementations: visibility is applied per slot from its definition, the softmax is one
`jax.nn.logsumexp`, and the GQA grouping is an explicit [B, T, K, G, H] einsum. Layouts:

  q        [B, T, N, H]   T query tokens (decode token, chain, or verification tree)
  k_cache  [B, S, K, H]   static-capacity cache; N = G * K (GQA)
  lengths  [B] int32      valid length of each row's cache (run-time value)
  k, v     [B, Tk, K, H]  the tree's own keys / values
  mask     [B, T, Tk] bool  True = query may attend to key
  out      [B, T, N, H]   in q.dtype
  lse      [B, T, N]      float32 natural-log log-sum-exp of the scaled scores (-inf if no key)

Visibility of cache slot s (`pallas_kernels.hybrid`): with `back = (len - 1 - s) mod S` the steps
from the newest token, s is visible iff back < len and (no window or back < window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _attention_f32(q, k, v, mask, sm_scale):
    """softmax(q k^T * scale, masked) v in float32; mask [B, T, Tk]. Returns (out f32, lse f32)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = 1.0 / (H ** 0.5) if sm_scale is None else sm_scale
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)  # query head n = k * G + g
    s = jnp.einsum("btkgh,bskh->btkgs", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(mask[:, :, None, None, :], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # -inf where a row sees no key
    p = jnp.where(jnp.isfinite(lse)[..., None], jnp.exp(s - lse[..., None]), 0.0)
    o = jnp.einsum("btkgs,bskh->btkgh", p, v.astype(jnp.float32))
    return o.reshape(B, T, N, H), lse.reshape(B, T, N)


def _visible(lengths, capacity, window):
    """[B, S] bool from the definition of slot visibility (module docstring)."""
    back = jnp.mod(lengths.astype(jnp.int32)[:, None] - 1 - jnp.arange(capacity)[None, :], capacity)
    limit = lengths[:, None] if window is None else jnp.minimum(lengths[:, None], window)
    return back < limit


def prefix_attention_ref(q, k_cache, v_cache, lengths, *, window: int | None = None, sm_scale=None):
    """Unmasked attention of T queries over the visible slots of a static-capacity cache."""
    B, T = q.shape[:2]
    mask = jnp.broadcast_to(_visible(lengths, k_cache.shape[1], window)[:, None, :], (B, T, k_cache.shape[1]))
    o, lse = _attention_f32(q, k_cache, v_cache, mask, sm_scale)
    return o.astype(q.dtype), lse


def tree_attention_ref(q, k, v, mask, *, sm_scale=None):
    """Attention of T tree queries over Tk tree keys under a boolean ancestor mask [B, T, Tk]."""
    o, lse = _attention_f32(q, k, v, mask.astype(bool), sm_scale)
    return o.astype(q.dtype), lse


def dense_attention_ref(q, k_cache, v_cache, lengths, k, v, mask, *, window=None, sm_scale=None):
    """One dense masked attention over [prefix ; tree] keys: what hybrid attention must equal."""
    B, T = q.shape[:2]
    vis = jnp.broadcast_to(_visible(lengths, k_cache.shape[1], window)[:, None, :], (B, T, k_cache.shape[1]))
    full_mask = jnp.concatenate([vis, mask.astype(bool)], axis=-1)
    kk = jnp.concatenate([k_cache, k.astype(k_cache.dtype)], axis=1)
    vv = jnp.concatenate([v_cache, v.astype(v_cache.dtype)], axis=1)
    o, lse = _attention_f32(q, kk, vv, full_mask, sm_scale)
    return o.astype(q.dtype), lse
