"""GQA self-attention of the target model over a static KV cache (spec section 4: Hybrid Tree
Attention). One code path serves causal prefill (any T, chunked by the caller), one-token decode
and tree verification: the T new tokens see the committed prefix `[0, lengths)` unmasked plus
each other under `mask` (causal when None). Attention maths runs in float32 inside
`pallas_kernels`; projections run in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from longspec_jax import kv_cache as kvc
from longspec_jax.configs import ModelConfig
from longspec_jax.layers import apply_rope, param


def causal_mask(batch: int, T: int) -> jax.Array:
    """[B, T, T] bool lower-triangular: token t sees new tokens 0..t."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (batch, T, T))


class Attention(nnx.Module):
    """Multi-head attention with grouped K/V heads and optional q/k/v biases (Qwen2).

    Params: q_kernel [D, N, H], k_kernel / v_kernel [D, K, H], o_kernel [N, H, D];
    q_bias [N, H], k_bias / v_bias [K, H] when `cfg.attention_bias`.
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

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """Projections + RoPE: q [B,T,N,H], k [B,T,K,H] (post-RoPE), v [B,T,K,H], in the compute dtype."""
        x = x.astype(self.dtype)
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

    def __call__(self, x, cos, sin, cache: kvc.KVCache, layer: int, lengths, mask):
        """Attend T new tokens over the cached prefix and each other; returns (out [B,T,D], cache).

        The new K/V are written at slots lengths[b] + [0, T) of layer `layer`; the prefix seen is
        exactly `[0, lengths)` (hybrid attention's visibility rule), so the just-written slots are
        read only through the masked tree part.
        """
        q, k, v = self.qkv(x, cos, sin)
        cache = kvc.write_layer(cache, layer, k, v, lengths)
        o, _ = pallas_kernels.hybrid_attention(
            q, cache.k[layer], cache.v[layer], lengths, k.astype(cache.dtype), v.astype(cache.dtype), mask,
            window=None, implementation=self.attention_impl)
        return self.out(o), cache

    def forward_train(self, x, cos, sin):
        """Causal attention without a cache; returns (out [B,T,D], (k, v) [B,T,K,H] post-RoPE)."""
        q, k, v = self.qkv(x, cos, sin)
        o, _ = pallas_kernels.tree_attention(q, k, v, causal_mask(x.shape[0], x.shape[1]),
                                             implementation=self.attention_impl)
        return self.out(o), (k, v)
