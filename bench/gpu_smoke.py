"""GPU smoke check of the Pallas attention at verification shapes, with timings per stage.

    python -m bench.gpu_smoke

Prints compile and run time of each stage so a slow compile or a hang shows where it is.
"""

import faulthandler
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels import hybrid_attention
from pallas_kernels import reference as ref


def stage(name, fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    print(f"{name}: {time.perf_counter() - t:.2f} s", flush=True)
    return out


def main():
    faulthandler.dump_traceback_later(int(sys.argv[1]) if len(sys.argv) > 1 else 200, exit=True)
    key = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(key[5], (1, 16, 128256), jnp.float32)
    stage("lax.top_k  [1,16,128256] k=16 compile+run", lambda: jax.jit(jax.lax.top_k, static_argnums=1)(x, 16))
    for S, L, T in ((5120, 4096, 69), (5120, 4000, 69), (33792, 32768, 69), (640, 600, 16)):
        q = jax.random.normal(key[0], (1, T, 32, 128), jnp.bfloat16)
        kc = jax.random.normal(key[1], (1, S, 8, 128), jnp.bfloat16)
        vc = jax.random.normal(key[2], (1, S, 8, 128), jnp.bfloat16)
        kt = jax.random.normal(key[3], (1, T, 8, 128), jnp.bfloat16)
        vt = jax.random.normal(key[4], (1, T, 8, 128), jnp.bfloat16)
        mask = jnp.tril(jnp.ones((T, T), bool))[None]
        lens = jnp.array([L], jnp.int32)
        f = jax.jit(lambda *a: hybrid_attention(*a, implementation="pallas"))
        o, _ = stage(f"hybrid S={S} L={L} T={T} compile+run", lambda: f(q, kc, vc, lens, kt, vt, mask))
        stage("  second run", lambda: f(q, kc, vc, lens, kt, vt, mask))
        r, _ = ref.dense_attention_ref(q, kc, vc, lens, kt, vt, mask)
        err = jnp.linalg.norm((o.astype(jnp.float32) - r.astype(jnp.float32)).ravel()) / jnp.linalg.norm(r.astype(jnp.float32).ravel())
        print(f"  rel err {float(err):.2e}", flush=True)


if __name__ == "__main__":
    main()
