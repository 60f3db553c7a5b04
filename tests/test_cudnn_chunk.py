"""A prefill chunk's attention through cuDNN (`pallas_kernels.cudnn_chunk`) against the float32
oracle: one dense attention over [cache prefix ; the chunk's own keys] under a causal mask.

On a CPU the same wiring runs through `jax.nn.dot_product_attention`'s XLA path (the prefix part's
padding at the committed length, the chunk's causal part, the empty first chunk, the merge); on an
NVIDIA GPU the cuDNN path, and `hybrid_attention` routing a causal chunk to it."""

import pytest

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import cudnn_chunk
from pallas_kernels import reference as ref
from tests.test_kernels import TOL, _assert_close, _keys, _rand


def _case(seed, B, T, S, N, K, H, dtype, lengths):
    kq, kc, vc, kk, vk = _keys(seed, 5)
    q = _rand(kq, (B, T, N, H), dtype)
    k_cache, v_cache = _rand(kc, (B, S, K, H), dtype), _rand(vc, (B, S, K, H), dtype)
    k, v = _rand(kk, (B, T, K, H), dtype), _rand(vk, (B, T, K, H), dtype)
    lengths = jnp.array(lengths, jnp.int32)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    want = ref.dense_attention_ref(q, k_cache, v_cache, lengths, k, v, mask)
    return (q, k_cache, v_cache, lengths, k, v), want


@pytest.mark.parametrize("lengths", [(0, 37), (64, 5)])
def test_xla_wiring_matches_the_oracle(lengths):
    args, (want_o, want_l) = _case(3, 2, 24, 64, 4, 2, 16, jnp.float32, lengths)
    out, lse = cudnn_chunk.chunk_attention(*args, implementation="xla")
    _assert_close(out, lse, want_o, want_l, jnp.float32, f"chunk attention, lengths {lengths}")


def test_this_jax_has_the_cudnn_call_used():
    """The private call (float32 statistics) is found with the signature used: a jax that changed it
    would silently send every chunk back to the kernels."""
    assert cudnn_chunk.cudnn_module() is not None


def test_a_narrow_chunk_or_a_cpu_keeps_the_kernels():
    q = jnp.zeros((1, cudnn_chunk.MIN_ROWS - 1, 4, 64), jnp.bfloat16)
    assert not cudnn_chunk.applies(q, q, None)
    if jax.devices()[0].platform != "gpu":
        assert not cudnn_chunk.applies(jnp.zeros((1, 512, 4, 64), jnp.bfloat16), q, None)


@pytest.mark.gpu
@pytest.mark.parametrize("T, lengths", [(256, (0, 3000)), (512, (4096, 17)), (1024, (8000, 1024))])
def test_cudnn_matches_the_oracle(T, lengths):
    dtype = jnp.bfloat16
    args, (want_o, want_l) = _case(7, 2, T, 8192, 32, 8, 128, dtype, lengths)
    out, lse = cudnn_chunk.chunk_attention(*args)
    _assert_close(out, lse, want_o, want_l, dtype, f"cudnn chunk T={T}")
    q, k_cache, v_cache, lens, k, v = args  # the route a prefill takes: a causal chunk (mask None)
    o2, l2 = jax.jit(lambda *a: pallas_kernels.hybrid_attention(*a, None, implementation="auto"))(*args)
    assert cudnn_chunk.applies(q, k_cache, None)
    _assert_close(o2, l2, want_o, want_l, dtype, f"hybrid attention of a causal chunk T={T}")


def test_an_unknown_implementation_is_refused_by_name():
    args, _ = _case(5, 1, 8, 16, 2, 1, 16, jnp.float32, (4,))
    with pytest.raises(ValueError, match="implementation must be 'cudnn' or 'xla', got 'pallas'"):
        cudnn_chunk.chunk_attention(*args, implementation="pallas")
