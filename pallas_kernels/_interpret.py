"""Version shim for Mosaic GPU interpret mode (runs Hopper kernels on CPU).

jax 0.10.x keeps `InterpretGPUParams` in a private module; jax >= 0.11 re-exports it as
`plgpu.InterpretGPUParams`. Every kernel asks this helper, so the difference lives in one place.
"""

from __future__ import annotations

import functools


@functools.cache
def _params_cls():
    import jax.experimental.pallas.mosaic_gpu as plgpu

    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:  # jax 0.10.x
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls


def interpret_params(interpret: bool):
    """`interpret=` value for `plgpu.kernel`: None (compile natively) or InterpretGPUParams.

    Uninitialised simulated memory is NaN (the interpreter's default), so an output element the
    kernel forgets to write shows up as NaN in the tests instead of a plausible stale value.
    """
    if not interpret:
        return None
    return _params_cls()(uninitialized_memory="nan")


# The interpreter (jax 0.10.x) has no rule for the register-layout primitives of Mosaic GPU.
# Layouts only steer native code generation, so in interpret mode the plain jax ops are exact.
def layout_cast(x, layout, interpret: bool):
    """`plgpu.layout_cast` natively; identity in interpret mode."""
    if interpret:
        return x
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.layout_cast(x, layout)


def iota(shape, dimension, layout, interpret: bool):
    """int32 iota along `dimension` in `layout` (natively) / plain `lax.broadcasted_iota`."""
    import jax.numpy as jnp
    from jax import lax

    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dimension)
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=layout)


def matmul_nt(a_smem, b_smem, interpret: bool, after_issue=None):
    """float32 `a @ b.T` of two SMEM tiles [M, H] x [Nk, H]: wgmma natively.

    `after_issue()` (optional) runs between issuing the wgmma and reading its result (the
    warpgroup ping-pong's hand-over point). The interpreter's wgmma (jax 0.10.x) rejects a
    transposed B operand, so in interpret mode the product is a plain f32-accumulated dot of the
    same SMEM contents.
    """
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    if interpret:
        out = jnp.dot(a_smem[...], b_smem[...].T, preferred_element_type=jnp.float32)
        if after_issue is not None:
            after_issue()
        return out
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        if after_issue is not None:
            after_issue()
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC((a_smem.shape[0], b_smem.shape[0]), jnp.float32))


def matmul_nn(a_regs, b_smem, interpret: bool):
    """float32 `a @ b` of a register tile [M, Kd] (WGMMA layout) and an SMEM tile [Kd, Nn].

    Natively a wgmma with A from registers; the interpreter's wgmma needs A in SMEM, so interpret
    mode uses a plain f32-accumulated dot.
    """
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    if interpret:
        return jnp.dot(a_regs, b_smem[...], preferred_element_type=jnp.float32)
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_regs, b_smem)
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC((a_regs.shape[0], b_smem.shape[1]), jnp.float32))


def matmul_nn_acc(acc, a_regs, b_smem, interpret: bool):
    """`acc + a @ b` (f32): natively a wgmma accumulating into `acc` in place (A from registers).

    The interpreter has no `run_state`, and its wgmma needs A in SMEM: a plain dot there.
    """
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    if interpret:
        return acc + jnp.dot(a_regs, b_smem[...], preferred_element_type=jnp.float32)
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_regs, b_smem)

    return pl.run_state(body)(plgpu.ACC.init(acc))


def matmul_nt_then_nn_acc(a_smem, b_smem, acc, p_regs, v_smem, between, interpret: bool, after_issue=None):
    """FA3's intra-warpgroup overlap: issue `s = a @ b.T` (SMEM x SMEM) and `acc + p @ v` (A from
    registers) back to back as two wgmma groups, run `between(s)` once the first is done while the
    second still runs on the tensor cores, then wait for it. Returns (between(s), acc + p @ v).

    `after_issue()` (optional) runs once both are issued (the warpgroup ping-pong's hand-over). In
    interpret mode the two products are plain f32-accumulated dots, in the same order.
    """
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    if interpret:
        s = jnp.dot(a_smem[...], b_smem[...].T, preferred_element_type=jnp.float32)
        if after_issue is not None:
            after_issue()
        r = between(s)
        return r, acc + jnp.dot(p_regs, v_smem[...], preferred_element_type=jnp.float32)
    import jax.experimental.pallas.mosaic_gpu as plgpu

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
