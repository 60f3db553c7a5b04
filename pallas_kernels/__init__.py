"""Hybrid Tree Attention kernels (spec section 4). Imports only jax.

Public API (all return (out, lse), lse float32 [B, T, N]):
  prefix_attention(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None, implementation="xla")
  tree_attention(q, k, v, mask, *, sm_scale=None, implementation="xla")
  merge_attention((o1, lse1), (o2, lse2))
  hybrid_attention(q, k_cache, v_cache, lengths, k, v, mask, *, window=None, sm_scale=None,
                   implementation="xla")
"""

from pallas_kernels.api import (  # noqa: F401
    default_implementation,
    hybrid_attention,
    prefix_attention,
    tree_attention,
)
from pallas_kernels.reference import merge_attention  # noqa: F401
