"""Dense against blockwise XLA prefix attention inside a real target forward (the choice that
`pallas_kernels.xla_attention.MIN_ROWS` makes).

For each query count T (1 = decode, small = chains and trees, 512 = a prefill chunk) and each
visible length, the target forward over T new tokens runs `--steps` times in one fori_loop with
the prefix attention forced dense, then forced blockwise; AR-style in-place cache updates, the
same random cache. Reports ms per forward (median of `--reps`, the two variants interleaved so a
drifting machine biases neither). Default model: the demo target in float32, as CPUs run it.

    python -m bench.bench_xla_prefix --context 8192 --T 1 5 16 69 128 512 --visible 4096 8192

Writes bench/results/xla_prefix_<device>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longspec_jax import demo, weights
from longspec_jax import kv_cache as kvc
from longspec_jax.attention import causal_mask
from pallas_kernels import xla_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"dense": 10 ** 9, "blockwise": 1}  # MIN_ROWS forcing each algorithm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=demo.TARGET_DIR)
    p.add_argument("--context", type=int, default=8192, help="cache capacity is this + 1024")
    p.add_argument("--T", type=int, nargs="+", default=[1, 5, 16, 69, 128, 512])
    p.add_argument("--visible", type=int, nargs="+", default=[4096, 8192], help="committed prefix lengths")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    target, cfg, _ = weights.load_target(a.target, dtype=jnp.float32, attention_impl="xla")
    graph, state = nnx.split(target)
    cap = a.context + 1024
    key = jax.random.key(0)
    shape = (1, cap, cfg.num_kv_heads, cfg.head_dim)
    cache = kvc.KVCache(k=tuple(jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(cfg.num_layers)),
                        v=tuple(jax.random.normal(jax.random.fold_in(key, 100 + i), shape)
                                for i in range(cfg.num_layers)))
    dev = jax.devices()[0]
    device = dev.device_kind if dev.platform != "cpu" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    rows = []
    saved = xla_attention.MIN_ROWS
    try:
        for visible in a.visible:
            for T in a.T:
                toks = (jnp.arange(T, dtype=jnp.int32)[None] % 97) + 5
                pos = visible + jnp.arange(T, dtype=jnp.int32)[None]
                fns = {}
                for name, rows_needed in VARIANTS.items():
                    xla_attention.MIN_ROWS = rows_needed  # read at trace time: each jit keeps its variant

                    @functools.partial(jax.jit, donate_argnums=(1,))
                    def loop(state, cache, toks=toks, pos=pos):
                        model = nnx.merge(graph, state)
                        lengths = jnp.full((1,), visible, jnp.int32)

                        def body(i, carry):
                            cache, acc = carry
                            h, cache = model(toks + acc[:, None], pos, cache, lengths, causal_mask(1, T))
                            return cache, acc + 0 * jnp.argmax(model.logits(h)[:, -1], -1).astype(jnp.int32)

                        return jax.lax.fori_loop(0, a.steps, body, (cache, jnp.zeros((1,), jnp.int32)))

                    cache, _ = jax.block_until_ready(loop(state, cache))  # compile
                    fns[name] = loop
                times = {name: [] for name in fns}
                for _ in range(a.reps):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        cache, _ = jax.block_until_ready(fn(state, cache))
                        times[name].append((time.perf_counter() - t0) / a.steps * 1e3)
                row = {"T": T, "visible": visible, "rows_per_kv_head": T * cfg.num_heads // cfg.num_kv_heads,
                       **{f"{n}_ms": float(np.median(v)) for n, v in times.items()}}
                rows.append(row)
                print(f"visible {visible:6d} T {T:4d} ({row['rows_per_kv_head']:5d} rows/kv head): dense "
                      f"{row['dense_ms']:8.2f} ms  blockwise {row['blockwise_ms']:8.2f} ms", flush=True)
    finally:
        xla_attention.MIN_ROWS = saved
    out = a.out or os.path.join(ROOT, "bench", "results",
                                f"xla_prefix_{'cpu' if dev.platform == 'cpu' else device.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"benchmark": "xla prefix attention, dense vs blockwise, inside the target forward",
                   "device": device, "jax_version": jax.__version__, "cache_capacity": cap,
                   "command": "python -m bench.bench_xla_prefix " + " ".join(sys.argv[1:] if argv is None else argv),
                   "min_rows_in_use": saved, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
