"""Llama / Qwen2 decoder-only target model (Qwen2 = Llama with q/k/v biases, a config flag).

`Transformer.__call__` is the single inference entry (DESIGN.md): causal prefill chunks, one-token
decode and tree verification differ only in T, positions and mask. `forward_train` is the cache-free
causal pass used by training (the frozen target of the draft objective, and the LM objective),
returning the last layer's post-RoPE K/V for the draft's cross-attention (spec section 1.3); its
attention core and activation checkpointing are arguments.

`fuse_projections` regroups, in place, every layer's q|k|v and gate|up weights into one matmul each
for inference (`infer.Decoder` does it); checkpoints, training and export use the separate layout,
which `unfuse_projections` restores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from longspec_jax import kv_cache as kvc
from longspec_jax import sharding as shd
from longspec_jax.attention import Attention
from longspec_jax.configs import ModelConfig
from longspec_jax.layers import MLP, Embedding, LMHead, RMSNorm, remat_call, rope_cos_sin


class DecoderLayer(nnx.Module):
    """Pre-norm block: h + Attn(RMSNorm(h)), then h + MLP(RMSNorm(h))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention_impl: str):
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, h, cos, sin, cache, layer, lengths, mask, visible=None):
        a, cache = self.attn(self.input_norm(h), cos, sin, cache, layer, lengths, mask, visible)
        h = h + a
        return h + self.mlp(self.post_attn_norm(h)), cache

    def forward_train(self, h, cos, sin, *, attention="dense", chunk: int = 1024):
        a, kv = self.attn.forward_train(self.input_norm(h), cos, sin, attention=attention, chunk=chunk)
        h = h + a
        return h + self.mlp(self.post_attn_norm(h)), kv


class Transformer(nnx.Module):
    """Decoder-only target model built from a `ModelConfig`.

    Args:
      cfg: the model configuration (static).
      rngs: initialisation RNGs (weights are usually overwritten by `weights.load_target`).
      dtype: compute dtype of activations and matmuls (attention softmax is float32 regardless).
      param_dtype: storage dtype of the parameters.
      attention_impl: `pallas_kernels` implementation ("xla", "pallas", "pallas_interpret", "auto").
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                 attention_impl: str = "xla"):
        self.cfg = cfg
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.embedder = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # nnx.List (not a plain list) so the layers are pytree data on flax >= 0.12.
        self.layers = nnx.List([
            DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
            for _ in range(cfg.num_layers)
        ])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int -> embeddings [B, T, D] in the compute dtype."""
        return self.embedder(tokens)

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden states [B, T, D] (after the final norm) -> logits [B, T, V] float32."""
        if self.cfg.tie_word_embeddings:
            return self.embedder.attend(h)
        return self.lm_head(h)

    def head_weight(self) -> jax.Array:
        """The output projection as [D, V] in its storage dtype: the untied LM head, or the transposed
        tied embedding. The one accessor for everything that reads the head outside `logits`
        (training losses, draft-vocabulary columns)."""
        if self.cfg.tie_word_embeddings:
            return self.embedder.embedding[...].T
        return self.lm_head.kernel[...]

    @property
    def head_dtype(self):
        """Compute dtype of the LM head: the operand dtype of the einsum in `logits`."""
        return self.embedder.dtype if self.cfg.tie_word_embeddings else self.lm_head.dtype

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B, T, H] float32 of this model's RoPE at `positions` [B, T]."""
        return rope_cos_sin(self.cfg.rope, self.cfg.head_dim, positions)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: kvc.KVCache, lengths: jax.Array,
                 mask: jax.Array | None = None, visible: jax.Array | None = None) -> tuple[jax.Array, kvc.KVCache]:
        """Run T new tokens against the cache.

        Args:
          tokens: [B, T] int32.
          positions: [B, T] int32 RoPE positions (arbitrary: true positions, tree depths, offsets).
          cache: KVCache with capacity >= lengths[b] + T.
          lengths: [B] int32 committed prefix length per row; never advanced here.
          mask: [B, T, T] bool among the new tokens (True = may attend); None = causal.
          visible: [B] int32 cached prefix the tokens attend to (default: `lengths`). A decode loop
            passes 0 for rows that are done, so their attention reads none of their cache.

        Returns:
          (hidden [B, T, D] after the final norm, cache with every layer's new K/V written at
          slots lengths[b] + [0, T)).
        """
        B, T = tokens.shape
        if positions.shape != (B, T):
            raise ValueError(f"positions {positions.shape} must match tokens {tokens.shape}")
        if cache.batch != B or cache.num_layers != self.cfg.num_layers:
            raise ValueError(f"cache has batch {cache.batch} and {cache.num_layers} layers; the call has batch {B} "
                             f"and the model {self.cfg.num_layers} layers")
        if mask is not None and mask.shape != (B, T, T):
            raise ValueError(f"mask {mask.shape} must be [B, T, T] = {(B, T, T)}")
        lengths = lengths.astype(jnp.int32)
        cos, sin = self.rope(positions)
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h, cache = layer(h, cos, sin, cache, i, lengths, mask, visible)
        return self.final_norm(h), cache

    def forward_train(self, tokens: jax.Array, positions: jax.Array, *, attention="dense", chunk: int = 1024,
                      remat: str = "none") -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Causal pass without a cache (training).

        Args:
          tokens, positions: [B, T] int32 (positions: Anchor-Offset or vanilla).
          attention: the attention core, "dense" | "chunked" | "flash" or a callable
            (`attention.train_attention`); independent of `attention_impl`, which serves inference.
          chunk: query rows per block of the "chunked" core (and of "flash"'s float32 fallback).
          remat: activation checkpointing of each decoder layer, a `layers.REMAT_POLICIES` name.

        Returns:
          (hidden [B, T, D] after the final norm, (k_last, v_last) [B, T, K, H]: the last layer's
          post-RoPE keys and values).
        """
        cos, sin = self.rope(positions)
        h = self.embed(tokens)
        kv = None

        def run(layer, h, cos, sin):
            return layer.forward_train(h, cos, sin, attention=attention, chunk=chunk)

        for layer in self.layers:
            h, kv = remat_call(layer, run, remat, h, cos, sin)
        return self.final_norm(h), kv


# --------------------------------------------------------------------------------------------
# Fused projections for inference


def fuse_projections(model: nnx.Module, rules=None) -> nnx.Module:
    """Fuse the q|k|v and gate|up projections of every `Attention` and `MLP` in `model`, in place;
    idempotent; returns `model`.

    `model` is a `Transformer` or a `Draft` (whose MLP is fused; its self-attention computes q apart
    from k, v, see `Draft`). The fused model computes the same function with three fewer weight
    matmuls per layer (`Attention.fuse`, `MLP.fuse`). Module by module, the separate arrays are
    dropped as the fused ones are made, so the extra memory is one layer's projections (provided
    nothing else holds the arrays). A model placed on a mesh keeps its placement: each fused
    parameter gets the sharding `rules` (default `sharding.DEFAULT_RULES`) give its logical axes.
    """
    placement = _placement(model, rules)
    for module in _projection_modules(model):
        module.fuse(placement)
    return model


def unfuse_projections(model: nnx.Module, rules=None) -> nnx.Module:
    """The inverse of `fuse_projections` (the separate layout that checkpoints, export and training
    use), in place; idempotent; returns `model`."""
    placement = _placement(model, rules)
    for module in _projection_modules(model):
        module.unfuse(placement)
    return model


def is_fused(model: nnx.Module) -> bool:
    """Whether any projection of `model` is fused (`fuse_projections`)."""
    return any(module.fused for module in _projection_modules(model))


def check_unfused(model: nnx.Module, what: str) -> None:
    """Refuse (ValueError naming `what`) a model whose projections are fused: checkpoints and
    exports hold q, k, v, gate and up separately."""
    if is_fused(model):
        raise ValueError(f"{what}: the model's q|k|v and gate|up projections are fused for inference (a Decoder "
                         "fuses the models it is given), while checkpoints hold them apart; call "
                         "longspec_jax.transformer.unfuse_projections(model) first, or save or load before "
                         "building the Decoder.")


def _projection_modules(model: nnx.Module) -> list:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, (Attention, MLP))]


def _placement(model: nnx.Module, rules):
    """`regroup_params`' placement for a model on a mesh (that of its first mesh-sharded
    parameter), or None for a model on one device."""
    for _, var in shd.iter_params(model):
        sharding = getattr(var.get_value(), "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return functools.partial(shd.variable_sharding, mesh=sharding.mesh, rules=rules)
    return None
