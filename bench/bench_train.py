"""Draft-training throughput and MFU at real model shapes (default: Llama-3-8B, batch 1, 1k and 32k).

    python -m bench.bench_train                       # llama3-8b preset, seq 1024 and 32768, on the GPU
    python -m bench.bench_train --tiny                # CPU smoke test (tiny config, seq 64 and 128)
    python -m bench.bench_train --seq-lens 1024 --remat full --steps 10

The target is the preset's shapes with random bf16 weights initialised on device (no checkpoint is
read); the draft has float32 master weights and computes in bf16, as in `train.run`. One train step
is the full `train.step` program: frozen target forward, draft forward/backward with a random lag,
chunked float32 LM-head cross-entropy, AdamW update.

FLOPs per step (T tokens = batch x seq; counted analytically, not from XLA):
  draft_6nd      6 x draft_params x T                 (the MFU numerator, as in the brief)
  draft_attn     3 x (self-attn within the window + causal cross-attn), 4 N H flops per (query, key)
  lm_head        4 x D x V x T                        (forward + gradient w.r.t. the draft hidden)
  target_fwd     2 x target_params(non-embedding) x T + causal attention forward over L layers
MFU = draft_6nd / step time / peak; mfu_total adds the other terms. The peak is *measured* with a
large bf16 matmul on the same device (reported), not a datasheet number.

Results go to bench/results/train_<device>_<time>.json with the device, jax version and command.
Compile time is reported apart from the steady-state step time (mean over --steps after a warm-up,
each step synchronised with block_until_ready).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longspec_jax import configs
from train import setup
from train import step as step_lib
from train.config import from_dict

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure_peak(tiny: bool) -> float:
    """Achieved bf16 matmul flop/s on device 0 (best of a few runs)."""
    n = 512 if tiny else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3 if tiny else 10):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def flops(tcfg: configs.ModelConfig, draft_params: int, target_params: int, batch: int, T: int, window: int):
    """Analytic per-step flops (see the module docstring)."""
    tokens = batch * T
    N, H, D, V, L = tcfg.num_heads, tcfg.head_dim, tcfg.hidden_size, tcfg.vocab_size, tcfg.num_layers
    t = np.arange(T)
    self_keys = np.minimum(t + 1, window + 1).sum()
    cross_keys = np.maximum(t, 0).sum()  # lag >= 1: about t keys for query t
    causal_keys = (t + 1).sum()
    emb = tcfg.vocab_size * D * (1 if tcfg.tie_word_embeddings else 2)
    return {
        "draft_6nd": 6.0 * draft_params * tokens,
        "draft_attn": 3.0 * 4 * N * H * float(self_keys + cross_keys) * batch,
        "lm_head": 4.0 * D * V * tokens,
        "target_fwd": 2.0 * (target_params - emb) * tokens + 4.0 * N * H * float(causal_keys) * batch * L,
    }


def train_attention(args, T: int) -> str:
    """auto: the models' dense forward_train up to 4k tokens, train/chunked.py above (memory)."""
    if args.train_attention != "auto":
        return args.train_attention
    return "chunked" if T > 4096 else "model"


def bench_one(args, tcfg, T: int, mesh, peak: float) -> dict:
    cfg = from_dict({
        "model": {"target": "tiny" if args.tiny else args.preset, "target_dtype": "bfloat16",
                  "compute_dtype": "bfloat16", "window": args.window, "attention_impl": args.attention_impl},
        "data": {"seq_len": T},
        "train": {"batch_size": args.batch, "grad_accum": 1, "steps": 1000, "loss_chunk": args.loss_chunk,
                  "remat": args.remat, "log_target_loss": False, "attention": train_attention(args, T),
                  "attention_chunk": args.attention_chunk},
        "mesh": {"data": -1},
    })
    target, tcfg, _ = setup.build_target(cfg, mesh)
    draft = setup.build_draft(cfg, tcfg, mesh)
    fg, frozen = nnx.split(target)
    dg, params = nnx.split(draft)
    tx = step_lib.make_optimizer(cfg, 1000)
    state = setup.place_replicated(step_lib.init_state(params, tx, 0), mesh)
    bsh = setup.batch_sharding(mesh)
    fn = step_lib.jit_train_step(
        step_lib.make_train_step(cfg, dg, fg, tx, max_position_embeddings=tcfg.max_position_embeddings),
        setup.shardings_of(state), setup.shardings_of(frozen), {"tokens": bsh, "loss_mask": bsh})
    rng = np.random.default_rng(0)
    batch = {"tokens": jax.device_put(rng.integers(0, tcfg.vocab_size, (1, args.batch, T)).astype(np.int32), bsh),
             "loss_mask": jax.device_put(np.ones((1, args.batch, T), np.int32), bsh)}
    t0 = time.perf_counter()
    compiled = fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, frozen, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, frozen, batch)
        jax.block_until_ready((state.params, m))
        times.append(time.perf_counter() - t0)
    step_s = float(np.mean(times))
    fl = flops(tcfg, count(params), count(frozen), args.batch, T, args.window)
    tokens = args.batch * T
    return {
        "seq_len": T, "batch": args.batch, "tokens_per_step": tokens, "train_attention": train_attention(args, T),
        "compile_s": compile_s, "step_s_mean": step_s, "step_s_min": float(np.min(times)),
        "tokens_per_s": tokens / step_s, "loss": float(m["loss"]),
        "draft_params": count(params), "target_params": count(frozen),
        "flops": fl, "mfu": fl["draft_6nd"] / step_s / peak, "mfu_total": sum(fl.values()) / step_s / peak,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama3-8b", help="target shapes (exact preset name)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 1024 32768 (tiny: 64 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--attention-impl", default="xla", help="xla | pallas | auto")
    p.add_argument("--train-attention", default="auto", choices=["auto", "model", "chunked"],
                   help="train.attention: dense model forwards, or query-chunked (auto: chunked above 4k)")
    p.add_argument("--attention-chunk", type=int, default=1024, help="query rows per block for 'chunked'")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with configs.tiny_config()")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.tiny:
        args.window = min(args.window, 16)
        args.loss_chunk = min(args.loss_chunk, 32)
        args.steps = min(args.steps, 2)
    seq_lens = args.seq_lens or ([64, 128] if args.tiny else [1024, 32768])
    tcfg = configs.tiny_config() if args.tiny else configs.get_preset(args.preset).config
    mesh = setup.sharding.make_mesh(1, 1, 1)  # one device: the per-chip numbers the MFU is about
    peak = measure_peak(args.tiny)
    dev = jax.devices()[0]
    out = {
        "benchmark": "draft_train_step", "preset": "tiny" if args.tiny else args.preset,
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "jax": jax.__version__,
        "python": platform.python_version(), "command": " ".join([sys.executable, "-m", "bench.bench_train"] +
                                                                 list(argv if argv is not None else sys.argv[1:])),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peak_bf16_flops_measured": peak, "remat": args.remat, "attention_impl": args.attention_impl,
        "results": [],
    }
    for T in seq_lens:
        try:
            r = bench_one(args, tcfg, T, mesh, peak)
        except Exception as e:  # OOM at long T must not lose the other results
            r = {"seq_len": T, "batch": args.batch, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        out["results"].append(r)
        print(json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    kind = (getattr(dev, "device_kind", dev.platform) or dev.platform).replace(" ", "_")
    path = os.path.join(args.out, f"train_{kind}_{stamp}{'_tiny' if args.tiny else ''}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
