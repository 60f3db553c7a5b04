"""Latency of the collectives a tensor-parallel decode step issues, and the memory ceilings.

A greedy decode step of a tensor-parallel target (`longspec_jax.sharding`, Megatron style) issues
two all-reduces of one token's hidden state per layer (after the attention output and after the
MLP down projection), one for the vocabulary-parallel embedding lookup and three small ones for
the argmax over the vocabulary-split logits (`sampling.greedy`): 2 L + 4 all-reduces of a few KiB
(on 2 x H200 the compiled 64-layer step holds exactly 132). At batch 1 their cost is latency, not
bandwidth, so this script measures the latency of those collectives (a psum of [1, 1, hidden] in
bf16 and in float32; also an all-gather of [1, 2], what the speculative loop's draft top-k and
`jnp.argmax` over split logits issue) on a ("tensor",) mesh of N devices, each inside a
`fori_loop` of many iterations (no dispatch in the time). It also prints how the GPUs are linked
(`nvidia-smi topo -m`) and measures one GPU's copy and read bandwidth (`bench_e2e.measure_ceilings`).

    python bench/bench_collectives.py --devices 2 --hidden 5120

Writes bench/results/collectives_<device>x<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from bench.bench_e2e import measure_ceilings, timeit  # noqa: E402
from longspec_jax import sharding  # noqa: E402


def collective_latency(mesh: Mesh, make, shape, dtype, iters: int) -> float:
    """Seconds per collective: `iters` dependent collectives in one fori_loop on every device
    (`mesh`: `sharding.tensor_parallel_mesh`, collectives over its "tensor" axis)."""
    n = mesh.shape["tensor"]
    x = jax.device_put(jnp.ones((n,) + shape[1:], dtype) * 1e-3, NamedSharding(mesh, P("tensor")))

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=P("tensor"), out_specs=P("tensor"), check_vma=False)
    def loop(v):
        def body(i, c):
            return make(c) * jnp.asarray(0.5, dtype)  # dependent: no two collectives overlap

        return jax.lax.fori_loop(0, iters, body, v)

    return timeit(loop, x, reps=5) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--hidden", type=int, default=5120, help="hidden size (QwQ-32B: 5120, Llama-3-8B: 4096)")
    p.add_argument("--layers", type=int, default=64, help="layers of the model the per-step total is for")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--no-ceilings", action="store_true", help="skip the one-device bandwidth and matmul ceilings")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    mesh = sharding.tensor_parallel_mesh(args.devices)  # refuses more devices than there are
    dev = jax.devices()[0]
    device = dev.device_kind if dev.platform != "cpu" else "cpu"
    topo = ""
    if dev.platform == "gpu":
        try:
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            topo = f"nvidia-smi topo -m failed: {e}"
        print(topo, flush=True)
    ceil, peak = {}, None
    if not args.no_ceilings:
        _, peak = measure_ceilings(dev.platform == "cpu", jnp.bfloat16, ceil)
        print(f"one device: copy {ceil['copy_bandwidth_Bps'] / 1e12:.3f} TB/s, row sum {ceil['read_bandwidth_Bps'] / 1e12:.3f} "
              f"TB/s, gemv {ceil['gemv_bandwidth_Bps'] / 1e12:.3f} TB/s, bf16 matmul {peak / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    cases = [
        ("psum [1,1,hidden] bf16", lambda c: jax.lax.psum(c, "tensor"), (1, 1, args.hidden), jnp.bfloat16),
        ("psum [1,1,hidden] f32", lambda c: jax.lax.psum(c, "tensor"), (1, 1, args.hidden), jnp.float32),
        ("all_gather [1,2] f32", lambda c: jax.lax.all_gather(c, "tensor", axis=1, tiled=True)[:, :2],
         (1, 2), jnp.float32),
        ("no collective (loop only)", lambda c: c + jnp.asarray(1e-3, c.dtype), (1, 1, args.hidden), jnp.bfloat16),
    ]
    for name, make, shape, dtype in cases:
        t = collective_latency(mesh, make, shape, dtype, args.iters)
        rows.append({"collective": name, "us": t * 1e6})
        print(f"{name:28s} {t * 1e6:8.2f} us", flush=True)
    per_step = (2 * args.layers + 4) * rows[0]["us"]
    print(f"per greedy decode step of a {args.layers}-layer model: {2 * args.layers + 4} all-reduces "
          f"= {per_step / 1e3:.2f} ms of collective latency", flush=True)
    result = {"benchmark": "collectives", "device": device, "devices": args.devices, "jax": jax.__version__,
              "python": platform.python_version(), "topology": topo, **ceil, "matmul_peak_flops": peak,
              "rows": rows, "layers": args.layers, "per_decode_step_collectives_ms": per_step / 1e3,
              "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"collectives_{device.replace(' ', '_')}x{args.devices}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
