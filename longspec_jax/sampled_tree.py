"""Sampled draft trees: a static topology per tree shape, children drawn from the draft without
replacement (the drafts of `verify.accept_sampled`).

Rejection-sampling verification at temperature > 0 is exact only for proposals that are draws of
the draft's own distribution q (processed with the row's temperature / top-k / top-p, exactly as
the target's sampler processes p), and only if how many children a node gets does not depend on
which tokens they turn out to be. The beam search (`tree.expand`) meets neither condition: it
keeps the best-scored (parent, token) pairs, so both the tokens and the number of children per
parent follow the scores. Here:

* The topology is fixed per `TreeShape` at trace time (`topology`). The n_{d+1} nodes of depth
  d + 1 are shared out among the n_d nodes of depth d greedily by a prior on how often a node lies
  on the accepted path: a node's reach times the chance that a j-th drawn child is the accepted
  one (`FIRST_CHILD` * `LATER_CHILD` ** j). The first-drawn children, the likeliest accepted,
  get the deepest subtrees, as in Sequoia's trees (Chen et al. 2024). Siblings are contiguous and
  in draw order; a chain shape is a chain.
* Children are drawn by Gumbel-top-k: the top m of log q + Gumbel noise are m ordered draws
  without replacement from q (Vieira 2014; Kool et al. 2019), one top-k per level for every node.
  Where q has fewer than m tokens of nonzero probability (top-k, top-p), the children past its
  support cannot be drawn: their score is -inf and verification never accepts them.
* Rows at temperature 0 take the top m of the draft's logits instead: deterministic proposals,
  which verification treats as the one-hot draws they are (that is, it matches the target's
  argmax, so greedy rows stay exactly greedy).

Shapes (STYLE.md alphabet): B batch, Nn nodes, n nodes at a level, m most children of one of
them, V vocabulary (V' with a draft vocabulary).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from longspec_jax import sampling as smp
from longspec_jax.tree import Tree, TreeShape, row_top_k

# Prior of the topology: the chance that a node's first-drawn child is on the accepted path (about
# the demo pair's at T = 1), and the factor each later sibling loses (it is tried only after the
# earlier ones were refused, against the residual they leave; a coarse value, docs/perf_notes.md,
# "Sampled drafts at T > 0"). Only where nodes go depends on it, never exactness.
FIRST_CHILD = 0.75
LATER_CHILD = 0.25


@dataclasses.dataclass(frozen=True, eq=False)
class Topology:
    """The static structure of a sampled tree (numpy; one per `TreeShape`, see `topology`).

    Attributes:
      parents: int32 [Nn] parent of every node (the root points at itself).
      children: per depth d < D, int32 [n_d, m_d]: node index of the j-th drawn child of the
        depth-d node u (local index), -1 past its last child; m_d is the most any depth-d node has.
      mask: bool [Nn, Nn] ancestor mask: mask[u, v] iff v is u or an ancestor of u.
    """

    parents: np.ndarray
    children: tuple[np.ndarray, ...]
    mask: np.ndarray


@functools.cache
def topology(shape: TreeShape) -> Topology:
    """The sampled-tree topology of `shape` (module docstring): breadth-first, siblings contiguous."""
    parents, reach, level = [0], [1.0], [0]
    children = []
    for n_next in shape.widths:
        # Every (parent, j-th child) slot scored by its prior reach; the n_next best, stable on ties.
        slots = sorted((-reach[u] * FIRST_CHILD * LATER_CHILD ** j, i, j)
                       for i, u in enumerate(level) for j in range(n_next))[:n_next]
        chosen = sorted((i, j, -r) for r, i, j in slots)  # layout: by parent, then draw order
        table = np.full((len(level), max(j for _, j, _ in chosen) + 1), -1, np.int32)
        next_level = []
        for i, j, r in chosen:
            table[i, j] = len(parents)
            next_level.append(len(parents))
            parents.append(level[i])
            reach.append(r)
        children.append(table)
        level = next_level
    Nn = len(parents)
    mask = np.eye(Nn, dtype=bool)
    for u in range(1, Nn):  # parents precede children, so a parent's row is final
        mask[u] |= mask[parents[u]]
    return Topology(parents=np.asarray(parents, np.int32), children=tuple(children), mask=mask)


def init_tree(shape: TreeShape, root_tokens: jax.Array) -> Tree:
    """A sampled tree holding only the root: the static parents and ancestor mask are final; deeper
    tokens are filled by `expand` (until then token 0, score -inf)."""
    topo = topology(shape)
    B, Nn = root_tokens.shape[0], shape.num_nodes
    tokens = jnp.zeros((B, Nn), jnp.int32).at[:, 0].set(root_tokens.astype(jnp.int32))
    scores = jnp.full((B, Nn), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    return Tree(tokens=tokens, parents=jnp.broadcast_to(jnp.asarray(topo.parents), (B, Nn)),
                mask=jnp.broadcast_to(jnp.asarray(topo.mask), (B, Nn, Nn)), scores=scores)


def expand(tree: Tree, shape: TreeShape, level: int, logits: jax.Array, sampling, key: jax.Array,
           vocab_ids: jax.Array | None = None) -> tuple[Tree, jax.Array]:
    """Draw the children of every node of `level` (module docstring).

    Args:
      tree: the tree with levels 0..level filled.
      shape: its static shape; level: static int in [0, D).
      logits: float [B, n_level, V] the draft's logits at each node of `level` (V' columns with
        `vocab_ids`).
      sampling: SamplingParams or RowSampling (the rows' temperature / top-k / top-p).
      key: PRNG key or [B] per-row keys, fresh for this level.
      vocab_ids: optional int32 [V'] full-vocabulary id of each column.
    Returns:
      (the tree with level + 1 filled, q float32 [B, n_level, V] (V' columns with `vocab_ids`): the
      processed draft distribution the children were drawn from). Scores are cumulative log q
      (the draft's raw log-probabilities for greedy rows); -inf marks a child that could not be drawn.
    """
    table = topology(shape).children[level]  # [n, m]
    n, m = table.shape
    B = logits.shape[0]
    logits = logits.astype(jnp.float32)
    logq = smp.process_logits(logits, sampling)  # [B, n, V'], -inf where filtered
    raw = jax.nn.log_softmax(logits, axis=-1)
    greedy = smp.is_greedy_row(sampling, B)[:, None, None]
    perturbed = jnp.where(greedy, raw, logq + smp.gumbel(key, logq.shape))
    top, cols = row_top_k(perturbed, m)  # [B, n, m]: draw order
    child_logq = jnp.take_along_axis(jnp.where(greedy, raw, logq), cols, axis=-1)
    parent_scores = tree.scores[:, shape.offsets[level]:shape.offsets[level] + n]
    scores = jnp.where(top > -jnp.inf, parent_scores[:, :, None] + child_logq, -jnp.inf)
    tokens = cols if vocab_ids is None else jnp.take(vocab_ids.astype(jnp.int32), cols, axis=0)
    # Children are numbered by (parent, draw order): the slots that exist, in row-major order.
    src = np.flatnonzero(table.ravel() >= 0)
    o = shape.offsets[level + 1]
    tree = tree.replace(
        tokens=tree.tokens.at[:, o:o + src.size].set(tokens.reshape(B, n * m)[:, src].astype(jnp.int32)),
        scores=tree.scores.at[:, o:o + src.size].set(scores.reshape(B, n * m)[:, src]))
    return tree, jnp.exp(logq)
