"""Sweep the prefix kernel's tuning knobs on this GPU and (with --install) write its tuning table.

For the workload's attention shape (G query heads per KV head, K KV heads, head dim H, batch 1),
each cache capacity S (holding S - 200 tokens) and each query count T its trees imply, every valid
knob set of `prefix_decode.prefix_attention` (num_wg, block_kv, stages, num_splits, pingpong,
overlap) is checked against the float32 reference and timed (8 invocations per jitted call over
distinct caches, median of repetitions). The result JSON keeps every variant's time, the
heuristic's, the floor max(bytes / bandwidth, FLOPs / matmul rate) measured in the same run and,
with --baseline, a previous kernel file timed at its own default config. --install merges the
fastest knob set per shape into pallas_kernels/tuning/prefix_<device kind>.json, which
`prefix_decode.default_config` reads (the swept shapes replace their entries, the others stay).

Off a Hopper GPU the variants run in Mosaic GPU interpret mode: correctness only, nothing timed.

    python -m bench tune --workload llama3-8b --install
    python -m bench tune --workload qwq-32b-32k --T 69 --quick --num-wg 2
    python -m bench tune --workload llama3-8b-32k --T 69 --quick --baseline OLD_prefix_decode.py
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import jax
import numpy as np

from bench import common, kernels, workloads
from pallas_kernels import prefix_decode, tuning
from pallas_kernels.tuning import ROWS_PER_WG
from pallas_kernels import reference as ref

SM_COUNT = 132  # H100 SXM / H200; only used to propose split counts (waves of CTAs)


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "llama3-8b")
    parser.add_argument("--S", type=int, nargs="+", help="cache capacities (default: the workload's contexts)")
    parser.add_argument("--T", type=int, nargs="+", help="query counts (default: what the workload's trees imply)")
    parser.add_argument("--quick", action="store_true", help="only the heuristic's split count")
    parser.add_argument("--num-wg", type=int, choices=(1, 2), help="only knob sets with this many compute warpgroups")
    parser.add_argument("--block-kv", type=int, choices=(64, 128), help="only knob sets with this key block")
    parser.add_argument("--baseline", help="a previous prefix_decode.py (`git show REV:pallas_kernels/prefix_decode.py"
                        " > FILE`) timed at its own default config next to each shape's variants")
    parser.add_argument("--install", action="store_true", help="merge the winners into this GPU's tuning table")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


def heuristic_knobs(T, G, K, B, S, H) -> dict:
    """The kernel's heuristic config as named knobs."""
    return dataclasses.asdict(tuning.heuristic_config(T, G, K, B, S, H))


def variants(T, G, K, B, S, H, quick=False) -> list[dict]:
    """Valid knob sets: one compute warpgroup (and two where the rows exceed one warpgroup's 64),
    64- and 128-slot key blocks, the deepest pipeline that fits shared memory, split counts giving
    1-4 waves of CTAs (`quick`: the heuristic's), the ping-pong off and on with two warpgroups, the
    intra-warpgroup overlap off and on where the pipeline has two stages or more."""
    rows = T * G
    out = []
    for num_wg in ((1,) if rows <= ROWS_PER_WG else (1, 2)):
        for block_kv in (64, 128):
            if S % block_kv:
                continue
            stages = tuning.smem_stages(num_wg, block_kv, H)
            if quick:
                splits = [heuristic_knobs(T, G, K, B, S, H)["num_splits"]]
            else:
                ctas = K * B * -(-rows // (num_wg * ROWS_PER_WG))
                # Two CTAs fit on an SM when one takes at most half its shared memory: count waves against that.
                smem = stages * 2 * block_kv * H * 2 + num_wg * ROWS_PER_WG * H * 2
                slots = SM_COUNT * (2 if smem <= 113 * 1024 else 1)
                splits = sorted({max(1, min(64, S // block_kv, -(-w * slots // ctas))) for w in (1, 2, 3, 4)})
            for num_splits in splits:
                for pingpong in ((False, True) if num_wg == 2 else (False,)):
                    for overlap in ((False, True) if stages >= 2 else (False,)):
                        out.append({"num_wg": num_wg, "block_kv": block_kv, "stages": stages,
                                    "num_splits": num_splits, "pingpong": pingpong, "overlap": overlap})
    return out


def load_baseline(path: str):
    """A previous version of prefix_decode.py as a module of its own."""
    spec = importlib.util.spec_from_file_location("prefix_decode_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tune_point(G, K, H, S, T, ceil, reps, quick=False, baseline=None, num_wg=None, block_kv=None) -> dict:
    interpret = kernels.interpret_mode()
    calls = 1 if interpret else kernels.CALLS
    qs, caches, lengths, _, _, _, length = kernels.point_inputs(G, K, H, S, T, calls,
                                                                jax.random.key(S * 7919 + T * 31 + G))
    floor = ceil.floor_s(*kernels.prefix_cost(G, K, H, T, length)) if ceil else math.nan
    r_out, r_lse = (np.asarray(x, np.float32) for x in ref.prefix_attention_ref(qs[0], *caches[0], lengths))
    heur = heuristic_knobs(T, G, K, 1, S, H)
    cands = [v for v in variants(T, G, K, 1, S, H, quick)
             if num_wg in (None, v["num_wg"]) and block_kv in (None, v["block_kv"])]
    cands += [heur] if heur not in cands else []
    cands += ["baseline"] if baseline is not None else []
    results = []
    for knobs in cands:
        if knobs == "baseline":
            call = lambda q, kc, vc: baseline.prefix_attention(q, kc, vc, lengths, interpret=interpret)  # noqa: E731
        else:
            call = lambda q, kc, vc, kw=knobs: prefix_decode.prefix_attention(  # noqa: E731
                q, kc, vc, lengths, interpret=interpret, **kw)
        fn = jax.jit(lambda qs, caches, call=call: [call(qs[i], *caches[i]) for i in range(calls)])
        rec = {"knobs": knobs}
        try:
            out, lse = fn(qs, caches)[0]
            rec.update(max_abs_err=float(np.max(np.abs(np.asarray(out, np.float32) - r_out))),
                       lse_max_abs_err=float(np.max(np.abs(np.asarray(lse) - r_lse))))
            if not (rec["max_abs_err"] < kernels.TOL["out"] and rec["lse_max_abs_err"] < kernels.TOL["lse"]):
                rec["error"] = (f"wrong result: max|out - ref| {rec['max_abs_err']:.3g}, "
                                f"max|lse - ref| {rec['lse_max_abs_err']:.3g}")
            elif not interpret:
                rec["us"] = common.timeit(fn, qs, caches, reps=reps, min_time=0.1) / calls * 1e6
        except Exception as e:  # a config the compiler refuses (shared memory, registers): record, go on
            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        results.append(rec)
    timed = [r for r in results if "us" in r and r["knobs"] != "baseline"]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    at = lambda k: next((r.get("us") for r in results if r["knobs"] == k), None)  # noqa: E731
    return {"G": G, "K": K, "B": 1, "H": H, "T": T, "S": S, "length": length,
            "knobs": best["knobs"] if best else None, "us": best["us"] if best else None,
            "heuristic": heur, "heuristic_us": at(heur), "baseline_us": at("baseline"),
            "floor_us": floor * 1e6, "variants": results}


def install_table(device_kind: str, entries: list[dict], meta: dict) -> str:
    """Merge the winners of `entries` into pallas_kernels/tuning/prefix_<device kind>.json through
    `tuning.install_entries` (named knobs, versioned; the swept shapes replace their entries)."""
    new = [{**{k: e[k] for k in ("G", "K", "B", "H", "T", "S", "floor_us")}, "config": e["knobs"], "t_us": e["us"],
            "heuristic_config": e["heuristic"], "heuristic_t_us": e["heuristic_us"]} for e in entries if e["knobs"]]
    path = os.path.join(tuning.TABLE_DIR, tuning.device_file_name(device_kind))
    tuning.install_entries(path, new, meta)
    return path


def main(args) -> int:
    wl = workloads.get(args.workload)
    cfg, _ = wl.configs()
    G, K, H = cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim
    interpret = kernels.interpret_mode()
    if args.install and interpret:
        raise SystemExit("--install needs a Hopper GPU: off one the variants run in interpret mode, which checks "
                         "results and times nothing. Run without --install for a correctness sweep.")
    ceil = None if interpret else common.ceilings("bfloat16")
    baseline = load_baseline(args.baseline) if args.baseline else None
    record = common.header("tune", args.workload, args.argv)
    record.update(shape={"G": G, "K": K, "H": H, "B": 1}, interpret=interpret,
                  ceilings=None if ceil is None else {**vars(ceil), "bandwidth_Bps": ceil.bandwidth_Bps}, entries=[])
    path = common.result_path(args.out, "tune", args.workload)
    for S in args.S or wl.contexts:
        for T in args.T or wl.query_counts():
            e = tune_point(G, K, H, S, T, ceil, args.reps, args.quick, baseline, args.num_wg, args.block_kv)
            record["entries"].append(e)
            common.write_json(path, record)
            if args.install:  # after every point: a time-limited run keeps its table
                table = install_table(record["device"], record["entries"], {k: record[k] for k in (
                    "device", "jax", "git_commit", "git_dirty", "argv", "time_utc")})
            fails = sum("error" in v for v in e["variants"])
            common.log(f"G={G} S={S:6d} T={T:3d}: {len(e['variants']) - fails}/{len(e['variants'])} variants "
                       f"match the reference; best {e['knobs']} {e['us'] or math.nan:.1f} us, heuristic "
                       f"{e['heuristic_us'] or math.nan:.1f} us, floor {e['floor_us']:.1f} us")
    common.log(f"wrote {path}" + (f" and installed {table}" if args.install else ""))
    bad = [(e["S"], e["T"], v["knobs"]) for e in record["entries"] for v in e["variants"]
           if v.get("error", "").startswith("wrong result")]
    if bad:
        common.log(f"WRONG RESULTS (S, T, knobs): {bad}")
    return 1 if bad else 0
