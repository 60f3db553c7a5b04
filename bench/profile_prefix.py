"""Where a prefix-attention call's time goes: the Mosaic GPU kernel against the XLA glue around it.

`prefix_decode.prefix_attention` is one Pallas kernel (per-split partial outputs and LSEs) plus
XLA work around it: the query re-layout to [B, K, T * G, H] rows, the exact LSE merge of the
splits and the layout back. For each (T, S) this times the jitted call (U invocations per call,
cycling over caches larger than L2, as `tune_prefix.py` does), then profiles one run and splits
the device time per call into the kernel and everything else, with the device-op count.

    python bench/profile_prefix.py --T 1 16 69 --S 4096 32768 --out bench/results
    python bench/profile_prefix.py --tiny          # CPU smoke run (interpret mode, small shapes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_kernels, tune_prefix  # noqa: E402
from bench.bench_e2e import summarize_trace  # noqa: E402
from pallas_kernels import prefix_decode, tuning  # noqa: E402

U = bench_kernels.U


def is_kernel(name: str) -> bool:
    """The Pallas kernel's device op (its launch is named after the kernel body or Mosaic GPU)."""
    low = name.lower()
    return "mosaic" in low or "prefix_kernel" in low or "entry" in low


def profile_point(G, K, H, S, T, interpret, reps, bw, peak):
    B = 1
    qs, caches, lengths, length, floor = tune_prefix.point_inputs(G, K, H, S, T, interpret, bw, peak)
    nbuf = len(caches)
    calls = 1 if interpret else U

    @jax.jit
    def run(qs, caches, lengths):
        return [prefix_decode.prefix_attention(qs[i], *caches[i % nbuf], lengths, interpret=interpret)
                for i in range(calls)]

    jax.block_until_ready(run(qs, caches, lengths))
    row = {"T": T, "S": S, "G": G, "K": K, "H": H, "length": length, "floor_us": floor * 1e6,
           "config": dataclasses.asdict(tuning.default_config(T, G, K, B, S, H))}
    if not interpret:
        row["wall_us_per_call"] = bench_kernels.timeit(run, (qs, caches, lengths), reps=reps)[0] / calls * 1e6
    with tempfile.TemporaryDirectory() as pdir:
        jax.profiler.start_trace(pdir)
        jax.block_until_ready(run(qs, caches, lengths))
        jax.profiler.stop_trace()
        summ = summarize_trace(pdir, calls, top=200)
    if "error" in summ:
        row["profile_error"] = summ["error"]
        return row
    ops = summ["ops"]
    kern = sum(o["ms_per_iteration"] for o in ops if is_kernel(o["name"])) * 1e3
    total = summ["device_ms_per_iteration"] * 1e3
    row.update(device_us_per_call=total, kernel_us_per_call=kern, glue_us_per_call=total - kern,
               kernel_vs_floor=kern / (floor * 1e6),
               device_ops_per_call=summ["ops_per_iteration"],
               glue_ops=[{"name": o["name"][:80], "us_per_call": o["ms_per_iteration"] * 1e3}
                         for o in ops if not is_kernel(o["name"])][:8])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--T", type=int, nargs="+", default=[1, 16, 69])
    ap.add_argument("--S", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: interpret mode, K=1, H=64, S=256")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    interpret = args.tiny
    if args.tiny:
        args.K, args.H, args.S, args.T = 1, 64, [256], [2]
    dev = jax.devices()[0]
    kind = "interpret" if interpret else dev.device_kind
    meta = dict(benchmark="prefix_profile", device=kind, jax=jax.__version__, python=platform.python_version(),
                command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
                time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    # Floors: max(bytes / copy bandwidth, flops / bf16 matmul peak), both measured in this run.
    bw, peak = (float("nan"), float("nan")) if interpret else bench_kernels.measure_ceilings()
    meta.update(copy_bw_Bps=bw, bf16_peak_flops=peak)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "profile_prefix_" + kind.replace(" ", "_") + ".json")
    for S in args.S:
        for T in args.T:
            rows.append(profile_point(args.G, args.K, args.H, S, T, interpret, args.reps, bw, peak))
            with open(path, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {path}")
    print("     S    T  config                          wall_us  device_us  kernel_us  glue_us  ops  floor_us  kernel/floor")
    for r in rows:
        print(f"{r['S']:6d} {r['T']:4d}  {tune_prefix.short(r['config']):30s} "
              f"{r.get('wall_us_per_call', float('nan')):8.1f} "
              f"{r.get('device_us_per_call', float('nan')):10.1f} {r.get('kernel_us_per_call', float('nan')):10.1f} "
              f"{r.get('glue_us_per_call', float('nan')):8.1f} {r.get('device_ops_per_call', float('nan')):4.0f} "
              f"{r['floor_us']:9.1f} {r.get('kernel_vs_floor', float('nan')):12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
