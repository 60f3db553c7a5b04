"""`implementation="pallas" | "xla"` switch over the Hybrid Tree Attention parts.

"xla" runs the float32 pure-jnp references (any backend). "pallas" runs the Mosaic GPU kernels
(Hopper); "pallas_interpret" runs the same kernel bodies in Mosaic GPU interpret mode on CPU.
"auto" picks "pallas" on a Hopper GPU and "xla" elsewhere.
"""

from __future__ import annotations

import jax

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


def _resolve(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return default_implementation() if implementation == "auto" else implementation


def prefix_attention(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None, implementation="xla"):
    impl = _resolve(implementation)
    if impl == "xla":
        return ref.prefix_attention_ref(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale)
    from pallas_kernels import prefix_decode  # the Mosaic GPU kernel

    return prefix_decode.prefix_attention(q, k_cache, v_cache, lengths, window=window, sm_scale=sm_scale,
                                          interpret=impl == "pallas_interpret")


def tree_attention(q, k, v, mask, *, sm_scale=None, implementation="xla"):
    impl = _resolve(implementation)
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
