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
at T > 0 but needs the tree built by sampling from q; it is not implemented.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

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


def target_choices(key: jax.Array, logits: jax.Array, sampling) -> jax.Array:
    """int32 [B, Nn]: one independent target draw per node (argmax when temperature == 0).

    `sampling.sample` draws with a single key over all leading dimensions; jax.random.categorical
    uses independent randomness per row, which is what the losslessness argument needs.
    """
    from longspec_jax import sampling as sampling_lib

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
