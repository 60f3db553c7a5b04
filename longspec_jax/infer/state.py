"""The decode loop's state: one `flax.struct.dataclass` carried through `lax.while_loop`.

The same state serves autoregressive decoding (one target token per step) and tree speculative
decoding (a draft tree verified per step), for one request or for the serving engine's slots: every
field has a static shape, per-row settings (sampling, stop ids, token budget, PRNG key) are data,
and the KV cache travels inside so that donation lets XLA update it in place. A row that is done
(finished, or a free engine slot) is masked: it neither writes its cache nor emits tokens.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from longspec_jax.configs import ModelConfig
from longspec_jax.draft import DraftCache
from longspec_jax.kv_cache import KVCache
from longspec_jax.sampling import RowSampling, SamplingParams

# stop_reason codes
STOP_RUNNING, STOP_EOS, STOP_MAX_NEW, STOP_CACHE_FULL, STOP_CANCELLED = 0, 1, 2, 3, 4
STOP_NAMES = {STOP_RUNNING: "running", STOP_EOS: "eos", STOP_MAX_NEW: "max_new_tokens",
              STOP_CACHE_FULL: "cache_full", STOP_CANCELLED: "cancelled"}


@flax.struct.dataclass
class DecodeState:
    """Everything one decode step reads and writes (B rows, M output columns, G = most tokens one
    step can emit, E stop-id slots).

    Attributes:
      cache: target KVCache, L x [B, S, K, H]; valid for slots [0, committed) in every layer.
      ring: DraftCache [B, R, K, H] of the draft's self-attention K/V for positions [0, committed)
        (slot = position mod R), or None when decoding without a draft.
      committed: int32 [B] c: tokens (prompt + emitted) whose K/V are in the cache; also the
        position of `root`.
      root: int32 [B] the last emitted token: not yet in the cache, the input of the next step.
      out: int32 [B, M + G] emitted tokens of each row (its first, sampled from the prefill, at
        column 0); valid [0, out_len). The G spare columns take one step's tokens unclamped.
      out_len: int32 [B] emitted tokens per row.
      max_new: int32 [B] the row's token budget (<= M): it stops after this many.
      eos_ids: int32 [B, E] the row's stop ids, padded with -1 (which matches no token).
      done: bool [B] the row is stopped (finished, or a free slot): masked from then on.
      stop_reason: int32 [B] a STOP_* code.
      key: PRNG key [B], one per row; step i of a row draws from `fold_in(key, i + 1)` (its first
        token from `fold_in(key, 0)`), so a row's draws depend on its own key only.
      sampling: RowSampling, temperature / top-k / top-p per row.
      iters: int32 [B] decode steps (target forwards after the prefill) the row took part in.
      accept_hist: int32 [B, G] accept_hist[b, k] = steps of row b that accepted k draft tokens.
    """

    cache: KVCache
    ring: DraftCache | None
    committed: jax.Array
    root: jax.Array
    out: jax.Array
    out_len: jax.Array
    max_new: jax.Array
    eos_ids: jax.Array
    done: jax.Array
    stop_reason: jax.Array
    key: jax.Array
    sampling: RowSampling
    iters: jax.Array
    accept_hist: jax.Array

    @property
    def batch(self) -> int:
        return self.committed.shape[0]

    @property
    def max_accept(self) -> int:
        """G: the most tokens one step may emit (columns of accept_hist)."""
        return self.accept_hist.shape[1]

    @classmethod
    def initial(cls, cfg: ModelConfig, *, batch: int, capacity: int, out_size: int, max_accept: int,
                ring_slots: int | None = None, draft_cfg=None, eos_slots: int = 4, dtype=jnp.bfloat16,
                cache_sharding=None, committed=0, seed: int = 0) -> "DecodeState":
        """A state of `batch` running rows with zero caches, `committed` tokens each (benchmarks
        time steps at a given context this way; decoders build their state from a prefill with
        `DecodeLoop.start`). Greedy sampling, no stop ids, budget `out_size`.

        Args:
          cfg: the target's ModelConfig; capacity: cache slots per row; out_size: M.
          max_accept: G, at least the max_accept of every tree the state will run.
          ring_slots, draft_cfg: the draft ring (both or neither).
        """
        B = batch
        ring = None
        if draft_cfg is not None:
            ring = DraftCache.init(draft_cfg, B, ring_slots, dtype)
        def zeros():  # a buffer per field: the state is donated, and a buffer can be donated once
            return jnp.zeros((B,), jnp.int32)

        return cls(
            cache=KVCache.init(cfg, B, capacity, dtype, sharding=cache_sharding), ring=ring,
            committed=jnp.full((B,), committed, jnp.int32), root=zeros(),
            out=jnp.zeros((B, out_size + max_accept), jnp.int32), out_len=zeros(),
            max_new=jnp.full((B,), out_size, jnp.int32), eos_ids=jnp.full((B, eos_slots), -1, jnp.int32),
            done=jnp.zeros((B,), bool), stop_reason=zeros(), key=jax.random.split(jax.random.key(seed), B),
            sampling=jax.tree.map(jnp.asarray, RowSampling.rows(SamplingParams(), B)), iters=zeros(),
            accept_hist=jnp.zeros((B, max_accept), jnp.int32))


def eos_array(eos_ids, slots: int | None = None) -> np.ndarray:
    """Stop ids as an int32 row padded with -1 to `slots` (default: a multiple of 4, at least 4)."""
    eos = [int(e) for e in eos_ids]
    slots = slots if slots is not None else max(4, -(-len(eos) // 4) * 4)
    if len(eos) > slots:
        raise ValueError(f"{len(eos)} stop ids do not fit in {slots} slots")
    arr = np.full((slots,), -1, np.int32)
    arr[:len(eos)] = eos
    return arr


# ------------------------------------------------------------------------------------------------
# Row operations (the serving engine's slots; the state is donated, so XLA updates rows in place)


@functools.partial(jax.jit, donate_argnames=("staging",))
def copy_row(cache, staging, slot):
    """Copy row `slot` of `cache` [B, S, K, H] into the first S slots of `staging` [1, S', K, H]
    (the serving engine prefills a reused prefix on from there)."""

    def one(full, stage):
        row = jax.lax.dynamic_slice_in_dim(full, slot, 1, axis=0)  # [1, S, K, H]
        return jax.lax.dynamic_update_slice_in_dim(stage, row, 0, axis=1)

    return KVCache(k=tuple(map(one, cache.k, staging.k)), v=tuple(map(one, cache.v, staging.v)))


@functools.partial(jax.jit, donate_argnames=("state",))
def stop_row(state: DecodeState, slot):
    """Stop row `slot` (masked from the next step on; stop reason "cancelled" unless it was done)."""
    return state.replace(done=state.done.at[slot].set(True),
                         stop_reason=state.stop_reason.at[slot].set(jnp.where(state.done[slot], state.stop_reason[slot],
                                                                              STOP_CANCELLED)))


@functools.partial(jax.jit, static_argnames=("width",))
def new_tokens(state: DecodeState, *, width: int) -> jax.Array:
    """What a host reads after a decode call, packed into one int32 [B, width + 4] array (one
    device-to-host copy): each row's last `width` emitted tokens (ending at out_len; `width` is the
    most one call can emit), then out_len, done, stop_reason and iters."""
    cols = jnp.clip(state.out_len[:, None] - width + jnp.arange(width)[None, :], 0, state.out.shape[1] - 1)
    tail = jnp.take_along_axis(state.out, cols, axis=1)
    return jnp.concatenate([tail, jnp.stack([state.out_len, state.done.astype(jnp.int32), state.stop_reason,
                                             state.iters], axis=1)], axis=1)
