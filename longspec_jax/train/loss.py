"""Chunked next-token cross-entropy (and distillation) through a (shared) LM head, in float32.

With 128k-152k vocabularies and 32k-token sequences the logits of one row are 4-5e9 floats, so the
head matmul and the softmax are computed chunk by chunk along T inside a `lax.scan`, and each
chunk is wrapped in `jax.checkpoint`: the backward pass recomputes the chunk's logits instead of
keeping them, so at most [B, chunk, V] float32 logits are alive at once (the role Liger's fused
linear cross-entropy plays in the original).

Convention: `tokens[:, t]` is predicted from `hidden[:, t - 1]`; `loss_mask[:, t]` says whether
token t counts as a target (0 for padding, for chat prompts, and for t = 0). The function returns
the *sum* of per-token losses and the number of counted tokens, so gradient accumulation and data
parallelism can divide once by the global count (exact global mean, independent of sharding).

`chunked_draft_losses` is the draft objective's variant: in the same chunk pass it also computes the
frozen target's logits and (a) the target's own CE (logged, spec 5.1), (b) the forward KL
KL(p_target || p_draft) for distillation (train.distill > 0: loss = (1 - a) CE + a T^2 KL at
temperature T, the DistillSpec / knowledge-distillation form; the spec's recipe is a = 0), and
(c) how often the draft's argmax equals the target's, the quantity greedy verification accepts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _sequence_chunks(hiddens, tokens, loss_mask, chunk: int):
    """Shift for next-token prediction and cut along T into a scan's [n_chunks, B, chunk, ...] inputs.

    Position t of each hidden state predicts token t + 1, so the last hidden and the first label
    are dropped; T - 1 is padded up to a multiple of `chunk` with weight-0 rows, which add nothing
    to any sum or gradient. Returns (hiddens, labels int32, weights float32), each chunked.
    """
    B, T = tokens.shape
    n = T - 1
    chunk = max(1, min(chunk, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n

    def cut(x):
        x = x[:, :-1] if x.ndim == 3 else x[:, 1:]
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape((B, n_chunks, chunk) + x.shape[2:]).swapaxes(0, 1)

    return ([cut(h) for h in hiddens], cut(tokens.astype(jnp.int32)), cut(loss_mask.astype(jnp.float32)))


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
    (h,), labels, weights = _sequence_chunks([hidden], tokens, loss_mask, chunk)
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


DRAFT_PARTS = ("ce", "kl", "target_ce", "agree")  # the logged sums of `chunked_draft_losses`, in order


def chunked_draft_losses(hidden: jax.Array, target_hidden: jax.Array, head: jax.Array, tokens: jax.Array,
                         loss_mask: jax.Array, *, chunk: int = 512, distill: float = 0.0,
                         temperature: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The draft objective's loss sum and its parts, one chunked pass over the sequence.

    Args:
      hidden: [B, T, D] draft hidden states (position t predicts token t + 1).
      target_hidden: [B, T, D] the frozen target's post-final-norm hidden states (no gradient flows
        into them; position t's logits are the target's distribution over token t + 1).
      head: [D, V] shared LM head (frozen).
      tokens, loss_mask: [B, T] as in `chunked_cross_entropy`.
      distill: weight a of the distillation term, in [0, 1].
      temperature: softmax temperature T of both distributions in the KL term.

    Returns:
      (objective_sum, parts): objective_sum = sum over counted tokens of
      (1 - a) * CE + a * T^2 * KL(p_target^T || p_draft^T); parts holds float32 sums over counted
      tokens: "ce" (draft CE on the data), "kl" (the KL term at T, before weighting), "target_ce"
      (the target's CE on the data), "agree" (1 where argmax draft == argmax target), and "count".
    """
    (h, th), labels, weights = _sequence_chunks([hidden, target_hidden], tokens, loss_mask, chunk)
    head32 = head.astype(jnp.float32)
    a, inv_t = float(distill), 1.0 / float(temperature)

    @jax.checkpoint
    def chunk_terms(h_c, th_c, y_c, w_c):
        logits = jnp.einsum("BCD,DV->BCV", h_c.astype(jnp.float32), head32, preferred_element_type=jnp.float32)
        t_logits = jax.lax.stop_gradient(
            jnp.einsum("BCD,DV->BCV", th_c.astype(jnp.float32), head32, preferred_element_type=jnp.float32))
        log_q = jax.nn.log_softmax(logits, axis=-1)
        log_p = jax.nn.log_softmax(t_logits, axis=-1)
        ce = -jnp.take_along_axis(log_q, y_c[..., None], axis=-1)[..., 0]
        t_ce = -jnp.take_along_axis(log_p, y_c[..., None], axis=-1)[..., 0]
        agree = (jnp.argmax(logits, axis=-1) == jnp.argmax(t_logits, axis=-1)).astype(jnp.float32)
        if inv_t != 1.0:  # at T = 1 the KL reuses the CE's log-softmaxes (one pass over V fewer each)
            log_p = jax.nn.log_softmax(t_logits * inv_t, axis=-1)
            log_q = jax.nn.log_softmax(logits * inv_t, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        objective = (1.0 - a) * ce + (a * temperature * temperature) * kl
        sums = [jnp.sum(x * w_c) for x in (objective, ce, kl, t_ce, agree)]
        # Only the objective carries gradient; the logged parts are cut off from it.
        return sums[0], jax.lax.stop_gradient(jnp.stack(sums[1:]))

    def body(carry, xs):
        obj, parts = carry
        o, p = chunk_terms(*xs)
        return (obj + o, parts + p), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((len(DRAFT_PARTS),), jnp.float32))
    (total, parts), _ = jax.lax.scan(body, init, (h, th, labels, weights))
    out = {k: parts[i] for i, k in enumerate(DRAFT_PARTS)}
    out["count"] = jnp.sum(weights)
    return total, out


def dense_draft_losses(hidden, target_hidden, head, tokens, loss_mask, *, distill=0.0, temperature=1.0):
    """Reference for `chunked_draft_losses` with full [B, T, V] logits (tests only)."""
    f32 = jnp.float32
    logits = jnp.einsum("BTD,DV->BTV", hidden[:, :-1].astype(f32), head.astype(f32))
    t_logits = jnp.einsum("BTD,DV->BTV", target_hidden[:, :-1].astype(f32), head.astype(f32))
    y = tokens[:, 1:, None].astype(jnp.int32)
    w = loss_mask[:, 1:].astype(f32)
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y, -1)[..., 0]
    t_ce = jax.nn.logsumexp(t_logits, -1) - jnp.take_along_axis(t_logits, y, -1)[..., 0]
    log_p = jax.nn.log_softmax(t_logits / temperature, -1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(logits / temperature, -1)), -1)
    agree = (jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1)).astype(f32)
    obj = (1.0 - distill) * ce + distill * temperature ** 2 * kl
    return jnp.sum(obj * w), {"ce": jnp.sum(ce * w), "kl": jnp.sum(kl * w), "target_ce": jnp.sum(t_ce * w),
                              "agree": jnp.sum(agree * w), "count": jnp.sum(w)}


def dense_cross_entropy(hidden, head, tokens, loss_mask):
    """Reference: the same quantity with the full [B, T, V] logits (tests only)."""
    logits = jnp.einsum("BTD,DV->BTV", hidden[:, :-1].astype(jnp.float32), head.astype(jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    w = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum((lse - picked) * w), jnp.sum(w)
