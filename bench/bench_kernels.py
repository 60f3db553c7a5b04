"""Benchmark of the Hybrid Tree Attention kernels on one GPU (spec section 4.4).

For Llama-3-8B (N=32, K=8, H=128) and QwQ-32B (N=40, K=8, H=128) attention shapes, batch 1, bf16,
cache capacity S in {4k, 32k, 128k} holding len = S - 200 tokens, tree sizes T in {1, 6, 16, 69, 74}
(random trees), it times per layer:
  prefix   the Pallas prefix kernel alone (pallas_kernels.prefix_decode), several tuning variants
  tree     the Pallas tree kernel alone
  hybrid   prefix + tree + LSE merge (pallas_kernels.hybrid_attention, implementation="pallas")
  xla      the same composition with the float32 XLA references under jit
  dense    one masked attention over [prefix ; tree] (reference.dense_attention_ref): the "HF" baseline
  gqa      for T = 1, JAX's bundled (deprecated, Triton) decode_attention.gqa, if importable
It measures device-to-device copy bandwidth and the bf16 matmul peak in the same run and reports
the floor max(bytes / bw, flops / peak) for the prefix part. Correctness of every Pallas result is
checked against the references first.

Timing: each jitted call runs U = 8 kernel invocations cycling over enough K/V buffers to exceed
the L2 cache; the call is repeated and the median per-invocation time taken (host clock around
block_until_ready, dispatch overlapped with device work).

Usage: python bench/bench_kernels.py --out DIR [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import hybrid_attention, prefix_decode, tree_attn, tuning  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402

U = 8  # invocations per jitted call


def log(*a):
    print(*a, flush=True)


def timeit(fn, args, reps=5, min_time=0.1):
    """Median seconds per call of a jitted fn over reps groups (after warm-up / compile)."""
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    inner = max(1, int(min_time / max(one, 1e-6) / reps))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times)), float(np.min(times))


def measure_ceilings():
    n = 2**29  # 1 GiB of bf16
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda x: x * 2)
    t, _ = timeit(copy, (x,))
    bw = 2 * n * 2 / t
    del x
    m = 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t, _ = timeit(mm, (a, b))
    peak = 2 * m**3 / t
    return bw, peak


def make_inputs(key, B, T, N, K, H, S, nbuf, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 4 + 2 * nbuf)
    # U distinct query sets: identical calls inside one jit would be merged by XLA's CSE.
    q = [jax.random.normal(k_, (B, T, N, H), dtype) for k_ in jax.random.split(ks[0], U)]
    kn = jax.random.normal(ks[1], (B, T, K, H), dtype)
    vn = jax.random.normal(ks[2], (B, T, K, H), dtype)
    caches = [(jax.random.normal(ks[4 + 2 * i], (B, S, K, H), dtype),
               jax.random.normal(ks[5 + 2 * i], (B, S, K, H), dtype)) for i in range(nbuf)]
    rng = np.random.default_rng(int(S + T))
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, T)]
    m = np.eye(T, dtype=bool)
    for i in range(1, T):
        m[i] |= m[parent[i]]
    mask = jnp.asarray(np.broadcast_to(m, (B, T, T)))
    return q, kn, vn, caches, mask


def multi(fn, nbuf):
    """jit(U invocations of fn(q, kc, vc, lengths, kn, vn, mask) cycling over nbuf caches)."""
    def run(q, caches, lengths, kn, vn, mask):
        outs = []
        for i in range(U):
            kc, vc = caches[i % nbuf]
            outs.append(fn(q[i], kc, vc, lengths, kn, vn, mask))
        return outs
    return jax.jit(run)


def rel_err(a, b):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_point(model, N, K, H, S, T, bw, peak, quick, results):
    B = 1
    length = S - 200
    # A distinct cache per invocation: shared inputs would let XLA fuse sibling reductions of the
    # reference paths into one pass (and L2 would serve small caches).
    nbuf = U
    qs, kn, vn, caches, mask = make_inputs(jax.random.key(S * 131 + T), B, T, N, K, H, S, nbuf)
    q = qs[0]
    lengths = jnp.full((B,), length, jnp.int32)
    bytes_read = 2 * B * length * K * H * 2 + 2 * q.size * 2
    flops = 4 * B * T * N * length * H
    floor = max(bytes_read / bw, flops / peak)
    base = dict(model=model, N=N, K=K, H=H, S=S, T=T, B=B, length=length, bytes=bytes_read, flops=flops,
                floor_s=floor, bw_floor_s=bytes_read / bw, flop_floor_s=flops / peak)
    kc0, vc0 = caches[0]

    # correctness first (GPU vs float32 reference)
    r_out, r_lse = ref.dense_attention_ref(q, kc0, vc0, lengths, kn, vn, mask)
    h_out, h_lse = jax.jit(lambda *a: hybrid_attention(*a, implementation="pallas"))(q, kc0, vc0, lengths, kn, vn, mask)
    p_out, p_lse = jax.jit(prefix_decode.prefix_attention)(q, kc0, vc0, lengths)
    rp_out, rp_lse = ref.prefix_attention_ref(q, kc0, vc0, lengths)
    fin = bool(np.isfinite(np.asarray(h_out, np.float32)).all() and np.isfinite(np.asarray(h_lse)).all())
    base["check"] = dict(hybrid_rel_err=rel_err(h_out, r_out), hybrid_lse_max_abs=float(np.max(np.abs(np.asarray(h_lse) - np.asarray(r_lse)))),
                         prefix_rel_err=rel_err(p_out, rp_out), prefix_lse_max_abs=float(np.max(np.abs(np.asarray(p_lse) - np.asarray(rp_lse)))),
                         finite=fin)
    del r_out, r_lse

    impls = {}

    def add(name, fn, **extra):
        try:
            t, tmin = timeit(multi(fn, nbuf), (qs, caches, lengths, kn, vn, mask))
            t /= U
            tmin /= U
            impls[name] = dict(t_s=t, tmin_s=tmin, **extra)
        except Exception as e:  # record and continue: one failed variant must not sink the run
            impls[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            log(f"  {name} failed: {impls[name]['error']}")

    G = N // K
    d = tuning.default_config(T, G, K, B, S, H)
    add("prefix", lambda q, kc, vc, l, kn, vn, m: prefix_decode.prefix_attention(q, kc, vc, l),
        config=dataclasses.asdict(d))
    if not quick:
        variants = []
        if T * G > 64:
            variants += [dict(num_wg=2, block_kv=64, stages=3), dict(num_splits=min(64, d.num_splits * 2))]
        else:
            variants += [dict(block_kv=64, stages=4), dict(num_splits=min(64, d.num_splits * 2))]
        for kw in variants:
            name = "prefix_" + "_".join(f"{k}{v}" for k, v in kw.items())
            add(name, lambda q, kc, vc, l, kn, vn, m, kw=kw: prefix_decode.prefix_attention(q, kc, vc, l, **kw), config=kw)
    add("tree", lambda q, kc, vc, l, kn, vn, m: tree_attn.tree_attention(q, kn, vn, m))
    add("hybrid", lambda *a: hybrid_attention(*a, implementation="pallas"))
    add("xla", lambda *a: hybrid_attention(*a, implementation="xla"))
    add("dense", lambda *a: ref.dense_attention_ref(*a))
    if T == 1:
        try:
            from jax.experimental.pallas.ops.gpu import decode_attention as da  # deprecated; baseline only

            add("gqa_triton", lambda q, kc, vc, l, kn, vn, m: da.gqa(q[:, 0], kc, vc, kv_seq_len=l, return_residuals=True))
        except Exception as e:
            impls["gqa_triton"] = dict(error=f"import: {e}")
    for name, r in impls.items():
        if "t_s" in r:
            r["GBps"] = bytes_read / r["t_s"] / 1e9 if name.startswith(("prefix", "gqa", "hybrid")) else None
            r["frac_copy_bw"] = bytes_read / r["t_s"] / bw if name.startswith(("prefix", "gqa", "hybrid")) else None
            r["TFLOPs"] = flops / r["t_s"] / 1e12 if name.startswith(("prefix", "hybrid")) else None
            r["x_floor"] = r["t_s"] / floor if name.startswith(("prefix", "hybrid")) else None
    base["impls"] = impls
    results.append(base)
    best = min((r["t_s"] for n, r in impls.items() if n.startswith("prefix") and "t_s" in r), default=float("nan"))
    h = impls.get("hybrid", {}).get("t_s", float("nan"))
    log(f"{model:6s} S={S:6d} T={T:3d} chk={base['check']['hybrid_rel_err']:.1e} floor={floor*1e6:8.1f}us "
        f"prefix_best={best*1e6:8.1f}us ({bytes_read/best/bw*100:5.1f}% bw, {best/floor:4.2f}x floor) "
        f"hybrid={h*1e6:8.1f} xla={impls.get('xla', {}).get('t_s', float('nan'))*1e6:9.1f} "
        f"dense={impls.get('dense', {}).get('t_s', float('nan'))*1e6:9.1f} "
        + (f"gqa={impls.get('gqa_triton', {}).get('t_s', float('nan'))*1e6:8.1f}" if T == 1 else ""))
    del caches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="no tuning variants")
    ap.add_argument("--S", default="4096,32768,131072")
    ap.add_argument("--T", default="1,6,16,69,74")
    ap.add_argument("--models", default="llama3-8b,qwq-32b")
    ap.add_argument("--name", default="", help="suffix of the result file name")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                jaxlib=getattr(jax.lib, "__version__", None) if hasattr(jax, "lib") else None,
                python=platform.python_version(), command=" ".join(sys.argv),
                time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log(json.dumps(meta))
    bw, peak = measure_ceilings()
    meta.update(copy_bw_Bps=bw, bf16_peak_flops=peak)
    log(f"copy bandwidth {bw/1e12:.3f} TB/s, bf16 matmul {peak/1e12:.1f} TFLOP/s")
    shapes = {"llama3-8b": (32, 8, 128), "qwq-32b": (40, 8, 128)}
    results = []
    out_path = os.path.join(args.out, f"kernels_{dev.device_kind.replace(' ', '_')}{args.name}.json")
    for model in args.models.split(","):
        N, K, H = shapes[model]
        for S in map(int, args.S.split(",")):
            for T in map(int, args.T.split(",")):
                try:
                    bench_point(model, N, K, H, S, T, bw, peak, args.quick, results)
                except Exception:
                    log(f"point {model} S={S} T={T} failed:\n{traceback.format_exc()[-1500:]}")
                    results.append(dict(model=model, S=S, T=T, error=traceback.format_exc()[-1500:]))
                with open(out_path, "w") as f:  # rewrite after every point: a timeout keeps what ran
                    json.dump(dict(meta=meta, results=results), f, indent=1)

    log("\nmodel   S       T   prefix_us  %copy  x_floor  hybrid_us  xla_us     dense_us   dense/hyb xla/hyb  gqa_us")
    for r in results:
        if "impls" not in r:
            log(f"{r['model']:7s} {r['S']:6d} {r['T']:3d}  FAILED")
            continue
        im = r["impls"]
        pre = min((v for k, v in im.items() if k.startswith("prefix") and "t_s" in v), key=lambda v: v["t_s"], default=None)
        g = lambda k: im.get(k, {}).get("t_s", float("nan"))  # noqa: E731
        pt = pre["t_s"] if pre else float("nan")
        log(f"{r['model']:7s} {r['S']:6d} {r['T']:3d} {pt*1e6:9.1f} {r['bytes']/pt/bw*100:6.1f} {pt/r['floor_s']:7.2f} "
            f"{g('hybrid')*1e6:9.1f} {g('xla')*1e6:9.1f} {g('dense')*1e6:10.1f} {g('dense')/g('hybrid'):8.2f} "
            f"{g('xla')/g('hybrid'):7.2f} {g('gqa_triton')*1e6:8.1f}")
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
