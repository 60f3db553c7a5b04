"""Chunked next-token cross-entropy through a (shared) LM head, in float32 (spec 5.1).

With 128k-152k vocabularies and 32k-token sequences the logits of one row are 4-5e9 floats, so the
head matmul and the softmax are computed chunk by chunk along T inside a `lax.scan`, and each
chunk is wrapped in `jax.checkpoint`: the backward pass recomputes the chunk's logits instead of
keeping them, so at most [B, chunk, V] float32 logits are alive at once (the role Liger's fused
linear cross-entropy plays in the original).

Convention: `tokens[:, t]` is predicted from `hidden[:, t - 1]`; `loss_mask[:, t]` says whether
token t counts as a target (0 for padding, for chat prompts, and for t = 0). The function returns
the *sum* of per-token losses and the number of counted tokens, so gradient accumulation and data
parallelism can divide once by the global count (exact global mean, independent of sharding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def head_weight(target) -> jax.Array:
    """The target's output projection as [D, V] (untied LM head, or the transposed tied embedding)."""
    if target.cfg.tie_word_embeddings:
        return target.embedder.embedding[...].T
    return target.lm_head.kernel[...]


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                          *, chunk: int = 512) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token CE over counted tokens, and their count.

    Args:
      hidden: [B, T, D] hidden states (draft output, or the target's post-final-norm hidden).
      head: [D, V] LM-head weight (any dtype; the matmul and softmax run in float32).
      tokens: [B, T] int token ids.
      loss_mask: [B, T] (bool / 0-1): whether token t is a prediction target.
      chunk: sequence chunk length; T - 1 is padded up to a multiple of it.

    Returns:
      (loss_sum float32 scalar, count float32 scalar).
    """
    B, T, D = hidden.shape
    # Predict token t+1 from hidden t: drop the last hidden and the first label.
    h = hidden[:, :-1]
    labels = tokens[:, 1:].astype(jnp.int32)
    weights = loss_mask[:, 1:].astype(jnp.float32)
    n = T - 1
    chunk = max(1, min(chunk, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    if pad:
        # Padded rows carry weight 0, so they add nothing to the sum or the gradient.
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    # [n_chunks, B, chunk, ...] so the scan walks the sequence.
    h = h.reshape(B, n_chunks, chunk, D).swapaxes(0, 1)
    labels = labels.reshape(B, n_chunks, chunk).swapaxes(0, 1)
    weights = weights.reshape(B, n_chunks, chunk).swapaxes(0, 1)
    head32 = head.astype(jnp.float32)

    @jax.checkpoint
    def chunk_loss(h_c, y_c, w_c):
        # [B, C, V] float32: the only large intermediate, recomputed in the backward pass.
        logits = jnp.einsum("BCD,DV->BCV", h_c.astype(jnp.float32), head32,
                            preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - picked) * w_c)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, labels, weights))
    return total, jnp.sum(weights)


def dense_cross_entropy(hidden, head, tokens, loss_mask):
    """Reference: the same quantity with the full [B, T, V] logits (tests only)."""
    logits = jnp.einsum("BTD,DV->BTV", hidden[:, :-1].astype(jnp.float32), head.astype(jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    w = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum((lse - picked) * w), jnp.sum(w)
