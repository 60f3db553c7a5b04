"""LongSpec tree speculative decoding (spec section 3) as ONE jit-compiled `lax.while_loop`.

One iteration, per batch row (all shapes static, Nn = 1 + sum(tree_shape), G = D + 1):

  1. Draft: D forwards of the one-block draft, level by level (root, depth 1 .. D-1), each
     followed by a global beam-search step (`tree.expand`) that fixes the next level's nodes.
     Self-attention reads the constant-size ring (last W committed tokens) plus the tree K/V buffer
     under the ancestor mask; cross-attention reads the target's last-layer cache [0, c).
     Optionally over a draft vocabulary of V' ids only (`draft_vocab`: the LM head restricted to
     those columns, gathered once; ~1/4 of the head's bytes for V' = 32k of Llama-3's 128k).
  2. Verify: one target forward over the Nn tree tokens at positions c + depth, written at cache
     slots c + [0, Nn), prefix [0, c) + ancestor mask (hybrid tree attention).
  3. Accept (`verify.accept`): one target draw per node (argmax at T = 0), walk down the matching
     children; k accepted drafts + 1 bonus token are emitted. Lossless at any temperature.
     A chain at T > 0 instead samples its drafts from the draft distribution q in step 1 and
     accepts by speculative sampling (`verify.accept_sampled_chain`: min(1, p/q), residual draw).
  4. Commit: `kv_cache.compact` moves the k + 1 accepted rows (root + accepted drafts) to slots
     c .. c + k in EVERY target layer; the draft's K/V of the same nodes are copied from the tree
     buffer into the ring. Then c <- c + k + 1 and the bonus token becomes the next root.

State invariants at the top of every iteration (compare spec 3.2):
  * c = committed: target K/V valid in all layers for positions [0, c); the root (last emitted
    token, not yet in the target) sits at position c. The original's `acc_ids` block collapses to
    the root alone, so the verification input is exactly the Nn tree nodes (no padding to P).
  * t_last = c: the draft cross-attends to exactly the committed (accepted) tokens.
  * draft ring holds the K/V of positions [0, c) (the last `window` of them are read); dpos = c.

Why compaction in every layer instead of the original's re-feed of accepted tokens:
  the re-feed makes every verification Nn + D rows (74 instead of 69 for the default tree) and
  keeps a second length (t_last != c) in the state; compaction moves <= G rows per layer with one
  gather + one dynamic_update_slice per buffer: 2 x 32 layers x 6 rows x 8 heads x 128 x 2 B
  = 0.8 MB of traffic per iteration for Llama-3-8B, a fraction of a microsecond of HBM time
  (an estimate, NOT yet measured on a GPU; the re-feed alternative costs 5 extra query rows through
  every layer's projections and MLP). It also makes t_last = c, so the draft's cross-attention
  always reads a cache that is consistent with the accepted tokens in every layer.

Stop conditions per row: an EOS id was emitted (output truncated right after it), max_new_tokens
reached (truncated to exactly that many), or the target cache cannot hold another tree
(`stop_reason == "cache_full"`, reported with a message naming the capacity; never a silent
clamp: dynamic_update_slice would clamp the write offset and corrupt the cache). Rows that stop
early idle (masked) until every row is done.

Statistics: tau = emitted tokens / target forwards, the prefill forward and its token included
(the paper's (count + num) / num); acceptance counts by depth; decode tokens/s excluding prefill;
prefill and compile times measured apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels
from infer import ar
from longspec_jax import kv_cache as kvc
from longspec_jax import sharding as shd
from longspec_jax import verify
from longspec_jax.draft import Draft, DraftCache, cut_logits, head_columns, ring_capacity
from longspec_jax.sampling import SamplingParams, process_logits, sample
from longspec_jax.tree import TreeShape, default_tree_for_context, expand, init_tree

STOP_RUNNING, STOP_EOS, STOP_MAX_NEW, STOP_CACHE_FULL = 0, 1, 2, 3
STOP_NAMES = {STOP_RUNNING: "running", STOP_EOS: "eos", STOP_MAX_NEW: "max_new_tokens",
              STOP_CACHE_FULL: "cache_full"}


@flax.struct.dataclass
class SpecState:
    """The decode loop's carry (B rows, M = max_new_tokens, G = max tokens per iteration).

    cache:        target KVCache, L x [B, S, K, H]; valid for slots [0, committed) in every layer
    ring:         DraftCache [B, R, K, H]; K/V of positions [0, committed), slot = position mod R
    committed:    int32 [B] c: tokens (prompt + emitted) whose K/V are in every target layer;
                  also the position of the root
    root:         int32 [B] last emitted token: root of the next tree, not yet in the target cache
    out:          int32 [B, M' + G] emitted tokens (the prefill's token first); valid [0, out_len);
                  M' = ar.output_bucket(M) >= M so close max_new_tokens share one executable
    out_len:      int32 [B] number of emitted tokens
    max_new:      int32 [] M, a run-time value (<= M')
    eos_ids:      int32 [E] stop ids padded with -1 (E a small static bucket; the ids are run-time
                  values, so changing them does not recompile)
    done:         bool  [B] row stopped (masked from then on)
    stop_reason:  int32 [B] STOP_* code
    key:          PRNG key for the target draws (unused at temperature 0)
    iters:        int32 [B] verification forwards the row took part in while active
    accept_hist:  int32 [B, G] accept_hist[b, k] = iterations that accepted k draft tokens
    """

    cache: kvc.KVCache
    ring: DraftCache
    committed: jax.Array
    root: jax.Array
    out: jax.Array
    out_len: jax.Array
    max_new: jax.Array
    eos_ids: jax.Array
    done: jax.Array
    stop_reason: jax.Array
    key: jax.Array
    iters: jax.Array
    accept_hist: jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that shapes the compiled loop (hashable: a static jit argument)."""

    shape: TreeShape
    sampling: SamplingParams
    out_size: int  # output buffer columns before the G spare ones (ar.output_bucket)
    eos_slots: int  # E
    # Chains at T > 0: drafts sampled from the draft distribution and verified by speculative
    # sampling (`verify.accept_sampled_chain`) instead of the draft's argmax + sample-and-match.
    sample_drafts: bool = False


def _emit(state: SpecState, tokens: jax.Array, count: jax.Array, active: jax.Array, st: _Static):
    """Append tokens[:, :count] (count >= 1) to the output, honouring EOS and max_new_tokens.

    Returns (out, out_len, hit_eos [B], full [B]).
    """
    G = tokens.shape[1]
    j = jnp.arange(G)[None, :]
    valid = j < count[:, None]
    # Padding ids are -1 and never match a token.
    is_eos = jnp.any(tokens[:, :, None] == state.eos_ids[None, None, :], axis=-1) & valid
    hit_eos = jnp.any(is_eos, axis=1)
    first_eos = jnp.argmax(is_eos, axis=1)
    n = jnp.where(hit_eos, first_eos + 1, count)  # truncate right after the first EOS
    n = jnp.minimum(n, state.max_new - state.out_len)
    n = jnp.where(active, n, 0)
    # out has M' + G columns and out_len < M <= M' while active, so this write never clamps.
    out = kvc.write_rows(state.out, tokens, state.out_len)
    out = jnp.where(active[:, None], out, state.out)
    out_len = state.out_len + n
    hit_eos = hit_eos & active & (first_eos < n)
    return out, out_len, hit_eos, out_len >= state.max_new


def _draft_tree(target, draft: Draft, state: SpecState, shape: TreeShape, vocab=None, key=None, sampling=None):
    """Build this iteration's tree with D draft forwards (levels 0 .. D-1).

    vocab: None (draft over the full vocabulary) or (ids int32 [V'], head [D, V']): a draft
    vocabulary cut; logits, log_softmax and top-k run over the V' columns only and the chosen
    columns are mapped back to full-vocabulary ids in `expand`. Verification never sees it.
    key, sampling: for a chain at T > 0 (`_Static.sample_drafts`), each draft token is drawn from
    q = exp(process_logits(draft logits, sampling)) instead of taken by the beam search; the q
    distributions are returned as float32 [B, D, V] (zero outside a draft vocabulary), else None.
    """
    B = state.root.shape[0]
    c = state.committed
    tree = init_tree(shape, state.root)
    positions = tree.positions(shape, c)  # [B, Nn]
    K, H = draft.cfg.num_kv_heads, draft.cfg.head_dim
    tree_k = jnp.zeros((B, shape.num_nodes, K, H), state.ring.k.dtype)
    tree_v = jnp.zeros_like(tree_k)
    k_last, v_last = state.cache.k[-1], state.cache.v[-1]
    q_probs = []
    for level in range(shape.depth):  # static unroll: each level has its own static width
        o, n = shape.offsets[level], shape.level_sizes[level]
        with jax.named_scope(f"draft_level{level}"):  # (named scopes: phases in profiles, bench_e2e)
            x = target.embed(tree.tokens[:, o:o + n])
            h, tree_k, tree_v = draft.tree_step(x, positions[:, o:o + n], state.ring, c, tree_k, tree_v, o,
                                                tree.mask[:, o:o + n], k_last, v_last, c)
            logits = target.logits(h).astype(jnp.float32) if vocab is None else cut_logits(target, h, vocab[1])
            logq = jax.nn.log_softmax(logits, axis=-1)  # [B, n, V] or [B, n, V']
            if key is not None:  # a chain (n == 1) drawing its next token from q
                logq_s = process_logits(logits, sampling)  # [B, 1, V(')]
                col = jax.random.categorical(jax.random.fold_in(key, level), logq_s, axis=-1)  # [B, 1]
                cols = jnp.arange(logq.shape[-1])[None, None, :]
                logq = jnp.where(cols == col[..., None], logq, -jnp.inf)  # the beam step keeps exactly that token
                q = jnp.exp(logq_s[:, 0])
                if vocab is not None:  # columns -> full vocabulary, zero elsewhere
                    q = jnp.zeros((q.shape[0], target.cfg.vocab_size), q.dtype).at[:, vocab[0]].set(q)
                q_probs.append(q)
            tree = expand(tree, shape, level, logq, vocab_ids=None if vocab is None else vocab[0])
    return tree, positions, tree_k, tree_v, (jnp.stack(q_probs, axis=1) if q_probs else None)


def _iteration(target, draft: Draft, state: SpecState, st: _Static, vocab=None) -> SpecState:
    shape = st.shape
    G = shape.max_accept
    active = ~state.done
    c = state.committed
    key, sub, k_draft = jax.random.split(state.key, 3)
    tree, positions, tree_k, tree_v, q_probs = _draft_tree(
        target, draft, state, shape, vocab, k_draft if st.sample_drafts else None, st.sampling)

    # Verification: the Nn tree tokens after the committed prefix, ancestor mask among themselves.
    with jax.named_scope("verify"):
        hidden, cache = target(tree.tokens, positions, state.cache, c, tree.mask)
        logits = target.logits(hidden)  # [B, Nn, V] float32
    with jax.named_scope("accept"):
        if st.sample_drafts:
            acc = verify.accept_sampled_chain(sub, tree, shape, logits, q_probs, st.sampling)
        else:
            acc = verify.accept(tree, shape, verify.target_choices(sub, logits, st.sampling))
        k = acc.num_accepted

    # Commit: accepted rows (root = path[0], then the accepted drafts) to slots c .. c + k.
    with jax.named_scope("commit"):
        j = jnp.arange(G)[None, :]
        if shape.is_chain:
            # A chain's accepted path is nodes 0 .. k, already at slots c .. c + k in every layer
            # and at [0, k] in the tree buffer: nothing to move (2L buffer moves fewer; on an H200
            # the demo's commit is 7 kernels for a chain against 34 for a tree that compacts,
            # docs/perf_notes.md, "Small targets are launch-bound on GPUs").
            path_k, path_v = tree_k[:, :G], tree_v[:, :G]
        else:
            cache = kvc.compact(cache, c, acc.path, jnp.where(active, k + 1, 0))
            path_k = jnp.take_along_axis(tree_k, acc.path[:, :, None, None], axis=1)  # [B, G, K, H]
            path_v = jnp.take_along_axis(tree_v, acc.path[:, :, None, None], axis=1)
        ring = state.ring.write(path_k, path_v, c[:, None] + j, (j <= k[:, None]) & active[:, None])

    out, out_len, hit_eos, hit_max = _emit(state, acc.tokens, k + 1, active, st)
    new_c = jnp.where(active, c + k + 1, c)
    root = jnp.where(active, jnp.take_along_axis(acc.tokens, k[:, None], axis=1)[:, 0], state.root)
    # The next iteration writes slots new_c + [0, Nn): stop the row if they do not fit.
    cache_full = active & ~hit_eos & ~hit_max & (new_c + shape.num_nodes > cache.capacity)
    reason = jnp.where(hit_eos, STOP_EOS, jnp.where(hit_max, STOP_MAX_NEW,
                                                    jnp.where(cache_full, STOP_CACHE_FULL, STOP_RUNNING)))
    reason = jnp.where(active, reason, state.stop_reason)
    hist = state.accept_hist + (active[:, None] & (j == k[:, None])).astype(jnp.int32)
    return state.replace(cache=cache, ring=ring, committed=new_c, root=root, out=out, out_len=out_len,
                         done=state.done | (reason != STOP_RUNNING), stop_reason=reason, key=key,
                         iters=state.iters + active.astype(jnp.int32), accept_hist=hist)


@functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "st"), donate_argnames=("state",))
def _decode_loop(t_state, d_state, state: SpecState, vocab=None, *, t_graph, d_graph, st: _Static) -> SpecState:
    """vocab: None or the draft-vocabulary pair (ids [V'], head [D, V']) of `_draft_tree`: a
    run-time argument (not a constant folded into the executable), read every draft step."""
    target = nnx.merge(t_graph, t_state)
    draft = nnx.merge(d_graph, d_state)

    def cond(s: SpecState):
        # Every stop condition (EOS, max_new_tokens, cache full) is folded into `done` per row.
        return jnp.any(~s.done)

    return jax.lax.while_loop(cond, lambda s: _iteration(target, draft, s, st, vocab), state)


@functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "st", "ring_slots"),
                   donate_argnames=("cache",))
def _start(t_state, d_state, cache, hidden_last, prompt, prompt_lens, key, max_new, eos_ids, *, t_graph, d_graph,
           st: _Static, ring_slots: int) -> SpecState:
    """After the target prefill (`infer.ar`'s chunked prefill, which returns the last prompt
    token's hidden state): draw the first token, fill the draft ring, build the loop state."""
    target = nnx.merge(t_graph, t_state)
    last_logits = target.logits(hidden_last[:, None, :])[:, 0]  # [B, V] float32, as infer.ar's first token
    draft = nnx.merge(d_graph, d_state)
    B, P = prompt.shape
    G = st.shape.max_accept
    key, sub = jax.random.split(key)
    t0 = sample(sub, last_logits, st.sampling)  # [B]
    # Draft prefill: only the last `ring_slots` prompt tokens can ever be read (window < ring).
    pos = prompt_lens[:, None] - ring_slots + jnp.arange(ring_slots)[None, :]  # [B, R]
    valid = pos >= 0
    toks = jnp.take_along_axis(prompt, jnp.clip(pos, 0, P - 1), axis=1)
    ring = draft.init_ring(target.embed(toks), pos, valid, ring_slots, cache_dtype=cache.dtype)
    state = SpecState(
        cache=cache, ring=ring, committed=prompt_lens.astype(jnp.int32), root=t0,
        out=jnp.zeros((B, st.out_size + G), jnp.int32), out_len=jnp.zeros((B,), jnp.int32),
        max_new=max_new.astype(jnp.int32), eos_ids=eos_ids.astype(jnp.int32),
        done=jnp.zeros((B,), bool), stop_reason=jnp.zeros((B,), jnp.int32), key=key,
        iters=jnp.zeros((B,), jnp.int32), accept_hist=jnp.zeros((B, G), jnp.int32))
    out, out_len, hit_eos, hit_max = _emit(state, t0[:, None], jnp.ones((B,), jnp.int32),
                                           jnp.ones((B,), bool), st)
    cache_full = ~hit_eos & ~hit_max & (state.committed + st.shape.num_nodes > cache.capacity)
    reason = jnp.where(hit_eos, STOP_EOS, jnp.where(hit_max, STOP_MAX_NEW,
                                                    jnp.where(cache_full, STOP_CACHE_FULL, STOP_RUNNING)))
    return state.replace(out=out, out_len=out_len, done=reason != STOP_RUNNING, stop_reason=reason)


def check_draft_vocab(ids, vocab_size: int) -> np.ndarray:
    """Validate a draft vocabulary: a non-empty 1-D list of distinct integer token ids in
    [0, vocab_size). Returns them as sorted int32 (ascending, so beam-search ties resolve to the
    lower token id as over the full vocabulary)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"draft_vocab must be a non-empty 1-D list of token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"draft_vocab must hold integer token ids, got dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ValueError(f"draft_vocab has {bad.size} ids outside the target vocabulary [0, {vocab_size}) "
                         f"(e.g. {bad[:5].tolist()}); was it built with another tokenizer? "
                         "Rebuild it with scripts/draft_vocab.py for this model's tokenizer.")
    uniq = np.unique(arr)
    if uniq.size != arr.size:
        raise ValueError(f"draft_vocab has {arr.size - uniq.size} duplicate ids; every id must appear once")
    return uniq.astype(np.int32)


@dataclasses.dataclass
class SpecResult:
    """Output of `generate_tree`.

    tokens: list of B int lists, the generated tokens per row (prompt excluded), truncated right
      after the first EOS and to max_new_tokens.
    stop_reason: list of B strings ("eos", "max_new_tokens", "cache_full").
    stats: dict with
      tau: emitted tokens / target forwards over all rows (prefill forward and token included;
        the paper's (sum count + sum num) / sum num),
      tau_per_row, target_forwards (verification forwards per row, prefill excluded),
      accepted_by_depth[d-1]: iterations in which a drafted token at depth d was accepted (all rows),
      accept_hist[k]: iterations that accepted exactly k draft tokens,
      decode_time_s (loop only, after block_until_ready), decode_tokens_per_s (emitted tokens /
      decode time, the paper's convention), prefill_time_s, compile_time_s (first-call compile of
      the loop and start functions; 0 when already cached), tree_shape, cache_capacity, ring_capacity.
    """

    tokens: list
    stop_reason: list
    stats: dict


class SpeculativeDecoder:
    """Notebook-friendly wrapper: split the models once, reuse the compiled executables.

        decoder = SpeculativeDecoder(target, draft, tree_shape=(4, 16, 16, 16, 16))
        result = decoder.generate(prompt_ids, max_new_tokens=256)
        result.tokens[0], result.stats["tau"]

    Args:
      target: `Transformer` (the verifier; its embedding and LM head are shared with the draft).
      draft: `Draft` matching the target (checked).
      tree_shape: nodes per depth, e.g. (4, 16, 16, 16, 16); (1, 1, 1, 1) is a chain. None (the
        default): picked per `generate` call by `tree.default_tree_for_context(longest prompt +
        max_new_tokens, platform, temperature, target parameter bytes)`, a measured heuristic
        (smaller trees at long context; a short chain on CPUs and for small, launch-bound targets;
        a sampled chain at T > 0).
      draft_vocab: None, or int32 ids [V'] of a draft vocabulary (e.g. the V' most frequent tokens,
        `scripts/draft_vocab.py`): the draft scores only those tokens (its LM head cost shrinks by
        V / V'); the sub-head is gathered once here. Lossless: verification uses the full
        vocabulary, so a target choice outside the subset just ends acceptance at that node.
      sample_drafts: for a chain tree at temperature > 0, draw each draft token from the draft's
        distribution (same temperature / top-k / top-p as the target) and verify by speculative
        sampling (`verify.accept_sampled_chain`); False keeps the draft's argmax and the
        sample-and-match rule that trees use. Both are exact; sampling usually accepts more.
      cache_dtype: dtype of the target KV cache and draft ring (default: the target's compute dtype).
      prefill_chunk: most prompt tokens per prefill forward (`infer.ar`'s chunked, bucketed prefill).
      mesh: optional `jax.sharding.Mesh` (e.g. `sharding.tensor_parallel_mesh(n)`): copies of the
        target and draft are placed on it by the logical-axis rules (heads and MLP split over
        "tensor"; kv heads must divide, `sharding.check_tensor_parallel`), the target cache is
        sharded over kv heads, small inputs are replicated, and the executables run SPMD.
    """

    def __init__(self, target, draft: Draft, *, tree_shape: Sequence[int] | str | TreeShape | None = None,
                 cache_dtype=None, prefill_chunk: int = ar.DEFAULT_PREFILL_CHUNK, draft_vocab=None, mesh=None,
                 sample_drafts: bool = True):
        self.target, self.draft = target, draft
        self.sample_drafts = bool(sample_drafts)
        tcfg = target.cfg
        draft.cfg.check_matches(tcfg)
        self.draft_vocab = None if draft_vocab is None else check_draft_vocab(draft_vocab, tcfg.vocab_size)
        self._draft_vocab_size = tcfg.vocab_size if self.draft_vocab is None else self.draft_vocab.size
        # None: chosen per generate() call from the context length (tree.default_tree_for_context).
        self.shape = None if tree_shape is None else TreeShape.parse(tree_shape)
        if self.shape is not None:
            self.shape.check_vocab(self._draft_vocab_size)
        self.cache_dtype = cache_dtype if cache_dtype is not None else getattr(target, "dtype", jnp.float32)
        self.prefill_chunk = int(prefill_chunk)
        impl = draft.attention_impl
        impl = pallas_kernels.default_implementation() if impl == "auto" else impl
        # The Pallas prefix kernel reads the ring in 128-slot blocks; the XLA path takes any size,
        # and the smallest ring (window + G rounded to 8) keeps CPU runs and tests wrapping often.
        self._ring_multiple = 8 if impl == "xla" else 128
        self.ring_slots = None if self.shape is None else self._ring_slots(self.shape)
        self.mesh, self._rep = mesh, None  # _rep: where small inputs go (None: the default device)
        if mesh is not None:
            target = self.target = shd.place_for_inference(target, mesh, what="target")
            draft = self.draft = shd.place_for_inference(draft, mesh, what="draft")
            self._rep = NamedSharding(mesh, PartitionSpec())
        self._t_graph, self._t_state = nnx.split(target)
        # Parameter bytes of the target (the tree default treats small targets as launch-bound).
        self._target_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(target, nnx.Param)))
        self._d_graph, self._d_state = nnx.split(draft)
        # (ids [V'], head [D, V']): a run-time argument of the loop, gathered once here.
        self._vocab = None if self.draft_vocab is None else (
            jnp.asarray(self.draft_vocab), head_columns(target, self.draft_vocab))
        if mesh is not None and self._vocab is not None:  # beside the replicated inputs, for the loop
            self._vocab = jax.device_put(self._vocab, self._rep)

    def _ring_slots(self, shape: TreeShape) -> int:
        return ring_capacity(self.draft.cfg.window, shape.max_accept, self._ring_multiple)

    def tree_shape_for(self, prompt_len: int, max_new_tokens: int, sampling: SamplingParams | None = None
                       ) -> TreeShape:
        """The fixed tree shape, or the default for a decode up to prompt_len + max_new_tokens
        tokens with these sampling settings (a sampled chain at T > 0, see `tree.SAMPLED_CHAIN`)."""
        if self.shape is not None:
            return self.shape
        platform = (self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]).platform
        temperature = 0.0 if sampling is None else sampling.temperature
        shape = default_tree_for_context(prompt_len + max_new_tokens, platform, temperature, self.sample_drafts,
                                         target_bytes=self._target_bytes)
        shape.check_vocab(self._draft_vocab_size)
        return shape

    def needed_capacity(self, prompt_len: int, max_new_tokens: int, sampling: SamplingParams | None = None) -> int:
        """Target KV slots that always suffice: while a row runs, its committed length is at most
        prompt + max_new_tokens - 2 and one verification writes Nn slots after it."""
        return prompt_len + max_new_tokens + self.tree_shape_for(prompt_len, max_new_tokens, sampling).num_nodes

    def generate(self, prompt_ids, *, max_new_tokens: int, sampling: SamplingParams | None = None,
                 eos_ids: Sequence[int] | None = None, seed: int = 0, cache_capacity: int | None = None
                 ) -> SpecResult:
        """Generate for one prompt or a batch of prompts.

        Args:
          prompt_ids: token ids: one sequence, a list of B sequences (lengths may differ), or [B, P].
          max_new_tokens: most tokens generated per row (>= 1), EOS included.
          sampling: SamplingParams (default greedy); verification uses exactly these settings.
          eos_ids: ids that end a row (default: the target config's eos_token_ids); () disables.
          seed: PRNG seed for temperature > 0.
          cache_capacity: target KV slots per row (default: `ar.capacity_bucket` of
            `needed_capacity`). A smaller value is allowed: a row that cannot fit another tree stops
            with stop_reason "cache_full" and a warning naming the capacity.
        """
        sampling = sampling or SamplingParams()
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        cfg = self.target.cfg
        rows = ar._as_rows(prompt_ids)
        if not rows:
            raise ValueError("prompt_ids is empty; pass at least one prompt of at least one token")
        for b, r in enumerate(rows):
            if r.size == 0:
                raise ValueError(f"prompt row {b} is empty; every prompt needs at least one token")
            if r.min() < 0 or r.max() >= cfg.vocab_size:
                raise ValueError(f"prompt row {b} has token ids outside [0, {cfg.vocab_size}); "
                                 "was it tokenized for another model?")
        eos = tuple(int(e) for e in (cfg.eos_token_ids if eos_ids is None else eos_ids))
        B = len(rows)
        lens = np.array([r.size for r in rows], np.int32)
        longest = int(lens.max())
        padded, chunk = ar.prompt_bucket(longest, self.prefill_chunk)
        shape = self.tree_shape_for(longest, max_new_tokens, sampling)
        ring_slots = self._ring_slots(shape)
        needed = self.needed_capacity(longest, max_new_tokens, sampling)
        capacity = cache_capacity if cache_capacity is not None else max(ar.capacity_bucket(needed), padded)
        min_cap = max(padded, longest + shape.num_nodes)
        if capacity < min_cap:
            raise ValueError(
                f"--cache-capacity {capacity} cannot hold the padded prompt ({padded} slots) and one tree "
                f"after the prompt ({longest} + {shape.num_nodes} nodes); pass at least {min_cap} "
                f"(at least {needed} to never stop early), or leave it unset.")
        eos_slots = max(4, -(-len(eos) // 4) * 4)
        st = _Static(shape, sampling, ar.output_bucket(max_new_tokens), eos_slots,
                     sample_drafts=self.sample_drafts and shape.is_chain and not sampling.is_greedy)
        eos_arr = np.full((eos_slots,), -1, np.int32)
        eos_arr[:len(eos)] = eos
        compiler = ar._Compiler()

        tokens = np.zeros((B, padded), np.int32)  # right padding: hidden by the causal mask and lengths
        for b, r in enumerate(rows):
            tokens[b, :r.size] = r
        cache_sharding = None if self.mesh is None else shd.cache_sharding(
            self.mesh, shape=(B, capacity, cfg.num_kv_heads, cfg.head_dim))
        cache = kvc.KVCache.init(cfg, B, capacity, self.cache_dtype, sharding=cache_sharding)
        hidden_last = jnp.zeros((B, cfg.hidden_size), jnp.float32)
        rep = self._rep
        chunks = [jax.device_put(tokens[:, s:s + chunk], rep) for s in range(0, padded, chunk)]
        starts = [jax.device_put(np.int32(s), rep) for s in range(0, padded, chunk)]
        last_index = jax.device_put(lens - 1, rep)
        dev_lens = jax.device_put(lens, rep)
        dev_prompt = jax.device_put(tokens, rep)
        key = jax.random.key(seed)
        if self.mesh is not None:
            hidden_last, key = jax.device_put((hidden_last, key), rep)
        graphs = dict(t_graph=self._t_graph, d_graph=self._d_graph)

        chunk_exe = compiler.get("prefill", ar._prefill_chunk_jit, self._t_graph,
                                 (self._t_state, cache, chunks[0], starts[0], last_index, hidden_last), {})
        start_args = (self._t_state, self._d_state, cache, hidden_last, dev_prompt, dev_lens, key,
                      jax.device_put(np.int32(max_new_tokens), rep), jax.device_put(eos_arr, rep))
        start_exe = compiler.get("spec_start", _start, None, start_args,
                                 dict(graphs, st=st, ring_slots=ring_slots))

        t0 = time.perf_counter()
        for chunk_tokens, start in zip(chunks, starts):
            cache, hidden_last = chunk_exe(self._t_state, cache, chunk_tokens, start, last_index, hidden_last)
        state = start_exe(self._t_state, self._d_state, cache, hidden_last, *start_args[4:])
        jax.block_until_ready(state)
        prefill_time = time.perf_counter() - t0

        loop_exe = compiler.get("spec_loop", _decode_loop, None, (self._t_state, self._d_state, state, self._vocab),
                                dict(graphs, st=st))
        t0 = time.perf_counter()
        # Everything the loop reads is on the device: a host round trip inside it would be a bug.
        with jax.transfer_guard("disallow"):
            state = loop_exe(self._t_state, self._d_state, state, self._vocab)
            jax.block_until_ready(state)
        decode_time = time.perf_counter() - t0
        res = _result(state, st, prefill_time, decode_time, compiler.seconds, capacity, ring_slots)
        res.stats["draft_vocab_size"] = self._draft_vocab_size
        return res


def _result(state: SpecState, st: _Static, prefill_time, decode_time, compile_time, capacity, ring_slots):
    out = np.asarray(state.out)
    out_len = np.asarray(state.out_len)
    reasons = [STOP_NAMES[int(r)] for r in np.asarray(state.stop_reason)]
    iters = np.asarray(state.iters)
    hist = np.asarray(state.accept_hist)
    tokens = [out[b, :out_len[b]].tolist() for b in range(out.shape[0])]
    for b, r in enumerate(reasons):
        if r == "cache_full":
            warnings.warn(
                f"row {b}: stopped after {out_len[b]} of {int(state.max_new)} tokens because the target "
                f"KV cache ({capacity} slots) cannot hold another tree of {st.shape.num_nodes} nodes; "
                "pass a larger cache_capacity (or leave it unset for the safe default).", stacklevel=3)
    total_tokens = int(out_len.sum())
    forwards = int(iters.sum()) + out.shape[0]  # + one prefill forward per row
    D = st.shape.depth
    totals = hist.sum(axis=0)  # [G]
    stats = dict(
        tau=total_tokens / max(forwards, 1),
        tau_per_row=[float(out_len[b] / (iters[b] + 1)) for b in range(out.shape[0])],
        target_forwards=iters.tolist(),
        accept_hist=totals.tolist(),
        accepted_by_depth=[int(totals[d:].sum()) for d in range(1, D + 1)],
        decode_time_s=decode_time,
        decode_tokens_per_s=total_tokens / decode_time if decode_time > 0 else math.nan,
        prefill_time_s=prefill_time,
        compile_time_s=compile_time,
        tree_shape=list(st.shape.widths),
        cache_capacity=capacity,
        ring_capacity=ring_slots,
    )
    return SpecResult(tokens=tokens, stop_reason=reasons, stats=stats)


def _as_prompt_list(prompt_ids) -> list[list[int]]:
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_ids)
        return [arr.tolist()] if arr.ndim == 1 else [list(r) for r in arr.tolist()]
    prompt_ids = list(prompt_ids)
    if prompt_ids and isinstance(prompt_ids[0], (int, np.integer)):
        return [[int(t) for t in prompt_ids]]
    return [[int(t) for t in p] for p in prompt_ids]


def generate_tree(target, draft: Draft, prompt_ids, *, tree_shape=None, max_new_tokens: int,
                  sampling: SamplingParams | None = None, eos_ids: Sequence[int] | None = None, seed: int = 0,
                  cache_capacity: int | None = None, cache_dtype=None,
                  prefill_chunk: int = ar.DEFAULT_PREFILL_CHUNK, draft_vocab=None, mesh=None,
                  sample_drafts: bool = True) -> SpecResult:
    """One-shot tree speculative generation (see `SpeculativeDecoder` to reuse compilations;
    tree_shape None = `tree.default_tree_for_context`, draft_vocab = a draft vocabulary cut,
    sample_drafts = sampled chains at T > 0)."""
    decoder = SpeculativeDecoder(target, draft, tree_shape=tree_shape, cache_dtype=cache_dtype,
                                 prefill_chunk=prefill_chunk, draft_vocab=draft_vocab, mesh=mesh,
                                 sample_drafts=sample_drafts)
    return decoder.generate(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                            seed=seed, cache_capacity=cache_capacity)
