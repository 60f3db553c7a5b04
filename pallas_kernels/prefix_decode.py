"""Prefix flash-decoding for Hybrid Tree Attention (LongSpec spec section 4.1): Mosaic GPU, Hopper.

Backend: Pallas Mosaic GPU (`plgpu.kernel`), sm_90 (wgmma + TMA). `interpret=True` runs the same
body in Mosaic GPU interpret mode on CPU (tests).

Algorithm (split-K flash decoding with GQA folded into the matmul M dimension):
  * The T query tokens and the G = N / K query heads that share one KV head are folded into the
    rows of one matrix, row r = t * G + g, so one KV head is read once for all T * G rows and the
    scores come from wgmma (M = 64 rows per compute warpgroup; padding rows are discarded).
  * The visible keys of a row are a ring interval of the cache (reference.prefix_visibility):
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

Layouts: q [B, T, N, H]; k_cache, v_cache [B, S, K, H] (the cache is read in place, no copy);
lengths [B] int32 (read by the kernel from GMEM at run time); out [B, T, N, H] q.dtype;
lse [B, T, N] float32 (natural log, scale included; -inf and out = 0 where nothing is visible).

Supported: bf16 / f16 inputs (q, k, v the same dtype), float32 accumulation; H in {64, 128};
any T >= 1 (rows T * G padded to the row tile); any G = N / K (1, 4, 5, 8, ...);
S a multiple of `block_kv`; optional sliding window (static int).

Measured (H100 SXM, jax 0.11.2, bench/bench_kernels.py, batch 1, bf16, per layer; results in
bench/results/kernels_H100_*.json): T <= 16 reaches ~90% of copy bandwidth at 128k but 61-70% at
32k, where a fixed ~20 us per call (the XLA glue around the kernel: q re-layout, split combine;
launch and pipeline ramp) weighs; T = 69..74 runs at 1.7-1.9x the max(bytes/bw, flops/peak)
floor (wgmma issued synchronously per warpgroup, rows padded to 128-row tiles).

Two refinements for many rows, measured on an H200 against the kernel before them in the same run
(`bash bench/gpu_issue7.sh pingpong`, bench/results/tune_prefix_NVIDIA_H200.json): a warpgroup
whose 64 rows are all padding computes nothing (T = 37, G = 4: 148 rows in 2 x 128, one warpgroup
of four idle; 110.6 -> 78.6 us at 32k, 360 -> 280 us at 128k), and the FA3 warpgroup ping-pong
(`pingpong`: the two compute warpgroups alternate on the tensor cores, one's softmax under the
other's wgmma) takes T = 69 from 110.5 to 99.7 us at 32k (at 128k 369 -> 371 in that run and
389 -> 352 in another: within run-to-run spread there).

The last row tile of T = 69 (rows 256..275) holds one warpgroup of real rows. Two knobs serve it
(`lone_splits`: its own split count; `lone_share`: both warpgroups hold its 64 rows and each takes
one half of every block's keys, the second writing its partial into the tile's padding rows).
Swept on an H200 (`bash bench/gpu_issue7.sh lone`, bench/README.md): no form beats the default at
T = 69, 32k; 7% at T = 37, 32k and 3% at T = 69, 128k, measured with a CTA order this kernel no
longer uses, so no table entry selects them yet. With lone_splits == num_splits and no sharing the kernel and its
XLA glue are the code from before the knobs.

FA3's intra-warpgroup overlap (`overlap`): iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1}
as two wgmma groups, waits for the first only, and runs block j's softmax while the PV is on the
tensor cores. The bf16 cast of P and the rescale of O come after the PV's wait: with the cast inside
the softmax, ptxas serialised every wgmma of the kernel (C7513, bench/results/dump_prefix_H200_69_32k.txt)
and the form lost 0.3-31%. With the ping-pong, a warpgroup waits for its turn, issues both groups and
passes the turn on without waiting (FA3's scheme; the two-hand-over barrier of the plain form made
the pair slower than either alone). Measured on an H200 against the same knobs without it, same run
(`bash bench/gpu_issue7.sh overlap`, bench/results/tune_prefix_H200_overlap*.json): T = 69 at 32k
107.4 -> 96.3 us (2.0x its compute floor), at 128k 357.8 -> 353.1 us (the best form there has no
ping-pong: 390.9 -> 353.1), T = 37 at 32k 80.5 -> 77.8 us; it is in the H200 table and the heuristic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._interpret import (interpret_params, iota, layout_cast, matmul_nn_acc, matmul_nt,
                                       matmul_nt_then_nn_acc)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ROWS_PER_WG = 64  # wgmma M per warpgroup


def _prefix_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, *, capacity, head_dim, rows,
                   m_tiles, num_wg, block_kv, stages, num_splits, lone_splits, lone, share, window, scale_log2,
                   dtype, pingpong, overlap, interpret):
    """One CTA: rows tile `mt` of KV head `kh`, split `split` of batch row `b`.

    The grid is (KV head x row tile, split, batch) with max(num_splits, lone_splits) splits; the
    last row tile runs `lone_splits` of them (the same count unless that tile is `lone`: one
    warpgroup of real rows, two compute warpgroups) and its CTAs beyond exit at once, so the
    default configs keep the CTA order the kernel was tuned with. With `share`, a lone
    tile's two warpgroups both hold its real rows and each takes one half of every block's keys;
    the second writes its partial into the tile's padding rows (merged like another split).
    `overlap`: FA3's intra-warpgroup overlap, block j's QK^T and block j - 1's PV issued together
    and block j's softmax run while the PV is on the tensor cores (needs stages >= 2)."""
    q_smem2, k_smem, v_smem, lse_smem2, k_bar, v_bar, q_bar, k_cons, v_cons, sched, turn = scoped
    S, bk = capacity, block_kv
    nblocks = S // bk
    rows_cta = num_wg * ROWS_PER_WG
    km, split, b = lax.axis_index("km"), lax.axis_index("split"), lax.axis_index("b")
    kh, mt = lax.div(km, m_tiles), lax.rem(km, m_tiles)
    in_last = mt == m_tiles - 1
    if lone_splits == num_splits:  # static: the same code as before the lone-tile knobs
        splits_here, active = num_splits, True
    else:
        splits_here = jnp.where(in_last, lone_splits, num_splits)
        active = split < splits_here  # a CTA beyond its tile's split count does nothing
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
    per_split = lax.div(nv + splits_here - 1, splits_here)
    v0 = split * per_split
    steps = jnp.clip(nv - v0, 0, per_split)

    def kv_slice(step):
        blk = lax.rem(first_blk + v0 + step, nblocks)
        return (b, pl.ds(blk * bk, bk), kh)

    @pl.when((wg == num_wg) & active)
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
    sharing = in_last if (lone and share) else False  # a lone tile whose two warpgroups split its keys
    idle = (row0 >= rows) & jnp.logical_not(sharing)
    if num_wg > 1:
        @pl.when((wg < num_wg) & idle & active)
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

    @pl.when((wg < num_wg) & jnp.logical_not(idle) & active)
    def _compute_wg():
        if num_wg > 1:
            plgpu.set_max_registers(232, action="increase")
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        q_row0 = jnp.where(sharing, mt * rows_cta, row0)  # sharing: both warpgroups hold the first 64 rows
        plgpu.copy_gmem_to_smem(q_ref.at[b, kh, pl.ds(q_row0, ROWS_PER_WG)], q_smem, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])

        wgmma_layout = plgpu.Layout.WGMMA
        m_i = layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), wgmma_layout.reduce(1), interpret)
        l_i = layout_cast(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32), wgmma_layout.reduce(1), interpret)
        acc = layout_cast(jnp.full((ROWS_PER_WG, head_dim), 0.0, jnp.float32), wgmma_layout, interpret)

        def tile(step, half):
            """(slot, K tile, V tile, first key, key count) of block `step`; `half` (share mode): that
            half of the block's keys."""
            slot = lax.rem(step, stages)
            if half is None:
                return slot, k_smem.at[slot], v_smem.at[slot], 0, bk
            width = bk // 2
            return (slot, k_smem.at[slot, pl.ds(half * width, width)], v_smem.at[slot, pl.ds(half * width, width)],
                    half * width, width)

        def probs(qk, step, m_i, l_i, masked, key0, width):
            """Block `step`'s online-softmax update from its raw scores: (p in float32, m, l, alpha)."""
            s = qk * scale_log2  # base-2 logits
            if masked:
                # Ring visibility of each key slot of this block: (newest - s) mod S < c.
                blk = lax.rem(first_blk + v0 + step, nblocks)
                slot_ids = blk * bk + key0 + iota((ROWS_PER_WG, width), 1, wgmma_layout, interpret)
                back = newest - slot_ids
                back = jnp.where(back < 0, back + S, back)
                s = jnp.where(back < c, s, -jnp.inf)
            # Every walked block holds >= 1 visible key, so m_new is finite after the first step.
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            return p, m_new, l_i * alpha + p.sum(axis=1), alpha

        def body(step, carry, masked, half=None):
            """One block; `half` (share mode): only that half of the block's keys."""
            acc, m_i, l_i = carry
            slot, k_tile, v_tile, key0, width = tile(step, half)
            plgpu.barrier_wait(k_bar.at[slot])
            qk = matmul_nt(q_smem, k_tile, interpret, after_issue=schedule)
            plgpu.barrier_arrive(k_cons.at[slot])
            p, m_new, l_i, alpha = probs(qk, step, m_i, l_i, masked, key0, width)
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
        def loops(half=None):
            head = jnp.minimum(jnp.where(v0 == 0, 1, 0), steps)
            tail = jnp.where((v0 + steps == nv) & (steps > head), 1, 0)
            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(0, head, functools.partial(body, masked=True, half=half), carry)
            carry = lax.fori_loop(head, steps - tail, functools.partial(body, masked=False, half=half), carry)
            return lax.fori_loop(steps - tail, steps, functools.partial(body, masked=True, half=half), carry)

        # --- the overlapped form (FA3's intra-warpgroup pipelining) ---
        # Iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, takes S_j as soon
        # as its wgmma group is done, and runs block j's softmax while the PV group is still on the
        # tensor cores; then O is rescaled by block j's alpha. K_j is released after S_j, V_{j-1}
        # after the PV (one block later than in the plain loop: the pipeline needs >= 2 stages).
        def first_block(half):
            # Block 0 of the split: S and its softmax only. Masked always (exact on any block).
            slot, k_tile, _, key0, width = tile(0, half)
            plgpu.barrier_wait(k_bar.at[slot])
            take_turn()
            qk = matmul_nt(q_smem, k_tile, interpret, after_issue=pass_turn)
            plgpu.barrier_arrive(k_cons.at[slot])
            p, m_new, l_new, _ = probs(qk, 0, m_i, l_i, True, key0, width)
            return acc, m_new, l_new, p.astype(dtype)

        def overlapped(step, carry, masked, half):
            acc, m_i, l_i, p_prev = carry
            slot, k_tile, _, key0, width = tile(step, half)
            pslot, _, v_prev, _, _ = tile(step - 1, half)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[pslot])

            def softmax(qk):
                plgpu.barrier_arrive(k_cons.at[slot])
                return probs(qk, step, m_i, l_i, masked, key0, width)

            take_turn()
            (p, m_new, l_new, alpha), acc = matmul_nt_then_nn_acc(
                q_smem, k_tile, acc, p_prev, v_prev, softmax, interpret, after_issue=pass_turn)
            plgpu.barrier_arrive(v_cons.at[pslot])
            # Registers a wgmma reads (the next PV's A operand, the accumulator) are written only
            # after this PV is done: ptxas serialises every wgmma of the kernel otherwise (C7513,
            # seen with the bf16 cast inside the softmax above).
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            return acc, m_new, l_new, p.astype(dtype)

        def last_pv(carry, half):
            acc, m_i, l_i, p16 = carry
            slot, _, v_tile, _, _ = tile(steps - 1, half)
            plgpu.barrier_wait(v_bar.at[slot])
            acc = matmul_nn_acc(acc, p16, v_tile, interpret)
            plgpu.barrier_arrive(v_cons.at[slot])
            return acc, m_i, l_i

        def run_overlapped(half=None):
            def pipeline():
                @pl.when(steps > 0)
                def _blocks():
                    # Only the split's last block can hold invisible slots past block 0.
                    tail = jnp.where((v0 + steps == nv) & (steps > 1), 1, 0)
                    carry = first_block(half)
                    carry = lax.fori_loop(1, steps - tail, functools.partial(overlapped, masked=False, half=half),
                                          carry)
                    carry = lax.fori_loop(steps - tail, steps, functools.partial(overlapped, masked=True, half=half),
                                          carry)
                    finish(last_pv(carry, half))

                @pl.when(steps == 0)
                def _empty():
                    finish((acc, m_i, l_i))

            schedule_around(pipeline)

        def run_plain(half=None):
            finish(schedule_around(lambda: loops(half)))

        run = run_overlapped if overlap else run_plain
        if lone and share:
            # A sharing CTA: both warpgroups hold the tile's 64 real rows, warpgroup p takes key
            # half p of every block (the pipeline protocol is unchanged: both consume each block).
            pl.when(jnp.logical_not(sharing))(run)
            for parity in range(2):
                pl.when(sharing & (wg == parity))(functools.partial(run, parity))
        else:
            run()


def default_config(T, G, K, B, S, H):
    """Static tuning knobs (num_wg, block_kv, stages, num_splits, pingpong, lone_splits, lone_share,
    overlap) for a problem shape: the device's measured table (`pallas_kernels.tuning`, written by
    bench/tune_prefix.py) where it has the shape, else `heuristic_config`."""
    from pallas_kernels import tuning

    return tuning.lookup(T, G, K, B, S, H) or heuristic_config(T, G, K, B, S, H)


def smem_stages(num_wg, block_kv, H):
    """The most K/V pipeline stages (max 4) that fit in 227 KiB of SMEM next to the q tiles, the
    LSE rows and ~2.7 KiB of barriers and alignment (measured on H100: num_wg=2, block_kv=128,
    H=128, 3 stages asks 232560 bytes of 232448, so 4 KiB are kept back)."""
    per_stage = 2 * block_kv * H * 2
    q_bytes = num_wg * ROWS_PER_WG * H * 2 + num_wg * ROWS_PER_WG * 4
    return max(1, min(4, (227 * 1024 - q_bytes - 4096) // per_stage))


def heuristic_config(T, G, K, B, S, H):
    """Static tuning knobs from rules of thumb (used where no measured table entry exists)."""
    rows = T * G
    num_wg = 1 if rows <= ROWS_PER_WG else 2
    block_kv = 128
    stages = smem_stages(num_wg, block_kv, H)
    m_tiles = -(-rows // (num_wg * ROWS_PER_WG))
    ctas = K * m_tiles * B
    # CTAs per launch on a 132-SM H100 (one CTA per SM fits in SMEM), measured on H100 with
    # jax 0.11.2 (bench/results): two full waves win at S >= 16k (better balance; 1.09 waves cost
    # 25% at T = 74), one wave wins at 4k (fewer partials to merge). The split count is a
    # ceiling: short rows use fewer.
    target = 264 if S >= 16384 else 132
    num_splits = max(1, min(-(-target // ctas), S // block_kv, 64))
    # Warpgroup ping-pong: measured on an H200 (`bash bench/gpu_issue7.sh pingpong`, jax 0.11.2) it
    # gains 2-10% at 276 rows (three row tiles; 10% at 32k in both runs) over the same kernel
    # without it, and nothing at 148 rows (two).
    # The intra-warpgroup overlap: measured on an H200 (`bash bench/gpu_issue7.sh overlap`, jax 0.11.2)
    # with two compute warpgroups, T = 37 / 69 and 4k / 32k / 128k, it is 1-29% faster than the same
    # knobs without it at every point but one (T = 37, 4k, with the ping-pong, which the heuristic
    # does not pick there: 5% slower). Not measured with one warpgroup since its serialised first form, so off there.
    overlap = num_wg == 2 and stages >= 2
    return num_wg, block_kv, stages, num_splits, num_wg == 2 and m_tiles >= 3, num_splits, False, overlap


def lone_tile(rows, num_wg):
    """Whether the last row tile holds one warpgroup of real rows next to one of padding."""
    rows_cta = num_wg * ROWS_PER_WG
    return num_wg == 2 and (-(-rows // rows_cta) - 1) * rows_cta + ROWS_PER_WG >= rows


@functools.partial(jax.jit, static_argnames=("window", "sm_scale", "num_wg", "block_kv", "stages",
                                             "num_splits", "pingpong", "lone_splits", "lone_share",
                                             "overlap", "interpret"))
def prefix_attention(q, k_cache, v_cache, lengths, *, window=None, sm_scale=None, num_wg=None,
                     block_kv=None, stages=None, num_splits=None, pingpong=None, lone_splits=None,
                     lone_share=None, overlap=None, interpret=False):
    """Attention of T queries over the visible slots of a static-capacity KV cache.

    Args:
      q: [B, T, N, H] bf16/f16.
      k_cache, v_cache: [B, S, K, H], same dtype as q; N % K == 0.
      lengths: [B] int32 run-time valid lengths (ring rule of reference.prefix_visibility).
      window: static sliding window (None = unlimited).
      sm_scale: softmax scale (default 1/sqrt(H)).
      num_wg, block_kv, stages, num_splits, pingpong: static tuning knobs (None =
        default_config); pingpong (two compute warpgroups only) alternates them on the tensor cores.
      lone_splits, lone_share: static knobs for a last row tile with one warpgroup of real rows
        (`lone_tile`): its split count (None = default_config), and whether its second warpgroup
        shares the first one's rows, each taking half of every block's keys, instead of idling
        (run on the GPU with block_kv = 128; 64-slot blocks only in interpret mode so far).
      overlap: FA3's intra-warpgroup overlap (block j's QK^T issued with block j - 1's PV, block j's
        softmax under that PV; needs stages >= 2; None = default_config).
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
        raise ValueError(f"q, k_cache, v_cache must share dtype bf16 or f16, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if H not in (64, 128):
        raise ValueError(f"head dim H={H} not supported (64 or 128); use implementation='xla'")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    G = N // K
    d_wg, d_bk, d_st, d_sp, d_pp, d_lsp, d_lsh, d_ov = default_config(T, G, K, B, S, H)
    if stages is None and (num_wg or d_wg, block_kv or d_bk) != (d_wg, d_bk):
        stages = smem_stages(num_wg or d_wg, block_kv or d_bk, H)  # the default's depth is for other tiles
    num_wg = num_wg or d_wg
    block_kv = block_kv or d_bk
    stages = stages or d_st
    num_splits = num_splits or d_sp
    if num_wg not in (1, 2):
        raise ValueError(f"num_wg={num_wg}: the kernel has 1 or 2 compute warpgroups")
    if stages > smem_stages(num_wg, block_kv, H):
        raise ValueError(f"stages={stages} with num_wg={num_wg}, block_kv={block_kv}, H={H} exceeds shared "
                         f"memory; at most {smem_stages(num_wg, block_kv, H)} (prefix_decode.smem_stages)")
    pingpong = bool(d_pp if pingpong is None else pingpong) and num_wg == 2
    if overlap is None:  # the default's choice for its own warpgroup count; the heuristic's rule otherwise
        overlap = bool(d_ov if num_wg == d_wg else num_wg == 2) and stages >= 2
    overlap = bool(overlap)
    if overlap and stages < 2:
        raise ValueError(f"overlap=True needs stages >= 2 (V of block j - 1 is held while K of block j "
                         f"arrives), got stages={stages}; pass overlap=False or a smaller block_kv")
    rows = T * G
    lone = lone_tile(rows, num_wg)
    if not lone:
        lone_splits, lone_share = num_splits, False
    else:
        if lone_splits is None:
            lone_splits = d_lsp if (num_wg, num_splits) == (d_wg, d_sp) else num_splits
        lone_share = bool(d_lsh if lone_share is None else lone_share)
    if num_splits < 1 or lone_splits < 1:
        raise ValueError(f"num_splits={num_splits} and lone_splits={lone_splits} must be >= 1 "
                         "(or None for the tuned default)")
    if S % block_kv:
        raise ValueError(f"cache capacity S={S} must be a multiple of block_kv={block_kv} "
                         "(allocate the cache in multiples of 128 slots)")
    scale = (1.0 / math.sqrt(H)) if sm_scale is None else float(sm_scale)

    rows_cta = num_wg * ROWS_PER_WG
    m_tiles = -(-rows // rows_cta)
    m_pad = m_tiles * rows_cta
    # [B, T, K, G, H] -> [B, K, T*G, H]: row r = t * G + g shares KV head k.
    qf = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, rows, H)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, m_pad - rows), (0, 0)))

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    kernel_body = functools.partial(
        _prefix_kernel, capacity=S, head_dim=H, rows=T * G, m_tiles=m_tiles, num_wg=num_wg, block_kv=block_kv,
        stages=stages, num_splits=num_splits, lone_splits=lone_splits, lone=lone, share=lone_share, window=window, scale_log2=scale * LOG2E, dtype=q.dtype,
        pingpong=pingpong, overlap=overlap, interpret=interpret)

    def entry(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        pl.run_scoped(
            lambda *scoped: kernel_body(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped),
            plgpu.SMEM((num_wg, ROWS_PER_WG, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, block_kv, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, block_kv, H), q.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((num_wg, ROWS_PER_WG), jnp.float32),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=num_wg),
            plgpu.Barrier(num_arrivals=num_wg, num_barriers=stages),
            plgpu.Barrier(num_arrivals=num_wg, num_barriers=stages),
            plgpu.Barrier(num_arrivals=num_wg),  # ping-pong schedule (unused without it)
            plgpu.Barrier(num_barriers=2),  # the overlapped form's ping-pong turns (unused without both)
            collective_axes="wg",
        )

    o_part, lse_part = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, K, max(num_splits, lone_splits), m_pad, H), q.dtype),
                  jax.ShapeDtypeStruct((B, K, max(num_splits, lone_splits), m_pad), jnp.float32)),
        grid=(K * m_tiles, max(num_splits, lone_splits), B),
        grid_names=("km", "split", "b"),
        num_threads=num_wg + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(lengths.astype(jnp.int32), qf, k_cache, v_cache)

    if not lone_share:
        o_part, lse_part = o_part[:, :, :, :rows], lse_part[:, :, :, :rows]
        if lone_splits != num_splits:  # the splits a tile does not run hold nothing: weight 0
            r0 = (m_tiles - 1) * rows_cta
            runs = lax.broadcasted_iota(jnp.int32, lse_part.shape, 2) < jnp.where(
                lax.broadcasted_iota(jnp.int32, lse_part.shape, 3) >= r0, lone_splits, num_splits)
            lse_part = jnp.where(runs, lse_part, -jnp.inf)
        out, lse = combine_splits(o_part, lse_part)
    else:
        # Leading tiles over their splits; the lone tile over its own and the second warpgroup's
        # partials in the tile's padding rows, merged as further splits.
        r0, r = (m_tiles - 1) * rows_cta, rows - (m_tiles - 1) * rows_cta
        r1 = r0 + ROWS_PER_WG
        o_last = jnp.concatenate([o_part[:, :, :lone_splits, r0:r0 + r], o_part[:, :, :lone_splits, r1:r1 + r]], axis=2)
        l_last = jnp.concatenate([lse_part[:, :, :lone_splits, r0:r0 + r], lse_part[:, :, :lone_splits, r1:r1 + r]],
                                 axis=2)
        out, lse = combine_splits(o_last, l_last)
        if r0:
            o_lead, l_lead = combine_splits(o_part[:, :, :num_splits, :r0], lse_part[:, :, :num_splits, :r0])
            out, lse = jnp.concatenate([o_lead, out], axis=2), jnp.concatenate([l_lead, lse], axis=2)
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
