"""Lossless acceptance of a draft tree against the target's logits ("sample, then match").

Given the target's logits Z[u] at every tree node u (its next-token distribution after the path
root..u), we draw ONE target token x[u] per node from the target's processed distribution
(`sampling.sample`: argmax at temperature 0, else temperature / top-k / top-p exactly as the
autoregressive sampler) with independent randomness per node, then walk down from the root:

    u = root
    loop: emit x[u]; if some child c of u carries token x[u], move to u = c and continue; else stop.

The last emitted token is the "bonus"; the others are accepted draft tokens. The same code serves
temperature 0 (x = argmax) and temperature > 0.

Why this is exactly lossless (distribution of the output = plain sampling from the target):
  * The first emitted token x[root] is a fresh draw from p(. | prefix), the target's processed
    distribution: the draft never changes which value it takes, only whether we get to continue.
  * Induction: suppose we emitted y_1..y_j and are at node u whose path spells y_1..y_j (the
    move to u happened because x[parent(u)] = token(u), a condition on already-emitted tokens).
    The next emitted token is x[u], drawn from p(. | prefix, y_1..y_j) with randomness that was
    not used for anything else (each node is visited at most once on the single walked path, and
    the keys of different nodes are independent). Conditioned on the emitted history, x[u] is
    therefore an exact sample of the target's next-token distribution. Whether the walk stops
    after it is a function of x[u] and of the draft tree only, i.e. of the past and the current
    token, never of future randomness, so it does not bias any emitted token: after a stop the next
    iteration restarts from the emitted prefix with fresh keys.
  * Hence every emitted token is sampled from the exact target conditional given everything
    emitted before it; the joint law of the output is the autoregressive one. At temperature 0
    x = argmax, so the output is token-for-token the greedy AR output (up to floating-point
    differences between the verification forward and a one-token decode of the target).
  * Children of one parent always carry distinct tokens (the beam search picks distinct
    (parent, token) pairs), so at most one child can match and the walked path is unique.

This is "sample from the target and match a child", the valid choice for a deterministic (beam)
tree; the original's `verify_stochastic` applied SpecInfer-style min(1, p/q) rejection to
deterministically chosen children (and indexed the vocabulary by child index), which is not
distribution-preserving (spec 3.5). Recursive rejection over *sampled* children could accept more
at T > 0 but needs the tree built by sampling from q; for trees it is not implemented.

Chains at T > 0 (`accept_sampled_chain`): when the tree is a chain and its drafts were *sampled*
from the draft distribution q (processed with the same temperature / top-k / top-p as the target),
the standard speculative-sampling rule applies (Leviathan et al. 2023, Chen et al. 2023): accept
draft x_d with probability min(1, p_{d-1}(x_d) / q_d(x_d)); at the first rejection emit a draw from
the residual norm(max(p_{d-1} - q_d, 0)), after D acceptances a draw from p_D. Each emitted token is
then an exact sample of the target conditional. Its acceptance probability per depth is
sum_x min(p(x), q(x)) = 1 - TV(p, q), against p(argmax q) for a deterministic draft: much higher
when both distributions are spread (T = 1 with a small model), similar when they are peaked.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from longspec_jax import sampling as sampling_lib
from longspec_jax.tree import Tree, TreeShape


@flax.struct.dataclass
class Acceptance:
    """Result of verifying one tree per row.

    num_accepted: int32 [B]      k: accepted draft tokens (0..D); k + 1 tokens are emitted
    path:         int32 [B, G]   node index at depth j of the accepted path, j = 0..D
                                 (path[:, 0] = root; entries j > k repeat the deepest node)
    tokens:       int32 [B, G]   emitted tokens: tokens[:, j] = x[path[:, j]] for j <= k
                                 (= accepted draft tokens then the bonus); entries j > k are junk
    """

    num_accepted: jax.Array
    path: jax.Array
    tokens: jax.Array


def target_choices(key: jax.Array | None, logits: jax.Array, sampling) -> jax.Array:
    """int32 [B, Nn]: one independent target draw per node (argmax for rows at temperature 0).

    `key` is one key or a [B] array of per-row keys; either way every (row, node) gets independent
    randomness (`sampling.categorical`), which is what the losslessness argument needs.
    """
    return sampling_lib.sample(key, logits, sampling).astype(jnp.int32)


def accept(tree: Tree, shape: TreeShape, choices: jax.Array) -> Acceptance:
    """Walk the tree along the target's choices (see the module docstring).

    Args:
      tree: the drafted tree (tokens, parents, ancestor mask).
      shape: its static shape.
      choices: int32 [B, Nn] the target's token at every node (`target_choices`).
    """
    depths = jnp.asarray(shape.node_depths)  # [Nn]
    G = shape.max_accept
    # ok[u]: the target chose u's token at u's parent (the root is always ok).
    ok = jnp.take_along_axis(choices, tree.parents, axis=1) == tree.tokens  # [B, Nn]
    ok = ok.at[:, 0].set(True)
    # reached[u]: every node on the path root..u is ok. Unfilled nodes never match: they are
    # only read if expand() was skipped, which the decoder never does.
    reached = jnp.all(ok[:, None, :] | ~tree.mask, axis=-1)  # [B, Nn]
    # The reached nodes form one chain (siblings carry distinct tokens), so the deepest is unique.
    deepest = jnp.argmax(jnp.where(reached, depths[None, :], -1), axis=-1).astype(jnp.int32)  # [B]
    k = depths[deepest]
    anc = jnp.take_along_axis(tree.mask, deepest[:, None, None], axis=1)[:, 0, :]  # [B, Nn]
    at_depth = anc[:, None, :] & (depths[None, None, :] == jnp.arange(G)[None, :, None])  # [B, G, Nn]
    node = jnp.argmax(at_depth, axis=-1).astype(jnp.int32)
    path = jnp.where(jnp.any(at_depth, axis=-1), node, deepest[:, None])  # [B, G]
    tokens = jnp.take_along_axis(choices, path, axis=1)
    return Acceptance(num_accepted=k.astype(jnp.int32), path=path, tokens=tokens)


def accept_sampled_chain(key: jax.Array, tree: Tree, shape: TreeShape, logits: jax.Array, q_probs: jax.Array,
                         sampling) -> Acceptance:
    """Speculative sampling over a chain whose drafts were drawn from q (module docstring).

    Rows at temperature 0 are exact too: q and p are one-hot, so a draft is accepted iff it is the
    target's argmax and the residual (or p_D) is the target's argmax: greedy acceptance.

    Args:
      key: PRNG key, or [B] per-row keys, for the acceptance draws and the bonus token (fresh every
        iteration).
      tree: a chain (node d at depth d, parent d - 1); tree.tokens[:, d] = x_d ~ q_d for d >= 1.
      shape: its static shape (`shape.is_chain`).
      logits: float32 [B, D + 1, V] the target's logits at nodes 0..D.
      q_probs: float32 [B, D, V] q_d, the draft distribution x_d was drawn from (probabilities over
        the full vocabulary; zero outside a draft vocabulary).
      sampling: SamplingParams or RowSampling (p = exp(process_logits(logits, sampling))).
    """
    if not shape.is_chain:
        raise ValueError(f"accept_sampled_chain needs a chain tree shape (one node per depth), got {shape}")
    D, G = shape.depth, shape.max_accept
    B = logits.shape[0]
    p = jnp.exp(sampling_lib.process_logits(logits, sampling))  # [B, D + 1, V]
    drafts = tree.tokens[:, 1:]  # [B, D] x_1 .. x_D
    p_x = jnp.take_along_axis(p[:, :D], drafts[:, :, None], axis=-1)[..., 0]  # p_{d-1}(x_d)
    q_x = jnp.take_along_axis(q_probs, drafts[:, :, None], axis=-1)[..., 0]  # q_d(x_d) > 0 (it was drawn)
    k_u, k_bonus = sampling_lib.split(key)
    u = sampling_lib.uniform(k_u, (B, D))
    ok = u * q_x < p_x  # u < p / q without dividing by a possibly tiny q
    k = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)  # leading accepts
    p_k = jnp.take_along_axis(p, k[:, None, None], axis=1)[:, 0]  # [B, V] target at node k
    q_next = jnp.take_along_axis(q_probs, jnp.minimum(k, D - 1)[:, None, None], axis=1)[:, 0]  # q_{k+1}
    residual = jnp.maximum(p_k - q_next, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # After D acceptances the bonus comes from p_D itself; a residual with no mass (p == q up to
    # rounding) can only follow a rejection of probability ~0, and p_k is then the right law.
    use_p = (k == D)[:, None] | (mass <= 0.0)
    bonus_p = jnp.where(use_p, p_k, residual / jnp.where(mass > 0.0, mass, 1.0))
    bonus = sampling_lib.categorical(k_bonus, jnp.log(bonus_p))  # [B]
    j = jnp.arange(G)[None, :]
    padded = jnp.concatenate([drafts, jnp.zeros((B, 1), drafts.dtype)], axis=1)  # [B, G]
    tokens = jnp.where(j < k[:, None], padded, bonus[:, None]).astype(jnp.int32)
    path = jnp.minimum(j, k[:, None]).astype(jnp.int32)  # chain: the node at depth j is node j
    return Acceptance(num_accepted=k, path=path, tokens=tokens)
