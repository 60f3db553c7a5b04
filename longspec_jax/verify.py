"""Lossless acceptance of a draft tree against the target's logits: "sample, then match" for beam
trees (`accept`), rejection sampling for trees drawn from the draft (`accept_sampled`).

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
distribution-preserving (spec 3.5): rejection needs children drawn from q, as below.

Sampled drafts at T > 0 (`accept_sampled`): trees (chains included) whose children were drawn
from the draft distribution q without replacement (`sampled_tree`: q processed with the same
temperature / top-k / top-p as p; a static topology) are verified by rejection sampling, which
accepts a proposal x with probability ~ min(1, p(x) / q(x)) instead of only when the target's own
draw equals it: per depth about 1 - TV(p, q) against p(argmax q). Two rules, both exact:

* token-wise (`block=False`): recursive rejection sampling over each node's siblings (SpecInfer,
  SpecTr), without replacement as in Jeon et al. 2024, walked down from the root. At a reached
  node with target p_1 = p and children x_1..x_m: accept x_j with probability
  min(1, p_j(x_j) / q_j(x_j)), where q_j is q with x_1..x_{j-1} removed and renormalised (the law
  x_j was drawn from) and p_{j+1} = norm(max(p_j - q_j, 0)); if all are rejected emit a draw of
  p_{m+1}. Exact: given x_1..x_{j-1} rejected, accepting x_j ~ q_j w.p. min(1, p_j/q_j) yields
  min(p_j, q_j)(y), and a rejection (probability sum(max(p_j - q_j, 0))) leaves exactly
  max(p_j - q_j, 0), whose normalisation p_{j+1} no longer depends on which x_j was rejected
  (p_{j+1}(x_j) = 0), so by induction over the siblings the emitted token is a draw of p. On a
  chain this is Leviathan et al.'s speculative sampling.
* block (`block=True`, the default): the whole path's likelihood ratio decides, as block
  verification does on chains (Sun et al. 2024, arXiv 2403.10444) and traversal verification on
  trees (Weng et al. 2025). Node u carries a weight w_u (the root 1) and a demand D_1 = w_u p_u, a
  sub-distribution over its next token; its children in draw order get w_j = min(1, D_j(x_j) /
  q_j(x_j)) and hand on D_{j+1} = max(D_j - q_j, 0) / (1 - |D_j| + |max(D_j - q_j, 0)|), |.| the
  total mass. Verification runs leaf to root: a node is *taken* if one of its children is, else
  with probability |D_{m+1}| (a leaf: w_u); the path follows each node's first taken child and
  ends with a draw of D_{m+1} / |D_{m+1}|. Exact: by induction from the leaves, a node of weight w
  is taken with probability w, and then next emits y with probability w p_u(y). Child j takes
  min(D_j, q_j)(y) of it; it is refused with probability 1 - |D_j| + |max(D_j - q_j, 0)|, after
  which D_{j+1} (the same whichever x_j was refused) carries the rest max(D_j - q_j, 0)(y); the
  terms telescope to D_1 = w_u p_u. At the root w = 1: every emitted token is a draw of the target
  conditional given the tokens before it. On a chain this is Sun et al.'s rule, which they prove
  optimal in expected accepted tokens (so never below token-wise); on trees the exact tests find
  it never below token-wise either.

Rows at temperature 0 are exact under both: their proposals are one-hot draws of the draft's top
choices, p is one-hot, and both rules reduce to matching the target's argmax.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from longspec_jax import sampling as sampling_lib
from longspec_jax.sampled_tree import topology
from longspec_jax.tree import Tree, TreeShape


@flax.struct.dataclass
class Acceptance:
    """Result of verifying one tree per row.

    num_accepted: int32 [B]      k: accepted draft tokens (0..D); k + 1 tokens are emitted
    path:         int32 [B, G]   node index at depth j of the accepted path, j = 0..D
                                 (path[:, 0] = root; entries j > k repeat the deepest node)
    tokens:       int32 [B, G]   emitted tokens, j <= k: the k accepted draft tokens (those of
                                 path[:, 1..k]) then the bonus; entries j > k are junk
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
    # ok[u]: the target chose u's token at u's parent (the root is always ok). Unfilled nodes
    # never match: they are only read if expand() was skipped, which the decoder never does.
    ok = jnp.take_along_axis(choices, tree.parents, axis=1) == tree.tokens  # [B, Nn]
    k, path = _walk(tree, shape, ok)
    return Acceptance(num_accepted=k, path=path, tokens=jnp.take_along_axis(choices, path, axis=1))


def _walk(tree: Tree, shape: TreeShape, ok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(k [B], path [B, G]) of the walk from the root through nodes whose `ok` holds (bool [B, Nn],
    at most one ok child per node; the root's entry is ignored)."""
    depths = jnp.asarray(shape.node_depths)  # [Nn]
    G = shape.max_accept
    ok = ok.at[:, 0].set(True)
    # reached[u]: every node on the path root..u is ok.
    reached = jnp.all(ok[:, None, :] | ~tree.mask, axis=-1)  # [B, Nn]
    # The reached nodes form one chain (at most one ok child per node), so the deepest is unique.
    deepest = jnp.argmax(jnp.where(reached, depths[None, :], -1), axis=-1).astype(jnp.int32)  # [B]
    k = depths[deepest]
    anc = jnp.take_along_axis(tree.mask, deepest[:, None, None], axis=1)[:, 0, :]  # [B, Nn]
    at_depth = anc[:, None, :] & (depths[None, None, :] == jnp.arange(G)[None, :, None])  # [B, G, Nn]
    node = jnp.argmax(at_depth, axis=-1).astype(jnp.int32)
    path = jnp.where(jnp.any(at_depth, axis=-1), node, deepest[:, None])  # [B, G]
    return k.astype(jnp.int32), path


def sampled_weights(tree: Tree, shape: TreeShape, p: jax.Array, q_probs: jax.Array, greedy: jax.Array,
                    block: bool) -> tuple[jax.Array, jax.Array]:
    """Every node's acceptance weight and final demand under `accept_sampled`'s rule (module docstring).

    Args:
      tree: a sampled tree (`sampled_tree`: static topology, children in draw order, score -inf for
        a child that could not be drawn).
      shape: its static shape.
      p: float32 [B, Nn, V] the target's processed probabilities at every node.
      q_probs: float32 [B, Nn - n_D, V] the processed draft distribution each node of depth < D drew
        its children from (zero outside a draft vocabulary).
      greedy: bool [B] rows at temperature 0: their proposals count as one-hot draws.
      block: the whole-path rule; else token-wise (every node's demand is its own p).
    Returns:
      w: float32 [B, Nn] per node (root 1): block, the chance that its subtree is taken once it is
        considered; token-wise, the chance that its own coin accepts it once it is tried.
      demand: float32 [B, Nn, V] what is left of each node's demand after all its children were
        refused: its mass is the chance the node ends the path then (block; token-wise 1), and
        normalised it is the law of the bonus token there.
    """
    topo = topology(shape)
    B, _, V = p.shape
    vocab = jnp.arange(V, dtype=jnp.int32)
    drawn = tree.scores > -jnp.inf  # [B, Nn]
    w = jnp.ones(tree.scores.shape, jnp.float32)
    demands = []
    for d in range(shape.depth + 1):  # static unroll, top-down: a level's weights fix its children's
        o, n = shape.offsets[d], shape.level_sizes[d]
        demand = p[:, o:o + n] * (w[:, o:o + n, None] if block else 1.0)  # [B, n, V]
        table = topo.children[d] if d < shape.depth else np.zeros((n, 0), np.int32)
        q = q_probs[:, o:o + n] if d < shape.depth else None
        removed = jnp.zeros((B, n, V), bool)  # tokens of the children drawn so far
        for j in range(table.shape[1]):  # children in draw order
            has = table[:, j] >= 0  # [n] static: the parent has a j-th child
            kid = np.where(has, table[:, j], 0)
            x = tree.tokens[:, kid]  # [B, n]
            is_x = vocab == x[:, :, None]  # [B, n, V]
            left = jnp.where(removed, 0.0, q)
            mass = jnp.sum(left, axis=-1, keepdims=True)
            # q_j: the law x_j was drawn from (q without the earlier siblings), one-hot for greedy rows.
            q_j = jnp.where(greedy[:, None, None], is_x.astype(jnp.float32), left / jnp.where(mass > 0, mass, 1.0))
            live = has[None, :] & drawn[:, kid]  # [B, n]
            q_x = jnp.sum(jnp.where(is_x, q_j, 0.0), axis=-1)
            d_x = jnp.sum(jnp.where(is_x, demand, 0.0), axis=-1)
            live = live & (q_x > 0)
            w_j = jnp.where(live, jnp.minimum(d_x / jnp.where(live, q_x, 1.0), 1.0), 0.0)
            rest = jnp.maximum(demand - q_j, 0.0)
            rest_mass = jnp.sum(rest, axis=-1, keepdims=True)
            # Chance that this child is refused, averaged over x_j: 1 - sum(min(demand, q_j)).
            refused = jnp.maximum(1.0 - jnp.sum(demand, axis=-1, keepdims=True), 0.0) + rest_mass
            handed_on = jnp.where(refused > 0, rest / jnp.where(refused > 0, refused, 1.0), 0.0)
            demand = jnp.where(live[:, :, None], handed_on, demand)
            removed = removed | (is_x & live[:, :, None])
            cols = np.flatnonzero(has)
            w = w.at[:, table[cols, j]].set(w_j[:, cols])
        demands.append(demand)
    return w, jnp.concatenate(demands, axis=1)


def accept_sampled(key: jax.Array, tree: Tree, shape: TreeShape, logits: jax.Array, q_probs: jax.Array, sampling,
                   *, block: bool = True) -> Acceptance:
    """Rejection-sampling verification of a sampled tree: block (whole-path) or token-wise rule
    (module docstring); exact for every row, greedy rows included.

    Args:
      key: PRNG key, or [B] per-row keys, fresh every iteration (coins and the bonus token).
      tree: a sampled tree (`sampled_tree.init_tree` / `expand`); a chain is one too.
      shape: its static shape.
      logits: float32 [B, Nn, V] the target's logits at every node.
      q_probs: float32 [B, Nn - n_D, V] the processed draft distribution each node of depth < D drew
        its children from, over the full vocabulary (zero outside a draft vocabulary).
      sampling: SamplingParams or RowSampling (p = exp(process_logits(logits, sampling))).
      block: the whole-path rule (default); False: token-wise recursive rejection sampling.
    """
    B, Nn, _ = logits.shape
    p = jnp.exp(sampling_lib.process_logits(logits, sampling))  # [B, Nn, V]
    w, demand = sampled_weights(tree, shape, p, q_probs, sampling_lib.is_greedy_row(sampling, B), block)
    k_coin, k_bonus = sampling_lib.split(key)
    coin = sampling_lib.uniform(k_coin, (B, Nn))
    topo = topology(shape)
    if block:
        # Leaf to root: a node is taken if a child is, else by its own coin against its demand's mass.
        taken = coin < jnp.sum(demand, axis=-1)
        for d in reversed(range(shape.depth)):
            table = topo.children[d]
            o, n = shape.offsets[d], shape.level_sizes[d]
            kids = taken[:, np.where(table >= 0, table, 0)] & (table >= 0)[None]  # [B, n, m]
            taken = taken.at[:, o:o + n].set(taken[:, o:o + n] | jnp.any(kids, axis=-1))
    else:
        taken = coin < w  # each child's own acceptance, tried only once its earlier siblings failed
    # ok[c]: c is the first taken child of its parent (the walk moves there).
    ok = jnp.zeros((B, Nn), bool)
    for d in range(shape.depth):
        table = topo.children[d]
        before = jnp.zeros((B, table.shape[0]), bool)
        for j in range(table.shape[1]):
            has = table[:, j] >= 0
            t = jnp.where(has[None], taken[:, np.where(has, table[:, j], 0)], False)  # [B, n]
            cols = np.flatnonzero(has)
            ok = ok.at[:, table[cols, j]].set((t & ~before)[:, cols])
            before = before | t
    k, path = _walk(tree, shape, ok)
    end = jnp.take_along_axis(path, k[:, None], axis=1)  # [B, 1] the path's last node
    left = jnp.take_along_axis(demand, end[:, :, None], axis=1)[:, 0]  # [B, V]
    mass = jnp.sum(left, axis=-1, keepdims=True)
    # The path ends at a node whose demand has mass (it was taken); p there guards rounding only.
    law = jnp.where(mass > 0, left / jnp.where(mass > 0, mass, 1.0), jnp.take_along_axis(p, end[:, :, None], 1)[:, 0])
    bonus = sampling_lib.categorical(k_bonus, jnp.log(law))  # [B]
    G = shape.max_accept
    j = jnp.arange(G)[None, :]
    following = jnp.concatenate([path[:, 1:], path[:, -1:]], axis=1)  # node at depth j + 1
    drafted = jnp.take_along_axis(tree.tokens, following, axis=1)
    tokens = jnp.where(j < k[:, None], drafted, bonus[:, None]).astype(jnp.int32)
    return Acceptance(num_accepted=k, path=path, tokens=tokens)
