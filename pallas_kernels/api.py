"""Public entry points of the attention parts, with an `implementation=` switch.

  "xla"               plain XLA in float32 on any backend (`xla_attention`).
  "pallas"            the Mosaic GPU kernels (Hopper: `prefix_decode`, `tree_attn`).
  "pallas_interpret"  the same kernel bodies in Mosaic GPU interpret mode on CPU (tests).
  "auto"              "pallas" on a Hopper GPU for the shapes and dtypes the kernels support
                      (bf16/f16, head dim 64 or 128, cache capacity a multiple of 128), "xla" for
                      everything else, so a float32 model or an odd-sized cache still runs there.

Tensor parallelism: under an ambient mesh (`with jax.set_mesh(mesh):`) whose `head_axis` splits the
query and KV heads over more than one device, the kernels run under `jax.shard_map`, each device
on its own heads (GQA groups stay whole: query head n uses KV head n // G, and both head axes are
split into the same number of contiguous blocks). XLA cannot partition a Mosaic GPU custom call
by itself: without this it would gather the whole KV cache onto every device. The "xla"
implementation needs no wrapper (XLA partitions it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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


def resolve_implementation(implementation: str, q=None, kv=None, capacity_multiple: int | None = None) -> str:
    """The implementation a call runs: `implementation` itself, or for "auto" the one that suits
    this device and the shapes and dtypes of q and kv (see the module docstring)."""
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


def head_parallel_mesh(head_axis: str = "tensor"):
    """The ambient mesh (`jax.sharding.get_abstract_mesh()`, set by `jax.set_mesh`) when the kernels
    must run per device on its `head_axis`, else None: no mesh, a one-device head axis, or already
    inside a `shard_map` over that axis. Refuses a mesh that also splits another axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get(head_axis, 1) == 1 or head_axis in mesh.manual_axes:
        return None
    others = [a for a, n in dict(mesh.shape).items() if a != head_axis and n > 1 and a not in mesh.manual_axes]
    if others:
        raise ValueError(f"the attention kernels shard over heads only ({head_axis!r}); the ambient mesh also "
                         f"splits {others}: use a tensor-parallel mesh (longspec_jax.sharding.tensor_parallel_mesh)")
    return mesh


def per_device_heads(fn, mesh, head_axis: str, split: tuple[bool, ...]):
    """`fn` under shard_map over `head_axis`: inputs with split[i] True are [B, T|S, heads, H] and
    split on axis 2, the others (lengths, masks) replicated; returns (out [B, T, N, H], lse [B, T, N])
    split on heads."""
    heads = P(None, None, head_axis, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(heads if h else P() for h in split),
                         out_specs=(heads, P(None, None, head_axis)), check_vma=False)


def _prefix_kernel(q, k_cache, v_cache, lengths, *, window, sm_scale, interpret):
    from pallas_kernels import prefix_decode  # the Mosaic GPU kernel, imported where it runs

    return prefix_decode.prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale,
                                          interpret=interpret)


def _tree_kernel(q, k, v, mask, *, sm_scale, interpret):
    from pallas_kernels import tree_attn  # the Mosaic GPU kernel, imported where it runs

    return tree_attn.tree_attention(q, k, v, mask, sm_scale=sm_scale, interpret=interpret)


def prefix_attention(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None, implementation="xla",
                     head_axis="tensor"):
    """Attention of T queries over the visible slots of a static-capacity KV cache (no mask
    between the queries: every query of a row sees the same slots).

    Args:
      q: [B, T, N, H] queries.
      k_cache, v_cache: [B, S, K, H] cache; N % K == 0 (GQA).
      lengths: [B] int32 run-time valid lengths; the visible slots follow the ring rule of
        `pallas_kernels.hybrid` (`xla_attention.prefix_visibility`).
      window: static sliding window (None = unlimited).
      sm_scale: softmax scale (default 1/sqrt(H)).
      implementation: "xla", "pallas", "pallas_interpret" or "auto" (module docstring).
      head_axis: the mesh axis that splits heads under an ambient mesh (module docstring).

    Returns:
      (out [B, T, N, H] in q.dtype, lse [B, T, N] float32); rows with no visible slot: 0 and -inf.
    """
    impl = resolve_implementation(implementation, q, k_cache, capacity_multiple=128)
    if impl == "xla":
        return xla_attention.prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale)
    kernel = functools.partial(_prefix_kernel, window=window, sm_scale=sm_scale, interpret=impl == "pallas_interpret")
    mesh = head_parallel_mesh(head_axis)
    if mesh is not None:
        kernel = per_device_heads(kernel, mesh, head_axis, (True, True, True, False))
    return kernel(q, k_cache, v_cache, lengths)


def tree_attention(q, k, v, mask, *, sm_scale=None, implementation="xla", head_axis="tensor"):
    """Attention of T tree queries over Tk tree keys under a boolean mask.

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, Tk, K, H] the tree's own keys and values; N % K == 0 (GQA).
      mask: [B, T, Tk] bool, True where query t may attend to key j (the tree's ancestor-or-self
        rows; causal for a chain).
      sm_scale: softmax scale (default 1/sqrt(H)).
      implementation: "xla", "pallas", "pallas_interpret" or "auto" (module docstring).
      head_axis: the mesh axis that splits heads under an ambient mesh (module docstring).

    Returns:
      (out [B, T, N, H] in q.dtype, lse [B, T, N] float32); fully masked rows: 0 and -inf.
    """
    impl = resolve_implementation(implementation, q, k)
    if impl == "xla":
        return xla_attention.tree_attention(q, k, v, mask, sm_scale=sm_scale)
    kernel = functools.partial(_tree_kernel, sm_scale=sm_scale, interpret=impl == "pallas_interpret")
    mesh = head_parallel_mesh(head_axis)
    if mesh is not None:
        kernel = per_device_heads(kernel, mesh, head_axis, (True, True, True, False))
    return kernel(q, k, v, mask)
