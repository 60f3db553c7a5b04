"""The LongSpec draft model (spec section 1): ONE decoder block run on top of the frozen target.

    x  = E_target[token]                              shared embedding (the target's, not a copy)
    h1 = x  + SelfAttn(RMSNorm_in(x))                 sliding window W = 512, q/k/v biases, o no bias
    h2 = h1 + CrossAttn(RMSNorm_postSA(h1))           q/o only; K, V = the target's LAST-layer
                                                      post-RoPE cache, GQA
    h3 = h2 + MLP(RMSNorm_postCA(h2))                 SwiGLU
    logits = target.logits(h3)                        the target's LM head, NO final norm

RoPE is the target's (`layers.rope_cos_sin` with the target's RopeConfig); the draft owns no
embedding, LM head or rotary tables, so `nnx.state(draft)` holds only the draft block (the part
that is trained and saved). Every method that needs the embedding takes it as an argument.

Inference cache: a truly constant-size RING of `capacity` slots (`DraftCache`), independent of the
context length. The token at position p lives in slot p mod capacity; `pallas_kernels.prefix_attention`
reads it with the ring visibility rule (the last `window` committed tokens wherever they sit).
Because the draft has one layer, a token's self-attention K/V depend only on (token, position), so
the ring only needs committed tokens: the tree nodes of the current iteration keep their K/V in a
small separate buffer `[B, Nn, K, H]` (read by `tree_attention` under the ancestor mask and merged
with the ring part by LSE), and the decoder copies the accepted nodes' K/V into the ring after
verification. The ring therefore needs only `window + G` slots (G = tokens accepted per iteration,
written just past the committed length without clobbering the visible window).

Window rule at inference: a query sees the last W committed tokens plus its in-tree ancestors
(root included), i.e. W + depth + 1 keys, a few more than the W + 1 of training at the far edge.
The original used flash-attn's bottom-right alignment, which is similarly approximate (spec 1.2);
it only affects acceptance, never losslessness.

Cross-attention visibility (spec 1.3): in training the query at sequence index i sees target keys
[0, i - lag] (queries i < lag get a zero output, "flash noisy training"); at inference every draft
query of one iteration sees the committed target cache [0, c) where c is the root's position, so a
node at depth m has lag m + 1, the root lag 1, as in the original.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from longspec_jax.attention import train_attention
from longspec_jax.configs import DraftConfig, RopeConfig
from longspec_jax.layers import MLP, RMSNorm, apply_rope, param, remat_call, rope_cos_sin


def ring_capacity(window: int, max_accept: int, multiple: int = 128) -> int:
    """Slots of the draft ring: the visible window plus one iteration's accepted tokens, rounded up
    to a multiple of `multiple` (128: the Pallas prefix kernel reads the ring in 128-slot blocks).
    Independent of the context length: 640 slots for W = 512. Any capacity > window + max_accept
    is correct for the "xla" implementation (tests use small rings to exercise wrap-around)."""
    need = window + max_accept
    return -(-need // multiple) * multiple


@flax.struct.dataclass
class DraftCache:
    """Constant-size ring buffer of the draft's self-attention K/V (post-RoPE).

    k, v: [B, R, K, H]; the token at position p is stored in slot p mod R. Which slots are valid is
    decided by the caller's committed length (see `reference.prefix_visibility`).
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def init(cls, cfg: DraftConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> "DraftCache":
        if capacity <= cfg.window:
            raise ValueError(f"draft ring capacity {capacity} must exceed the window {cfg.window} "
                             "(use draft.ring_capacity(window, tree_shape.max_accept)).")
        shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array) -> "DraftCache":
        """Store k, v [B, T, K, H] of tokens at `positions` [B, T] (slot = position mod R).

        Rows with valid == False are dropped (scatter to an out-of-range slot). The T positions of
        a row must be distinct modulo R (true for T <= R consecutive positions).
        """
        R = self.capacity
        slots = jnp.where(valid, jnp.mod(positions, R), R).astype(jnp.int32)  # R = dropped
        b = jnp.arange(k.shape[0])[:, None]
        return DraftCache(k=self.k.at[b, slots].set(k.astype(self.k.dtype), mode="drop"),
                          v=self.v.at[b, slots].set(v.astype(self.v.dtype), mode="drop"))


class _SelfAttention(nnx.Module):
    """Draft self-attention projections: q/k/v with biases (even for Llama drafts), o without.

    Left separate for inference (`transformer.fuse_projections` fuses the draft's MLP only): the
    ring writes (`Draft.self_kv`, once per committed root) need k and v without q, and slicing them
    out of one fused weight would copy it whole each time.
    """

    def __init__(self, cfg: DraftConfig, *, rngs, dtype, param_dtype, init_std=0.02):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = dtype
        init = jax.nn.initializers.normal(init_std)
        self.q_kernel = param(rngs, init, (D, N, H), param_dtype, ("embed", "q_heads", "head_dim"))
        self.k_kernel = param(rngs, init, (D, K, H), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.v_kernel = param(rngs, init, (D, K, H), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.q_bias = param(rngs, init, (N, H), param_dtype, ("q_heads", "head_dim"))
        self.k_bias = param(rngs, init, (K, H), param_dtype, ("kv_heads", "head_dim"))
        self.v_bias = param(rngs, init, (K, H), param_dtype, ("kv_heads", "head_dim"))
        self.o_kernel = param(rngs, init, (N, H, D), param_dtype, ("q_heads", "head_dim", "embed"))

    def q(self, x, cos, sin):
        x = x.astype(self.dtype)
        q = jnp.einsum("BTD,DNH->BTNH", x, self.q_kernel[...].astype(self.dtype)) + self.q_bias[...].astype(self.dtype)
        return apply_rope(q, cos, sin)

    def kv(self, x, cos, sin):
        x = x.astype(self.dtype)
        k = jnp.einsum("BTD,DKH->BTKH", x, self.k_kernel[...].astype(self.dtype)) + self.k_bias[...].astype(self.dtype)
        v = jnp.einsum("BTD,DKH->BTKH", x, self.v_kernel[...].astype(self.dtype)) + self.v_bias[...].astype(self.dtype)
        return apply_rope(k, cos, sin), v

    def out(self, o):
        return jnp.einsum("BTNH,NHD->BTD", o.astype(self.dtype), self.o_kernel[...].astype(self.dtype))


class _CrossAttention(nnx.Module):
    """Cross-attention projections: q (bias) and o (no bias). The checkpoint's cross k/v
    projections are dead parameters in the original and are not created here (spec 1.3)."""

    def __init__(self, cfg: DraftConfig, *, rngs, dtype, param_dtype, init_std=0.02):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.dtype = dtype
        init = jax.nn.initializers.normal(init_std)
        self.q_kernel = param(rngs, init, (D, N, H), param_dtype, ("embed", "q_heads", "head_dim"))
        self.q_bias = param(rngs, init, (N, H), param_dtype, ("q_heads", "head_dim"))
        self.o_kernel = param(rngs, init, (N, H, D), param_dtype, ("q_heads", "head_dim", "embed"))

    def q(self, x, cos, sin):
        x = x.astype(self.dtype)
        q = jnp.einsum("BTD,DNH->BTNH", x, self.q_kernel[...].astype(self.dtype)) + self.q_bias[...].astype(self.dtype)
        return apply_rope(q, cos, sin)

    def out(self, o):
        return jnp.einsum("BTNH,NHD->BTD", o.astype(self.dtype), self.o_kernel[...].astype(self.dtype))


class Draft(nnx.Module):
    """The LongSpec draft block.

    Args:
      cfg: DraftConfig (check it against the target with `cfg.check_matches(target_cfg)`).
      rope: the TARGET's RopeConfig (the draft reuses the target's rotary embedding).
      rngs: initialisation RNGs (weights are usually replaced by `draft_weights.load_draft`).
      dtype: compute dtype; attention softmax runs in float32 regardless.
      param_dtype: storage dtype of the parameters.
      attention_impl: `pallas_kernels` implementation ("xla", "pallas", "pallas_interpret", "auto").
    """

    def __init__(self, cfg: DraftConfig, rope: RopeConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16,
                 param_dtype=jnp.bfloat16, attention_impl: str = "xla"):
        self.cfg = cfg
        self.rope = rope
        self.dtype = dtype
        self.attention_impl = attention_impl
        D = cfg.hidden_size
        self.input_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = _SelfAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_self_attention_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.cross_attn = _CrossAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_cross_attention_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(D, cfg.intermediate_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    # ---------------------------------------------------------------------------------------
    # pieces

    def cos_sin(self, positions: jax.Array):
        """cos, sin [B, T, H] float32 of the target's RoPE at `positions` [B, T]."""
        return rope_cos_sin(self.rope, self.cfg.head_dim, positions)

    def self_kv(self, x: jax.Array, positions: jax.Array):
        """Self-attention K (post-RoPE), V [B, T, K, H] of embedded tokens x [B, T, D]: they depend
        only on (token, position), which is what lets the ring hold only committed tokens."""
        cos, sin = self.cos_sin(positions)
        return self.self_attn.kv(self.input_layernorm(x.astype(self.dtype)), cos, sin)

    def _block(self, x, cos, sin, self_attend: Callable, cross_attend: Callable):
        """The residual block given the two attention cores (each maps q [B,T,N,H] -> o [B,T,N,H])."""
        x = x.astype(self.dtype)
        q = self.self_attn.q(self.input_layernorm(x), cos, sin)
        h = x + self.self_attn.out(self_attend(q))
        q = self.cross_attn.q(self.post_self_attention_layernorm(h), cos, sin)
        h = h + self.cross_attn.out(cross_attend(q))
        return h + self.mlp(self.post_cross_attention_layernorm(h))

    # ---------------------------------------------------------------------------------------
    # inference

    def init_ring(self, x_tail: jax.Array, positions: jax.Array, valid: jax.Array, capacity: int,
                  cache_dtype=None) -> DraftCache:
        """Draft prefill: a ring holding the K/V of the prompt's last tokens.

        Args:
          x_tail: [B, R', D] embeddings of the last R' <= capacity prompt tokens (any R' >= window).
          positions: [B, R'] their positions; valid: [B, R'] False for padding (position < 0).
          capacity: ring slots (`ring_capacity`).
        The rest of the original draft prefill (attention, MLP over the whole prompt) only
        produced discarded outputs and is skipped: cost independent of the prompt length.
        """
        B = x_tail.shape[0]
        ring = DraftCache.init(self.cfg, B, capacity, cache_dtype or self.dtype)
        k, v = self.self_kv(x_tail, jnp.maximum(positions, 0))
        return ring.write(k, v, positions, valid)

    def tree_step(self, x: jax.Array, positions: jax.Array, ring: DraftCache, committed: jax.Array,
                  tree_k: jax.Array, tree_v: jax.Array, offset: int, tree_mask: jax.Array,
                  k_last: jax.Array, v_last: jax.Array, t_last: jax.Array):
        """One draft forward over the n nodes of one tree level (the root is level 0).

        Args:
          x: [B, n, D] embeddings of the level's tokens; positions: [B, n] (root_pos + depth).
          ring: the draft ring holding committed tokens; committed: [B] int32 number of committed
            tokens (= the root's position); the ring part sees the last `window` of them.
          tree_k, tree_v: [B, Nn, K, H] K/V of the tree nodes drafted so far (all levels < this one).
          offset: static first node index of this level; its K/V are written at [offset, offset+n).
          tree_mask: [B, n, Nn] bool ancestor rows of this level's nodes (self included).
          k_last, v_last: [B, S, K, H] the target's last-layer post-RoPE cache; t_last: [B] int32
            valid prefix length (= committed: every node sees [0, root_pos), spec 1.3 lags).
        Returns:
          (h [B, n, D] block output before the LM head, tree_k, tree_v).
        """
        cos, sin = self.cos_sin(positions)
        k, v = self.self_attn.kv(self.input_layernorm(x.astype(self.dtype)), cos, sin)
        tree_k = jax.lax.dynamic_update_slice_in_dim(tree_k, k.astype(tree_k.dtype), offset, axis=1)
        tree_v = jax.lax.dynamic_update_slice_in_dim(tree_v, v.astype(tree_v.dtype), offset, axis=1)
        impl = self.attention_impl

        def self_attend(q):
            o, _ = pallas_kernels.hybrid_attention(q, ring.k, ring.v, committed, tree_k, tree_v, tree_mask,
                                                   window=self.cfg.window, implementation=impl)
            return o

        def cross_attend(q):
            o, _ = pallas_kernels.prefix_attention(q, k_last, v_last.astype(k_last.dtype), t_last,
                                                   window=None, implementation=impl)
            return o

        h = self._block(x, cos, sin, self_attend, cross_attend)
        return h, tree_k, tree_v

    # ---------------------------------------------------------------------------------------
    # training

    def forward_train(self, tokens: jax.Array, positions: jax.Array, k_last: jax.Array, v_last: jax.Array,
                      lag, *, embed: Callable[[jax.Array], jax.Array], attention="dense", chunk: int = 1024,
                      remat: str = "none") -> jax.Array:
        """Teacher-forced draft pass for training (spec 1.3 and 5.1).

        Args:
          tokens: [B, T] int32 token ids.
          positions: [B, T] int32 RoPE positions (anchor-offset or vanilla; the target's positions).
          k_last, v_last: [B, T, K, H] the target's last-layer post-RoPE K/V from
            `Transformer.forward_train` on the same tokens and positions.
          lag: int or int32 scalar j >= 1 ("flash noisy training"): the query at sequence index i
            sees target keys [0, i - j]; queries i < j get a zero cross-attention output. May be a
            traced value (one compile for every lag).
          embed: the target's embedding function (e.g. `target.embed`), kept outside the draft so
            its table is neither copied nor trained.
          attention: the attention core, "dense" | "chunked" | "flash" or a callable
            (`attention.train_attention`), for both the self- and the cross-attention.
          chunk: query rows per block of the "chunked" core.
          remat: activation checkpointing of the block, a `layers.REMAT_POLICIES` name.
        Returns:
          hidden [B, T, D] (compute dtype), before the shared LM head, which the caller applies
          (e.g. chunked, fused with the cross-entropy). There is no final norm.

        Self-attention is causal with the window by sequence index: i sees [i - W, i] (W + 1 keys,
        flash-attn window_size=(W, -1)).
        """
        x = embed(tokens)
        lag = jnp.asarray(lag, jnp.int32)

        def run(draft, x, positions, k_last, v_last, lag):
            cos, sin = draft.cos_sin(positions)
            k, v = draft.self_attn.kv(draft.input_layernorm(x.astype(draft.dtype)), cos, sin)  # [B, T, K, H]

            def self_attend(q):
                return train_attention(q, k, v, attention=attention, window=draft.cfg.window, chunk=chunk)

            def cross_attend(q):
                return train_attention(q, k_last, v_last, attention=attention, lag=lag, chunk=chunk)

            return draft._block(x, cos, sin, self_attend, cross_attend)

        return remat_call(self, run, remat, x, positions, k_last, v_last, lag)

