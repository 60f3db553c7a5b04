"""Slot-major against head-major KV caches for XLA decode attention (the CPU path's layout question).

The target cache is stored slot-major, [B, S, K, H] (what the Mosaic GPU kernels and the ring
writes use); XLA's dense attention re-lays it out per layer as [B, K, S, H] for its batched
matmuls, a copy of K and V per layer per step. This measures whether storing the cache head-major
would pay on this machine: a scan of decode steps over `--layers` layers of attention only (write
T new rows with an in-place dynamic_update_slice, then attend T * G query rows per KV head over
the cache), cache donated into the jitted scan as the decoder does. Head-major runs two forms:
batched matmuls (the reference's einsum) and, for a handful of rows, a fused multiply-reduce.
Demo-target shapes by default (K = 2, G = 3, H = 64, float32, 9216 slots, 8192 visible).

    python -m bench.bench_cpu_cache_layout --T 1 5

Writes bench/results/cpu_cache_layout_<device>.json; ms per decode step, best of `--reps`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attention(q, kc, vc, length, layout):
    """q [B, K, G*T, H]; caches slot-major [B, S, K, H] or head-major [B, K, S, H]."""
    S = kc.shape[1] if layout == "slot_major" else kc.shape[2]
    if layout == "slot_major":
        kc, vc = kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3)
    visible = jnp.arange(S)[None, None, None, :] < length
    if layout == "head_major_reduce":
        s = jnp.sum(q[:, :, :, None, :] * kc[:, :, None, :, :], axis=-1)
        p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
        return jnp.sum(p[..., None] * vc[:, :, None, :, :], axis=-2)
    s = jnp.einsum("bkqh,bksh->bkqs", q, kc)
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    return jnp.einsum("bkqs,bksh->bkqh", p, vc)


def time_layout(layout, T, layers, S, K, G, H, visible, steps, reps):
    key = jax.random.key(0)
    slot_major = layout == "slot_major"
    shape = (1, S, K, H) if slot_major else (1, K, S, H)

    def step(carry, _):
        ks, vs, length, x = carry
        ks, vs = list(ks), list(vs)
        for l in range(layers):
            q = (x * (l + 1)).reshape(1, K, G * T, H)
            new = x.reshape(1, T, K, G, H)[:, :, :, 0, :]  # [1, T, K, H]
            start = (0, length, 0, 0)
            if not slot_major:
                new, start = new.transpose(0, 2, 1, 3), (0, 0, length, 0)
            ks[l] = jax.lax.dynamic_update_slice(ks[l], new, start)
            vs[l] = jax.lax.dynamic_update_slice(vs[l], new * 0.5, start)
            x = jnp.tanh(attention(q, ks[l], vs[l], length + T, layout).reshape(x.shape))
        return (tuple(ks), tuple(vs), length + T, x), None

    ks = tuple(jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(layers))
    vs = tuple(jax.random.normal(jax.random.fold_in(key, 100 + i), shape) for i in range(layers))
    x = jax.random.normal(key, (1, T, K * G, H))
    run = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps)[0], donate_argnums=0)
    carry = jax.block_until_ready(run((ks, vs, jnp.int32(visible), x)))
    best = float("inf")
    for _ in range(reps):
        carry = (carry[0], carry[1], jnp.int32(visible), carry[3])
        t0 = time.perf_counter()
        carry = jax.block_until_ready(run(carry))
        best = min(best, time.perf_counter() - t0)
    return best / steps * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[1, 5], help="new tokens per step (1 = AR, 5 = a chain of 4)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--capacity", type=int, default=9216)
    p.add_argument("--visible", type=int, default=8192)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--group", type=int, default=3, help="query heads per KV head")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    rows = []
    for T in args.T:
        row = {"T": T}
        for layout in ("slot_major", "head_major", "head_major_reduce"):
            row[layout + "_ms"] = time_layout(layout, T, args.layers, args.capacity, args.kv_heads, args.group,
                                              args.head_dim, args.visible, args.steps, args.reps)
        rows.append(row)
        print(f"T={T}: ms per step ({args.layers} layers of attention): " +
              ", ".join(f"{k[:-3]} {v:.2f}" for k, v in row.items() if k != "T"), flush=True)
    result = dict(benchmark="cpu_cache_layout", device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                  python=platform.python_version(), cpu_count=os.cpu_count(),
                  command="python -m bench.bench_cpu_cache_layout " + " ".join(sys.argv[1:] if argv is None else argv),
                  shapes=dict(layers=args.layers, capacity=args.capacity, visible=args.visible, K=args.kv_heads,
                              G=args.group, H=args.head_dim, dtype="float32"), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    name = "cpu_cache_layout_" + ("cpu" if dev.platform == "cpu" else dev.device_kind.replace(" ", "_")) + ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
