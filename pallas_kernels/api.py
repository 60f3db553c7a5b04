"""`implementation="pallas" | "xla"` switch over the Hybrid Tree Attention parts.

"xla" runs the float32 pure-jnp references (any backend). "pallas" runs the Mosaic GPU kernels
(Hopper); "pallas_interpret" runs the same kernel bodies in Mosaic GPU interpret mode on CPU.
"auto" picks "pallas" on a Hopper GPU for the shapes and dtypes the kernels support (bf16/f16,
head dim 64 or 128, cache capacity a multiple of 128) and "xla" for everything else, so a float32
model or an odd-sized cache still runs on a Hopper GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import reference as ref

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


def prefix_attention(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None, implementation="xla"):
    impl = _resolve(implementation, q, k_cache, capacity_multiple=128)
    if impl == "xla":
        return ref.prefix_attention_ref(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale)
    from pallas_kernels import prefix_decode  # the Mosaic GPU kernel

    return prefix_decode.prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale,
                                          interpret=impl == "pallas_interpret")


def tree_attention(q, k, v, mask, *, sm_scale=None, implementation="xla"):
    impl = _resolve(implementation, q, k)
    if impl == "xla":
        return ref.tree_attention_ref(q, k, v, mask, sm_scale=sm_scale)
    from pallas_kernels import tree_attn  # the Mosaic GPU kernel

    return tree_attn.tree_attention(q, k, v, mask, sm_scale=sm_scale, interpret=impl == "pallas_interpret")


def hybrid_attention(q, k_cache, v_cache, lengths, k, v, mask, *, window=None, sm_scale=None,
                     implementation="xla"):
    """Prefix (unmasked, optional window) + tree (masked) attention, merged exactly by LSE."""
    prefix = prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale,
                              implementation=implementation)
    tree = tree_attention(q, k, v, mask, sm_scale=sm_scale, implementation=implementation)
    return ref.merge_attention(prefix, tree)
