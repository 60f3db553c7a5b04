"""Logical axis names -> mesh axes: one rules table, mesh helpers and model placement.

Parameters declare logical axes (`layers.LOGICAL_AXES` metadata, e.g. ("embed", "q_heads",
"head_dim")); `DEFAULT_RULES` maps each name to zero or more of the mesh axes ("data", "fsdp",
"tensor"). A spec that would use one mesh axis for two dimensions of the same array is refused.
A dimension that the mesh axes do not divide (e.g. 2 kv heads on tensor=4) is replicated instead,
which is always correct and only costs memory.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longspec_jax.layers import LOGICAL_AXES

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a tuple shards one dimension over several mesh axes; () replicates).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),   # activations and caches
    "seq": (),                   # cache slots / tokens
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "norm": (),
}


class ShardingError(ValueError):
    """A rules table or spec that cannot be honoured; the message names the axis."""


def check_rules(rules: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Validate a rules table (known mesh axes, no axis twice in one rule) and normalise it."""
    out = {}
    for name, axes in rules.items():
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ShardingError(f"rule {name!r} -> {axes} names unknown mesh axes {unknown}; use {MESH_AXES}")
        if len(set(axes)) != len(axes):
            raise ShardingError(f"rule {name!r} -> {axes} uses a mesh axis twice")
        out[name] = axes
    return out


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over the first data*fsdp*tensor devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = data * fsdp * tensor
    if n > len(devices):
        raise ShardingError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {n} devices, "
                            f"but only {len(devices)} are available")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, Sequence[str]] | None = None,
                    *, shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`; refuses a mesh axis used by two dimensions.

    With `shape` and `mesh`, a dimension not divisible by its mesh axes' total size is replicated.
    """
    rules = check_rules(DEFAULT_RULES if rules is None else rules)
    used: dict[str, str] = {}
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no sharding rule; add it to the rules table "
                                f"(known: {sorted(rules)})")
        mesh_axes = tuple(a for a in rules[name] if mesh is None or a in mesh.shape)
        for a in mesh_axes:
            if a in used:
                raise ShardingError(f"mesh axis {a!r} would shard both {used[a]!r} and {name!r} in {tuple(axes)}; "
                                    "change the rules table")
            used[a] = name
        if shape is not None and mesh is not None and mesh_axes:
            size = int(np.prod([mesh.shape[a] for a in mesh_axes]))
            if shape[i] % size:
                mesh_axes = ()
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def logical_to_sharding(axes: Sequence[str | None], mesh: Mesh, rules=None, *,
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for logical `axes` (see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape=shape, mesh=mesh))


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=None) -> NamedSharding:
    """The sharding of one parameter from its logical axes (replicated when it has none)."""
    axes = var.get_metadata(LOGICAL_AXES, None)
    shape = var.get_value().shape
    if axes is None:
        axes = (None,) * len(shape)
    return logical_to_sharding(axes, mesh, rules, shape=shape)


def iter_params(model: nnx.Module):
    """Yield (path string, nnx.Variable) for every Variable of `model`, e.g. ("layers.0.attn.q_kernel", var)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            yield ".".join(str(p) for p in path), node


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Place every parameter of `model` (in place) on `mesh` following the rules; returns `model`."""
    for _, var in iter_params(model):
        var.set_value(jax.device_put(var.get_value(), variable_sharding(var, mesh, rules)))
    return model


def cache_sharding(mesh: Mesh, rules=None, *, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding for a KV cache buffer [B, S, K, H]: batch over data/fsdp, kv heads over tensor."""
    return logical_to_sharding(("batch", "seq", "kv_heads", "head_dim"), mesh, rules, shape=shape)


# --------------------------------------------------------------------------------------------
# Tensor parallelism for inference (one model over the devices of one host, Megatron style)
#
# With DEFAULT_RULES on a (1, 1, n) mesh: q/k/v/o kernels are split over heads and the MLP over its
# hidden dimension ("q_heads", "kv_heads", "mlp" -> "tensor"), so each layer needs one all-reduce
# after the attention output and one after the MLP down projection; the KV cache is split over kv
# heads. The embedding and LM head stay sharded over the vocabulary ("vocab" -> "tensor"): at
# Llama-3 sizes the LM head (128k x 4096) is the largest single matrix read per decode step, so
# splitting it divides that read by n, at the price of small cross-device reductions in the
# argmax / top-k / softmax over the vocabulary-sharded logits. A vocabulary the axis does not
# divide is replicated (correct, only costs memory). Heads are refused instead (`check_tensor_parallel`):
# replicated kv heads would silently keep the whole KV cache on every device.


def tensor_parallel_mesh(n: int, *, devices=None) -> Mesh:
    """A (data=1, fsdp=1, tensor=n) mesh over the first `n` devices, for tensor-parallel inference."""
    devices = list(jax.devices() if devices is None else devices)
    if n < 1:
        raise ShardingError(f"tensor parallel size must be >= 1, got {n}")
    if n > len(devices):
        raise ShardingError(f"tensor parallel size {n} needs {n} devices but only {len(devices)} are available "
                            f"({devices[0].platform}); pass at most {len(devices)}")
    return make_mesh(1, 1, n, devices=devices)


def check_tensor_parallel(cfg, tensor: int, *, what: str = "model") -> None:
    """Refuse a config whose query or kv heads the tensor axis size does not divide.

    `cfg` is any config with `num_heads` and `num_kv_heads` (ModelConfig, DraftConfig).
    """
    for field in ("num_kv_heads", "num_heads"):
        heads = getattr(cfg, field)
        if heads % tensor:
            ok = [d for d in range(1, heads + 1) if heads % d == 0 and cfg.num_heads % d == 0
                  and cfg.num_kv_heads % d == 0]
            raise ShardingError(f"{what}: {field}={heads} is not divisible by the tensor parallel size {tensor}; "
                                f"the attention heads (and the KV cache) are split over it. Use one of {ok}")


def place_for_inference(model: nnx.Module, mesh: Mesh, rules=None, *, what: str = "model") -> nnx.Module:
    """A copy of `model` with its parameters on `mesh` (`model` itself is left where it is).

    Checks the heads against the mesh's tensor axis (`check_tensor_parallel`) first. Trace and run
    the placed model's jitted calls under `with jax.set_mesh(mesh):`: the ambient mesh is what makes
    the Pallas attention kernels run per device on their heads (`pallas_kernels.api`) and the
    embedding look tokens up per vocabulary slice (`layers.vocab_parallel_lookup`). Without it the
    results are the same, but XLA may gather the KV cache or the embedding table onto every device.
    """
    check_tensor_parallel(model.cfg, mesh.shape.get("tensor", 1), what=what)
    graphdef, state = nnx.split(model)
    return shard_model(nnx.merge(graphdef, state, copy=True), mesh, rules)
