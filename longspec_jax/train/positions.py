"""Anchor-Offset position indices for draft training (spec 2.1, paper Alg. 1).

Short training sequences are given large position ids so that the draft (and its RoPE phases)
sees the positions it meets at long-context inference:

    pos = [0, 1, ..., s-1,  s+o, s+1+o, ..., T-1+o]

with `s` anchor ("sink") positions and an offset `o`, drawn once per step and shared across the
batch (as released). The target is run with the same `pos`, so the last-layer keys it returns carry
matching RoPE phases. Above `switch_off_len` tokens the indices are vanilla `arange(T)` (the
long-context stages already see long positions).

Everything here is jit-safe: `T` and the switch-off decision are static (shapes), `s` and `o` are
traced draws from the step key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_offset_for(seq_len: int, max_position_embeddings: int, max_offset: int | None) -> int:
    """The largest offset o such that the last position stays inside the model's range.

    Released code: `max(min(30000, model_max_length - 1000) - L, 0)`. With `max_offset` given we
    still clip to keep `T - 1 + o < max_position_embeddings` (RoPE tables / scaling assume it).
    """
    if max_offset is None:
        return max(min(30000, max_position_embeddings - 1000) - seq_len, 0)
    return max(min(max_offset, max_position_embeddings - seq_len), 0)


def anchor_offset_positions(
    key: jax.Array,
    batch: int,
    seq_len: int,
    *,
    sinks: int | str = "random",
    max_sinks: int = 4,
    max_offset: int = 0,
    switch_off_len: int = 1200,
    enabled: bool = True,
) -> jax.Array:
    """Positions [B, T] int32 for one training step.

    Args:
      key: the step's PRNG key (jax.random.key or a raw uint32[2] key).
      batch, seq_len: static B and T.
      sinks: fixed number of anchors, or "random" = uniform over {0..max_sinks} (released code).
      max_offset: inclusive upper bound of the uniform offset draw (see `max_offset_for`).
      switch_off_len: T above this gives vanilla positions.
      enabled: False gives vanilla positions.

    Returns:
      int32 [B, T], strictly increasing along T, identical across B.
    """
    base = jnp.arange(seq_len, dtype=jnp.int32)
    if not enabled or seq_len > switch_off_len:
        return jnp.broadcast_to(base, (batch, seq_len))
    k_s, k_o = jax.random.split(key)
    if sinks == "random":
        s = jax.random.randint(k_s, (), 0, max_sinks + 1, dtype=jnp.int32)
    else:
        s = jnp.int32(sinks)
    o = jax.random.randint(k_o, (), 0, max_offset + 1, dtype=jnp.int32)
    pos = base + jnp.where(base >= s, o, 0)
    return jnp.broadcast_to(pos, (batch, seq_len))
