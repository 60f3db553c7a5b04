"""wgmma building blocks shared by the Mosaic GPU kernels, each with its interpret-mode twin.

Natively (sm_90) every helper issues Hopper warpgroup matmuls (`plgpu.wgmma`) with float32
accumulators and register layouts. With `interpret=True` the same kernel bodies run in Mosaic GPU
interpret mode on CPU, whose wgmma rejects a transposed B operand and an A operand in registers
and which has no rule for the layout primitives; there each helper is the plain float32-accumulated
`jnp.dot` of the same SMEM contents (layouts only steer native code generation, so this is exact).

`interpret_params` holds the one jax-version difference of interpret mode (see its docstring).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS_PER_WG = 64  # wgmma M: the query rows one compute warpgroup holds


@functools.cache
def _interpret_params_cls():
    cls = getattr(plgpu, "InterpretGPUParams", None)  # public from jax 0.11
    if cls is None:
        # Compatibility with jax 0.10.x, which keeps the class private; remove with jax 0.10 support.
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls


def interpret_params(interpret: bool):
    """`interpret=` value for `plgpu.kernel`: None (compile natively) or Mosaic GPU interpret mode.

    `plgpu.kernel(interpret=True)` would pick the generic Pallas interpreter, which simulates no
    warpgroups or barriers; the GPU interpreter needs an `InterpretGPUParams`. Uninitialised
    simulated memory is NaN, so an output element a kernel forgets to write shows up as NaN in the
    tests instead of a plausible stale value.
    """
    if not interpret:
        return None
    return _interpret_params_cls()(uninitialized_memory="nan")


def layout_cast(x, layout, interpret: bool):
    """`plgpu.layout_cast` natively; identity in interpret mode."""
    return x if interpret else plgpu.layout_cast(x, layout)


def iota(shape, dimension, layout, interpret: bool):
    """int32 iota along `dimension`, in `layout` natively (plain `lax.broadcasted_iota` interpreted)."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dimension)
    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=layout)


def matmul_nt(a_smem, b_smem, interpret: bool, after_issue=None):
    """float32 `a @ b.T` of two SMEM tiles [M, H] x [Nk, H].

    `after_issue()` (optional) runs between issuing the wgmma and reading its result: the
    warpgroup ping-pong's hand-over point.
    """
    if interpret:
        out = jnp.dot(a_smem[...], b_smem[...].T, preferred_element_type=jnp.float32)
        if after_issue is not None:
            after_issue()
        return out

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        if after_issue is not None:
            after_issue()
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC((a_smem.shape[0], b_smem.shape[0]), jnp.float32))


def matmul_nn(a_regs, b_smem, interpret: bool):
    """float32 `a @ b` of a register tile [M, Kd] (WGMMA layout) and an SMEM tile [Kd, Nn]."""
    if interpret:
        return jnp.dot(a_regs, b_smem[...], preferred_element_type=jnp.float32)

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_regs, b_smem)
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC((a_regs.shape[0], b_smem.shape[1]), jnp.float32))


def matmul_nn_smem(a_smem, b_smem, interpret: bool):
    """float32 `a @ b` with both operands in SMEM."""
    if interpret:
        return jnp.dot(a_smem[...], b_smem[...], preferred_element_type=jnp.float32)

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC((a_smem.shape[0], b_smem.shape[1]), jnp.float32))


def matmul_nn_acc(acc, a_regs, b_smem, interpret: bool):
    """`acc + a @ b` (float32): natively one wgmma accumulating into `acc` in place (A from registers)."""
    if interpret:
        return acc + jnp.dot(a_regs, b_smem[...], preferred_element_type=jnp.float32)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_regs, b_smem)

    return pl.run_state(body)(plgpu.ACC.init(acc))


def matmul_nt_then_nn_acc(a_smem, b_smem, acc, p_regs, v_smem, between, interpret: bool, after_issue=None):
    """FA3's intra-warpgroup overlap: issue `s = a @ b.T` (SMEM x SMEM) and `acc + p @ v` (A from
    registers) back to back as two wgmma groups, run `between(s)` once the first is done while the
    second still runs on the tensor cores, then wait for it. Returns (between(s), acc + p @ v).

    `after_issue()` (optional) runs once both are issued (the warpgroup ping-pong's hand-over).
    """
    if interpret:
        s = jnp.dot(a_smem[...], b_smem[...].T, preferred_element_type=jnp.float32)
        if after_issue is not None:
            after_issue()
        r = between(s)
        return r, acc + jnp.dot(p_regs, v_smem[...], preferred_element_type=jnp.float32)

    def scope(s_ref, o_ref):
        o_ref[...] = acc
        plgpu.wgmma(s_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        plgpu.wgmma(o_ref, p_regs, v_smem)
        if after_issue is not None:
            after_issue()
        r = between(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))  # the second group may still run
        return r, o_ref[...]

    return pl.run_scoped(scope, plgpu.ACC((a_smem.shape[0], b_smem.shape[0]), jnp.float32),
                         plgpu.ACC(acc.shape, jnp.float32))
