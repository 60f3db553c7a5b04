"""Sweep the prefix kernel's tuning knobs on this GPU and write its measured tuning table.

For each attention shape (G query heads per KV head, K KV heads, head dim H, batch 1), query count
T (the AR step, the draft levels and the verification trees) and cache capacity S (holding S - 200
tokens), every valid knob set (`tuning.PrefixConfig`: num_wg, block_kv, stages, num_splits,
pingpong, overlap) of `prefix_decode.prefix_attention` is checked against the float32 reference and
timed (U invocations per jitted call, cycling over enough caches to exceed L2; median of repeats).
The fastest valid config per shape goes to

    pallas_kernels/tuning/prefix_<device kind>.json   (with --install; else only bench/results)

which `tuning.default_config` reads (merged by `tuning.install_entries`: the swept shapes replace
their entries, the table's other shapes stay). The JSON also keeps every variant's time, the
heuristic's time and the max(bytes / bandwidth, flops / matmul peak) floor, with bandwidth and
peak measured in the same run.

    python bench/tune_prefix.py --install                       # H100: Llama-3-8B heads (G=4, K=8)
    python bench/tune_prefix.py --G 4 5 --install               # + QwQ-32B heads (G=5)
    python bench/tune_prefix.py --quick --overlap --install     # + each variant with the intra-warpgroup overlap
    python bench/tune_prefix.py --interpret --T 5 --S 512       # CPU smoke run (interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_kernels  # noqa: E402
from pallas_kernels import prefix_decode, tuning  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402
from pallas_kernels._wgmma import ROWS_PER_WG  # noqa: E402

U = bench_kernels.U  # invocations per jitted call
SM_COUNT = 132  # H100 SXM / H200; only used to propose split counts (waves of CTAs)


def log(*a):
    print(*a, flush=True)


def measure_ceilings(interpret):
    return (float("nan"), float("nan")) if interpret else bench_kernels.measure_ceilings()


def variants(T, G, K, B, S, H, quick=False, overlap=False):
    """Valid knob sets (`tuning.PrefixConfig`) for a shape: num_wg (1, or 2 where rows > 64),
    block_kv 64 / 128, the deepest pipeline that fits SMEM, split counts giving 1, 2, 3 and 4 waves
    of CTAs, and, with two compute warpgroups, the warpgroup ping-pong off and on. `quick`: the
    heuristic's split count only. `overlap`: each knob set also with the intra-warpgroup overlap
    (where the pipeline has >= 2 stages)."""
    rows = T * G
    out = []
    for num_wg in ((1,) if rows <= ROWS_PER_WG else (1, 2)):
        for block_kv in (64, 128):
            if S % block_kv:
                continue
            stages = tuning.smem_stages(num_wg, block_kv, H)
            if quick:
                splits = [tuning.heuristic_config(T, G, K, B, S, H).num_splits]
            else:
                m_tiles = -(-rows // (num_wg * ROWS_PER_WG))
                ctas = K * m_tiles * B
                # Two CTAs fit on an SM when the SMEM of one is at most half: count waves against that.
                smem = stages * 2 * block_kv * H * 2 + num_wg * ROWS_PER_WG * H * 2
                slots = SM_COUNT * (2 if smem <= 113 * 1024 else 1)
                splits = sorted({max(1, min(64, S // block_kv, -(-w * slots // ctas))) for w in (1, 2, 3, 4)})
            for sp in splits:
                for pp in ((False, True) if num_wg == 2 else (False,)):
                    out.append(tuning.PrefixConfig(num_wg=num_wg, block_kv=block_kv, stages=stages, num_splits=sp,
                                                   pingpong=pp))
    if overlap:
        out += [dataclasses.replace(v, overlap=True) for v in out if v.stages >= 2]
    return out


def short(cfg: dict) -> str:
    """A config dict of a result as one column: 'wg2 bk128 st2 sp11 pp ov'."""
    return (f"wg{cfg['num_wg']} bk{cfg['block_kv']} st{cfg['stages']} sp{cfg['num_splits']}"
            + (" pp" if cfg["pingpong"] else "") + (" ov" if cfg["overlap"] else ""))


def keep_variants(cands, num_wg=None, block_kv=None):
    """The knob sets with the given num_wg / block_kv (None: any)."""
    return [c for c in cands if (num_wg is None or c.num_wg == num_wg) and (block_kv is None or c.block_kv == block_kv)]


def load_baseline(path):
    """A previous version of prefix_decode.py (e.g. `git show REV:pallas_kernels/prefix_decode.py`),
    timed at its own default config next to the current kernel."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prefix_decode_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def point_inputs(G, K, H, S, T, interpret, bw=float("nan"), peak=float("nan")):
    """Batch-1 inputs of one (G, K, H, S, T) point: U query sets, the caches they cycle over (U of
    them natively, enough to exceed L2; one in interpret mode), lengths S - 200, and the
    max(bytes / bw, flops / peak) floor of one call. Returns (qs, caches, lengths, length, floor)."""
    B = 1
    N = G * K
    length = S - 200 if S > 400 else S - 3
    key = jax.random.key(S * 7919 + T * 31 + G)
    ks = jax.random.split(key, 2 + 2 * U)
    qs = [jax.random.normal(k_, (B, T, N, H), jnp.bfloat16) for k_ in jax.random.split(ks[0], U)]
    nbuf = 1 if interpret else U
    caches = [(jax.random.normal(ks[2 + 2 * i], (B, S, K, H), jnp.bfloat16),
               jax.random.normal(ks[3 + 2 * i], (B, S, K, H), jnp.bfloat16)) for i in range(nbuf)]
    lengths = jnp.full((B,), length, jnp.int32)
    bytes_read = 2 * B * length * K * H * 2 + 2 * qs[0].size * 2
    flops = 4 * B * T * N * length * H
    return qs, caches, lengths, length, max(bytes_read / bw, flops / peak)


def tune_point(G, K, H, S, T, bw, peak, interpret, reps, quick=False, baseline=None, overlap=False,
               num_wg=None, block_kv=None):
    B = 1
    qs, caches, lengths, length, floor = point_inputs(G, K, H, S, T, interpret, bw, peak)
    nbuf = len(caches)
    r_out, r_lse = ref.prefix_attention_ref(qs[0], *caches[0], lengths)
    r_out, r_lse = np.asarray(r_out, np.float32), np.asarray(r_lse)

    def run_fn(cfg):
        if cfg == "baseline":
            call = lambda q, kc, vc: baseline.prefix_attention(q, kc, vc, lengths, interpret=interpret)  # noqa: E731
        else:
            call = lambda q, kc, vc: prefix_decode.prefix_attention(  # noqa: E731
                q, kc, vc, lengths, interpret=interpret, **dataclasses.asdict(cfg))

        def run(qs, caches, lengths):
            return [call(qs[i], *caches[i % nbuf]) for i in range(U if not interpret else 1)]
        return jax.jit(run)

    heur = tuning.heuristic_config(T, G, K, B, S, H)
    cands = variants(T, G, K, B, S, H, quick, overlap)
    cands = keep_variants(cands, num_wg, block_kv) or cands  # a filter that keeps nothing: all of them
    if heur not in cands:
        cands.append(heur)
    if baseline is not None:
        cands.append("baseline")
    results = []
    for cfg in cands:
        rec = {"config": cfg if cfg == "baseline" else dataclasses.asdict(cfg)}
        try:
            fn = run_fn(cfg)
            out, lse = fn(qs, caches, lengths)[0]
            err = float(np.max(np.abs(np.asarray(out, np.float32) - r_out)))
            lse_err = float(np.max(np.abs(np.asarray(lse) - r_lse)))
            rec.update(max_abs_err=err, lse_max_abs_err=lse_err)
            if not (err < 2e-2 and lse_err < 1e-2):  # bf16 output tolerance (tests/test_kernels.py)
                rec["error"] = f"wrong result: max|out - ref| {err:.3g}, max|lse - ref| {lse_err:.3g}"
            elif not interpret:
                rec["t_us"] = bench_kernels.timeit(fn, (qs, caches, lengths), reps=reps)[0] / U * 1e6
        except Exception as e:  # a config the compiler refuses (SMEM, registers): record, go on
            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        results.append(rec)
    ok = [r for r in results if "t_us" in r and r["config"] != "baseline"] or [
        r for r in results if "error" not in r and r["config"] != "baseline"]
    best = min(ok, key=lambda r: r.get("t_us", 0.0)) if ok else None
    h = next(r for r in results if r["config"] == dataclasses.asdict(heur))
    base = next((r for r in results if r["config"] == "baseline"), {})
    entry = {"G": G, "K": K, "B": B, "H": H, "T": T, "S": S, "length": length,
             "config": best["config"] if best else None, "t_us": best.get("t_us") if best else None,
             "heuristic_config": dataclasses.asdict(heur), "heuristic_t_us": h.get("t_us"),
             "baseline_t_us": base.get("t_us"),
             "floor_us": floor * 1e6, "variants": results}
    return entry


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--G", type=int, nargs="+", default=[4], help="query heads per KV head (4: Llama-3-8B, 5: QwQ-32B)")
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--T", type=int, nargs="+", default=[1, 5, 16, 19, 37, 69, 74])
    ap.add_argument("--S", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--interpret", action="store_true", help="check the variants in interpret mode (CPU), no timing")
    ap.add_argument("--install", action="store_true", help="also write pallas_kernels/tuning/<device>.json")
    ap.add_argument("--quick", action="store_true", help="the heuristic's split count only (fewer variants)")
    ap.add_argument("--overlap", action="store_true",
                    help="also time each variant with the intra-warpgroup overlap (FA3: QK^T of block j with PV of j - 1)")
    ap.add_argument("--num-wg", type=int, help="only knob sets with this many compute warpgroups")
    ap.add_argument("--block-kv", type=int, help="only knob sets with this block size")
    ap.add_argument("--baseline", help="a previous prefix_decode.py to time next to the current kernel")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    kind = "interpret" if args.interpret else dev.device_kind
    bw, peak = measure_ceilings(args.interpret)
    meta = dict(device=kind, platform=dev.platform, jax=jax.__version__, python=platform.python_version(),
                command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
                copy_bw_Bps=bw, bf16_peak_flops=peak, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log(json.dumps(meta))
    entries = []
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "tune_" + tuning.device_file_name(kind))

    def save():
        with open(out_path, "w") as f:
            json.dump(dict(meta=meta, entries=entries), f, indent=1)
        if args.install and not args.interpret:  # after every point: a time-limited run keeps its table
            keys = ("G", "K", "B", "H", "T", "S", "config", "t_us", "heuristic_config", "heuristic_t_us", "floor_us")
            tuning.install_entries(os.path.join(tuning.TABLE_DIR, tuning.device_file_name(kind)),
                                   [{k: e[k] for k in keys} for e in entries if e["config"] and e["t_us"]], meta)

    baseline = load_baseline(args.baseline) if args.baseline else None
    for G in args.G:
        for S in args.S:
            for T in args.T:
                t0 = time.perf_counter()
                e = tune_point(G, args.K, args.H, S, T, bw, peak, args.interpret, args.reps, args.quick, baseline,
                               args.overlap, args.num_wg, args.block_kv)
                entries.append(e)
                save()
                fails = sum("error" in v for v in e["variants"])
                if args.interpret:
                    log(f"G={G} S={S:6d} T={T:3d}: {len(e['variants']) - fails}/{len(e['variants'])} variants "
                        f"match the reference ({time.perf_counter() - t0:.0f} s)")
                else:
                    log(f"G={G} S={S:6d} T={T:3d}: best {short(e['config']) if e['config'] else None} "
                        f"{e['t_us'] or math.nan:8.1f} us, heuristic "
                        f"{short(e['heuristic_config'])} {e['heuristic_t_us'] or math.nan:8.1f} us, "
                        f"floor {e['floor_us']:7.1f} us ({fails} failed, {time.perf_counter() - t0:.0f} s)")
    log(f"wrote {out_path}")
    bad = [(e["G"], e["S"], e["T"], v["config"], v["error"]) for e in entries for v in e["variants"]
           if v.get("error", "").startswith("wrong result")]
    if args.install and not args.interpret:
        log(f"installed {os.path.join(tuning.TABLE_DIR, tuning.device_file_name(kind))}")
    log("\n   G      S    T  best config                 best_us  heur_us  base_us  floor_us  best/floor  heur/best  base/best")
    for e in entries:
        if e["t_us"]:
            log(f"{e['G']:4d} {e['S']:6d} {e['T']:4d}  {short(e['config']):26s} {e['t_us']:8.1f} "
                f"{e['heuristic_t_us'] or math.nan:8.1f} {e['baseline_t_us'] or math.nan:8.1f} {e['floor_us']:9.1f} "
                f"{e['t_us'] / e['floor_us']:10.2f} {(e['heuristic_t_us'] or math.nan) / e['t_us']:9.2f} "
                f"{(e['baseline_t_us'] or math.nan) / e['t_us']:9.2f}")
    if bad:
        log(f"WRONG RESULTS: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
