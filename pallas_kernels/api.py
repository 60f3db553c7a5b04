"""`implementation="pallas" | "xla"` switch over the Hybrid Tree Attention parts.

"xla" runs plain XLA in float32 on any backend: the pure-jnp references, except the prefix part
for many query rows, which runs blockwise over the visible cache (`xla_attention`). "pallas" runs the Mosaic GPU kernels
(Hopper); "pallas_interpret" runs the same kernel bodies in Mosaic GPU interpret mode on CPU.
"auto" picks "pallas" on a Hopper GPU for the shapes and dtypes the kernels support (bf16/f16,
head dim 64 or 128, cache capacity a multiple of 128) and "xla" for everything else, so a float32
model or an odd-sized cache still runs on a Hopper GPU.

Tensor parallelism: with `mesh` (a mesh whose `head_axis` splits the query and KV heads, as
`longspec_jax.sharding.tensor_parallel_mesh` builds), the kernels run under `jax.shard_map`, each
device on its own heads (GQA groups stay whole: query head n uses KV head n // G, and both head
axes are split into the same number of contiguous blocks). XLA cannot partition a Mosaic GPU
custom call by itself: without this it would gather the whole KV cache onto every device.
The "xla" references need no wrapper (XLA partitions them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import reference as ref
from pallas_kernels import xla_attention

IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret", "auto")


def default_implementation() -> str:
    """'pallas' where Mosaic GPU can run natively (compute capability 9.x), else 'xla'."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return "xla"
    if dev.platform != "gpu":
        return "xla"
    cc = getattr(dev, "compute_capability", "")
    return "pallas" if str(cc).startswith("9") else "xla"


def _resolve(implementation: str, q=None, kv=None, capacity_multiple: int | None = None) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    impl = default_implementation()
    if impl == "pallas" and q is not None:
        supported = (q.dtype in (jnp.bfloat16, jnp.float16) and kv.dtype == q.dtype
                     and q.shape[-1] in (64, 128)
                     and (capacity_multiple is None or kv.shape[1] % capacity_multiple == 0))
        impl = "pallas" if supported else "xla"
    return impl


def _heads_split(mesh, head_axis: str) -> bool:
    """True where the kernels must run per device: a mesh whose head axis has > 1 device."""
    if mesh is None or dict(mesh.shape).get(head_axis, 1) == 1:
        return False
    others = [a for a, n in dict(mesh.shape).items() if a != head_axis and n > 1]
    if others:
        raise ValueError(f"the attention kernels shard over heads only ({head_axis!r}); the mesh also splits "
                         f"{others}: use a tensor-parallel mesh (longspec_jax.sharding.tensor_parallel_mesh)")
    return True


def _per_device_heads(fn, mesh, head_axis, split):
    """shard_map `fn` over the head axis: inputs with split[i] True are [B, T|S, heads, H] and split
    on axis 2, the others (lengths, masks) replicated; returns (out [B, T, N, H], lse [B, T, N])
    split on heads."""
    heads = P(None, None, head_axis, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(heads if h else P() for h in split),
                         out_specs=(heads, P(None, None, head_axis)), check_vma=False)


def prefix_attention(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None, implementation="xla",
                     mesh=None, head_axis="tensor"):
    impl = _resolve(implementation, q, k_cache, capacity_multiple=128)
    if impl != "xla" and _heads_split(mesh, head_axis):
        fn = functools.partial(prefix_attention, window=window, sm_scale=sm_scale, implementation=impl)
        return _per_device_heads(fn, mesh, head_axis, (True, True, True, False))(q, k_cache, v_cache, lengths)
    if impl == "xla":
        return xla_attention.prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale)
    from pallas_kernels import prefix_decode  # the Mosaic GPU kernel

    return prefix_decode.prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale,
                                          interpret=impl == "pallas_interpret")


def tree_attention(q, k, v, mask, *, sm_scale=None, implementation="xla", mesh=None, head_axis="tensor"):
    impl = _resolve(implementation, q, k)
    if impl != "xla" and _heads_split(mesh, head_axis):
        fn = functools.partial(tree_attention, sm_scale=sm_scale, implementation=impl)
        return _per_device_heads(fn, mesh, head_axis, (True, True, True, False))(q, k, v, mask)
    if impl == "xla":
        return ref.tree_attention_ref(q, k, v, mask, sm_scale=sm_scale)
    from pallas_kernels import tree_attn  # the Mosaic GPU kernel

    return tree_attn.tree_attention(q, k, v, mask, sm_scale=sm_scale, interpret=impl == "pallas_interpret")


def hybrid_attention(q, k_cache, v_cache, lengths, k, v, mask, *, window=None, sm_scale=None,
                     implementation="xla", mesh=None, head_axis="tensor"):
    """Prefix (unmasked, optional window) + tree (masked) attention, merged exactly by LSE."""
    impl = _resolve(implementation, q, k_cache, capacity_multiple=128)
    if impl != "xla" and _heads_split(mesh, head_axis):
        fn = functools.partial(hybrid_attention, window=window, sm_scale=sm_scale, implementation=impl)
        return _per_device_heads(fn, mesh, head_axis, (True, True, True, False, True, True, False))(
            q, k_cache, v_cache, lengths, k, v, mask)
    prefix = prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale,
                              implementation=implementation)
    tree = tree_attention(q, k, v, mask, sm_scale=sm_scale, implementation=implementation)
    return ref.merge_attention(prefix, tree)
