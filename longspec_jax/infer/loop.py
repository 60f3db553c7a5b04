"""The decode step and loop: autoregressive, or LongSpec tree speculative decoding (spec section 3).

`DecodeLoop` is the static part (hashable: the `self` of every jitted entry point); `DecodeState`
(`longspec_jax/infer/state.py`) the carry. One step advances every running row at once:

  AR (`tree=None`): one target forward on the root (the last emitted token), one draw, one token.
  Tree (`tree=TreeShape`), per row, all shapes static (Nn = 1 + sum(widths), G = depth + 1):
  1. Draft: D forwards of the one-block draft, level by level (root, depth 1 .. D-1), each
     followed by a global beam-search step (`tree.expand`) that fixes the next level's nodes, or,
     with `draft_sampling="sampled"`, by drawing every node's children from the draft's processed
     distribution without replacement on a static topology (`sampled_tree.expand`).
     Self-attention reads the constant-size ring plus the tree's own K/V under the ancestor mask;
     cross-attention reads the target's last-layer cache [0, c). Optionally over a draft vocabulary
     (`vocab`: the LM head restricted to V' columns).
  2. Verify: one target forward over the Nn tree tokens at positions c + depth, written at cache
     slots c + [0, Nn): hybrid tree attention (committed prefix + ancestor mask).
  3. Accept (`longspec_jax.verify`): beam drafts take one target draw per node and walk down the
     matching children; sampled drafts are verified by rejection sampling over each node's
     siblings, whole-path (block) or token-wise. k accepted drafts + 1 bonus token are emitted.
     Lossless at any temperature, per row.
  4. Commit: `kv_cache.compact` moves the k + 1 accepted rows to slots c .. c + k in EVERY target
     layer (a chain's accepted path is already in place); their draft K/V go into the ring. Then
     c <- c + k + 1 and the bonus token becomes the next root.

Invariants at the top of every step, per row: the target cache holds positions [0, c) in every
layer; the root sits at position c; the draft ring holds positions [0, c) (the draft cross-attends
to exactly the committed tokens, t_last = c). AR steps keep the ring current too when a draft is
present, so one state may alternate between AR and tree steps (the serving engine does).

Compaction in every layer instead of the original's re-feed of accepted tokens keeps each
verification at Nn rows (not Nn + D) and a single committed length per row; it moves <= G rows per
layer with one gather and one dynamic_update_slice per buffer.

Stop reasons per row: an EOS id emitted (output truncated right after it), the token budget
reached (truncated to exactly it), or the cache cannot hold another step (`cache_full`; never a
silent clamp: dynamic_update_slice would clamp the write offset and corrupt the cache).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longspec_jax.infer.state import STOP_CACHE_FULL, STOP_EOS, STOP_MAX_NEW, STOP_RUNNING, DecodeState
from longspec_jax import kv_cache as kvc
from longspec_jax import sampled_tree, verify
from longspec_jax import sampling as smp
from longspec_jax.draft_vocab import cut_logits
from longspec_jax.tree import TreeShape, expand, init_tree

MAX_ITERS = 2**31 - 1  # `run` without a step budget
_POLLS: dict[int, Callable[[], bool]] = {}  # `add_interrupt`: owner id -> poll
DRAFT_SAMPLING = ("beam", "sampled")
VERIFICATION = ("block", "token")


@dataclasses.dataclass(frozen=True)
class DecodeLoop:
    """What shapes one compiled decode step (frozen, hashable: the static `self` of `start`/`run`).

    Attributes:
      tree: the draft tree's nodes per depth, or None for autoregressive steps (no draft needed).
      draft_sampling: "beam": the global beam search picks the nodes and acceptance is
        sample-and-match (`verify.accept`). "sampled": every node's children are drawn from the
        draft's processed distribution q without replacement (`sampled_tree`) and verified by
        rejection sampling (`verify.accept_sampled`). Both are exact for every row at any
        temperature; sampling accepts more where the distributions are spread (T > 0), the beam
        more at T = 0, where a sampled tree's greedy rows take the draft's top children per node.
      verification: with sampled drafts, "block" (the whole path's likelihood ratio decides;
        never accepts less in expectation) or "token" (token-wise recursive rejection sampling);
        beam drafts have one rule and ignore it.
    """

    tree: TreeShape | None = None
    draft_sampling: str = "beam"
    verification: str = "block"

    def __post_init__(self):
        if self.draft_sampling not in DRAFT_SAMPLING:
            raise ValueError(f"draft_sampling must be one of {DRAFT_SAMPLING}, got {self.draft_sampling!r}")
        if self.verification not in VERIFICATION:
            raise ValueError(f"verification must be one of {VERIFICATION}, got {self.verification!r}")
        if self.draft_sampling == "sampled" and self.tree is None:
            raise ValueError("draft_sampling='sampled' needs a tree shape (autoregressive steps draft nothing)")

    @property
    def sampled(self) -> bool:
        """Drafts are drawn from the draft distribution (`draft_sampling == "sampled"`)."""
        return self.draft_sampling == "sampled"

    @property
    def max_accept(self) -> int:
        """G: the most tokens one step emits."""
        return 1 if self.tree is None else self.tree.max_accept

    @property
    def num_nodes(self) -> int:
        """Cache slots one step writes past the committed length."""
        return 1 if self.tree is None else self.tree.num_nodes

    # ---------------------------------------------------------------------------------------
    # pure functions (call them inside jit)

    def first_state(self, target, draft, cache, hidden_last, tail, lengths, key, max_new, eos_ids, sampling,
                    *, out_size: int, max_accept: int, ring_slots: int | None) -> DecodeState:
        """The state after a prefill: draw each row's first token, fill the draft ring.

        Args:
          cache: the prefilled target cache (positions [0, lengths) valid).
          hidden_last: float32 [B, D] the last prompt token's final hidden state.
          tail: int32 [B, R] the last R = ring_slots prompt tokens (R = 1 without a draft); entry i
            sits at position lengths - R + i (entries at negative positions are ignored).
          lengths: int32 [B] prompt lengths; key: [B] PRNG keys; max_new: int32 [B] token budgets;
          eos_ids: int32 [B, E] stop ids padded with -1; sampling: RowSampling.
        """
        B = hidden_last.shape[0]
        logits = target.logits(hidden_last[:, None, :])[:, 0]  # [B, V] float32
        first = smp.sample(smp.fold_in(key, 0), logits, sampling)
        ring = None
        if draft is not None:
            # Draft prefill: the ring needs only the K/V of the last R prompt tokens, which depend on
            # (token, position) alone; cost independent of the prompt length.
            R = tail.shape[1]
            pos = lengths[:, None] - R + jnp.arange(R)[None, :]  # [B, R]
            ring = draft.init_ring(target.embed(tail), pos, pos >= 0, ring_slots, cache_dtype=cache.dtype)
        zeros = jnp.zeros((B,), jnp.int32)
        state = DecodeState(
            cache=cache, ring=ring, committed=lengths.astype(jnp.int32), root=first,
            out=jnp.zeros((B, out_size + max_accept), jnp.int32), out_len=zeros, max_new=max_new.astype(jnp.int32),
            eos_ids=eos_ids.astype(jnp.int32), done=jnp.zeros((B,), bool), stop_reason=zeros, key=key,
            sampling=sampling, iters=zeros, accept_hist=jnp.zeros((B, max_accept), jnp.int32))
        return self._advance(state, first[:, None], zeros, jnp.ones((B,), bool), cache, ring, state.committed,
                             count_step=False)

    def draft_tree(self, target, draft, state: DecodeState, vocab=None, key=None, visible=None):
        """This step's tree by D draft forwards (levels 0 .. D-1) for every row.

        vocab: None, or (ids int32 [V'], head [D, V']) of a draft vocabulary: logits, log_softmax and
        top-k run over the V' columns, mapped back to full-vocabulary ids in `expand`.
        key: per-row keys for sampled drafts; then the q distributions each node of depth < D drew
        its children from come back as float32 [B, Nn - n_D, V] (zero outside a draft vocabulary),
        else None.
        visible: [B] committed tokens the draft attends to (default: all; 0 for rows that are done).
        Returns (tree, positions [B, Nn], tree_k, tree_v [B, Nn, K, H], q).
        """
        shape = self.tree
        B = state.root.shape[0]
        c = state.committed
        seen = c if visible is None else visible
        tree = sampled_tree.init_tree(shape, state.root) if self.sampled else init_tree(shape, state.root)
        positions = tree.positions(shape, c)  # [B, Nn]
        K, H = draft.cfg.num_kv_heads, draft.cfg.head_dim
        tree_k = jnp.zeros((B, shape.num_nodes, K, H), state.ring.k.dtype)
        tree_v = jnp.zeros_like(tree_k)
        k_last, v_last = state.cache.k[-1], state.cache.v[-1]
        vocab_ids = None if vocab is None else vocab[0]
        q_probs = []
        for level in range(shape.depth):  # static unroll: each level has its own static width
            o, n = shape.offsets[level], shape.level_sizes[level]
            with jax.named_scope(f"draft_level{level}"):  # phases in profiles (bench latency --profile)
                x = target.embed(tree.tokens[:, o:o + n])
                h, tree_k, tree_v = draft.tree_step(x, positions[:, o:o + n], state.ring, seen, tree_k, tree_v, o,
                                                    tree.mask[:, o:o + n], k_last, v_last, seen)
                logits = target.logits(h) if vocab is None else cut_logits(target, h, vocab[1])
                if self.sampled:
                    tree, q = sampled_tree.expand(tree, shape, level, logits, state.sampling, smp.fold_in(key, level),
                                                  vocab_ids)
                    if vocab is not None:  # columns -> full vocabulary, zero elsewhere
                        q = jnp.zeros((B, n, target.cfg.vocab_size), q.dtype).at[:, :, vocab_ids].set(q)
                    q_probs.append(q)
                else:
                    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, n, V(')]
                    tree = expand(tree, shape, level, logq, vocab_ids=vocab_ids)
        return tree, positions, tree_k, tree_v, (jnp.concatenate(q_probs, axis=1) if q_probs else None)

    def step(self, target, draft, state: DecodeState, vocab=None) -> DecodeState:
        """One decode step for every row (module docstring); done rows are left unchanged."""
        active = ~state.done
        c = state.committed
        # Rows that are done still run through every matmul (static shapes) but attend to none of
        # their cache: an idle serving slot holding a long resident sequence costs no KV reads.
        visible = jnp.where(active, c, 0)
        k_draft, k_verify = smp.split(smp.fold_in(state.key, state.iters + 1))
        if self.tree is None:
            with jax.named_scope("verify"):
                h, cache = target(state.root[:, None], c[:, None], state.cache, c, visible=visible)
                tok = smp.sample(k_verify, target.logits(h)[:, 0], state.sampling)  # [B]
            ring = state.ring
            if draft is not None:  # keep the ring current: it must hold [0, c + 1) after this step
                k, v = draft.self_kv(target.embed(state.root[:, None]), c[:, None])
                ring = ring.write(k, v, c[:, None], active[:, None])
            return self._advance(state, tok[:, None], jnp.zeros_like(c), active, cache, ring, c)

        shape = self.tree
        G = shape.max_accept
        tree, positions, tree_k, tree_v, q_probs = self.draft_tree(target, draft, state, vocab, k_draft, visible)
        with jax.named_scope("verify"):
            hidden, cache = target(tree.tokens, positions, state.cache, c, tree.mask, visible=visible)
            logits = target.logits(hidden)  # [B, Nn, V] float32
        with jax.named_scope("accept"):
            if self.sampled:
                acc = verify.accept_sampled(k_verify, tree, shape, logits, q_probs, state.sampling,
                                            block=self.verification == "block")
            else:
                acc = verify.accept(tree, shape, verify.target_choices(k_verify, logits, state.sampling))
            k = acc.num_accepted
        with jax.named_scope("commit"):
            j = jnp.arange(G)[None, :]
            if shape.is_chain:  # the accepted path is nodes 0 .. k: already in place in every layer
                path_k, path_v = tree_k[:, :G], tree_v[:, :G]
            else:
                cache = kvc.compact(cache, c, acc.path, jnp.where(active, k + 1, 0))
                path_k = jnp.take_along_axis(tree_k, acc.path[:, :, None, None], axis=1)  # [B, G, K, H]
                path_v = jnp.take_along_axis(tree_v, acc.path[:, :, None, None], axis=1)
            ring = state.ring.write(path_k, path_v, c[:, None] + j, (j <= k[:, None]) & active[:, None])
        return self._advance(state, acc.tokens, k, active, cache, ring, c)

    def _advance(self, state: DecodeState, tokens, k, active, cache, ring, c, count_step: bool = True):
        """Emit tokens[:, :k + 1] of the active rows (honouring stop ids and the budget), commit
        k + 1 tokens, set the next root and the stop reasons."""
        count = k + 1
        G = tokens.shape[1]
        j = jnp.arange(G)[None, :]
        valid = j < count[:, None]
        is_eos = jnp.any(tokens[:, :, None] == state.eos_ids[:, None, :], axis=-1) & valid  # -1 pads never match
        hit_eos = jnp.any(is_eos, axis=1)
        first_eos = jnp.argmax(is_eos, axis=1)
        n = jnp.where(hit_eos, first_eos + 1, count)  # truncate right after the first stop id
        n = jnp.where(active, jnp.minimum(n, state.max_new - state.out_len), 0)
        # out has M + G columns and out_len < max_new <= M while active, so this write never clamps.
        out = jnp.where(active[:, None], kvc.write_rows(state.out, tokens, state.out_len), state.out)
        out_len = state.out_len + n
        hit_eos = hit_eos & active & (first_eos < n)
        hit_max = out_len >= state.max_new
        new_c = jnp.where(active, c + count, c) if count_step else c
        root = jnp.where(active, jnp.take_along_axis(tokens, k[:, None], axis=1)[:, 0], state.root)
        # The next step writes slots new_c + [0, Nn): stop the row if they do not fit.
        cache_full = ~hit_eos & ~hit_max & (new_c + self.num_nodes > cache.capacity)
        reason = jnp.where(hit_eos, STOP_EOS, jnp.where(hit_max, STOP_MAX_NEW,
                                                        jnp.where(cache_full, STOP_CACHE_FULL, STOP_RUNNING)))
        reason = jnp.where(active, reason, state.stop_reason)
        hist = state.accept_hist
        if count_step:
            hist = hist + (active[:, None] & (jnp.arange(hist.shape[1])[None, :] == k[:, None])).astype(jnp.int32)
        return state.replace(cache=cache, ring=ring, committed=new_c, root=root, out=out, out_len=out_len,
                             done=state.done | (reason != STOP_RUNNING), stop_reason=reason,
                             iters=state.iters + (active & count_step).astype(jnp.int32), accept_hist=hist)

    # ---------------------------------------------------------------------------------------
    # jitted entry points (the loop, graphdefs and buffer sizes static; cache / state donated)

    def start(self, t_state, d_state, cache, hidden_last, tail, lengths, key, max_new, eos_ids, sampling, *,
              t_graph, d_graph, out_size: int, max_accept: int, ring_slots: int | None) -> DecodeState:
        """Jitted `first_state` on split models (the cache is donated into the returned state)."""
        return start_jit(t_state, d_state, cache, hidden_last, tail, lengths, key, max_new, eos_ids, sampling,
                         loop=self, t_graph=t_graph, d_graph=d_graph, out_size=out_size, max_accept=max_accept,
                         ring_slots=ring_slots)

    def run(self, t_state, d_state, state: DecodeState, vocab=None, max_iters=MAX_ITERS, stop_on_finish=False, *,
            t_graph, d_graph) -> DecodeState:
        """Decode steps until every row is done, `max_iters` steps ran (a run-time int32: streaming
        slices and serving steps share one executable), or, with `stop_on_finish` (run-time bool), a
        row that was running at the call finished, so the caller can reuse its slot. The state is
        donated. vocab: None or the draft-vocabulary pair (ids [V'], head [D, V']), run-time."""
        return run_jit(t_state, d_state, state, vocab, jnp.int32(max_iters), jnp.bool_(stop_on_finish), loop=self,
                       t_graph=t_graph, d_graph=d_graph)


@functools.partial(jax.jit, static_argnames=("loop", "t_graph", "d_graph", "out_size", "max_accept", "ring_slots"),
                   donate_argnames=("cache",))
def start_jit(t_state, d_state, cache, hidden_last, tail, lengths, key, max_new, eos_ids, sampling, *,
              loop: DecodeLoop, t_graph, d_graph, out_size: int, max_accept: int, ring_slots: int | None):
    """`DecodeLoop.first_state` on split models (see `DecodeLoop.start`)."""
    target, draft = _merge(t_graph, t_state, d_graph, d_state)
    return loop.first_state(target, draft, cache, hidden_last, tail, lengths, key, max_new, eos_ids, sampling,
                            out_size=out_size, max_accept=max_accept, ring_slots=ring_slots)


def add_interrupt(owner, poll: Callable[[], bool]) -> None:
    """Let `poll()` end interruptible decode calls (`run_jit(interrupt=True)`) at their next step
    boundary by returning True, as long as `owner` lives. `poll` must not refer to `owner` (it
    would keep it alive); it runs on an XLA thread after every step, so it must be cheap and
    thread-safe. Any registered poll ends any interruptible call: ending a call early is always
    safe (the state is exact after every step), it only costs another call."""
    key = id(owner)
    _POLLS[key] = poll
    weakref.finalize(owner, _POLLS.pop, key, None)


def _poll_interrupts(_after_step) -> np.ndarray:
    return np.bool_(any(poll() for poll in list(_POLLS.values())))


@functools.partial(jax.jit, static_argnames=("loop", "t_graph", "d_graph", "interrupt"), donate_argnames=("state",))
def run_jit(t_state, d_state, state: DecodeState, vocab, max_iters, stop_on_finish, *, loop: DecodeLoop, t_graph,
            d_graph, interrupt: bool = False) -> DecodeState:
    """The decode loop on split models (see `DecodeLoop.run`). With `interrupt`, the host is asked
    after every step whether to stop (`add_interrupt`): the serving engine ends a call when a request
    arrives, so that it waits one step, not the rest of the call, for its prefill. The ask is a host
    callback: one device-to-host sync per step (a GPU's loop already has one, for its condition),
    and the executable is not written to JAX's persistent compilation cache."""
    target, draft = _merge(t_graph, t_state, d_graph, d_state)
    done_at_call = jnp.sum(state.done)

    def cond(carry):
        s, i, asked = carry
        # Stop when every row is done (each stops on a stop id, its token budget, or a full cache),
        # when this call's step budget is spent, when a row finished and the caller asked for its
        # slot back at once, or when the host asked (`interrupt`).
        return jnp.any(~s.done) & (i < max_iters) & ~(stop_on_finish & (jnp.sum(s.done) > done_at_call)) & ~asked

    def body(carry):
        s = loop.step(target, draft, carry[0], vocab)
        # The callback takes the step's output, so it runs after the step, not beside it.
        asked = (jax.pure_callback(_poll_interrupts, jax.ShapeDtypeStruct((), jnp.bool_), s.done) if interrupt
                 else jnp.bool_(False))
        return s, carry[1] + 1, asked

    return jax.lax.while_loop(cond, body, (state, jnp.int32(0), jnp.bool_(False)))[0]


@functools.partial(jax.jit, static_argnames=("loop", "t_graph", "d_graph", "interrupt"), donate_argnames=("state",))
def run_rows_jit(t_state, d_state, state: DecodeState, rows, vocab, max_iters, stop_on_finish, *, loop: DecodeLoop,
                 t_graph, d_graph, interrupt: bool = False) -> DecodeState:
    """`run_jit` on the distinct rows `rows` (int32 [b]) of `state` alone: a batch of b rows whose
    matmuls and attention cost b rows, not B. The engine runs it where every row computes whether
    it is busy or not (CPUs, large targets under big trees on GPUs); the price is a copy of the b
    rows in and out. Each row moves as one dynamic slice (a contiguous copy; the write back is in
    place). On an H100 at Llama-3-8B shapes (8k slots a row) a call with nothing to step cost
    15.5 ms on two rows moved by XLA's gather and scatter, 4.2 ms on one row (which XLA already
    moves by slices) and 1.2 ms on the whole batch."""
    b = rows.shape[0]

    def take(x):
        if not x.ndim:
            return x
        return jnp.concatenate([jax.lax.dynamic_slice_in_dim(x, rows[i], 1, axis=0) for i in range(b)], axis=0)

    def put_back(full, part):
        if not full.ndim:
            return part
        for i in range(b):
            full = jax.lax.dynamic_update_slice_in_dim(full, part[i:i + 1], rows[i], axis=0)
        return full

    sub = run_jit(t_state, d_state, jax.tree.map(take, state), vocab, max_iters, stop_on_finish, loop=loop,
                  t_graph=t_graph, d_graph=d_graph, interrupt=interrupt)
    return jax.tree.map(put_back, state, sub)


@functools.partial(jax.jit, static_argnames=("loop", "t_graph", "d_graph", "out_size", "max_accept", "ring_slots"),
                   donate_argnames=("state",))
def insert_row_jit(t_state, d_state, state, staging, hidden, tail, length, key, max_new, eos_ids, sampling, slot, *,
                loop, t_graph, d_graph, out_size, max_accept, ring_slots):
    """The serving engine's admission: draw a request's first token from its prefilled batch-1
    `staging` cache, build its ring and write its row into slot `slot` of `state` (donated).
    Returns (state, (first token, done, stop reason))."""
    target, draft = _merge(t_graph, t_state, d_graph, d_state)
    S = state.cache.capacity
    cache = kvc.KVCache(k=tuple(k[:, :S] for k in staging.k), v=tuple(v[:, :S] for v in staging.v))
    row = loop.first_state(target, draft, cache, hidden, tail, length, key, max_new, eos_ids, sampling,
                           out_size=out_size, max_accept=max_accept, ring_slots=ring_slots)
    state = jax.tree.map(lambda full, one: jax.lax.dynamic_update_slice_in_dim(full, one, slot, 0), state, row)
    return state, (row.root[0], row.done[0], row.stop_reason[0])


def loops_for(tables) -> dict:
    """Decode loops keyed (widths or None for AR, sampled) for the load tables {sampled: table}.
    Chains always sample their drafts (at T = 0: the argmax chain); a tree of the greedy table
    drafts by beam search (the best for greedy rows, exact at any T), one of the sampled table
    draws its drafts, which accepts more once every row samples."""
    loops = {}
    for sampled, table in tables.items():
        for _, w in table:
            shape = None if w is None else TreeShape(w)
            rule = "sampled" if shape and (sampled or shape.is_chain) else "beam"
            loops[w, sampled] = DecodeLoop(shape, draft_sampling=rule)
    return loops


def _merge(t_graph, t_state, d_graph, d_state):
    target = nnx.merge(t_graph, t_state)
    draft = None if d_graph is None else nnx.merge(d_graph, d_state)
    return target, draft
