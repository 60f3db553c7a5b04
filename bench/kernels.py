"""Hybrid Tree Attention kernels per layer at a workload's attention shapes.

For the workload's model (N query heads, K KV heads, head dim H), batch 1, bf16, each cache capacity
S in its contexts (holding S - 200 tokens) and each query count T its trees imply (1, the widest
draft level, every tree's node count), one layer's attention is checked against the float32
references and then timed as:
  prefix   the Mosaic GPU prefix kernel at its default config (the GPU's tuning table or the heuristic)
  tree     the Mosaic GPU tree kernel
  hybrid   prefix + tree + exact LSE merge (`pallas_kernels.hybrid_attention`, implementation "pallas")
  xla      the same composition in float32 XLA (implementation "xla")
  dense    one masked attention over [prefix ; tree] (`reference.dense_attention_ref`): the "HF" baseline
  gqa      at T = 1, JAX's bundled Triton `decode_attention.gqa` (deprecated; a baseline only)
The prefix part's floor is max(bytes / bandwidth, FLOPs / matmul rate), both measured in the run.
One jitted call runs 8 invocations over 8 distinct caches (more than L2 holds, and distinct so XLA
cannot merge the references' reductions); the median over repetitions is reported per invocation.

--profile  one prefix call's device time split into the kernel and the XLA glue around it (query
           re-layout, split merge), from a profiler trace.

Off a Hopper GPU the kernels run in Mosaic GPU interpret mode: checked, not timed (a smoke run).

    python -m bench kernels --workload llama3-8b
    python -m bench kernels --workload llama3-8b-32k --profile --T 1 16 69
"""

from __future__ import annotations

import functools
import tempfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, workloads
import pallas_kernels as api

from pallas_kernels import reference as ref

CALLS = 8  # invocations per jitted call (1 in interpret mode)
TOL = {"out": 2e-2, "lse": 1e-2}  # bf16 kernel against the float32 reference (tests/test_kernels.py)


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "llama3-8b")
    parser.add_argument("--S", type=int, nargs="+", help="cache capacities (default: the workload's contexts)")
    parser.add_argument("--T", type=int, nargs="+", help="query counts (default: what the workload's trees imply)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--profile", action="store_true", help="kernel against XLA glue of one prefix call")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


def interpret_mode() -> bool:
    return api.default_implementation() != "pallas"


def point_inputs(G, K, H, S, T, calls, key):
    """Batch-1 inputs of one point: `calls` query sets [1, T, G*K, H] and as many caches [1, S, K, H]
    (bf16), lengths S - 200 (S - 3 for tiny caches), the tree's own K/V and a random tree mask."""
    ks = jax.random.split(key, 3 + 2 * calls)
    qs = [jax.random.normal(k, (1, T, G * K, H), jnp.bfloat16) for k in jax.random.split(ks[0], calls)]
    kn, vn = (jax.random.normal(k, (1, T, K, H), jnp.bfloat16) for k in ks[1:3])
    caches = [tuple(jax.random.normal(ks[3 + 2 * i + j], (1, S, K, H), jnp.bfloat16) for j in (0, 1))
              for i in range(calls)]
    length = S - 200 if S > 400 else S - 3
    rng = np.random.default_rng(S + T)
    mask = np.eye(T, dtype=bool)
    for i in range(1, T):
        mask[i] |= mask[int(rng.integers(0, i))]  # every node sees its ancestors
    return qs, caches, jnp.full((1,), length, jnp.int32), kn, vn, jnp.asarray(mask[None]), length


def prefix_cost(G, K, H, T, length):
    """(bytes, FLOPs) of one prefix call: K and V read once, q read and out written; QK^T and PV."""
    return 2 * length * K * H * 2 + 2 * T * G * K * H * 2, 4 * T * G * K * length * H


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def table_point(G, K, H, S, T, ceil, reps):
    interpret = interpret_mode()
    impl = "pallas_interpret" if interpret else "pallas"
    calls = 1 if interpret else CALLS
    qs, caches, lengths, kn, vn, mask, length = point_inputs(G, K, H, S, T, calls, jax.random.key(S * 131 + T))
    nbytes, flops = prefix_cost(G, K, H, T, length)
    floor = ceil.floor_s(nbytes, flops)
    row = {"S": S, "T": T, "length": length, "bytes": nbytes, "flops": flops, "floor_us": floor * 1e6}

    kc, vc = caches[0]
    h_out, h_lse = jax.jit(functools.partial(api.hybrid_attention, implementation=impl))(
        qs[0], kc, vc, lengths, kn, vn, mask)
    r_out, r_lse = ref.dense_attention_ref(qs[0], kc, vc, lengths, kn, vn, mask)
    p_out, p_lse = jax.jit(functools.partial(api.prefix_attention, implementation=impl))(qs[0], kc, vc, lengths)
    rp_out, rp_lse = ref.prefix_attention_ref(qs[0], kc, vc, lengths)
    check = {"hybrid_out": _max_abs(h_out, r_out), "hybrid_lse": _max_abs(h_lse, r_lse),
             "prefix_out": _max_abs(p_out, rp_out), "prefix_lse": _max_abs(p_lse, rp_lse)}
    check["ok"] = all(check[f"{p}_{w}"] < TOL[w] for p in ("hybrid", "prefix") for w in ("out", "lse"))
    row["check"] = check

    parts = {
        "prefix": lambda q, kc, vc, n, kn, vn, m: api.prefix_attention(q, kc, vc, n, implementation=impl),
        "tree": lambda q, kc, vc, n, kn, vn, m: api.tree_attention(q, kn, vn, m, implementation=impl),
        "hybrid": functools.partial(api.hybrid_attention, implementation=impl),
        "xla": functools.partial(api.hybrid_attention, implementation="xla"),
        "dense": ref.dense_attention_ref,
    }
    if T == 1 and not interpret:
        from jax.experimental.pallas.ops.gpu import decode_attention  # deprecated: a baseline only

        parts["gqa"] = lambda q, kc, vc, n, kn, vn, m: decode_attention.gqa(
            q[:, 0], kc, vc, kv_seq_len=n, return_residuals=True)
    times = {}
    for name, fn in parts.items():
        if interpret and name in ("prefix", "tree", "hybrid"):
            times[name] = {"error": "not timed: Mosaic GPU interpret mode"}
            continue

        def run(qs, caches, lengths, kn, vn, mask, fn=fn):
            return [fn(qs[i], *caches[i], lengths, kn, vn, mask) for i in range(calls)]
        try:
            t = common.timeit(jax.jit(run), qs, caches, lengths, kn, vn, mask, reps=reps, min_time=0.1) / calls
            times[name] = {"us": t * 1e6}
            if name in ("prefix", "hybrid", "gqa"):
                times[name].update(frac_bandwidth=nbytes / t / ceil.bandwidth_Bps, x_floor=t / floor)
        except Exception as e:  # one failed part (e.g. an unavailable baseline) must not sink the run
            times[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    row["us"] = times
    g = lambda k: times.get(k, {}).get("us", float("nan"))  # noqa: E731
    common.log(f"S={S:6d} T={T:3d} check {'ok' if check['ok'] else 'FAILED'} floor {floor * 1e6:7.1f} us | "
               + " ".join(f"{k} {g(k):8.1f}" for k in parts))
    return row


def profile_point(G, K, H, S, T, ceil, reps):
    interpret = interpret_mode()
    impl = "pallas_interpret" if interpret else "pallas"
    calls = 1 if interpret else CALLS
    qs, caches, lengths, _, _, _, length = point_inputs(G, K, H, S, T, calls, jax.random.key(S * 7 + T))
    floor = ceil.floor_s(*prefix_cost(G, K, H, T, length))

    @jax.jit
    def run(qs, caches, lengths):
        return [api.prefix_attention(qs[i], *caches[i], lengths, implementation=impl) for i in range(calls)]

    row = {"S": S, "T": T, "length": length, "floor_us": floor * 1e6}
    if not interpret:
        row["wall_us"] = common.timeit(run, qs, caches, lengths, reps=reps, min_time=0.1) / calls * 1e6
    with tempfile.TemporaryDirectory() as pdir:
        jax.profiler.start_trace(pdir)
        jax.block_until_ready(run(qs, caches, lengths))
        jax.profiler.stop_trace()
        summ = common.summarize_trace(pdir, calls, top=200)
    if "error" in summ:
        return {**row, "error": summ["error"]}

    def is_kernel(name):  # the Pallas call's launch is named after Mosaic GPU or the kernel body
        return any(s in name.lower() for s in ("mosaic", "prefix_kernel", "entry"))

    kernel = sum(o["ms_per_iteration"] for o in summ["ops"] if is_kernel(o["name"])) * 1e3
    total = summ["device_ms_per_iteration"] * 1e3
    row.update(device_us=total, kernel_us=kernel, glue_us=total - kernel, kernel_x_floor=kernel / (floor * 1e6),
               device_ops=summ["ops_per_iteration"],
               glue_ops=[{"name": o["name"][:80], "us": o["ms_per_iteration"] * 1e3}
                         for o in summ["ops"] if not is_kernel(o["name"])][:8])
    common.log(f"S={S:6d} T={T:3d} kernel {kernel:8.1f} us ({row['kernel_x_floor']:.2f}x floor), glue "
               f"{total - kernel:6.1f} us in {len(row['glue_ops'])} ops")
    return row


def main(args) -> int:
    wl = workloads.get(args.workload)
    cfg, _ = wl.configs()
    G, K, H = cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim
    contexts = args.S or list(wl.contexts)
    query_counts = args.T or list(wl.query_counts())
    suite = "kernels-profile" if args.profile else "kernels"
    record = common.header(suite, args.workload, args.argv)
    path = common.result_path(args.out, suite, args.workload)
    ceil = common.ceilings("bfloat16")
    record.update(shape={"G": G, "K": K, "H": H, "B": 1}, interpret=interpret_mode(),
                  ceilings={**vars(ceil), "bandwidth_Bps": ceil.bandwidth_Bps}, rows=[])
    common.log(f"{record['device']}: bandwidth {ceil.bandwidth_Bps / 1e12:.3f} TB/s, bf16 matmul "
               f"{ceil.matmul_flops / 1e12:.1f} TFLOP/s; G={G} K={K} H={H}")
    point = profile_point if args.profile else table_point
    for S in contexts:
        for T in query_counts:
            try:
                record["rows"].append(point(G, K, H, S, T, ceil, args.reps))
            except Exception:
                record["rows"].append({"S": S, "T": T, "error": traceback.format_exc()[-1500:]})
                common.log(f"S={S} T={T} failed:\n{record['rows'][-1]['error']}")
            common.write_json(path, record)
    common.log(f"wrote {path}")
    bad = [r for r in record["rows"] if "error" in r or not r.get("check", {"ok": True})["ok"]]
    return 1 if bad else 0
