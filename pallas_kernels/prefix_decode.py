"""Prefix flash-decoding for Hybrid Tree Attention (LongSpec section 4.1): Mosaic GPU, Hopper.

Backend: Pallas Mosaic GPU (`plgpu.kernel`), sm_90 (wgmma + TMA). `interpret=True` runs the same
body in Mosaic GPU interpret mode on CPU (tests).

Algorithm (split-K flash decoding with GQA folded into the matmul M dimension):
  * The T query tokens and the G = N / K query heads that share one KV head are folded into the
    rows of one matrix, row r = t * G + g, so one KV head is read once for all T * G rows and the
    scores come from wgmma (M = 64 rows per compute warpgroup; padding rows are discarded, and a
    warpgroup whose rows are all padding computes nothing).
  * The visible keys of a row are a ring interval of the cache (`xla_attention.prefix_visibility`):
    `c = min(len, W, S)` slots ending at slot `(len - 1) mod S`. The kernel walks only the
    `block_kv`-slot blocks that touch this interval ("virtual blocks", wrapping around the ring);
    blocks beyond `len` or before the window are never read, so a 128k-capacity cache with a short
    length costs what its length costs. The per-key rule `(newest - s) mod S < c` masks the
    partial blocks at both ends.
  * The virtual blocks are divided evenly (at run time) among `num_splits` CTAs per (batch, KV
    head, row tile). Each CTA runs an online softmax over its blocks with a TMA pipeline of
    `stages` K/V buffers fed by a dedicated memory warpgroup, and writes a normalised partial
    output (in q.dtype) plus its float32 LSE. A small XLA epilogue merges the splits exactly by
    LSE; empty splits carry lse = -inf and contribute nothing.
  * Optional FA3 schedules (`tuning.PrefixConfig`): the warpgroup ping-pong (two compute
    warpgroups alternate on the tensor cores) and the intra-warpgroup overlap (block j's softmax
    runs while block j - 1's PV is on the tensor cores).

Layouts: q [B, T, N, H]; k_cache, v_cache [B, S, K, H] (the cache is read in place, no copy);
lengths [B] int32 (read by the kernel from GMEM at run time); out [B, T, N, H] q.dtype;
lse [B, T, N] float32 (natural log, scale included; -inf and out = 0 where nothing is visible).

Supported: bf16 / f16 inputs (q, k, v the same dtype), float32 accumulation; H in {64, 128};
any T >= 1 (rows T * G padded to the row tile); any G = N / K (1, 4, 5, 8, ...);
S a multiple of `block_kv`; optional sliding window (static int).

Knobs (`tuning.PrefixConfig`) change speed only; how each default was chosen and what was
measured is in docs/perf_notes.md, "Kernels".
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import tuning
from pallas_kernels._wgmma import (ROWS_PER_WG, interpret_params, iota, layout_cast, matmul_nn_acc, matmul_nt,
                                   matmul_nt_then_nn_acc)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
HEAD_TILE_AXIS = "kv_head_x_row_tile"  # grid axis enumerating (KV head, row tile) pairs


def _prefix_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, *, capacity, head_dim, rows,
                   m_tiles, num_wg, block_kv, stages, num_splits, window, scale_log2, dtype, pingpong, overlap,
                   interpret):
    """One CTA: row tile `mt` of KV head `kh`, split `split` of batch row `b`.

    The grid is (KV head x row tile, split, batch). Each of the `num_wg` compute warpgroups holds 64
    rows of the tile; warpgroup `num_wg` is the memory warpgroup feeding the K/V pipeline.
    `pingpong`, `overlap`: see `tuning.PrefixConfig`.
    """
    q_smem2, k_smem, v_smem, lse_smem2, k_bar, v_bar, q_bar, k_cons, v_cons, sched, turn = scoped
    S, bk = capacity, block_kv
    nblocks = S // bk
    rows_cta = num_wg * ROWS_PER_WG
    head_tile, split, b = lax.axis_index(HEAD_TILE_AXIS), lax.axis_index("split"), lax.axis_index("b")
    kh, mt = lax.div(head_tile, m_tiles), lax.rem(head_tile, m_tiles)
    wg = lax.axis_index("wg")

    # --- the visible ring interval, in blocks (scalars, identical in every warpgroup) ---
    length = len_ref[b]
    cap = S if window is None else min(S, window)
    c = jnp.minimum(jnp.maximum(length, 0), cap)  # visible key count
    newest = lax.rem(jnp.maximum(length - 1, 0), S)  # slot of the newest token
    u = newest + 1 - c + S  # first visible slot, unwrapped into [1, 2S]
    first_blk = lax.div(u, bk)
    last_blk = lax.div(u + c - 1, bk)
    # A wrapped interval whose two ends share a block would touch that block twice: clamp to the
    # whole ring once (the per-key mask still selects exactly the visible slots).
    nv = jnp.where(c > 0, jnp.minimum(last_blk - first_blk + 1, nblocks), 0)
    per_split = lax.div(nv + num_splits - 1, num_splits)
    v0 = split * per_split
    steps = jnp.clip(nv - v0, 0, per_split)

    def kv_slice(step):
        blk = lax.rem(first_blk + v0 + step, nblocks)
        return (b, pl.ds(blk * bk, bk), kh)

    @pl.when(wg == num_wg)
    def _memory_wg():
        if num_wg > 1:
            plgpu.set_max_registers(40, action="decrease")
        for i in range(stages):
            @pl.when(i < steps)
            def _prologue():
                plgpu.copy_gmem_to_smem(k_ref.at[kv_slice(i)], k_smem.at[i], k_bar.at[i])
                plgpu.copy_gmem_to_smem(v_ref.at[kv_slice(i)], v_smem.at[i], v_bar.at[i])

        def refill(i, _):
            step = i + stages
            slot = lax.rem(i, stages)  # == step % stages
            plgpu.barrier_wait(k_cons.at[slot])  # every compute warpgroup is done with K[slot]
            plgpu.copy_gmem_to_smem(k_ref.at[kv_slice(step)], k_smem.at[slot], k_bar.at[slot])
            plgpu.barrier_wait(v_cons.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[kv_slice(step)], v_smem.at[slot], v_bar.at[slot])

        lax.fori_loop(0, jnp.maximum(steps - stages, 0), refill, None)

    def schedule():
        # FA3's warpgroup ping-pong (as in JAX's attention_mgpu.py): the two compute warpgroups
        # take turns on the tensor cores, so one's softmax overlaps the other's wgmma.
        if pingpong:
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

    def schedule_around(loop):
        """Run `loop()` inside the ping-pong's opening and closing hand-overs (warpgroup 0 first)."""
        if pingpong and overlap:  # the turns: warpgroup 1 gives the first, warpgroup 0 takes the last
            pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turn.at[0]))
            out = loop()
            pl.when(wg == 0)(lambda: plgpu.barrier_wait(turn.at[0]))
            return out
        if pingpong:
            pl.when(wg == 1)(schedule)
        out = loop()
        if pingpong:
            pl.when(wg == 0)(schedule)
        return out

    # The ping-pong of the overlapped form (FA3's): a warpgroup waits for its turn, issues its block's
    # two wgmma groups, and passes the turn on without waiting, so the two warpgroups' issues
    # alternate and each one's softmax runs under the other's matmuls.
    def take_turn():
        if pingpong:
            plgpu.barrier_wait(turn.at[wg])

    def pass_turn():
        if pingpong:
            plgpu.barrier_arrive(turn.at[1 - wg])

    row0 = mt * rows_cta + wg * ROWS_PER_WG  # this warpgroup's output rows
    idle = row0 >= rows
    if num_wg > 1:
        @pl.when((wg < num_wg) & idle)
        def _padding_wg():
            plgpu.set_max_registers(232, action="increase")
            # A warpgroup whose 64 rows are all padding (e.g. T * G = 276 rows in 3 x 128) computes
            # nothing; it only keeps the pipeline's barrier protocol so its partner and the memory
            # warpgroup run as usual. Its output rows are never read.
            def idle(step, _):
                slot = lax.rem(step, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_cons.at[slot])
                if overlap:  # the overlapped form's turn per block
                    take_turn()
                    pass_turn()
                else:
                    schedule()
                    schedule()
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_cons.at[slot])

            schedule_around(lambda: lax.fori_loop(0, steps, idle, None))

    @pl.when((wg < num_wg) & jnp.logical_not(idle))
    def _compute_wg():
        if num_wg > 1:
            plgpu.set_max_registers(232, action="increase")
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, kh, pl.ds(row0, ROWS_PER_WG)], q_smem, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])

        wgmma_layout = plgpu.Layout.WGMMA
        m_i = layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), wgmma_layout.reduce(1), interpret)
        l_i = layout_cast(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32), wgmma_layout.reduce(1), interpret)
        acc = layout_cast(jnp.full((ROWS_PER_WG, head_dim), 0.0, jnp.float32), wgmma_layout, interpret)

        def tile(step):
            """(pipeline slot, K tile, V tile) of block `step`."""
            slot = lax.rem(step, stages)
            return slot, k_smem.at[slot], v_smem.at[slot]

        def probs(qk, step, m_i, l_i, masked):
            """Block `step`'s online-softmax update from its raw scores: (p in float32, m, l, alpha)."""
            s = qk * scale_log2  # base-2 logits
            if masked:
                # Ring visibility of each key slot of this block: (newest - s) mod S < c.
                blk = lax.rem(first_blk + v0 + step, nblocks)
                slot_ids = blk * bk + iota((ROWS_PER_WG, bk), 1, wgmma_layout, interpret)
                back = newest - slot_ids
                back = jnp.where(back < 0, back + S, back)
                s = jnp.where(back < c, s, -jnp.inf)
            # Every walked block holds >= 1 visible key, so m_new is finite after the first step.
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            return p, m_new, l_i * alpha + p.sum(axis=1), alpha

        def body(step, carry, masked):
            """One block of the plain loop: QK^T, softmax, then PV."""
            acc, m_i, l_i = carry
            slot, k_tile, v_tile = tile(step)
            plgpu.barrier_wait(k_bar.at[slot])
            qk = matmul_nt(q_smem, k_tile, interpret, after_issue=schedule)
            plgpu.barrier_arrive(k_cons.at[slot])
            p, m_new, l_i, alpha = probs(qk, step, m_i, l_i, masked)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(dtype)
            if pingpong:
                # Keep the softmax before the hand-over (the ordering attention_mgpu.py measured).
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)  # the tensor cores are ours
            else:
                plgpu.barrier_wait(v_bar.at[slot])
            acc = matmul_nn_acc(acc, p16, v_tile, interpret)
            plgpu.barrier_arrive(v_cons.at[slot])
            return acc, m_new, l_i

        def finish(carry):
            acc, m_i, l_i = carry
            # Empty split (steps == 0): out 0, lse -inf, never NaN.
            has = l_i > 0
            l_safe = jnp.where(has, l_i, 1.0)
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            q_smem[...] = acc.astype(dtype)  # the q tile is dead: reuse its SMEM for the output
            lse_smem[...] = jnp.where(has, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, kh, split, pl.ds(row0, ROWS_PER_WG)])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, kh, split, pl.ds(row0, ROWS_PER_WG)])
            plgpu.wait_smem_to_gmem(0)

        # Only the first and the last virtual block can hold invisible slots (the interval's two
        # ends); interior blocks skip the per-key mask arithmetic.
        def loops():
            head = jnp.minimum(jnp.where(v0 == 0, 1, 0), steps)
            tail = jnp.where((v0 + steps == nv) & (steps > head), 1, 0)
            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(0, head, functools.partial(body, masked=True), carry)
            carry = lax.fori_loop(head, steps - tail, functools.partial(body, masked=False), carry)
            return lax.fori_loop(steps - tail, steps, functools.partial(body, masked=True), carry)

        # --- the overlapped form (FA3's intra-warpgroup pipelining) ---
        # Iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, takes S_j as soon
        # as its wgmma group is done, and runs block j's softmax while the PV group is still on the
        # tensor cores; then O is rescaled by block j's alpha. K_j is released after S_j, V_{j-1}
        # after the PV (one block later than in the plain loop: the pipeline needs >= 2 stages).
        def first_block():
            # Block 0 of the split: S and its softmax only. Masked always (exact on any block).
            slot, k_tile, _ = tile(0)
            plgpu.barrier_wait(k_bar.at[slot])
            take_turn()
            qk = matmul_nt(q_smem, k_tile, interpret, after_issue=pass_turn)
            plgpu.barrier_arrive(k_cons.at[slot])
            p, m_new, l_new, _ = probs(qk, 0, m_i, l_i, True)
            return acc, m_new, l_new, p.astype(dtype)

        def overlapped(step, carry, masked):
            acc, m_i, l_i, p_prev = carry
            slot, k_tile, _ = tile(step)
            pslot, _, v_prev = tile(step - 1)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[pslot])

            def softmax(qk):
                plgpu.barrier_arrive(k_cons.at[slot])
                return probs(qk, step, m_i, l_i, masked)

            take_turn()
            (p, m_new, l_new, alpha), acc = matmul_nt_then_nn_acc(
                q_smem, k_tile, acc, p_prev, v_prev, softmax, interpret, after_issue=pass_turn)
            plgpu.barrier_arrive(v_cons.at[pslot])
            # Registers a wgmma reads (the next PV's A operand, the accumulator) are written only
            # after this PV is done: ptxas serialises every wgmma of the kernel otherwise (warning
            # C7513; docs/perf_notes.md, "Kernels").
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            return acc, m_new, l_new, p.astype(dtype)

        def last_pv(carry):
            acc, m_i, l_i, p16 = carry
            slot, _, v_tile = tile(steps - 1)
            plgpu.barrier_wait(v_bar.at[slot])
            acc = matmul_nn_acc(acc, p16, v_tile, interpret)
            plgpu.barrier_arrive(v_cons.at[slot])
            return acc, m_i, l_i

        def run_overlapped():
            def pipeline():
                @pl.when(steps > 0)
                def _blocks():
                    # Only the split's last block can hold invisible slots past block 0.
                    tail = jnp.where((v0 + steps == nv) & (steps > 1), 1, 0)
                    carry = first_block()
                    carry = lax.fori_loop(1, steps - tail, functools.partial(overlapped, masked=False), carry)
                    carry = lax.fori_loop(steps - tail, steps, functools.partial(overlapped, masked=True), carry)
                    finish(last_pv(carry))

                @pl.when(steps == 0)
                def _empty():
                    finish((acc, m_i, l_i))

            schedule_around(pipeline)

        if overlap:
            run_overlapped()
        else:
            finish(schedule_around(loops))


@functools.partial(jax.jit, static_argnames=("window", "sm_scale", "num_wg", "block_kv", "stages", "num_splits",
                                             "pingpong", "overlap", "interpret"))
def prefix_attention(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None, num_wg=None, block_kv=None,
                     stages=None, num_splits=None, pingpong=None, overlap=None, interpret=False):
    """Attention of T queries over the visible slots of a static-capacity KV cache.

    Args:
      q: [B, T, N, H] bf16/f16.
      k_cache, v_cache: [B, S, K, H], same dtype as q; N % K == 0.
      lengths: [B] int32 run-time valid lengths (ring rule of `xla_attention.prefix_visibility`).
      window: static sliding window (None = unlimited).
      sm_scale: softmax scale (default 1/sqrt(H)).
      num_wg, block_kv, stages, num_splits, pingpong, overlap: static knobs of `tuning.PrefixConfig`;
        each one left None takes the tuned default (`tuning.default_config`, then
        `tuning.apply_overrides`).
      interpret: run in Mosaic GPU interpret mode (CPU).

    Returns:
      (out [B, T, N, H] q.dtype, lse [B, T, N] float32).
    """
    B, T, N, H = q.shape
    _, S, K, _ = k_cache.shape
    if k_cache.shape != (B, S, K, H) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [B, S, K, H] = {(B, S, K, H)}, got {k_cache.shape}, {v_cache.shape}")
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share dtype bf16 or f16, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}; use implementation='xla' for other dtypes")
    if H not in (64, 128):
        raise ValueError(f"head dim H={H} not supported (64 or 128); use implementation='xla'")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    G = N // K
    cfg = tuning.apply_overrides(tuning.default_config(T, G, K, B, S, H), H, num_wg=num_wg, block_kv=block_kv,
                                 stages=stages, num_splits=num_splits, pingpong=pingpong, overlap=overlap)
    if S % cfg.block_kv:
        raise ValueError(f"cache capacity S={S} must be a multiple of block_kv={cfg.block_kv} "
                         "(allocate the cache in multiples of 128 slots)")
    scale = (1.0 / math.sqrt(H)) if sm_scale is None else float(sm_scale)

    rows = T * G
    rows_cta = cfg.num_wg * ROWS_PER_WG
    m_tiles = -(-rows // rows_cta)
    m_pad = m_tiles * rows_cta
    # [B, T, K, G, H] -> [B, K, T*G, H]: row r = t * G + g shares KV head k.
    qf = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, rows, H)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, m_pad - rows), (0, 0)))

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    kernel_body = functools.partial(
        _prefix_kernel, capacity=S, head_dim=H, rows=rows, m_tiles=m_tiles, num_wg=cfg.num_wg,
        block_kv=cfg.block_kv, stages=cfg.stages, num_splits=cfg.num_splits, window=window,
        scale_log2=scale * LOG2E, dtype=q.dtype, pingpong=cfg.pingpong, overlap=cfg.overlap, interpret=interpret)

    def entry(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        pl.run_scoped(
            lambda *scoped: kernel_body(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped),
            plgpu.SMEM((cfg.num_wg, ROWS_PER_WG, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((cfg.stages, cfg.block_kv, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((cfg.stages, cfg.block_kv, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((cfg.num_wg, ROWS_PER_WG), jnp.float32),
            plgpu.Barrier(num_barriers=cfg.stages),
            plgpu.Barrier(num_barriers=cfg.stages),
            plgpu.Barrier(num_barriers=cfg.num_wg),
            plgpu.Barrier(num_arrivals=cfg.num_wg, num_barriers=cfg.stages),
            plgpu.Barrier(num_arrivals=cfg.num_wg, num_barriers=cfg.stages),
            plgpu.Barrier(num_arrivals=cfg.num_wg),  # ping-pong schedule (unused without it)
            plgpu.Barrier(num_barriers=2),  # the overlapped form's ping-pong turns (unused without both)
            collective_axes="wg",
        )

    o_part, lse_part = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, K, cfg.num_splits, m_pad, H), q.dtype),
                  jax.ShapeDtypeStruct((B, K, cfg.num_splits, m_pad), jnp.float32)),
        grid=(K * m_tiles, cfg.num_splits, B),
        grid_names=(HEAD_TILE_AXIS, "split", "b"),
        num_threads=cfg.num_wg + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(lengths.astype(jnp.int32), qf, k_cache, v_cache)

    out, lse = combine_splits(o_part[:, :, :, :rows], lse_part[:, :, :, :rows])
    out = out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    lse = lse.reshape(B, K, T, G).transpose(0, 2, 1, 3).reshape(B, T, N)
    return out.astype(q.dtype), lse


def combine_splits(o_part, lse_part):
    """Exact LSE merge over the split axis (2). o_part [..., P, R, H], lse_part [..., P, R] -> f32."""
    m = jnp.max(lse_part, axis=2, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse_part), jnp.exp(lse_part - m_safe), 0.0)
    den = jnp.sum(w, axis=2)
    # where(): an empty split's weight is 0 and its output is never trusted (0 * NaN would poison).
    o = jnp.sum(jnp.where(w[..., None] > 0, o_part.astype(jnp.float32), 0.0) * w[..., None], axis=2)
    has = den > 0
    o = o / jnp.where(has, den, 1.0)[..., None]
    lse = jnp.where(has, m_safe[:, :, 0] + jnp.log(jnp.where(has, den, 1.0)), -jnp.inf)
    return o, lse
