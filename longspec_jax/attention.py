"""GQA self-attention of the target model over a static KV cache (spec section 4: Hybrid Tree
Attention), and the attention cores of the cache-free training forwards.

Inference: one code path serves causal prefill (any T, chunked by the caller), one-token decode
and tree verification: the T new tokens see the committed prefix `[0, lengths)` unmasked plus
each other under `mask` (causal when None). Attention maths runs in float32 inside
`pallas_kernels`; projections run in the compute dtype.

Training (`train_attention`): full sequences of T tokens attend under one of three visibility rules
by sequence index (query i, key s): causal s <= i (the target), window i - W <= s <= i (the draft's
self-attention) and lag s <= i - j (the draft's cross-attention, spec 1.3: rows i < j have no key
and output exact zeros). The core is chosen by name:
  "dense"    one masked [T, T] float32 softmax (the reference: `pallas_kernels.reference`).
  "chunked"  the same maths over query blocks of `chunk` rows under `lax.map`, each block
             rematerialised, so at most [B, N, chunk, T] float32 scores are alive (32k sequences).
  "flash"    `jax.nn.dot_product_attention`: cuDNN flash attention on NVIDIA GPUs with bf16/f16
             inputs, XLA elsewhere. The lag rule becomes plain causal attention by rolling the
             queries (row i sees keys <= i - j  <=>  row i - j of the rolled queries is causal).
             float32 on a GPU falls back to "chunked" (cuDNN takes bf16/f16 only, and XLA's dense
             fallback would hold [B, N, T, T] float32 scores).
A callable `core(q, k, v, *, window, lag) -> out` may stand in for the name (tests use it to
check a rule against another formulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from typing import Callable

from flax import nnx

import pallas_kernels
from longspec_jax import kv_cache as kvc
from longspec_jax.configs import ModelConfig
from longspec_jax.layers import apply_rope, param, regroup_params
from pallas_kernels import reference as attn_ref


class Attention(nnx.Module):
    """Multi-head attention with grouped K/V heads and optional q/k/v biases (Qwen2).

    Params: q_kernel [D, N, H], k_kernel / v_kernel [D, K, H], o_kernel [N, H, D];
    q_bias [N, H], k_bias / v_bias [K, H] when `cfg.attention_bias`. After `fuse()` (inference)
    q, k and v are one qkv_kernel [D, K, G+2, H] (and qkv_bias [K, G+2, H]).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                 attention_impl: str = "xla", init_std: float = 0.02):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = dtype
        self.attention_impl = attention_impl
        init = jax.nn.initializers.normal(init_std)
        self.q_kernel = param(rngs, init, (D, N, H), param_dtype, ("embed", "q_heads", "head_dim"))
        self.k_kernel = param(rngs, init, (D, K, H), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.v_kernel = param(rngs, init, (D, K, H), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.o_kernel = param(rngs, init, (N, H, D), param_dtype, ("q_heads", "head_dim", "embed"))
        self.use_bias = cfg.attention_bias
        if cfg.attention_bias:
            self.q_bias = param(rngs, init, (N, H), param_dtype, ("q_heads", "head_dim"))
            self.k_bias = param(rngs, init, (K, H), param_dtype, ("kv_heads", "head_dim"))
            self.v_bias = param(rngs, init, (K, H), param_dtype, ("kv_heads", "head_dim"))

    @property
    def fused(self) -> bool:
        """Whether q, k and v are one parameter (`fuse`)."""
        return hasattr(self, "qkv_kernel")

    def fuse(self, placement=None) -> None:
        """Group q, k and v into qkv_kernel [D, K, G+2, H] ("embed", "kv_heads", None, "head_dim"),
        in place; idempotent. Biases likewise into qkv_bias [K, G+2, H].

        Per KV head k: its G query heads (n = k*G + g, HF's repeat_kv grouping), then k, then v. One
        [D, K*(G+2)*H] matmul replaces three (the k and v ones are too small to reach the memory
        bandwidth alone at decode row counts), and a split of "kv_heads" over devices keeps each
        device's q, k and v together. `placement`: as `layers.regroup_params`.
        """
        if self.fused:
            return
        regroup_params(self, ("q_kernel", "k_kernel", "v_kernel"),
                       {"qkv_kernel": ("embed", "kv_heads", None, "head_dim")}, _group_qkv, placement)
        if self.use_bias:
            regroup_params(self, ("q_bias", "k_bias", "v_bias"), {"qkv_bias": ("kv_heads", None, "head_dim")},
                           _group_qkv, placement)

    def unfuse(self, placement=None) -> None:
        """The inverse of `fuse` (the separate layout checkpoints and training use), in place; idempotent."""
        if not self.fused:
            return
        kernels = {"q_kernel": ("embed", "q_heads", "head_dim"), "k_kernel": ("embed", "kv_heads", "head_dim"),
                   "v_kernel": ("embed", "kv_heads", "head_dim")}
        regroup_params(self, ("qkv_kernel",), kernels, _ungroup_qkv, placement)
        if self.use_bias:
            biases = {"q_bias": ("q_heads", "head_dim"), "k_bias": ("kv_heads", "head_dim"),
                      "v_bias": ("kv_heads", "head_dim")}
            regroup_params(self, ("qkv_bias",), biases, _ungroup_qkv, placement)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """Projections + RoPE: q [B,T,N,H], k [B,T,K,H] (post-RoPE), v [B,T,K,H], in the compute dtype."""
        x = x.astype(self.dtype)
        if self.fused:
            y = jnp.einsum("BTD,DKJH->BTKJH", x, self.qkv_kernel[...].astype(self.dtype))
            if self.use_bias:
                y = y + self.qkv_bias[...].astype(self.dtype)
            B, T, K, J, H = y.shape
            G = J - 2
            q = y[..., :G, :].reshape(B, T, K * G, H)  # [B, T, N, H]: head n = k*G + g
            k, v = y[..., G, :], y[..., G + 1, :]
        else:
            q = jnp.einsum("BTD,DNH->BTNH", x, self.q_kernel[...].astype(self.dtype))
            k = jnp.einsum("BTD,DKH->BTKH", x, self.k_kernel[...].astype(self.dtype))
            v = jnp.einsum("BTD,DKH->BTKH", x, self.v_kernel[...].astype(self.dtype))
            if self.use_bias:
                q = q + self.q_bias[...].astype(self.dtype)
                k = k + self.k_bias[...].astype(self.dtype)
                v = v + self.v_bias[...].astype(self.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o: jax.Array) -> jax.Array:
        """Output projection [B,T,N,H] -> [B,T,D]."""
        return jnp.einsum("BTNH,NHD->BTD", o.astype(self.dtype), self.o_kernel[...].astype(self.dtype))

    def __call__(self, x, cos, sin, cache: kvc.KVCache, layer: int, lengths, mask, visible=None):
        """Attend T new tokens over the cached prefix and each other; returns (out [B,T,D], cache).

        The new K/V are written at slots lengths[b] + [0, T) of layer `layer`; the prefix seen is
        exactly `[0, visible)` (default `lengths`: hybrid attention's visibility rule), so the
        just-written slots are read only through the masked tree part.
        """
        q, k, v = self.qkv(x, cos, sin)
        cache = kvc.write_layer(cache, layer, k, v, lengths)
        o, _ = pallas_kernels.hybrid_attention(
            q, cache.k[layer], cache.v[layer], lengths if visible is None else visible, k.astype(cache.dtype),
            v.astype(cache.dtype), mask, window=None, implementation=self.attention_impl)
        return self.out(o), cache

    def forward_train(self, x, cos, sin, *, attention: str | Callable = "dense", chunk: int = 1024):
        """Causal attention without a cache through the training core `attention` (`train_attention`).

        Returns (out [B,T,D], (k, v) [B,T,K,H] post-RoPE).
        """
        q, k, v = self.qkv(x, cos, sin)
        return self.out(train_attention(q, k, v, attention=attention, chunk=chunk)), (k, v)


def _group_qkv(q, k, v):
    """q [..., N, H], k, v [..., K, H] -> ([..., K, G+2, H],): per KV head, its G query heads, k, v."""
    K = k.shape[-2]
    q = q.reshape(*q.shape[:-2], K, q.shape[-2] // K, q.shape[-1])
    return (jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2),)


def _ungroup_qkv(qkv):
    """The inverse of `_group_qkv`: [..., K, G+2, H] -> q [..., N, H], k, v [..., K, H]."""
    *lead, K, J, H = qkv.shape
    G = J - 2
    return qkv[..., :G, :].reshape(*lead, K * G, H), qkv[..., G, :], qkv[..., G + 1, :]


# --------------------------------------------------------------------------------------------
# Training attention cores

TRAIN_ATTENTION = ("dense", "chunked", "flash")


def _visible(i: jax.Array, s: jax.Array, window: int | None, lag) -> jax.Array:
    """The visibility rule at query indices i and key indices s (broadcast): True = may attend."""
    if lag is not None:
        return s <= i - lag
    if window is not None:
        return (s <= i) & (s >= i - window)
    return s <= i


def train_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, attention: str | Callable = "dense",
                    window: int | None = None, lag=None, chunk: int = 1024) -> jax.Array:
    """Attention of a training sequence under the causal, window or lag rule (module docstring).

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H] (GQA: N = G * K), any float dtypes.
      attention: "dense", "chunked", "flash", or a callable core with this function's keywords.
      window: sliding window W (query i sees keys i - W .. i); None = causal.
      lag: cross-attention lag j >= 1, a Python or traced int (query i sees keys <= i - j; rows
        i < j output zeros). Takes precedence over `window` (the two are never combined).
      chunk: query rows per block of the "chunked" core (T need not be a multiple).
    Returns:
      [B, T, N, H] in q.dtype.
    """
    if lag is not None:
        lag = jnp.asarray(lag, jnp.int32)
    if callable(attention):
        return attention(q, k, v, window=window, lag=lag)
    if attention == "dense":
        B, T = q.shape[:2]
        idx = jnp.arange(T)
        mask = jnp.broadcast_to(_visible(idx[:, None], idx[None, :], window, lag), (B, T, T))
        # Fully masked rows (i < lag) come out of the reference as exact zeros, never NaN.
        return attn_ref.tree_attention_ref(q, k, v, mask)[0]
    if attention == "chunked":
        return chunked_attention(q, k, v, window=window, lag=lag, chunk=chunk)
    if attention == "flash":
        return flash_attention(q, k, v, window=window, lag=lag, chunk=chunk)
    raise ValueError(f"unknown training attention {attention!r}; expected one of {', '.join(TRAIN_ATTENTION)} "
                     "or a callable core")


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None = None, lag=None,
                      chunk: int) -> jax.Array:
    """The "dense" maths query block by query block (T is padded up to a multiple of `chunk`)."""
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
        mask = _visible(start + jnp.arange(chunk)[:, None], key_idx, window, lag)  # [C, S]
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgcs,bskh->bckgh", p / jnp.where(l > 0, l, 1.0), vf)
        return o.astype(q.dtype)

    out = jax.lax.map(block, (qb, jnp.arange(n) * chunk))  # [n, B, C, K, G, H]
    return out.swapaxes(0, 1).reshape(B, n * chunk, N, H)[:, :T]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None = None, lag=None,
                    chunk: int = 1024) -> jax.Array:
    """`jax.nn.dot_product_attention` under the rule; `chunk` serves the float32-on-GPU fallback."""
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and q.dtype not in (jnp.bfloat16, jnp.float16):
        return chunked_attention(q, k, v, window=window, lag=lag, chunk=chunk)
    k, v = k.astype(q.dtype), v.astype(q.dtype)  # cuDNN wants one dtype (the target's K/V may differ)
    T = q.shape[1]
    if lag is not None:
        q = jnp.roll(q, -lag, axis=1)
    local = None if window is None or lag is not None else (int(window), 0)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                     implementation="cudnn" if on_gpu else "xla")
    if lag is not None:
        o = jnp.roll(o, lag, axis=1)
        o = jnp.where((jnp.arange(T) >= lag)[None, :, None, None], o, jnp.zeros((), o.dtype))
    return o
