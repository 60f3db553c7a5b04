"""Where the milliseconds of a speculative iteration go, at real model shapes (random weights, bf16
by default).

For each context length: the AR decode step (the real `infer.ar` while_loop), target verification
of several tree shapes, every draft level (root step and tree depths), the commit, and the whole
speculative iteration (the real `infer.speculative` while_loop with a random draft, so every
iteration accepts ~0 drafts and the loop time / iterations is the iteration cost). Every part runs
`--steps` times inside one while_loop, as the decoder runs it, so the parts add up to the iteration
(separately jitted calls would each pay launch and argument set-up). Each is compared with its
floor max(bytes / bandwidth, flops / matmul rate), both measured in the same run (`common.ceilings`).
Modelled speedup over AR for tau in {3.0, 3.5, 4.0} = tau * t_AR / t_iteration.
`--draft-vocab-sizes` adds the draft and the iteration with a draft-vocabulary cut;
`--profile-dir` keeps a Perfetto trace of one loop and a per-op summary in the JSON.

    python -m bench.bench_e2e --model llama3-8b --contexts 4096 32768 131072 --out bench/results

Writes bench/results/e2e_<model>_<device>_<impl>.json (plot: `python -m bench plot FILE`).
`--tiny` runs a tiny config on CPU as a smoke test. `--model longspec-demo --dtype float32` times the
demo pair's shapes (longspec_jax/demo) as CPUs run them:

    python -m bench.bench_e2e --model longspec-demo --dtype float32 --contexts 8192 \
        --trees "1 1 1 1" "1 1 1 1 1" "2 2 2 2" --loop-trees "1 1 1 1" --steps 32 --draft-vocab-sizes 2048
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from bench.common import random_cache, random_models, summarize_trace
from infer import ar, speculative
from infer.state import ARState
from longspec_jax import kv_cache as kvc
from longspec_jax import verify
from longspec_jax.configs import DraftConfig, get_preset, tiny_config
from longspec_jax.draft import DraftCache, head_columns, ring_capacity
from longspec_jax.sampling import SamplingParams
from longspec_jax.tree import TreeShape, expand, init_tree

DEFAULT_TREES = ("4 16 16 16 16", "4 8 8 8 8", "2 4 4 4 4", "1 1 1 1")


def param_count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", help="a preset name, or longspec-demo (the demo pair's shapes)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="parameters, compute and caches (float32: what CPUs run the demo pair in)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--trees", nargs="+", default=list(DEFAULT_TREES), help="trees whose verification is timed")
    p.add_argument("--loop-trees", nargs="*", default=[DEFAULT_TREES[0], DEFAULT_TREES[-1]],
                   help="trees whose draft levels and whole iteration are also timed (none: verification only)")
    p.add_argument("--impl", default="auto", help="attention implementation: auto | xla | pallas")
    p.add_argument("--steps", type=int, default=32, help="decode steps / iterations per timing")
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    p.add_argument("--profile-dir", default=None, help="write a jax.profiler trace of the iteration loop here")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--draft-levels", action="store_true",
                   help="time every draft level separately (one compile per level) instead of the whole draft")
    p.add_argument("--deadline", type=int, default=0, help="dump stacks and exit after this many seconds")
    p.add_argument("--draft-vocab-sizes", type=int, nargs="*", default=[],
                   help="also time the draft and the whole iteration of the loop trees with a draft vocabulary "
                        "of this many ids (FR-Spec style LM-head cut; which ids does not change the cost)")
    args = p.parse_args(argv)
    if args.deadline:
        import faulthandler

        faulthandler.dump_traceback_later(args.deadline, exit=True)

    dev = jax.devices()[0]
    device_name = getattr(dev, "device_kind", dev.platform)
    if args.tiny:
        cfg = tiny_config(vocab_size=512)
        dcfg = DraftConfig.from_target(cfg)
        args.contexts = [c for c in args.contexts if c <= 2048] or [256, 1024]
    elif args.model == "longspec-demo":  # the shipped pair's configs (its draft's MLP width)
        from longspec_jax import demo
        from longspec_jax.configs import from_hf_config
        from longspec_jax.draft_weights import draft_config_from_hf

        cfg = from_hf_config(demo.TARGET_DIR)
        dcfg = draft_config_from_hf(demo.DRAFT_DIR)
    else:
        cfg = get_preset(args.model).config
        dcfg = DraftConfig.from_target(cfg)
    dtype = jnp.dtype(args.dtype)
    isz = dtype.itemsize
    from pallas_kernels import default_implementation

    impl = default_implementation() if args.impl == "auto" else args.impl
    print(f"device={device_name} jax={jax.__version__} model={args.model} impl={impl}", flush=True)

    ceil = common.ceilings(args.dtype)
    bw, peak = ceil.bandwidth_Bps, ceil.matmul_flops
    args.ceilings = {"copy_bandwidth_Bps": ceil.copy_Bps, "read_bandwidth_Bps": ceil.read_Bps,
                     "gemv_bandwidth_Bps": ceil.gemv_Bps}
    print(f"memory bandwidth {bw / 1e12:.3f} TB/s (copy {ceil.copy_Bps / 1e12:.3f}, read {ceil.read_Bps / 1e12:.3f}, "
          f"gemv {ceil.gemv_Bps / 1e12:.3f}), {args.dtype} matmul {peak / 1e12:.3f} TFLOP/s", flush=True)

    target, draft = random_models(cfg, dcfg, impl, dtype=dtype)
    t_graph, t_state = nnx.split(target)
    d_graph, d_state = nnx.split(draft)
    w_bytes = common.param_bytes(target)  # embedding table excluded: decode gathers one row
    n_params = param_count(target)
    d_bytes = common.param_bytes(draft, skip_embedding=False)
    head_bytes = cfg.hidden_size * cfg.vocab_size * isz
    L, K, H, N = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    kv_bytes_per_token = 2 * L * K * H * isz
    greedy = SamplingParams()
    steps = args.steps
    rows = []

    for ctx in args.contexts:
        row = {"context": ctx}
        cap = ctx + 2 * steps * 8 + 512
        cache = random_cache(cfg, cap, jax.random.key(ctx), dtype)
        lengths = jnp.full((1,), ctx, jnp.int32)

        # ---- AR decode: the real infer.ar while_loop, `steps` tokens from context ctx (state donated).
        ar_state = ARState(tokens=jnp.zeros((1, steps + 1), jnp.int32), num_tokens=jnp.ones((1,), jnp.int32),
                           step=jnp.int32(1), limit=jnp.int32(steps + 1), last_token=jnp.full((1,), 7, jnp.int32),
                           lengths=jnp.full((1,), ctx, jnp.int32), done=jnp.zeros((1,), bool), key=jax.random.key(0), cache=cache)

        def ar_once(st):
            st = st.replace(step=jnp.int32(1), lengths=jnp.full((1,), ctx, jnp.int32), done=jnp.zeros((1,), bool))
            return ar._decode_jit(t_graph, t_state, st, jnp.int32(steps + 1), sampling=greedy, eos_ids=(), pad_id=0)

        t_loop, ar_state = common.time_carry(ar_once, ar_state)
        t_ar = t_loop / steps
        if args.profile_dir and ctx == args.contexts[min(1, len(args.contexts) - 1)]:
            pdir = os.path.join(args.profile_dir, f"ctx{ctx}_ar")
            jax.profiler.start_trace(pdir, create_perfetto_trace=True)
            ar_state = jax.block_until_ready(ar_once(ar_state))
            jax.profiler.stop_trace()
            row["ar_profile"] = summarize_trace(pdir, steps)
            print(f"  AR profile: {row['ar_profile'].get('device_ms_per_iteration', math.nan):.3f} device ms, "
                  f"{row['ar_profile'].get('ops_per_iteration', math.nan):.0f} ops per step; top: " + ", ".join(
                      f"{o['name'][:40]} {o['ms_per_iteration'] * 1e3:.1f} us x{o['per_iteration']:.0f}"
                      for o in row["ar_profile"].get("ops", [])[:10]), flush=True)
        cache = ar_state.cache
        ar_bytes = w_bytes + ctx * kv_bytes_per_token
        row["ar_ms"] = t_ar * 1e3
        row["ar_floor_ms"] = ar_bytes / bw * 1e3
        row["ar_vs_floor"] = t_ar / (ar_bytes / bw)
        print(f"ctx {ctx}: AR {t_ar * 1e3:.3f} ms/token, floor {ar_bytes / bw * 1e3:.3f} ms "
              f"({row['ar_vs_floor']:.2f}x)", flush=True)

        row["trees"] = {}
        for tree_str in args.trees:
            shape = TreeShape.parse(tree_str)
            Nn = shape.num_nodes
            tr = {"nodes": Nn}

            # A valid random tree (beam search over random draft scores).
            @jax.jit
            def make_tree(key):
                tree = init_tree(shape, jnp.full((1,), 5, jnp.int32))
                for lvl in range(shape.depth):
                    n = shape.level_sizes[lvl]
                    logq = jax.nn.log_softmax(jax.random.normal(jax.random.fold_in(key, lvl), (1, n, cfg.vocab_size)))
                    tree = expand(tree, shape, lvl, logq)
                return tree

            t0 = time.perf_counter()
            tree = jax.block_until_ready(make_tree(jax.random.key(1)))
            print(f"  [tree {tree_str}: built in {time.perf_counter() - t0:.1f} s]", flush=True)

            # ---- target verification: one forward over the Nn tree tokens + LM head + target choices,
            # `steps` times inside one while_loop (as in the decode loop: no per-call launch or
            # argument set-up in the time). The tokens depend on the carry so nothing is hoisted.
            @functools.partial(jax.jit, donate_argnums=(1,))
            def verify_loop(t_state, cache, tree):
                tgt = nnx.merge(t_graph, t_state)
                pos = tree.positions(shape, lengths)

                def body(i, carry):
                    cache, acc = carry
                    toks = jnp.where(acc[:, None] < 0, 0, tree.tokens)
                    h, cache = tgt(toks, pos, cache, lengths, tree.mask)
                    ch = verify.target_choices(jax.random.key(0), tgt.logits(h), greedy)
                    return cache, acc + verify.accept(tree, shape, ch).num_accepted

                return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((1,), jnp.int32)))

            t0 = time.perf_counter()
            cache, _ = jax.block_until_ready(verify_loop(t_state, cache, tree))
            print(f"  [verify compile+run {time.perf_counter() - t0:.1f} s]", flush=True)
            t_ver, (cache, _) = common.time_carry(lambda c: verify_loop(t_state, c[0], tree), (cache, None))
            t_ver /= steps
            v_bytes = ar_bytes
            v_flops = 2 * n_params * Nn + 4 * N * H * ctx * Nn * L
            v_floor = max(v_bytes / bw, v_flops / peak)
            tr.update(verify_ms=t_ver * 1e3, verify_floor_ms=v_floor * 1e3, verify_vs_floor=t_ver / v_floor,
                      verify_vs_ar=t_ver / t_ar, verify_tflops=v_flops / t_ver / 1e12)

            row["trees"][tree_str] = tr
            write_json(args, argv, device_name, impl, bw, peak, w_bytes, d_bytes, rows + [row])
            print(f"  tree {tree_str:>16} ({Nn} nodes): verify {t_ver * 1e3:.3f} ms ({t_ver / t_ar:.2f}x AR, "
                  f"{t_ver / v_floor:.2f}x floor)", flush=True)
            if tree_str not in args.loop_trees:
                continue

            # ---- draft levels: time the first l levels for l = 1..D; level cost = difference.
            ring = DraftCache.init(dcfg, 1, ring_capacity(dcfg.window, shape.max_accept), dtype)
            ring = ring.write(*[jax.random.normal(jax.random.key(9), (1, ring.capacity, K, H), dtype)] * 2,
                              ctx - ring.capacity + jnp.arange(ring.capacity)[None], jnp.ones((1, ring.capacity), bool))
            prev = 0.0
            levels = []
            for lvl in (range(1, shape.depth + 1) if args.draft_levels else [shape.depth]):
                sub = TreeShape(shape.widths[:lvl]) if lvl < shape.depth else shape

                @jax.jit
                def draft_levels(t_state, d_state, cache, ring, vocab=None, sub=sub):
                    # `steps` drafts in one while_loop, each rooted at a token of the previous one.
                    tgt = nnx.merge(t_graph, t_state)
                    dr = nnx.merge(d_graph, d_state)

                    def body(i, root):
                        st = speculative.SpecState(
                            cache=cache, ring=ring, committed=lengths, root=root,
                            out=jnp.zeros((1, 8), jnp.int32), out_len=jnp.zeros((1,), jnp.int32),
                            max_new=jnp.int32(1), eos_ids=jnp.full((4,), -1, jnp.int32), done=jnp.zeros((1,), bool),
                            stop_reason=jnp.zeros((1,), jnp.int32), key=jax.random.key(0),
                            iters=jnp.zeros((1,), jnp.int32), accept_hist=jnp.zeros((1, 8), jnp.int32))
                        tree, *_ = speculative._draft_tree(tgt, dr, st, sub, vocab)
                        return tree.tokens[:, -1]

                    return jax.lax.fori_loop(0, steps, body, jnp.full((1,), 5, jnp.int32))

                t0 = time.perf_counter()
                jax.block_until_ready(draft_levels(t_state, d_state, cache, ring))
                print(f"  [draft ({lvl} levels) compile+run {time.perf_counter() - t0:.1f} s]", flush=True)
                t_l = common.timeit(draft_levels, t_state, d_state, cache, ring) / steps
                levels.append((t_l - prev) * 1e3)
                prev = t_l
            tr["draft_level_ms"] = levels
            tr["draft_ms"] = prev * 1e3
            step_bytes = d_bytes + head_bytes + ctx * K * H * 2 * isz
            tr["draft_step_floor_ms"] = step_bytes / bw * 1e3

            # ---- the whole iteration: the real decode loop, random draft (accepts ~0 per iteration).
            spec_static = speculative._Static(shape, greedy, 64, 4)

            G = shape.max_accept
            spec_state = speculative.SpecState(
                cache=cache, ring=ring, committed=jnp.full((1,), ctx, jnp.int32), root=jnp.full((1,), 5, jnp.int32),
                out=jnp.zeros((1, 64 + G), jnp.int32), out_len=jnp.ones((1,), jnp.int32),
                max_new=jnp.int32(steps + 1), eos_ids=jnp.full((4,), -1, jnp.int32),
                done=jnp.zeros((1,), bool), stop_reason=jnp.zeros((1,), jnp.int32), key=jax.random.key(0),
                iters=jnp.zeros((1,), jnp.int32), accept_hist=jnp.zeros((1, G), jnp.int32))

            def spec_once(st):
                st = st.replace(committed=jnp.full((1,), ctx, jnp.int32), out_len=jnp.ones((1,), jnp.int32), done=jnp.zeros((1,), bool),
                                stop_reason=jnp.zeros((1,), jnp.int32), iters=jnp.zeros((1,), jnp.int32))
                return speculative._decode_loop(t_state, d_state, st, t_graph=t_graph, d_graph=d_graph,
                                                st=spec_static)

            t0 = time.perf_counter()
            spec_state = jax.block_until_ready(spec_once(spec_state))
            print(f"  [loop compile+run {time.perf_counter() - t0:.1f} s]", flush=True)
            t_spec, spec_state = common.time_carry(spec_once, spec_state)
            cache, ring = spec_state.cache, spec_state.ring
            iters = int(spec_state.iters[0])
            t_iter = t_spec / max(iters, 1)
            tr.update(iteration_ms=t_iter * 1e3, iteration_vs_ar=t_iter / t_ar, iterations_timed=iters,
                      rest_of_iteration_ms=(t_iter - t_ver - prev) * 1e3,
                      modelled_speedup={str(tau): tau * t_ar / t_iter for tau in (3.0, 3.5, 4.0)})
            print(f"  tree {tree_str:>16}: draft {prev * 1e3:.3f} ms {['%.3f' % x for x in levels]}, iteration "
                  f"{t_iter * 1e3:.3f} ms ({t_iter / t_ar:.2f}x AR) -> speedup@tau3.5 {3.5 * t_ar / t_iter:.2f}x",
                  flush=True)
            write_json(args, argv, device_name, impl, bw, peak, w_bytes, d_bytes, rows + [row])

            # ---- the commit alone: accept + KV compaction + ring write, as in the loop body.
            commit_fn = commit_step(shape, cfg.vocab_size, steps)
            t_commit, (cache, ring) = common.time_carry(lambda cr: commit_fn(cr[0], cr[1], tree, jax.random.key(3))[:2],
                                                 (cache, ring))
            t_commit /= steps
            spec_state = spec_state.replace(cache=cache, ring=ring)
            tr["commit_ms"] = t_commit * 1e3
            print(f"  tree {tree_str:>16}: commit (target choices + accept + compaction + ring write) "
                  f"{t_commit * 1e3:.3f} ms", flush=True)

            if args.profile_dir and ctx == args.contexts[min(1, len(args.contexts) - 1)]:
                # Every loop tree at one context: a trace per tree, ops and time per phase.
                pdir = os.path.join(args.profile_dir, f"ctx{ctx}_" + "-".join(map(str, shape.widths)))
                text = speculative._decode_loop.lower(t_state, d_state, spec_state, t_graph=t_graph, d_graph=d_graph,
                                                      st=spec_static).compile().as_text()
                os.makedirs(pdir, exist_ok=True)
                with open(os.path.join(pdir, "loop.hlo.txt"), "w") as f:
                    f.write(text)
                jax.profiler.start_trace(pdir, create_perfetto_trace=True)
                spec_state = spec_once(spec_state)
                jax.block_until_ready(spec_state)
                jax.profiler.stop_trace()
                cache, ring = spec_state.cache, spec_state.ring
                summ = summarize_trace(pdir, int(spec_state.iters[0]), compiled_text=text)
                tr["profile"] = {"dir": pdir, "iterations": int(spec_state.iters[0]), "top_ops": summ}
                print(f"  tree {tree_str:>16}: profile {summ.get('device_ms_per_iteration', math.nan):.3f} device ms, "
                      f"{summ.get('ops_per_iteration', math.nan):.0f} ops per iteration; " + ", ".join(
                          f"{ph} {v['ms_per_iteration']:.3f} ms / {v['ops_per_iteration']:.0f} ops"
                          for ph, v in summ.get("phases", {}).items()), flush=True)
                write_json(args, argv, device_name, impl, bw, peak, w_bytes, d_bytes, rows + [row])
            # ---- draft vocabulary cuts: the draft and the whole iteration with V' head columns.
            for vsize in args.draft_vocab_sizes:
                ids = jnp.arange(vsize, dtype=jnp.int32) * (cfg.vocab_size // vsize)
                vocab = (ids, jax.jit(lambda ts, i: head_columns(nnx.merge(t_graph, ts), i))(t_state, ids))
                t0 = time.perf_counter()
                jax.block_until_ready(draft_levels(t_state, d_state, cache, ring, vocab))
                print(f"  [draft V'={vsize} compile+run {time.perf_counter() - t0:.1f} s]", flush=True)
                t_dv = common.timeit(draft_levels, t_state, d_state, cache, ring, vocab) / steps

                def spec_once_v(st, vocab=vocab):
                    st = st.replace(committed=jnp.full((1,), ctx, jnp.int32), out_len=jnp.ones((1,), jnp.int32),
                                    done=jnp.zeros((1,), bool), stop_reason=jnp.zeros((1,), jnp.int32),
                                    iters=jnp.zeros((1,), jnp.int32))
                    return speculative._decode_loop(t_state, d_state, st, vocab, t_graph=t_graph, d_graph=d_graph,
                                                    st=spec_static)

                spec_state = jax.block_until_ready(spec_once_v(spec_state))
                t_sv, spec_state = common.time_carry(spec_once_v, spec_state)
                cache, ring = spec_state.cache, spec_state.ring
                t_iv = t_sv / max(int(spec_state.iters[0]), 1)
                dv = tr.setdefault("draft_vocab", {})
                dv[str(vsize)] = dict(draft_ms=t_dv * 1e3, iteration_ms=t_iv * 1e3, iteration_vs_ar=t_iv / t_ar,
                                      head_bytes=cfg.hidden_size * vsize * isz,
                                      modelled_speedup={str(tau): tau * t_ar / t_iv for tau in (3.0, 3.5, 4.0)})
                del vocab
                print(f"  tree {tree_str:>16}: draft vocab {vsize}: draft {t_dv * 1e3:.3f} ms, iteration "
                      f"{t_iv * 1e3:.3f} ms ({t_iv / t_ar:.2f}x AR)", flush=True)
                write_json(args, argv, device_name, impl, bw, peak, w_bytes, d_bytes, rows + [row])

        rows.append(row)
        del cache

    write_json(args, argv, device_name, impl, bw, peak, w_bytes, d_bytes, rows)
    print("\ncontext  AR_ms  floor  tree              verify_ms  v/AR  draft_ms  iter_ms  iter/AR  speedup@3.4")
    for r in rows:
        for t, tr in r["trees"].items():
            it = tr.get("iteration_ms", math.nan)
            print(f"{r['context']:>7} {r['ar_ms']:6.2f} {r['ar_floor_ms']:6.2f}  {t:<16} {tr['verify_ms']:9.2f} "
                  f"{tr['verify_vs_ar']:5.2f} {tr.get('draft_ms', math.nan):9.2f} {it:8.2f} "
                  f"{it / r['ar_ms']:7.2f} {3.4 * r['ar_ms'] / it:8.2f}")
    return 0


def commit_step(shape, vocab_size, steps):
    """jit(cache, ring, tree, key): `steps` times (one while_loop) the loop body's work after the
    verification forward: target choices from (random) logits, acceptance, KV compaction of the
    accepted path, ring write."""
    greedy = SamplingParams()

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # caches updated in place, as in the loop
    def run(cache, ring, tree, key):
        B, Nn = tree.tokens.shape
        logits = jax.random.normal(key, (B, Nn, vocab_size), jnp.float32)  # drawn once, outside the loop
        return jax.lax.fori_loop(0, steps, lambda i, c: one(*c, tree, logits, jax.random.fold_in(key, i)),
                                 (cache, ring, tree.tokens[:, :shape.max_accept]))

    def one(cache, ring, prev, tree, logits, key):
        B, Nn = tree.tokens.shape
        logits = jnp.where(prev[:, :1, None] < 0, 0.0, logits)  # depends on the carry: not hoisted
        ch = verify.target_choices(key, logits, greedy)
        acc = verify.accept(tree, shape, ch)
        k = acc.num_accepted
        c = jnp.full((B,), cache.capacity // 2, jnp.int32)
        if not shape.is_chain:  # as in the loop: a chain's accepted rows are already in place
            cache = kvc.compact(cache, c, acc.path, k + 1)
        K, H = ring.k.shape[-2:]
        tree_kv = jax.random.normal(key, (B, Nn, K, H), ring.k.dtype)
        path_kv = jnp.take_along_axis(tree_kv, acc.path[:, :, None, None], axis=1)
        j = jnp.arange(shape.max_accept)[None, :]
        ring = ring.write(path_kv, path_kv, c[:, None] + j, j <= k[:, None])
        return cache, ring, acc.tokens

    return run


def write_json(args, argv, device_name, impl, bw, peak, w_bytes, d_bytes, rows):
    """Write (or rewrite) the result file; called after every tree so a time-limited run keeps its data."""
    tag = "tiny" if args.tiny else args.model
    command = ["python", "-m", "bench.bench_e2e", *(sys.argv[1:] if argv is None else argv)]
    result = {
        **common.header("e2e", tag, command),
        "benchmark": "e2e_speculative_step",
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "model_shapes": tag,
        "weights": f"random {args.dtype}",
        "attention_impl": impl,
        "memory_bandwidth_Bps": bw,  # max of the three rates below: the floors use it
        **getattr(args, "ceilings", {}),
        "matmul_peak_flops": peak,
        "target_weight_bytes_excl_embedding": w_bytes,
        "draft_param_bytes": d_bytes,
        "command": " ".join(command),
        "rows": rows,
    }
    path = os.path.join(args.out, f"e2e_{tag}_{device_name.replace(' ', '_')}_{impl}.json")
    common.write_json(path, result)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
