"""A prefill chunk's attention through cuDNN's flash attention on NVIDIA GPUs.

A chunk of T prompt tokens at committed length L attends to the cached prefix [0, L) with no mask
and to its own keys causally: the two parts of `pallas_kernels.hybrid`, merged by log-sum-exp in
the same way. The verification kernels serve tens of tree rows; a chunk has hundreds, where
cuDNN's Hopper kernels (large query tiles, causal blocks skipped) run nearer the matmul rate:

  prefix  T queries over the cache, cuDNN's padding mask at kv length L (blocks past L skipped);
  chunk   T queries over the chunk's own T keys, cuDNN's causal mask (top-left: query i sees i).

The merge needs each part's log-sum-exp in float32. `jax.nn.dot_product_attention` casts it to the
output's dtype (in bf16, measured 0.03 off: ~3% on the merge weights), so the cuDNN path calls the
function beneath it, which returns cuDNN's float32 softmax statistics; `implementation="xla"` runs
the same wiring through the public function's XLA path (float32 inputs in the tests).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

MIN_ROWS = 256  # a GPU chunk of at least this many queries goes to cuDNN (tree verifications stay on the kernels)


def applies(q, k_cache, window) -> bool:
    """Whether a causal chunk of these shapes runs here on this device: a GPU with cuDNN's
    fused attention, bf16/f16 operands, head dim 64 or 128, at least `MIN_ROWS` queries, no window."""
    dev = jax.devices()[0]
    return (dev.platform == "gpu" and window is None and q.shape[1] >= MIN_ROWS and q.shape[-1] in (64, 128)
            and q.dtype in (jnp.bfloat16, jnp.float16) and k_cache.dtype == q.dtype and cudnn_module() is not None)


@functools.cache
def cudnn_module():
    """JAX's cuDNN fused-attention module (private to JAX: its float32 statistics), or None where
    this jax lacks it or its call differs from the one used here (the kernels serve chunks then)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
        params = inspect.signature(cudnn.dot_product_attention).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    needed = ("query", "key", "value", "bias", "mask", "q_seqlen", "kv_seqlen", "scale", "mask_type", "return_residual")
    if list(params)[:7] != list(needed[:7]) or not set(needed) <= set(params) or not hasattr(cudnn, "MaskType"):
        return None
    return cudnn


def prefix_part(q, k_cache, v_cache, lengths, *, sm_scale=None, implementation="cudnn"):
    """The chunk's T queries over cache slots [0, lengths) (padding mask): (out, lse [B, T, N] float32).
    Rows with lengths 0 (the first chunk) give out 0 and lse -inf, as the kernels do."""
    scale = 1 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    lengths = lengths.astype(jnp.int32)
    if implementation == "cudnn":
        cudnn = cudnn_module()
        full = jnp.full(lengths.shape, q.shape[1], jnp.int32)
        o, lse = _bnt(cudnn.dot_product_attention(q, k_cache, v_cache, None, None, full, lengths, scale=scale,
                                                  mask_type=cudnn.MaskType.PADDING, return_residual=True))
    else:
        o, lse = jax.nn.dot_product_attention(q, k_cache, v_cache, scale=scale, key_value_seq_lengths=lengths,
                                              implementation=_xla(implementation), return_residual=True)
    empty = (lengths == 0)[:, None, None]  # no prefix: that part holds nothing
    return jnp.where(empty[..., None], 0, o), jnp.where(empty, -jnp.inf, lse.astype(jnp.float32))


def causal_part(q, k, v, *, sm_scale=None, implementation="cudnn"):
    """The chunk's T queries over its own T keys, causally: (out, lse [B, T, N] float32)."""
    scale = 1 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    if implementation == "cudnn":
        cudnn = cudnn_module()
        return _bnt(cudnn.dot_product_attention(q, k, v, scale=scale, mask_type=cudnn.MaskType.CAUSAL,
                                                return_residual=True))
    o, lse = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=_xla(implementation),
                                          return_residual=True)
    return o, lse.astype(jnp.float32)


def chunk_attention(q, k_cache, v_cache, lengths, k, v, *, sm_scale=None, implementation="cudnn"):
    """Causal attention of a chunk's T queries over the cache prefix [0, lengths) and their own keys.

    Args:
      q: [B, T, N, H]; k_cache, v_cache: [B, S, K, H]; lengths: [B] int32 committed lengths
        (a plain prefix: no ring, no window); k, v: [B, T, K, H] the chunk's keys and values.
      implementation: "cudnn" (NVIDIA GPUs) or "xla" (the same wiring on any backend).

    Returns:
      (out [B, T, N, H] in q.dtype, lse [B, T, N] float32), as `hybrid_attention`.
    """
    from pallas_kernels.hybrid import merge_attention

    return merge_attention(prefix_part(q, k_cache, v_cache, lengths, sm_scale=sm_scale, implementation=implementation),
                           causal_part(q, k, v, sm_scale=sm_scale, implementation=implementation))


def _xla(implementation: str) -> str:
    if implementation != "xla":
        raise ValueError(f"implementation must be 'cudnn' or 'xla', got {implementation!r}")
    return implementation


def _bnt(out):
    o, lse = out
    return o, jnp.swapaxes(lse, 1, 2).astype(jnp.float32)  # cuDNN's statistics are [B, N, T]
