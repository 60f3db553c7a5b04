"""Decode-loop state of the autoregressive baseline (`infer/ar.py`).

One `flax.struct.dataclass` carried through a single `lax.while_loop` (STYLE habit 3): every
field has a static shape, so the loop compiles once per (batch, output-buffer, cache) shape
bucket, and the KV cache travels inside it so that donation lets XLA update it in place.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from longspec_jax.kv_cache import KVCache


@flax.struct.dataclass
class ARState:
    """Everything the AR decode loop reads and writes (B = batch rows, N_out = output buffer).

    Attributes:
      tokens: [B, N_out] int32. Generated tokens; column i holds the i-th new token of every row.
        Entries at or after `num_tokens[b]` hold `pad_id` (the buffer starts filled with it).
      num_tokens: [B] int32. Valid generated tokens per row, EOS included; stops growing once the
        row is done.
      step: [] int32. Columns of `tokens` written so far (the same for every row: rows advance in
        lockstep and a finished row only writes padding). The loop stops at `step == limit`.
      limit: [] int32. Number of new tokens to produce (<= N_out); a run-time value so different
        `max_new_tokens` in one output bucket share a compiled loop, and streaming can raise it
        chunk by chunk.
      last_token: [B] int32. The most recent token of each row: the input of the next step.
      lengths: [B] int32. Committed cache length per row = slot and RoPE position where
        `last_token` is written next. Frozen once the row is done so its writes stay in bounds.
      done: [B] bool. The row produced one of the EOS ids (it keeps its slot, its outputs are pad).
      key: PRNG key (typed, shape []). Base key of the run; step i samples with
        `fold_in(key, i)`, so results do not depend on how the loop is split into chunks.
      cache: the target KVCache; k[l], v[l] are [B, S, K, H].
    """

    tokens: jax.Array
    num_tokens: jax.Array
    step: jax.Array
    limit: jax.Array
    last_token: jax.Array
    lengths: jax.Array
    done: jax.Array
    key: jax.Array
    cache: KVCache

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.cache.capacity


def step_key(key: jax.Array, step: jax.Array) -> jax.Array:
    """The sampling key of decode step `step` (0 = the token sampled from the prefill)."""
    return jax.random.fold_in(key, jnp.asarray(step, jnp.uint32))
