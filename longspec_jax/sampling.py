"""Logits -> filtered log-probabilities (temperature, top-k, top-p) and sampling.

The autoregressive baseline (`infer/ar.py`) and the lossless speculative verifier
(`longspec_jax/verify.py`) both call exactly these functions, so a token sampled by either path is
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

All arrays are float32 with vocabulary on the last axis (`[..., V]`); the functions are pure and
jit-able, with `SamplingParams` a hashable static argument.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

__all__ = ["SamplingParams", "process_logits", "sample", "greedy"]

GREEDY_TEMPERATURE = 0.0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a next-token distribution (frozen, hashable: a jit static argument).

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
            raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"--top-k must be an integer >= 0 (0 = disabled), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 < p <= 1.0):
            raise ValueError(f"--top-p must be a number in (0, 1] (1 = disabled), got {p!r}")
        # Normalise types so equal settings hash equally (e.g. top_k=np.int64(5) vs 5): these
        # objects are jit cache keys.
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))

    @property
    def is_greedy(self) -> bool:
        """True when decoding is deterministic argmax (temperature 0)."""
        return self.temperature == GREEDY_TEMPERATURE


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


def _top_k_filter(x: jax.Array, k: int) -> jax.Array:
    vocab = x.shape[-1]
    if k == 0 or k >= vocab:
        return x
    kth = jax.lax.top_k(x, k)[0][..., -1:]  # [..., 1] the k-th largest value
    return jnp.where(x < kth, -jnp.inf, x)


def _top_p_filter(x: jax.Array, p: float) -> jax.Array:
    if p >= 1.0:
        return x
    ascending = jnp.sort(x, axis=-1)  # [..., V]; -inf (already filtered) entries come first
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = cumulative <= (1.0 - p)
    # Always keep the most likely token (HF min_tokens_to_keep=1), also when rounding makes the
    # cumulative sum of everything fall below 1 - p.
    removed = removed.at[..., -1].set(False)
    # The kept entries are a suffix of the ascending order, so the cut is a single value: the
    # smallest kept logit. Thresholding on it avoids a scatter back to vocabulary order.
    threshold = jnp.min(jnp.where(removed, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(x < threshold, -jnp.inf, x)


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Filtered next-token log-probabilities.

    Args:
      logits: `[..., V]` raw model logits (any float dtype; computed in float32).
      params: the sampling settings (a static, hashable value under jit).

    Returns:
      `[..., V]` float32 log-probabilities that sum (in probability space) to 1 over the kept
      entries; filtered entries are exactly `-inf`. With temperature 0 the result is one-hot on
      the argmax: 0 there and `-inf` elsewhere.
    """
    x = logits.astype(jnp.float32)
    if params.is_greedy:
        vocab_ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
        return jnp.where(vocab_ids == greedy(x)[..., None], 0.0, -jnp.inf).astype(jnp.float32)
    x = x / jnp.float32(params.temperature)
    x = _top_k_filter(x, params.top_k)
    x = _top_p_filter(x, params.top_p)
    return jax.nn.log_softmax(x, axis=-1)


def sample(key: jax.Array | None, logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Draw one token per row from `exp(process_logits(logits, params))`.

    Args:
      key: a PRNG key (unused and may be None when `params.is_greedy`). The same key and logits
        always give the same tokens; every leading index of `logits` gets an independent draw.
      logits: `[..., V]` raw model logits.
      params: the sampling settings.

    Returns:
      `[...]` int32 token ids.
    """
    if params.is_greedy:
        return greedy(logits)
    if key is None:
        raise ValueError("sample() needs a PRNG key when temperature > 0")
    logp = process_logits(logits, params)
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
