"""Hybrid Tree Attention kernels (LongSpec section 4): Mosaic GPU kernels for Hopper, their XLA
twins, and the exact merge. Imports only jax.

Public API (every attention returns (out [B, T, N, H] in q.dtype, lse [B, T, N] float32)):
  prefix_attention(q, k_cache, v_cache, lengths, *, window, sm_scale, implementation, head_axis)
      the T queries over the visible slots of a static-capacity cache (`api`).
  tree_attention(q, k, v, mask, *, sm_scale, implementation, head_axis)
      the T queries over the tree's own keys under a boolean mask (`api`).
  hybrid_attention(q, k_cache, v_cache, lengths, k, v, mask, *, window, sm_scale, implementation, head_axis)
      both parts merged exactly: the attention a decode or verification step needs (`hybrid`);
      mask None is a causal chunk (a prefill), on cuDNN on NVIDIA GPUs when wide (`cudnn_chunk`).
  causal_mask(batch, T)
      the [B, T, T] lower-triangular mask of a chunk of T new tokens (`hybrid`).
  merge_attention((o1, lse1), (o2, lse2))
      the exact log-sum-exp merge of two parts over disjoint keys (`hybrid`).
  default_implementation()
      "pallas" on a Hopper GPU, else "xla" (`api`).

`implementation` is "xla", "pallas", "pallas_interpret" or "auto"; under an ambient mesh
(`jax.set_mesh`) whose head axis has several devices, the kernels run per device on their heads.
"""

from pallas_kernels.api import default_implementation, prefix_attention, tree_attention
from pallas_kernels.hybrid import causal_mask, hybrid_attention, merge_attention

__all__ = ["causal_mask", "default_implementation", "hybrid_attention", "merge_attention", "prefix_attention", "tree_attention"]
