"""A prefill chunk's attention on cuDNN against the verification kernels, by part and end to end.

A prefill chunk of T tokens at committed length L attends to the cache prefix [0, L) and causally
to itself (`pallas_kernels.cudnn_chunk`). At the workload's attention shapes (batch 1, bf16) this
times, for each chunk width T of --chunks:
  chunk    the causal T x T part: the Mosaic GPU tree kernel under a dense causal mask, and cuDNN;
  prefix   the prefix part at L in --offsets: the Mosaic GPU prefix kernel, and cuDNN (padding mask);
each checked against the float32 reference (max |out| and |lse| errors in the JSON), with its
attention TFLOP/s; then the whole prefill of each context (`runtime.prefill` on random weights, as
`bench latency` times it) in each chunk width, with the chunk's attention on the kernels (the
baseline) and on cuDNN, against the compute floor (weights and causal attention at the matmul rate
measured in the run). GPU only (cuDNN).

    python -m bench prefill --workload llama3-8b-32k
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, latency, workloads
from longspec_jax.tree import TreeShape
from pallas_kernels import api, cudnn_chunk
from pallas_kernels import reference as ref


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "llama3-8b-32k")
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048], help="chunk widths T")
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 4096, 16384, 32256],
                        help="committed lengths L of the prefix part (clipped to the largest context - T)")
    parser.add_argument("--contexts", type=int, nargs="*", help="whole prefills (default: 32768 and 4096)")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


def _ms(fn, *args):
    return common.timeit(jax.jit(fn), *args, reps=10) * 1e3


def _errors(out, want):
    (o, l), (wo, wl) = out, want
    finite = np.isfinite(np.asarray(wl))
    return (float(np.abs(np.asarray(o, np.float32) - np.asarray(wo, np.float32)).max()),
            float(np.abs(np.where(finite, np.asarray(l) - np.asarray(wl), 0)).max()))


def parts(cfg, chunks, offsets, capacity):
    """Rows of the chunk and prefix parts (module docstring)."""
    N, K, H, dt = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 3)
    k_cache = jax.random.normal(keys[1], (1, capacity, K, H), dt)
    v_cache = jax.random.normal(keys[2], (1, capacity, K, H), dt)
    rows = []
    for T in chunks:
        q = jax.random.normal(keys[0], (1, T, N, H), dt)
        k, v = k_cache[:, :T], v_cache[:, :T]
        mask = jnp.tril(jnp.ones((T, T), bool))[None]
        want = ref.tree_attention_ref(q, k, v, mask)
        variants = {
            "kernels": lambda q, k, v: api.tree_attention(q, k, v, mask, implementation="pallas"),
            "cudnn": lambda q, k, v: cudnn_chunk.causal_part(q, k, v),
        }
        for name, fn in variants.items():
            ms = _ms(fn, q, k, v)
            rows.append(dict(part="chunk", impl=name, T=T, L=0, ms=ms, tflops=2 * T * T * N * H / ms / 1e9,
                             errors=_errors(jax.jit(fn)(q, k, v), want)))
            common.log(rows[-1])
        for L in sorted({min(off, capacity - T) for off in offsets}):
            lengths = jnp.array([L], jnp.int32)
            want = ref.prefix_attention_ref(q, k_cache, v_cache, lengths) if L else None
            variants = {
                "kernels": lambda q, kc, vc, n: api.prefix_attention(q, kc, vc, n, implementation="pallas"),
                "cudnn": lambda q, kc, vc, n: cudnn_chunk.prefix_part(q, kc, vc, n),
            }
            for name, fn in variants.items():
                ms = _ms(fn, q, k_cache, v_cache, lengths)
                errors = _errors(jax.jit(fn)(q, k_cache, v_cache, lengths), want) if L else None
                rows.append(dict(part="prefix", impl=name, T=T, L=L, ms=ms, tflops=4 * T * L * N * H / ms / 1e9,
                                 errors=errors))
                common.log(rows[-1])
    return rows


def main(args) -> int:
    wl = workloads.get(args.workload)
    if jax.devices()[0].platform != "gpu" or cudnn_chunk.cudnn_module() is None:
        common.log("bench prefill times cuDNN: it needs an NVIDIA GPU")
        return 2
    contexts = args.contexts if args.contexts is not None else [32768, 4096]
    lat = argparse.Namespace(steps=16, attention_impl="auto", tensor_parallel=1, prefill_chunk=max(args.chunks))
    b = latency.Bench(lat, wl)
    record = common.header("prefill", args.workload, args.argv)
    record.update(model_shapes=wl.model, weights=f"random {wl.dtype}", ceilings=vars(b.ceil), parts=[], prefill=[])
    path = common.result_path(args.out, "prefill", args.workload)
    record["parts"] = parts(b.cfg, args.chunks, args.offsets, max(contexts) + 256)
    common.write_json(path, record)
    tree, default_rows = [TreeShape.parse("4 16 16 16 16")], cudnn_chunk.MIN_ROWS
    for ctx in contexts:
        st = b.state(ctx, tree)
        for chunk in args.chunks:
            for mode in ("kernels", "cudnn"):
                cudnn_chunk.MIN_ROWS = default_rows if mode == "cudnn" else 1 << 30  # the baseline: never cuDNN
                jax.clear_caches()  # retrace the prefill under this choice
                st, row = b.prefill(st, ctx, chunk)
                record["prefill"].append(dict(context=ctx, chunk=chunk, attention=mode, **row))
                common.log(f"ctx {ctx}, chunks of {chunk}, {mode}: {row['prefill_s']:.3f} s "
                           f"({row['prefill_vs_floor']:.2f}x floor), compile {row['prefill_compile_s']:.1f} s")
                common.write_json(path, record)
        del st
    cudnn_chunk.MIN_ROWS = default_rows
    common.log(f"wrote {path}")
    return 0
