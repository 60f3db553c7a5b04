"""Static-shape draft trees for LongSpec tree speculative decoding (spec section 3.1).

A tree shape `(n_1, ..., n_D)` fixes how many nodes sit at each depth (the beam width of the
global beam search), not the number of children per parent. `(1, 1, 1, 1)` is a plain chain of
4 drafts and goes through exactly the same code path. Nodes are laid out breadth-first:

  node 0                      the root (the last sampled token, not yet in the target cache)
  nodes [o_d, o_d + n_d)      depth d, with o_1 = 1 and o_{d+1} = o_d + n_d

so the depth of every node index, the offsets and all buffer shapes are static (known at trace
time); only the topology (which parent each node hangs off) and the tokens change per iteration.
The topology comes from the global beam search of the original: at depth d every (parent at
depth d, vocabulary entry) pair is scored by the parent's cumulative draft log-probability plus
log q(token | parent); the n_{d+1} best pairs over the flattened n_d x V grid become depth d+1.
Parents that receive no child stay in the tree as leaves.

Shapes (STYLE.md alphabet): B batch, Nn = 1 + sum(n) tree nodes, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """Nodes per depth `(n_1, ..., n_D)`; hashable, so it can be a static jit argument."""

    widths: tuple[int, ...]

    def __post_init__(self):
        widths = tuple(int(w) for w in self.widths)
        object.__setattr__(self, "widths", widths)
        if not widths:
            raise ValueError("tree shape must have at least one depth, e.g. (4, 16, 16, 16, 16) or (1, 1, 1, 1)")
        if any(w <= 0 for w in widths):
            raise ValueError(f"every depth of the tree shape needs at least one node, got {widths}")

    @classmethod
    def parse(cls, shape) -> "TreeShape":
        """Accept a TreeShape, a sequence of ints, or a string like '4 16 16 16 16' / '4,16,16'."""
        if isinstance(shape, TreeShape):
            return shape
        if isinstance(shape, str):
            parts = shape.replace(",", " ").split()
            try:
                return cls(tuple(int(p) for p in parts))
            except ValueError:
                raise ValueError(f"tree shape {shape!r} must be integers separated by spaces or commas") from None
        return cls(tuple(shape))

    @property
    def depth(self) -> int:
        """D: the deepest level, also the most draft tokens one iteration can accept."""
        return len(self.widths)

    @property
    def is_chain(self) -> bool:
        """True for a plain chain (one node per depth): node d sits at depth d, parent d - 1."""
        return all(w == 1 for w in self.widths)

    @property
    def num_nodes(self) -> int:
        """Nn = 1 + sum(n): nodes including the root (the target verifies all of them at once)."""
        return 1 + sum(self.widths)

    @property
    def max_accept(self) -> int:
        """G = D + 1: the most tokens one iteration can produce (D drafts + the bonus token)."""
        return self.depth + 1

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """(1, n_1, ..., n_D): level 0 is the root."""
        return (1,) + self.widths

    @property
    def offsets(self) -> tuple[int, ...]:
        """First node index of each level (0 for the root, o_1 = 1, ...)."""
        return tuple(int(x) for x in np.cumsum((0,) + self.level_sizes[:-1]))

    @property
    def node_depths(self) -> np.ndarray:
        """int32 [Nn]: the depth of every node index (static)."""
        return np.repeat(np.arange(self.depth + 1, dtype=np.int32), self.level_sizes)

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse shapes the beam search cannot fill (more children than distinct (parent, token) pairs)."""
        for d, (n_prev, n_next) in enumerate(zip(self.level_sizes[:-1], self.level_sizes[1:])):
            if n_next > n_prev * vocab_size:
                raise ValueError(
                    f"tree shape {self.widths}: depth {d + 1} asks for {n_next} nodes but only "
                    f"{n_prev} parents x {vocab_size} tokens exist; use a narrower shape.")

    def __str__(self) -> str:
        return " ".join(map(str, self.widths))


@flax.struct.dataclass
class Tree:
    """One iteration's draft tree (all arrays static-shape).

    tokens:  int32 [B, Nn]   token of every node (tokens[:, 0] is the root)
    parents: int32 [B, Nn]   parent node index (the root points at itself)
    mask:    bool  [B, Nn, Nn] ancestor mask: mask[b, u, w] iff w is u or an ancestor of u;
             lower-triangular because ancestors have smaller indices (BFS layout)
    scores:  float32 [B, Nn] cumulative draft log-probability of the path to each node (root 0)
    """

    tokens: jax.Array
    parents: jax.Array
    mask: jax.Array
    scores: jax.Array

    def positions(self, shape: TreeShape, root_pos: jax.Array) -> jax.Array:
        """int32 [B, Nn]: a node at depth m sits at position root_pos + m (spec 2.2)."""
        return root_pos[:, None].astype(jnp.int32) + jnp.asarray(shape.node_depths)[None, :]


def init_tree(shape: TreeShape, root_tokens: jax.Array) -> Tree:
    """A tree holding only the root; deeper nodes are filled by `expand` (until then: token 0,
    parent 0, mask = self only, score -inf)."""
    B = root_tokens.shape[0]
    Nn = shape.num_nodes
    tokens = jnp.zeros((B, Nn), jnp.int32).at[:, 0].set(root_tokens.astype(jnp.int32))
    mask = jnp.broadcast_to(jnp.eye(Nn, dtype=bool), (B, Nn, Nn))
    scores = jnp.full((B, Nn), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    return Tree(tokens=tokens, parents=jnp.zeros((B, Nn), jnp.int32), mask=mask, scores=scores)


TOPK_CHUNK = 4096  # vocabulary chunk of `row_top_k`'s first stage


def row_top_k(x: jax.Array, k: int, chunk: int = TOPK_CHUNK) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis, exact (same values, same indices, same tie order), in
    two stages for long rows: the top k of each `chunk`-wide slice of the row, then the top k of
    those survivors. XLA's GPU top-k runs one row per thread block, so 16 rows of a 128k vocabulary
    keep 16 SMs busy (0.2 ms per draft level at Llama-3-8B shapes on an H100); cut into 4k-wide
    slices the first stage has 32x the parallelism. Ties: lax.top_k is stable (lower index first)
    and the survivors stay in index order, so the result equals the one-stage top-k."""
    V = x.shape[-1]
    if V <= 2 * chunk or k > chunk:
        return jax.lax.top_k(x, k)
    C = -(-V // chunk)
    pad = C * chunk - V
    if pad:  # -inf padding sorts after every real entry (and after real -inf entries: higher index)
        x = jnp.concatenate([x, jnp.full(x.shape[:-1] + (pad,), -jnp.inf, x.dtype)], axis=-1)
    xs = x.reshape(x.shape[:-1] + (C, chunk))
    v1, i1 = jax.lax.top_k(xs, k)  # [..., C, k]
    i1 = i1 + (jnp.arange(C, dtype=i1.dtype) * chunk)[:, None]
    v2, j = jax.lax.top_k(v1.reshape(x.shape[:-1] + (C * k,)), k)
    idx = jnp.take_along_axis(i1.reshape(x.shape[:-1] + (C * k,)), j, axis=-1)
    return v2, idx


def expand(tree: Tree, shape: TreeShape, level: int, logq: jax.Array, vocab_ids: jax.Array | None = None) -> Tree:
    """Add level `level + 1` by one global beam-search step.

    Args:
      tree: the tree with levels 0..level filled.
      shape: static tree shape.
      level: static int in [0, D), the level whose nodes were just run through the draft.
      logq: float32 [B, n_level, V] draft log-probabilities at each node of `level`
        (log_softmax of the draft logits, no temperature, as in the original). With `vocab_ids`
        the last axis is a draft vocabulary V' instead of the full one.
      vocab_ids: optional int32 [V'] full-vocabulary id of each column of `logq` (a draft
        vocabulary cut, see `longspec_jax.draft_vocab`): the chosen columns are mapped through it before
        they enter the tree, so tree tokens are always full-vocabulary ids.
    Returns:
      the tree with the n_{level+1} best (parent, token) pairs appended, best first.
    """
    sizes, offs = shape.level_sizes, shape.offsets
    n_par, n_child = sizes[level], sizes[level + 1]
    o_par, o_child = offs[level], offs[level + 1]
    B, _, V = logq.shape
    assert logq.shape[1] == n_par, (logq.shape, n_par)
    par_scores = tree.scores[:, o_par:o_par + n_par]  # [B, n_par]
    # Two-stage exact top-k: the global best n_child (parent, token) pairs are among each parent's
    # own best n_child tokens, so take those first ([B, n_par, k], a cheap per-row top-k over V)
    # and then the best of the n_par * k survivors. A single top-k over the flattened n_par * V
    # candidates (2M for 16 parents x 128k vocabulary) becomes a sort that takes minutes to
    # compile on GPU and is slow to run. Ties resolve as in the flat top-k: lower parent first,
    # then lower token, since lax.top_k is stable and the survivors stay in parent-major order.
    k = min(n_child, V)
    row_best, row_tok = row_top_k(logq.astype(jnp.float32), k)  # [B, n_par, k]
    cand = (par_scores[:, :, None] + row_best).reshape(B, n_par * k)
    best, idx = jax.lax.top_k(cand, n_child)  # [B, n_child]; (parent, token) pairs are distinct
    parents = (o_par + idx // k).astype(jnp.int32)
    tokens = jnp.take_along_axis(row_tok.reshape(B, n_par * k), idx, axis=1).astype(jnp.int32)
    if vocab_ids is not None:
        tokens = jnp.take(vocab_ids.astype(jnp.int32), tokens, axis=0)  # column -> full-vocab id
    # A child's ancestor row = its parent's row plus itself.
    par_rows = jnp.take_along_axis(tree.mask, parents[:, :, None], axis=1)  # [B, n_child, Nn]
    self_rows = jnp.arange(tree.mask.shape[-1])[None, None, :] == (o_child + jnp.arange(n_child))[None, :, None]
    rows = par_rows | self_rows
    return Tree(
        tokens=tree.tokens.at[:, o_child:o_child + n_child].set(tokens),
        parents=tree.parents.at[:, o_child:o_child + n_child].set(parents),
        mask=tree.mask.at[:, o_child:o_child + n_child, :].set(rows),
        scores=tree.scores.at[:, o_child:o_child + n_child].set(best),
    )
