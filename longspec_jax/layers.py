"""Decoder building blocks: RMSNorm, rotary embeddings (every supported scaling kind), SwiGLU MLP,
token embedding and LM head (spec section 1.1: HF-style RMSNorm and "rotate_half" RoPE).

Parameters are `nnx.Param`s whose `logical_axes` metadata names each dimension ("vocab", "embed",
"q_heads", "kv_heads", "head_dim", "mlp", "norm"); `sharding.py` maps those names to mesh axes.
We keep our own metadata key rather than flax's `out_sharding` because flax treats the latter as
mesh axis names (and may shard eagerly at creation), which logical names are not.

Numerics follow Hugging Face transformers exactly, so that float32 parity holds at 1e-4:
- RMSNorm upcasts to float32, normalises, casts back to the input dtype, then multiplies by the weight.
- RoPE inverse frequencies and angles are float32; cos/sin are cast to the activation dtype before use.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longspec_jax.configs import ConfigError, RopeConfig

LOGICAL_AXES = "logical_axes"  # Param metadata key read by sharding.py


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], dtype, axes: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` initialised by `init(key, shape, dtype)` with logical axis names attached.

    With `rngs=None` the value is filled with zeros (used for norm scales set to one by the caller
    and by abstract construction under `nnx.eval_shape`, where values are never materialised).
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    value = init(rngs.params(), tuple(shape), dtype) if rngs is not None else jnp.zeros(shape, dtype)
    return nnx.Param(value, **{LOGICAL_AXES: tuple(axes)})


def regroup_params(module: nnx.Module, old: Sequence[str], new: dict[str, Sequence[str | None]], fn: Callable,
                   placement: Callable[[nnx.Variable], jax.sharding.Sharding] | None = None) -> None:
    """Replace `module`'s parameters named `old` by ones named after `new`, in place.

    `new` maps each new name to its logical axes; the values are `fn(*old values)` (a tuple, one
    array per new name), computed in one jitted call. The old Variables are then removed, so their
    arrays are freed as soon as nothing else holds them: regrouping a model module by module needs
    one module's parameters of extra memory, not a second model.

    Args:
      placement: None, or a function from a new (shape-only) parameter to the sharding its value
        should have (e.g. `sharding.variable_sharding` on the model's mesh); None leaves the
        placement to XLA (the old parameters' device).
    """
    values = [getattr(module, name).get_value() for name in old]
    shapes = jax.eval_shape(fn, *values)
    abstract = [nnx.Param(s, **{LOGICAL_AXES: tuple(axes)}) for s, axes in zip(shapes, new.values())]
    out_shardings = None if placement is None else tuple(placement(p) for p in abstract)
    results = jax.jit(fn, out_shardings=out_shardings)(*values)
    del values
    for name in old:
        delattr(module, name)
    for (name, axes), value in zip(new.items(), results):
        setattr(module, name, nnx.Param(value, **{LOGICAL_AXES: tuple(axes)}))


def _normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


# --------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: float32 normalisation, cast back to x.dtype, then times `weight`."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned per-channel scale (initialised to one)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **{LOGICAL_AXES: ("norm",)})

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings


def _base_inv_freq(theta, head_dim: int) -> np.ndarray:
    # float64 on the host, rounded once to float32: the most accurate value of HF's float32 formula.
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / (float(theta) ** exponents)).astype(np.float32)


def _llama3_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """HF `_compute_llama3_parameters`: divide low frequencies by `factor`, keep high ones, blend between."""
    inv_freq = _base_inv_freq(rope.theta, head_dim).astype(np.float64)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(rope: RopeConfig, head_dim: int, positions: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies [H/2] float32 for `rope`.

    For "dynamic" the frequencies depend on the sequence length, which HF takes as
    `max(position_ids) + 1` over the whole call (batch included), floored at the original length:
    `base = theta * (factor * len / orig - (factor - 1)) ** (H / (H - 2))`. Below the original
    length this equals the default RoPE. `positions` is required for "dynamic" only.
    """
    if head_dim % 2:
        raise ConfigError(f"RoPE needs an even head_dim, got {head_dim}")
    if rope.kind == "default":
        return jnp.asarray(_base_inv_freq(rope.theta, head_dim))
    if rope.kind == "linear":
        return jnp.asarray(_base_inv_freq(rope.theta, head_dim)) / jnp.float32(rope.factor)
    if rope.kind == "llama3":
        if rope.original_max_position_embeddings is None:
            raise ConfigError("llama3 RoPE needs original_max_position_embeddings")
        return jnp.asarray(_llama3_inv_freq(rope, head_dim))
    if rope.kind == "dynamic":
        if rope.original_max_position_embeddings is None:
            raise ConfigError("dynamic RoPE needs original_max_position_embeddings (= max_position_embeddings)")
        if positions is None:
            raise ValueError("dynamic RoPE frequencies depend on the positions; pass them")
        orig = rope.original_max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, jnp.float32(orig))
        base = jnp.float32(rope.theta) * (jnp.float32(rope.factor) * seq_len / orig - (rope.factor - 1.0)) ** (
            head_dim / (head_dim - 2))
        exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
        scaled = 1.0 / (base ** exponents)
        # Below the original length HF uses the unscaled frequencies; pick the host-computed ones
        # exactly there so the common case is bit-identical to default RoPE.
        return jnp.where(seq_len > orig, scaled, jnp.asarray(_base_inv_freq(rope.theta, head_dim)))
    raise ConfigError(f"unsupported rope kind {rope.kind!r}")


def rope_cos_sin(rope: RopeConfig, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] float32 for integer positions [B, T] (any values: offsets, tree depths).

    HF layout: the H/2 angles are repeated (concat(freqs, freqs)), to be used with `rotate_half`.
    The draft model calls this with the target's RopeConfig so both share one RoPE.
    """
    inv_freq = rope_inv_freq(rope, head_dim, positions)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis (HF convention, not interleaved)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, H] by cos/sin [B, T, H]; cos/sin are cast to x.dtype first (as HF)."""
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------
# MLP, embedding, LM head


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); no biases.

    Params: gate_kernel, up_kernel [D, F], down_kernel [F, D]; after `fuse()` (inference) gate and up
    are one gate_up_kernel [D, 2, F], read by one matmul.
    """

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs | None, dtype=jnp.bfloat16,
                 param_dtype=jnp.float32, init_std: float = 0.02):
        self.dtype = dtype
        init = _normal(init_std)
        self.gate_kernel = param(rngs, init, (dim, hidden), param_dtype, ("embed", "mlp"))
        self.up_kernel = param(rngs, init, (dim, hidden), param_dtype, ("embed", "mlp"))
        self.down_kernel = param(rngs, init, (hidden, dim), param_dtype, ("mlp", "embed"))

    @property
    def fused(self) -> bool:
        """Whether gate and up are one parameter (`fuse`)."""
        return hasattr(self, "gate_up_kernel")

    def fuse(self, placement=None) -> None:
        """Stack gate and up into gate_up_kernel [D, 2, F] ("embed", None, "mlp"), in place; idempotent.

        One [D, 2F] matmul reads the two weights in one kernel (fewer, larger matmuls run nearer the
        memory bandwidth at decode row counts); a split of "mlp" over devices keeps each device's
        gate and up columns together. `placement`: as `regroup_params`.
        """
        if not self.fused:
            regroup_params(self, ("gate_kernel", "up_kernel"), {"gate_up_kernel": ("embed", None, "mlp")},
                           _stack_gate_up, placement)

    def unfuse(self, placement=None) -> None:
        """The inverse of `fuse` (the separate layout checkpoints and training use), in place; idempotent."""
        if self.fused:
            regroup_params(self, ("gate_up_kernel",), {"gate_kernel": ("embed", "mlp"), "up_kernel": ("embed", "mlp")},
                           _split_gate_up, placement)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.fused:
            y = jnp.einsum("BTD,DJF->BTJF", x, self.gate_up_kernel[...].astype(self.dtype))
            gate, up = y[..., 0, :], y[..., 1, :]
        else:
            gate = jnp.einsum("BTD,DF->BTF", x, self.gate_kernel[...].astype(self.dtype))
            up = jnp.einsum("BTD,DF->BTF", x, self.up_kernel[...].astype(self.dtype))
        return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down_kernel[...].astype(self.dtype))


def _stack_gate_up(gate, up):
    return (jnp.stack([gate, up], axis=1),)  # [D, 2, F]


def _split_gate_up(gate_up):
    return gate_up[:, 0], gate_up[:, 1]


def vocab_parallel_lookup(table: jax.Array, tokens: jax.Array, mesh, axis: str = "tensor") -> jax.Array:
    """Rows of a vocabulary-split table [V, D] for `tokens` (any shape), Megatron style: each device
    looks up the tokens its vocabulary slice holds, zeros elsewhere, and one all-reduce sums them
    (exact: one non-zero term per element).

    Left to XLA's partitioner, `jnp.take` on a vocabulary-split table can instead all-gather the
    whole table every step: jax 0.11.2 on 2 x H200 moved QwQ-32B's 1.56 GB embedding per decode
    step that way (3 ms of a 6.5 ms 16-layer step; docs/perf_notes.md, "Tensor parallelism")."""

    def lookup(tab, tok):
        v_local = tab.shape[0]
        local = tok - jax.lax.axis_index(axis) * v_local
        ok = (local >= 0) & (local < v_local)
        rows = jnp.take(tab, jnp.clip(local, 0, v_local - 1), axis=0)
        return jax.lax.psum(jnp.where(ok[..., None], rows, jnp.zeros((), rows.dtype)), axis)

    spec = jax.sharding.PartitionSpec
    return jax.shard_map(lookup, mesh=mesh, in_specs=(spec(axis, None), spec()), out_specs=spec(),
                         check_vma=False)(table, tokens)


class Embedding(nnx.Module):
    """Token embedding table [V, D]; `attend` uses it as a tied LM head."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs | None, dtype=jnp.bfloat16,
                 param_dtype=jnp.float32, init_std: float = 0.02):
        self.dtype = dtype
        self.embedding = param(rngs, _normal(init_std), (vocab, dim), param_dtype, ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Rows [..., D] for `tokens`; per vocabulary slice (`vocab_parallel_lookup`) under an ambient
        mesh (`jax.set_mesh`) whose "tensor" axis splits the vocabulary."""
        table = self.embedding[...]
        mesh = jax.sharding.get_abstract_mesh()
        n = 1 if mesh.empty or "tensor" in mesh.manual_axes else dict(mesh.shape).get("tensor", 1)
        if n > 1 and table.shape[0] % n == 0:
            return vocab_parallel_lookup(table, tokens, mesh).astype(self.dtype)
        return jnp.take(table, tokens, axis=0).astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied-head logits [B, T, V] in float32."""
        return jnp.einsum("BTD,VD->BTV", h.astype(self.dtype), self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


class LMHead(nnx.Module):
    """Untied output projection [D, V]; logits in float32."""

    def __init__(self, dim: int, vocab: int, *, rngs: nnx.Rngs | None, dtype=jnp.bfloat16,
                 param_dtype=jnp.float32, init_std: float = 0.02):
        self.dtype = dtype
        self.kernel = param(rngs, _normal(init_std), (dim, vocab), param_dtype, ("embed", "vocab"))

    def __call__(self, h: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,DV->BTV", h.astype(self.dtype), self.kernel[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------
# Activation checkpointing for the training forwards

REMAT_POLICIES = {
    "none": None,  # no checkpointing: every activation is kept for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the inputs, recompute the rest
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_call(module: nnx.Module, fn: Callable, remat: str, *args):
    """`fn(module, *args)`, under `jax.checkpoint` with the named policy unless `remat` is "none".

    The module's state enters the checkpointed function as an argument (split, then merged inside),
    so gradients reach its parameters; `args` must be arrays. Used per decoder layer, where
    checkpointing pays: the activations of one layer are alive at a time in the backward pass.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {', '.join(REMAT_POLICIES)}")
    if remat == "none":
        return fn(module, *args)
    graphdef, state = nnx.split(module)

    def run(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return jax.checkpoint(run, policy=REMAT_POLICIES[remat])(state, *args)
