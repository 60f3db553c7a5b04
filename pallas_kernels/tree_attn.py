"""Tree (speculative-block) attention for Hybrid Tree Attention (LongSpec sections 4.1, 4.3): Mosaic GPU.

Backend: Pallas Mosaic GPU (`plgpu.kernel`), sm_90 (wgmma + TMA); `interpret=True` runs the same
body in Mosaic GPU interpret mode on CPU.

Algorithm: T tree queries attend to Tk tree keys under an arbitrary boolean mask [B, T, Tk].
As in the prefix kernel, the T tokens and the G query heads of one KV head are folded into matmul
rows (r = t * G + g), 64 rows per CTA. Keys come in blocks of `block_k` (online softmax across
blocks, usually a single block for LongSpec trees). The mask is applied exactly without a
register gather: a 0/1 tile of the row-expanded mask is TMA-loaded to SMEM and multiplied by an
identity matrix with wgmma ("dot-I"), which puts it in the same register layout as the scores;
masked scores become -inf. Fully masked rows give out = 0 and lse = -inf, never NaN.

Layouts: q [B, T, N, H]; k, v [B, Tk, K, H]; mask [B, T, Tk] bool (True = may attend);
out [B, T, N, H] q.dtype; lse [B, T, N] float32 (natural log, scale included).
Supported: bf16 / f16, H in {64, 128}, any T, Tk (padded to `block_k`, 64 or 128), any G.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._wgmma import (ROWS_PER_WG, interpret_params, layout_cast, matmul_nn, matmul_nn_smem,
                                   matmul_nt)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
HEAD_TILE_AXIS = "kv_head_x_row_tile"  # grid axis enumerating (KV head, row tile) pairs


def _tree_kernel(q_ref, k_ref, v_ref, mask_ref, eye_ref, o_ref, lse_ref, scoped, *, m_tiles, head_dim,
                 block_k, num_kblocks, scale_log2, dtype, interpret):
    q_smem, k_smem, v_smem, mask_smem, eye_smem, lse_smem, bar = scoped
    head_tile, b = lax.axis_index(HEAD_TILE_AXIS), lax.axis_index("b")
    kh, mt = lax.div(head_tile, m_tiles), lax.rem(head_tile, m_tiles)
    row0 = mt * ROWS_PER_WG
    plgpu.copy_gmem_to_smem(q_ref.at[b, kh, pl.ds(row0, ROWS_PER_WG)], q_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(eye_ref, eye_smem, bar.at[1])
    plgpu.barrier_wait(bar.at[0])
    plgpu.barrier_wait(bar.at[1])

    layout = plgpu.Layout.WGMMA
    m_i = layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), layout.reduce(1), interpret)
    l_i = layout_cast(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32), layout.reduce(1), interpret)
    acc = layout_cast(jnp.full((ROWS_PER_WG, head_dim), 0.0, jnp.float32), layout, interpret)

    # The tree is tiny (<= a few blocks): load each key block synchronously, no pipeline.
    for j in range(num_kblocks):
        ks = (b, pl.ds(j * block_k, block_k), kh)
        plgpu.copy_gmem_to_smem(k_ref.at[ks], k_smem, bar.at[2])
        plgpu.copy_gmem_to_smem(v_ref.at[ks], v_smem, bar.at[3])
        plgpu.copy_gmem_to_smem(mask_ref.at[b, pl.ds(row0, ROWS_PER_WG), pl.ds(j * block_k, block_k)],
                                mask_smem, bar.at[4])
        plgpu.barrier_wait(bar.at[2])
        plgpu.barrier_wait(bar.at[4])
        qk = matmul_nt(q_smem, k_smem, interpret)
        allowed = matmul_nn_smem(mask_smem, eye_smem, interpret)  # exact 0/1 in the score layout
        s = jnp.where(allowed > 0.5, qk * scale_log2, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        # Fully masked so far: m_new = -inf; use 0 as the reference so exp2 gives 0, not NaN.
        m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_i - m_ref)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_ref, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(bar.at[3])
        acc = acc + matmul_nn(p.astype(dtype), v_smem, interpret)
        m_i = m_new

    has = l_i > 0
    l_safe = jnp.where(has, l_i, 1.0)
    acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    q_smem[...] = acc.astype(dtype)  # reuse the q tile's SMEM for the output
    lse_smem[...] = jnp.where(has, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, kh, pl.ds(row0, ROWS_PER_WG)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, kh, pl.ds(row0, ROWS_PER_WG)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_k", "interpret"))
def tree_attention(q, k, v, mask, *, sm_scale=None, block_k=None, interpret=False):
    """Masked attention of T tree queries over Tk tree keys.

    Args:
      q: [B, T, N, H] bf16/f16.   k, v: [B, Tk, K, H] same dtype.   mask: [B, T, Tk] bool.
      sm_scale: softmax scale (default 1/sqrt(H)).
      block_k: static key block (64 or 128; default 64 for Tk <= 64 else 128).
      interpret: Mosaic GPU interpret mode (CPU).

    Returns:
      (out [B, T, N, H] q.dtype, lse [B, T, N] float32); fully masked rows: 0 and -inf.
    """
    B, T, N, H = q.shape
    _, Tk, K, _ = k.shape
    if k.shape != (B, Tk, K, H) or v.shape != k.shape or mask.shape != (B, T, Tk):
        raise ValueError(f"expected k, v [B, Tk, K, H] and mask [B, T, Tk]; got {k.shape}, {v.shape}, {mask.shape}")
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share dtype bf16 or f16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if H not in (64, 128):
        raise ValueError(f"head dim H={H} not supported (64 or 128); use implementation='xla'")
    G = N // K
    block_k = block_k or (64 if Tk <= 64 else 128)
    num_kblocks = -(-Tk // block_k)
    tk_pad = num_kblocks * block_k
    rows = T * G
    m_tiles = -(-rows // ROWS_PER_WG)
    m_pad = m_tiles * ROWS_PER_WG
    scale = (1.0 / math.sqrt(H)) if sm_scale is None else float(sm_scale)

    qf = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, rows, H)  # [B, K, T*G, H]
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, m_pad - rows), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, tk_pad - Tk), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, tk_pad - Tk), (0, 0), (0, 0)))
    # Row-expanded 0/1 mask [B, T*G (padded), Tk (padded)]: padded keys and rows are masked out.
    mrow = jnp.repeat(mask.astype(q.dtype), G, axis=1)
    mrow = jnp.pad(mrow, ((0, 0), (0, m_pad - rows), (0, tk_pad - Tk)))
    eye = jnp.eye(block_k, dtype=q.dtype)

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    body = functools.partial(_tree_kernel, m_tiles=m_tiles, head_dim=H, block_k=block_k,
                             num_kblocks=num_kblocks, scale_log2=scale * LOG2E, dtype=q.dtype,
                             interpret=interpret)

    def entry(q_ref, k_ref, v_ref, mask_ref, eye_ref, o_ref, lse_ref):
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, mask_ref, eye_ref, o_ref, lse_ref, scoped),
            plgpu.SMEM((ROWS_PER_WG, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((block_k, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((block_k, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((ROWS_PER_WG, block_k), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((block_k, block_k), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((ROWS_PER_WG,), jnp.float32),
            plgpu.Barrier(num_barriers=5),
        )

    o, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, K, m_pad, H), q.dtype),
                  jax.ShapeDtypeStruct((B, K, m_pad), jnp.float32)),
        grid=(K * m_tiles, B),
        grid_names=(HEAD_TILE_AXIS, "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(qf, kp, vp, mrow, eye)
    o = o[:, :, :rows].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    lse = lse[:, :, :rows].reshape(B, K, T, G).transpose(0, 2, 1, 3).reshape(B, T, N)
    return o, lse
