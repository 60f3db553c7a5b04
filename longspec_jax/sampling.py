"""Logits -> filtered log-probabilities (temperature, top-k, top-p) and sampling.

The decode loop (`longspec_jax/infer/loop.py`, autoregressive and speculative alike) and the lossless verifier
(`longspec_jax/verify.py`) call exactly these functions, so a token sampled by either path is
drawn from the same distribution: "lossless" is only meaningful if the target distribution is
defined in one place.

Order of operations follows Hugging Face `generate` (temperature, then top-k, then top-p):

1. temperature: `logits / T`; `T == 0` means greedy and yields a one-hot distribution on the
   argmax (first index on ties, as `jnp.argmax`), whatever top-k / top-p say.
2. top-k: keep entries `>=` the k-th largest value (ties at the k-th value are all kept, as HF's
   `TopKLogitsWarper`); `k == 0` or `k >= V` disables it.
3. top-p (nucleus): sort the probabilities ascending, drop the entries whose ascending cumulative
   probability is `<= 1 - p`, always keep the most likely entry (HF's `TopPLogitsWarper` with
   `min_tokens_to_keep=1`). We apply the cut as a threshold on the logit value instead of a scatter
   of the sorted mask, which is identical except for exact ties at the cut, where we keep every
   tied entry (HF keeps an order-dependent subset); this makes the result independent of the sort's
   tie order.

Settings are data, not compile-time constants: `RowSampling` holds them as arrays over the batch
rows, so one compiled decode step serves greedy and sampled requests side by side (each row gets
its own temperature, top-k, top-p and PRNG key). `SamplingParams` is the validated per-request
value a user writes; it broadcasts over every row. Work only some rows need is skipped with
`lax.cond` when no row needs it (the sort behind top-k / top-p, the draws of an all-greedy batch).

All arrays are float32 with vocabulary on the last axis (`[..., V]`); the functions are pure and
jit-able.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SamplingParams", "RowSampling", "process_logits", "sample", "greedy", "categorical", "uniform",
           "gumbel", "fold_in", "split", "is_greedy_row"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into a next-token distribution (frozen, hashable).

    Attributes:
      temperature: >= 0. 0 selects greedy decoding (argmax); > 0 divides the logits.
      top_k: >= 0. Keep the k most likely tokens; 0 keeps all.
      top_p: in (0, 1]. Keep the smallest set of most likely tokens whose probability reaches p;
        1.0 keeps all.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (1 = disabled), got {p!r}")
        # Normalise types so equal settings compare and hash equally (e.g. top_k=np.int64(5) vs 5).
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))

    @property
    def is_greedy(self) -> bool:
        """True when decoding is deterministic argmax (temperature 0)."""
        return self.temperature == 0.0


@flax.struct.dataclass
class RowSampling:
    """Sampling settings of every batch row, as arrays (a pytree: traced, never a static argument).

    Attributes:
      temperature: float32 [B] (or [] for every row); 0 = greedy.
      top_k: int32 [B] (or []); 0 = off.
      top_p: float32 [B] (or []); 1 = off.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def of(cls, params: SamplingParams | Sequence[SamplingParams] | "RowSampling") -> "RowSampling":
        """Host arrays from one `SamplingParams` (shape [], every row), a sequence of them ([B]), or
        an existing `RowSampling` (returned as is)."""
        if isinstance(params, RowSampling):
            return params
        if isinstance(params, SamplingParams):
            return cls(np.float32(params.temperature), np.int32(params.top_k), np.float32(params.top_p))
        rows = list(params)
        if not all(isinstance(p, SamplingParams) for p in rows):
            raise TypeError("RowSampling.of takes SamplingParams, a sequence of them, or a RowSampling")
        return cls(np.array([p.temperature for p in rows], np.float32), np.array([p.top_k for p in rows], np.int32),
                   np.array([p.top_p for p in rows], np.float32))

    @classmethod
    def rows(cls, params: SamplingParams | Sequence[SamplingParams], batch: int) -> "RowSampling":
        """[B] host arrays: one `SamplingParams` repeated over `batch` rows, or one per row."""
        if isinstance(params, SamplingParams):
            params = [params] * batch
        params = list(params)
        if len(params) != batch:
            raise ValueError(f"got sampling settings for {len(params)} rows but the batch has {batch}")
        return cls.of(params)


def greedy(logits: jax.Array) -> jax.Array:
    """Argmax over the last axis as int32: exactly `jnp.argmax` (first index on ties, the first NaN
    if there is one), written as three reductions (any NaN, max, min index of the maxima).

    Under tensor parallelism the vocabulary axis is split over devices. XLA partitions
    `jnp.argmax` there as two NCCL all-gathers of every device's (value, index) pair; plain
    reductions become all-reduces, which XLA runs with its own small-message kernel (~7 us each on
    2 x H200, docs/perf_notes.md, "Tensor parallelism"), so the decode step issues no NCCL call at all."""
    vocab = logits.shape[-1]
    nan = jnp.isnan(logits)
    has_nan = jnp.any(nan, axis=-1, keepdims=True)
    top = jnp.max(jnp.where(nan, -jnp.inf, logits), axis=-1, keepdims=True)
    hit = jnp.where(has_nan, nan, logits == top)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, iota, vocab), axis=-1).astype(jnp.int32)


def _per_row(value: jax.Array, x: jax.Array) -> jax.Array:
    """A setting [] or [B] shaped to broadcast against x [B, ..., V] (a trailing axis of 1 each)."""
    value = jnp.asarray(value)
    return value if value.ndim == 0 else value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def _top_k_top_p(x: jax.Array, k: jax.Array, p: jax.Array) -> jax.Array:
    """Top-k then top-p on temperature-scaled logits x [..., V] (k, p broadcast per row), with one
    sort for both: the k-th largest value cuts top-k; the ascending cumulative softmax of the
    survivors cuts top-p."""
    vocab = x.shape[-1]
    ascending = jnp.sort(x, axis=-1)
    use_k = (k > 0) & (k < vocab)
    kth = jnp.take_along_axis(ascending, jnp.broadcast_to(jnp.clip(vocab - k, 0, vocab - 1), x.shape[:-1] + (1,))
                              .astype(jnp.int32), axis=-1)  # the k-th largest
    kth = jnp.where(use_k, kth, -jnp.inf)
    x = jnp.where(x < kth, -jnp.inf, x)
    ascending = jnp.where(ascending < kth, -jnp.inf, ascending)  # still ascending: a prefix became -inf
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = cumulative <= (1.0 - p)
    # Always keep the most likely token (HF min_tokens_to_keep=1), also when rounding makes the
    # cumulative sum of everything fall below 1 - p.
    removed = removed.at[..., -1].set(False)
    # The kept entries are a suffix of the ascending order, so the cut is a single value: the
    # smallest kept logit. Thresholding on it avoids a scatter back to vocabulary order.
    threshold = jnp.min(jnp.where(removed, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where((p < 1.0) & (x < threshold), -jnp.inf, x)


def process_logits(logits: jax.Array, params: SamplingParams | RowSampling) -> jax.Array:
    """Filtered next-token log-probabilities.

    Args:
      logits: `[B, ..., V]` raw model logits (any float dtype; computed in float32). With a single
        `SamplingParams`, any shape `[..., V]`.
      params: one setting for every row (`SamplingParams`), or per-row arrays (`RowSampling`, each
        field [B] or []).

    Returns:
      `[B, ..., V]` float32 log-probabilities that sum (in probability space) to 1 over the kept
      entries; filtered entries are exactly `-inf`. Rows with temperature 0 get a one-hot: 0 on the
      argmax and `-inf` elsewhere.
    """
    s = RowSampling.of(params)
    x = logits.astype(jnp.float32)
    t, k, p = (_per_row(v, x) for v in (s.temperature, s.top_k, s.top_p))
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    one_hot = jnp.where(vocab_ids == greedy(x)[..., None], 0.0, -jnp.inf).astype(jnp.float32)

    def sampled():
        y = x / jnp.where(t > 0, t, 1.0).astype(jnp.float32)
        needs_sort = jnp.any((t > 0) & (((k > 0) & (k < x.shape[-1])) | (p < 1.0)))
        y = jax.lax.cond(needs_sort, lambda: _top_k_top_p(y, k, p), lambda: y)
        return jnp.where(t > 0, jax.nn.log_softmax(y, axis=-1), one_hot)

    return jax.lax.cond(jnp.all(s.temperature == 0), lambda: one_hot, sampled)


# --------------------------------------------------------------------------------------------
# PRNG helpers that take one key (shared by every row) or one key per row ([B] key array), so a
# request's draws depend only on its own key, never on its neighbours or its batch position.


def _batched(key: jax.Array) -> bool:
    return jnp.ndim(key) > 0


def fold_in(key: jax.Array, data) -> jax.Array:
    """`jax.random.fold_in` for one key or per row (data [] or [B])."""
    if not _batched(key):
        return jax.random.fold_in(key, data)
    data = jnp.broadcast_to(jnp.asarray(data, jnp.uint32), key.shape)
    return jax.vmap(jax.random.fold_in)(key, data)


def split(key: jax.Array, num: int = 2) -> tuple[jax.Array, ...]:
    """`jax.random.split` for one key or per row; returns `num` keys of the input's shape."""
    if not _batched(key):
        return tuple(jax.random.split(key, num))
    keys = jax.vmap(lambda k: jax.random.split(k, num))(key)  # [B, num]
    return tuple(keys[:, i] for i in range(num))


def categorical(key: jax.Array, logp: jax.Array) -> jax.Array:
    """One draw over the last axis for every leading index of logp [B, ..., V]; int32 [B, ...].
    Independent draws per leading index; with per-row keys, row b uses key[b] only."""
    if not _batched(key):
        return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda k, lp: jax.random.categorical(k, lp, axis=-1))(key, logp).astype(jnp.int32)


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 uniforms in [0, 1) of `shape` = (B, ...); with per-row keys, row b uses key[b] only."""
    if not _batched(key):
        return jax.random.uniform(key, shape, jnp.float32)
    return jax.vmap(lambda k: jax.random.uniform(k, shape[1:], jnp.float32))(key)


def gumbel(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 standard Gumbel noise of `shape` = (B, ...); with per-row keys, row b uses key[b] only.
    The top k of `logp + gumbel` are k draws without replacement from exp(logp) (Gumbel-top-k)."""
    if not _batched(key):
        return jax.random.gumbel(key, shape, jnp.float32)
    return jax.vmap(lambda k: jax.random.gumbel(k, shape[1:], jnp.float32))(key)


def is_greedy_row(params: SamplingParams | RowSampling, batch: int) -> jax.Array:
    """bool [B]: which rows decode greedily (temperature 0)."""
    return jnp.broadcast_to(jnp.asarray(RowSampling.of(params).temperature) == 0, (batch,))


def sample(key: jax.Array | None, logits: jax.Array, params: SamplingParams | RowSampling) -> jax.Array:
    """Draw one token per row from `exp(process_logits(logits, params))`.

    Args:
      key: a PRNG key, or a [B] array of per-row keys (may be None when `params` is a greedy
        `SamplingParams`). The same keys and logits always give the same tokens; every leading
        index of `logits` gets an independent draw.
      logits: `[B, ..., V]` raw model logits.
      params: `SamplingParams` (every row) or `RowSampling` (per row).

    Returns:
      `[B, ...]` int32 token ids; greedy rows get exactly `greedy(logits)`.
    """
    if isinstance(params, SamplingParams) and params.is_greedy:
        return greedy(logits)
    if key is None:
        raise ValueError("sample() needs a PRNG key when the temperature may be > 0")
    s = RowSampling.of(params)
    return jax.lax.cond(jnp.all(s.temperature == 0), lambda: greedy(logits),
                        lambda: categorical(key, process_logits(logits, s)))
