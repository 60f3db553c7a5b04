"""Weight matmuls of a decoder stack at few rows: time against the memory floor, per row count.

A verification step multiplies every weight matrix by as many rows as the tree has nodes (69 for
the default tree), an AR step by one. Both should cost one read of the weights, but a GEMM with
tens of rows is not a GEMV: the library's kernel choice decides how close it comes to the
bandwidth floor. This benchmark isolates that: the seven projection matmuls of every layer
(q, k, v, o, gate, up, down, written as the model writes them, layer loop unrolled) plus the LM
head, with random bf16 weights at a preset's shapes, for a list of row counts, and in two forms:

  separate  q / k / v and gate / up as separate einsums (how `longspec_jax` computes them)
  fused     q|k|v and gate|up as one matmul each over concatenated weights

XLA compiler settings are process-wide, so variants of them run as separate processes
(`bash bench/gpu_issue7.sh gemm` runs several, `--tag` names each in the JSON).

    python -m bench.bench_gemm_rows --rows 1 5 69 --out bench/results
    python -m bench.bench_gemm_rows --tiny --rows 1 5      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_e2e import measure_ceilings, timeit  # noqa: E402
from longspec_jax.configs import get_preset, tiny_config  # noqa: E402


def layer_weights(cfg, layers, fused, key, dtype):
    """Per-layer weight dicts (distinct arrays, so nothing is served from cache between layers). The
    fused form holds the same values as the separate one, concatenated (q|k|v on the head axis,
    gate|up on the hidden axis), so both forms compute the same function."""
    D, N, K, H, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    out = []
    for i in range(layers):
        ks = jax.random.split(jax.random.fold_in(key, i), 7)
        s = D ** -0.5
        w = {"q": jax.random.normal(ks[0], (D, N, H), dtype) * s,
             "k": jax.random.normal(ks[1], (D, K, H), dtype) * s,
             "v": jax.random.normal(ks[2], (D, K, H), dtype) * s,
             "o": jax.random.normal(ks[3], (N, H, D), dtype) * s,
             "gate": jax.random.normal(ks[4], (D, F), dtype) * s,
             "up": jax.random.normal(ks[5], (D, F), dtype) * s,
             "down": jax.random.normal(ks[6], (F, D), dtype) * F ** -0.5}
        if fused:
            w["qkv"] = jnp.concatenate([w.pop("q"), w.pop("k"), w.pop("v")], axis=1)
            w["gate_up"] = jnp.concatenate([w.pop("gate"), w.pop("up")], axis=1)
        out.append(w)
    return out


def stack_fn(cfg, fused):
    """x [1, T, D] -> x after every layer's projections (attention replaced by the q heads themselves)."""
    N, K = cfg.num_heads, cfg.num_kv_heads

    def f(x, weights):
        for w in weights:
            if fused:
                qkv = jnp.einsum("BTD,DNH->BTNH", x, w["qkv"])
                q, k, v = qkv[:, :, :N], qkv[:, :, N:N + K], qkv[:, :, N + K:]
            else:
                q = jnp.einsum("BTD,DNH->BTNH", x, w["q"])
                k = jnp.einsum("BTD,DKH->BTKH", x, w["k"])
                v = jnp.einsum("BTD,DKH->BTKH", x, w["v"])
            # Stand-in for attention that keeps k and v live: q + (k + v) broadcast over the group.
            kv = jnp.repeat(k + v, N // K, axis=2)
            x = x + jnp.einsum("BTNH,NHD->BTD", q + kv, w["o"])
            if fused:
                gu = jnp.einsum("BTD,DF->BTF", x, w["gate_up"])
                gate, up = jnp.split(gu, 2, axis=-1)
            else:
                gate = jnp.einsum("BTD,DF->BTF", x, w["gate"])
                up = jnp.einsum("BTD,DF->BTF", x, w["up"])
            x = x + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w["down"])
        return x

    return jax.jit(f)


def lm_head_fn():
    def f(h, head):
        logits = jnp.einsum("BTD,DV->BTV", h, head, preferred_element_type=jnp.float32)
        return jnp.argmax(logits, axis=-1)
    return jax.jit(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the preset's)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5, 19, 64, 69, 128])
    p.add_argument("--forms", nargs="+", default=["separate", "fused"], choices=["separate", "fused"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tag", default="", help="name of this process's XLA settings in the JSON")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    cfg = tiny_config() if args.tiny else get_preset(args.model).config
    layers = args.layers or (2 if args.tiny else cfg.num_layers)
    dtype = jnp.bfloat16
    detail: dict = {}
    bw, peak = measure_ceilings(args.tiny, dtype, detail)
    key = jax.random.key(0)
    head = jax.random.normal(jax.random.key(1), (cfg.hidden_size, cfg.vocab_size), dtype) * cfg.hidden_size ** -0.5
    rows_out = []
    for form in args.forms:
        weights = layer_weights(cfg, layers, form == "fused", key, dtype)
        w_bytes = sum(a.nbytes for w in weights for a in w.values())
        n_params = sum(a.size for w in weights for a in w.values())
        f = stack_fn(cfg, form == "fused")
        for T in args.rows:
            x = jax.random.normal(jax.random.key(T), (1, T, cfg.hidden_size), dtype)
            t = timeit(f, x, weights, reps=args.reps)
            floor = max(w_bytes / bw, 2 * T * n_params / peak)
            row = {"form": form, "rows": T, "layers": layers, "ms": t * 1e3, "floor_ms": floor * 1e3,
                   "vs_floor": t / floor, "weight_bytes": w_bytes}
            rows_out.append(row)
            print(f"{args.tag or 'default':>12} {form:>8} T={T:4d}: {t * 1e3:8.3f} ms  floor {floor * 1e3:7.3f}"
                  f"  {t / floor:5.2f}x", flush=True)
        del weights
    g = lm_head_fn()
    for T in args.rows:
        h = jax.random.normal(jax.random.key(T), (1, T, cfg.hidden_size), dtype)
        t = timeit(g, h, head, reps=args.reps)
        floor = max(head.nbytes / bw, 2 * T * head.size / peak)
        rows_out.append({"form": "lm_head", "rows": T, "ms": t * 1e3, "floor_ms": floor * 1e3,
                         "vs_floor": t / floor, "weight_bytes": head.nbytes})
        print(f"{args.tag or 'default':>12}  lm_head T={T:4d}: {t * 1e3:8.3f} ms  floor {floor * 1e3:7.3f}"
              f"  {t / floor:5.2f}x", flush=True)

    device = jax.devices()[0].device_kind
    result = {"benchmark": "gemm_rows", "device": device, "jax": jax.__version__,
              "python": platform.python_version(), "model_shapes": "tiny" if args.tiny else args.model,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "tag": args.tag,
              "memory_bandwidth_Bps": bw, **detail, "matmul_peak_flops": peak,
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
              "rows": rows_out}
    os.makedirs(args.out, exist_ok=True)
    name = f"gemm_rows_{'tiny' if args.tiny else args.model}_{device.replace(' ', '_')}{'_' + args.tag if args.tag else ''}.json"
    with open(os.path.join(args.out, name), "w") as fh:
        json.dump(result, fh, indent=2)
    print("wrote", os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
