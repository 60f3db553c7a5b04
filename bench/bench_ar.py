"""Autoregressive decode speed against the memory-bandwidth floor.

    python -m bench.bench_ar                       # llama3-8b shapes, random bf16 weights, 4k and 32k
    python -m bench.bench_ar --tiny                # CPU smoke run with the tiny config
    python -m bench.bench_ar --tiny --stream-every 8   # also time decoding with text streaming on

For each context length C the prompt is C random tokens and `--new-tokens` tokens are decoded
with no EOS (so every run does the same work), with a KV cache of exactly C + new tokens. The
first run compiles (compile time reported apart); `--repeats` further runs are timed and the
median is reported. A decode step must read every weight except the embedding table (one row is
gathered; the LM head is read in full) plus the KV cache up to the current length, so

    floor_ms = (weight bytes without the embedding + KV bytes at the mean decode length) / copy bandwidth,

with the device-to-device copy bandwidth measured in the same run (`common.ceilings`: an in-place
elementwise op, bytes read + bytes written over the median time). Results go to
bench/results/ar_<tag>.json with the device, the versions and the command line.

`--stream-every` also times decoding with streaming on (the "stream" fields of the JSON; measured
figures: docs/perf_notes.md, "Streaming cost").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

def weight_bytes_per_step(model, cfg) -> tuple[int, int]:
    """(bytes a decode step reads from the weights, total weight bytes).

    The embedding table is excluded unless it is also the (tied) LM head: decoding gathers one row.
    """
    from flax import nnx

    total = read = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        n = leaf.size * leaf.dtype.itemsize
        total += n
        is_embedding = any(getattr(k, "key", None) == "embedder" for k in path)
        if not is_embedding or cfg.tie_word_embeddings:
            read += n
    return read, total


def kv_bytes(cfg, length: float, itemsize: int, batch: int = 1) -> float:
    """K and V of every layer for `length` tokens."""
    return 2 * cfg.num_layers * batch * length * cfg.num_kv_heads * cfg.head_dim * itemsize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_ar", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama3-8b", help="model shapes (longspec_jax.configs.PRESETS)")
    p.add_argument("--tiny", action="store_true", help="tiny config, short contexts: a CPU smoke run")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="prompt lengths (default 4096 32768)")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per run (default 256; tiny 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the compiling run")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    p.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--stream-every", type=int, default=0,
                   help="if > 0, also time decoding with streaming (first slice of this many tokens)")
    p.add_argument("--stream-interval", type=float, default=0.25,
                   help="streaming: later slices grow to this many seconds (0 = fixed --stream-every)")
    p.add_argument("--out", default=None, help="output JSON (default bench/results/ar_<tag>.json)")
    args = p.parse_args(argv)

    from infer.ar import generate_ar
    from infer.tiny_random import random_model
    from longspec_jax.configs import get_preset, tiny_config
    from pallas_kernels import api as kernels_api

    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[args.dtype]
    if args.tiny:
        cfg, name = tiny_config(), "tiny"
        contexts = args.contexts or [256, 1024]
        new_tokens = args.new_tokens or 64
    else:
        cfg, name = get_preset(args.preset).config, args.preset
        contexts = args.contexts or [4096, 32768]
        new_tokens = args.new_tokens or 256
    dev = jax.devices()[0]
    impl = kernels_api.default_implementation() if args.attention_impl == "auto" else args.attention_impl
    print(f"{name}: {cfg.num_layers} layers, D={cfg.hidden_size}, V={cfg.vocab_size} | {args.dtype} | "
          f"attention {impl} | {dev.device_kind} | jax {jax.__version__}", flush=True)

    t0 = time.perf_counter()
    model = random_model(cfg, dtype=dtype, attention_impl=impl, seed=0, on_device=True)
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
    init_s = time.perf_counter() - t0
    w_read, w_total = weight_bytes_per_step(model, cfg)
    bw = common.ceilings("bfloat16").copy_Bps
    print(f"random init {init_s:.1f} s; weights {w_total / 1e9:.3f} GB ({w_read / 1e9:.3f} GB read per step); "
          f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)

    itemsize = jnp.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    results = []
    for ctx in contexts:
        prompt = rng.integers(0, cfg.vocab_size, size=ctx).tolist()
        kw = dict(max_new_tokens=new_tokens, eos_ids=(), cache_capacity=ctx + new_tokens,
                  prefill_chunk=args.prefill_chunk)
        stream_kw = dict(stream_callback=lambda t, n: None, stream_every=args.stream_every,
                         stream_interval_s=args.stream_interval)
        first = generate_ar(model, prompt, **kw)  # compiles
        runs, sruns = [], []
        if args.stream_every > 0:
            generate_ar(model, prompt, **kw, **stream_kw)  # compiles the snapshot copy
        for _ in range(args.repeats):
            runs.append(generate_ar(model, prompt, **kw).timings)
            if args.stream_every > 0:  # interleaved, so load drift affects both the same way
                sruns.append(generate_ar(model, prompt, **kw, **stream_kw).timings)
        ms = statistics.median(t.ms_per_step for t in runs)
        kv = kv_bytes(cfg, ctx + new_tokens / 2, itemsize)
        floor_ms = 1e3 * (w_read + kv) / bw
        row = dict(
            context=ctx, new_tokens=new_tokens, cache_capacity=ctx + new_tokens,
            ms_per_token=ms, tokens_per_s=1e3 / ms, ms_per_token_runs=[t.ms_per_step for t in runs],
            floor_ms_per_token=floor_ms, fraction_of_floor=floor_ms / ms,
            bytes_per_step=w_read + kv, weight_bytes_read=w_read, kv_bytes_mean=kv,
            compile_s=first.timings.compile_s,
            prefill_s=statistics.median(t.prefill_s for t in runs),
            prefill_tokens_per_s=statistics.median(t.prefill_tokens_per_s for t in runs),
        )
        line = (f"ctx {ctx:>6}: {ms:7.3f} ms/token ({1e3 / ms:7.1f} tok/s) | floor {floor_ms:.3f} ms "
                f"({100 * floor_ms / ms:.0f}% of floor) | compile {first.timings.compile_s:.1f} s | "
                f"prefill {row['prefill_s']:.3f} s")
        if args.stream_every > 0:
            sms = statistics.median(t.ms_per_step for t in sruns)
            row.update(stream_every=args.stream_every, stream_interval_s=args.stream_interval,
                       stream_ms_per_token=sms,
                       stream_ms_per_token_runs=[t.ms_per_step for t in sruns], stream_overhead=sms / ms - 1)
            line += (f" | streaming ({args.stream_every} tokens, then {args.stream_interval} s slices): "
                     f"{sms:.3f} ms/token ({100 * (sms / ms - 1):+.1f}%)")
        print(line, flush=True)
        results.append(row)

    device_tag = dev.device_kind.lower().replace(" ", "-")
    tag = f"tiny_{dev.platform}" if args.tiny else f"{name}_{device_tag}_{impl}"
    out = args.out or os.path.join(common.RESULTS_DIR, f"ar_{tag}.json")
    command = ["python", "-m", "bench.bench_ar", *(sys.argv[1:] if argv is None else argv)]
    record = dict(
        **common.header("ar", name, command), benchmark="ar_decode", model=name, dtype=args.dtype,
        attention_impl=impl, batch=1, command=" ".join(command), copy_bandwidth_bytes_per_s=bw,
        random_init_s=init_s, weight_bytes_total=w_total, results=results,
        floor_definition="(weight bytes excluding the embedding table + KV bytes at context + new_tokens/2) "
                         "/ measured device-to-device copy bandwidth",
    )
    common.write_json(out, record)
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
