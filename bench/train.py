"""Draft-training throughput and MFU at a workload's target shapes (random weights, one device).

One step is the whole `train.step` program as `python -m train.run` compiles it: the frozen target's
forward, the draft's forward and backward with a random lag, the chunked float32 LM-head
cross-entropy and the AdamW update. The target is the workload's model with random bf16 weights
made on the device (no checkpoint read); the draft has float32 master weights and computes in bf16.
Compile time is reported apart from the steady-state step time (mean over --steps after one
warm-up step, each step synchronised).

FLOPs per step (T tokens = batch x sequence length; counted analytically, not from XLA):
  draft_6nd   6 x draft parameters x T                       (the MFU numerator)
  draft_attn  3 x (self-attention within the window + causal cross-attention), 4 N H per (query, key)
  lm_head     4 x D x V x T                                  (forward + gradient w.r.t. the draft's hidden)
  target_fwd  2 x target parameters (no embedding) x T + causal attention forward over L layers
MFU = draft_6nd / step time / matmul rate; mfu_total adds the other terms. The rate is the bf16
matmul rate measured on the device (`common.ceilings`), not a datasheet number.

    python -m bench train --workload llama3-8b
    python -m bench train --workload llama3-8b --seq-lens 1024 --remat full --steps 10
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from bench import common, workloads
from longspec_jax.train import build as setup
from longspec_jax.train import step as step_lib
from longspec_jax.train.config import from_dict


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "llama3-8b")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="default: the workload's train_seq_lens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    parser.add_argument("--attention-impl", default="xla", choices=["xla", "pallas", "auto"])
    parser.add_argument("--train-attention", default="auto", choices=["auto", "dense", "chunked", "flash"],
                        help="train.attention (auto: the dense model forwards up to 4k tokens, query-chunked above)")
    parser.add_argument("--attention-chunk", type=int, default=1024, help="query rows per block for 'chunked'")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


def flops(tcfg, draft_params: int, target_params: int, batch: int, T: int, window: int) -> dict:
    """Analytic FLOPs of one step (module docstring)."""
    tokens = batch * T
    N, H, D, V, L = tcfg.num_heads, tcfg.head_dim, tcfg.hidden_size, tcfg.vocab_size, tcfg.num_layers
    t = np.arange(T)
    self_keys = np.minimum(t + 1, window + 1).sum()
    cross_keys = t.sum()  # lag >= 1: about t keys for query t
    causal_keys = (t + 1).sum()
    emb = V * D * (1 if tcfg.tie_word_embeddings else 2)
    return {"draft_6nd": 6.0 * draft_params * tokens,
            "draft_attn": 3.0 * 4 * N * H * float(self_keys + cross_keys) * batch,
            "lm_head": 4.0 * D * V * tokens,
            "target_fwd": 2.0 * (target_params - emb) * tokens + 4.0 * N * H * float(causal_keys) * batch * L}


def train_attention(args, T: int) -> str:
    if args.train_attention != "auto":
        return args.train_attention
    return "chunked" if T > 4096 else "dense"


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def bench_one(args, wl, T: int, mesh, peak: float) -> dict:
    tiny = wl.model == "tiny"
    cfg = from_dict({
        "model": {"target": "tiny" if tiny else wl.model, "tiny": workloads.TINY if tiny else {},
                  "target_dtype": "bfloat16", "compute_dtype": "bfloat16", "window": args.window,
                  "attention_impl": args.attention_impl},
        "data": {"seq_len": T},
        "train": {"batch_size": args.batch, "grad_accum": 1, "steps": 1000, "loss_chunk": args.loss_chunk,
                  "remat": args.remat, "log_target_loss": False, "attention": train_attention(args, T),
                  "attention_chunk": args.attention_chunk},
        "mesh": {"data": -1},
    })
    target, tcfg, _ = setup.build_target(cfg, mesh)
    draft = setup.build_draft(cfg, tcfg, mesh)
    frozen_graph, frozen = nnx.split(target)
    draft_graph, params = nnx.split(draft)
    tx = step_lib.make_optimizer(cfg, 1000)
    state = setup.place_replicated(step_lib.init_state(params, tx, 0), mesh)
    bsh = setup.batch_sharding(mesh)
    fn = step_lib.jit_train_step(
        step_lib.make_train_step(cfg, draft_graph, frozen_graph, tx,
                                 max_position_embeddings=tcfg.max_position_embeddings),
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
    return {"seq_len": T, "batch": args.batch, "tokens_per_step": args.batch * T,
            "train_attention": train_attention(args, T), "compile_s": compile_s, "step_s_mean": step_s,
            "step_s_min": float(np.min(times)), "tokens_per_s": args.batch * T / step_s, "loss": float(m["loss"]),
            "draft_params": count(params), "target_params": count(frozen), "flops": fl,
            "mfu": fl["draft_6nd"] / step_s / peak, "mfu_total": sum(fl.values()) / step_s / peak}


def main(args) -> int:
    wl = workloads.get(args.workload)
    seq_lens = args.seq_lens or wl.train_seq_lens
    if not seq_lens:
        raise SystemExit(f"workload {args.workload!r} has no train_seq_lens; pass --seq-lens or pick one of "
                         f"{[n for n, w in workloads.WORKLOADS.items() if w.train_seq_lens]}")
    if wl.model == "demo":
        raise SystemExit("the train suite builds random targets at preset shapes; the demo pair's training is "
                         "`bash scripts/train_demo.sh` (longspec_jax/demo/MODEL_CARD.md)")
    if wl.model == "tiny":
        args.window, args.loss_chunk = min(args.window, 16), min(args.loss_chunk, 32)
    mesh = setup.sharding.make_mesh(1, 1, 1)  # one device: the per-chip numbers MFU is about
    peak = common.ceilings("bfloat16").matmul_flops
    record = common.header("train", args.workload, args.argv)
    record.update(matmul_flops=peak, remat=args.remat, attention_impl=args.attention_impl, rows=[])
    path = common.result_path(args.out, "train", args.workload)
    for T in seq_lens:
        try:
            row = bench_one(args, wl, T, mesh, peak)
        except Exception as e:  # out of memory at a long sequence must not lose the other rows
            row = {"seq_len": T, "batch": args.batch, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        record["rows"].append(row)
        common.write_json(path, record)
        common.log(f"seq {T}: " + (row.get("error") or (
            f"{row['tokens_per_s']:.0f} tokens/s, step {row['step_s_mean'] * 1e3:.1f} ms, MFU {row['mfu']:.3f} "
            f"(total {row['mfu_total']:.3f}), compile {row['compile_s']:.1f} s")))
    common.log(f"wrote {path}")
    return 1 if any("error" in r for r in record["rows"]) else 0
