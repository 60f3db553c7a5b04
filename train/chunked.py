"""Memory-bounded training forwards for long sequences (train.attention = "chunked" or "flash").

`Transformer.forward_train` and `Draft.forward_train` attend with dense [T, T] masks and scores,
which at T = 32k is ~128 GiB per layer for a 32-head model. These twins compute the same maths
with query-chunked attention: `lax.map` over query blocks of `chunk` rows, each wrapped in
`jax.checkpoint`, so at most [B, N, chunk, T] float32 scores are alive (also in the backward pass).
They reuse the models' own submodules (projections, norms, MLP, `Draft._block`), so only the
attention core differs; tests/test_train_step.py checks them against the models' forward_train.

Two attention cores:
  "chunked"  pure-JAX query blocks (above); runs anywhere, float32 scores.
  "flash"    `jax.nn.dot_product_attention` (cuDNN flash attention on NVIDIA GPUs with bf16/f16
             inputs, XLA elsewhere): causal, sliding-window (`local_window_size`) and lagged
             cross-attention, the last by rolling the queries so that it becomes plain causal
             attention (row i sees keys <= i - lag  <=>  row i - lag of the rolled queries is causal).

Visibility (by sequence index i, key index s): target causal s <= i; draft self-attention
i - W <= s <= i; draft cross-attention s <= i - lag (rows i < lag output zeros, spec 1.3).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: Callable[[jax.Array, jax.Array], jax.Array],
                      *, chunk: int) -> jax.Array:
    """Softmax attention with a position-rule mask, query block by query block.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] (GQA: N = G * K).
      visible: (query index [C, 1], key index [1, S]) -> bool [C, S]; True = may attend.
      chunk: query rows per block (T is padded up to a multiple).
    Returns:
      [B, T, N, H] in q.dtype; rows with no visible key are exact zeros.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    chunk = min(chunk, T)
    n = -(-T // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * chunk - T), (0, 0), (0, 0)))
    qb = qp.reshape(B, n, chunk, K, G, H).swapaxes(0, 1)  # [n, B, C, K, G, H]
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    scale = 1.0 / (H ** 0.5)
    key_idx = jnp.arange(S)[None, :]

    @jax.checkpoint
    def block(args):
        qc, start = args
        s = jnp.einsum("bckgh,bskh->bkgcs", qc.astype(jnp.float32), kf) * scale  # [B, K, G, C, S]
        mask = visible(start + jnp.arange(chunk)[:, None], key_idx)  # [C, S]
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgcs,bskh->bckgh", p / jnp.where(l > 0, l, 1.0), vf)
        return o.astype(q.dtype)

    out = jax.lax.map(block, (qb, jnp.arange(n) * chunk))  # [n, B, C, K, G, H]
    return out.swapaxes(0, 1).reshape(B, n * chunk, N, H)[:, :T]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None = None,
                    lag=None, chunk: int = 1024) -> jax.Array:
    """Causal attention through `jax.nn.dot_product_attention` (cuDNN flash attention where it applies).

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H] (same length: training sequences).
      window: sliding window W: row i sees keys i - W .. i (None = all keys <= i).
      lag: cross-attention lag j (traced int): row i sees keys <= i - j; rows i < j are zeros.
      chunk: query block of the chunked core used where cuDNN cannot run (float32 on a GPU).
    """
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and q.dtype not in (jnp.bfloat16, jnp.float16):
        # cuDNN takes bf16/f16 only, and XLA's dense fallback would hold [B, N, T, T] float32 scores
        # (24 GiB at 4 x 16k): use the memory-bounded query-chunked core instead.
        return _core("chunked", chunk)(q, k, v, window=window, lag=lag)
    impl = "cudnn" if on_gpu else "xla"
    if lag is not None:
        T = q.shape[1]
        lag = jnp.asarray(lag, jnp.int32)
        q = jnp.roll(q, -lag, axis=1)
    local = None if window is None else (int(window), 0)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation=impl)
    if lag is not None:
        o = jnp.roll(o, lag, axis=1)
        o = jnp.where((jnp.arange(T) >= lag)[None, :, None, None], o, jnp.zeros((), o.dtype))
    return o


def _core(impl: str, chunk: int):
    """(q, k, v, window, lag) -> attention output, for impl "chunked" or "flash"."""
    if impl == "flash":
        return lambda q, k, v, window=None, lag=None: flash_attention(q, k, v, window=window, lag=lag, chunk=chunk)
    if impl != "chunked":
        raise ValueError(f"unknown training attention {impl!r}; expected 'chunked' or 'flash'")

    def attend(q, k, v, window=None, lag=None):
        if lag is not None:
            lag = jnp.asarray(lag, jnp.int32)
            rule = lambda i, s: s <= i - lag  # noqa: E731
        elif window is not None:
            rule = lambda i, s: (s <= i) & (s >= i - window)  # noqa: E731
        else:
            rule = lambda i, s: s <= i  # noqa: E731
        return chunked_attention(q, k, v, rule, chunk=chunk)

    return attend


def target_forward_train(target, tokens: jax.Array, positions: jax.Array, *, chunk: int, impl: str = "chunked"):
    """`Transformer.forward_train` with chunked or flash causal attention: (hidden, (k_last, v_last))."""
    cos, sin = target.rope(positions)
    h = target.embed(tokens)
    kv = None
    attend = _core(impl, chunk)
    for layer in target.layers:
        q, k, v = layer.attn.qkv(layer.input_norm(h), cos, sin)
        h = h + layer.attn.out(attend(q, k, v))
        h = h + layer.mlp(layer.post_attn_norm(h))
        kv = (k, v)
    return target.final_norm(h), kv


def draft_forward_train(draft, tokens: jax.Array, positions: jax.Array, k_last: jax.Array, v_last: jax.Array,
                        lag, *, embed: Callable, chunk: int, impl: str = "chunked") -> jax.Array:
    """`Draft.forward_train` with chunked or flash window self-attention and lagged cross-attention."""
    x = embed(tokens)
    cos, sin = draft.cos_sin(positions)
    W = draft.cfg.window
    lag = jnp.asarray(lag, jnp.int32)
    attend = _core(impl, chunk)

    def self_attend(q):
        k, v = draft.self_attn.kv(draft.input_layernorm(x.astype(draft.dtype)), cos, sin)
        return attend(q, k, v, window=W)

    def cross_attend(q):
        return attend(q, k_last.astype(q.dtype), v_last.astype(q.dtype), lag=lag)

    return draft._block(x, cos, sin, self_attend, cross_attend)
