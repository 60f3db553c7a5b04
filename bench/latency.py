"""Where the milliseconds of decoding go, at a workload's model shapes with random weights.

Per context C, on a state at C committed tokens whose cache a chunked prefill of random tokens filled:
  prefill     that prefill (`longspec_jax.infer.runtime.prefill`): tokens/s against its compute floor
              (--prefill-chunks: the same prompt again in other chunk widths)
  ar          an AR step: `DecodeLoop(None)` run --steps steps in one `run_jit` while_loop
and per tree of the workload (Nn nodes):
  verify      one target forward over the tree's Nn tokens at C, LM head included
and for the loop trees (--loop-trees; default the workload's first tree) also:
  draft       the tree's D draft levels (`DecodeLoop.draft_tree`); each level apart with --draft-levels
  commit      acceptance, KV compaction of the accepted path and the ring write
  iteration   the whole step: `DecodeLoop(tree)` in `run_jit` with the random draft (which accepts
              about nothing, so the loop's time over its iterations is the cost of one iteration)
  draft_vocab the draft and the iteration again with each draft-vocabulary cut of the workload
Every part runs --steps times inside one jitted loop as the decoder runs it (separate calls would
each pay a launch), so the parts add up to the iteration; the median of 5 timings is reported.
Floors are max(bytes / bandwidth, FLOPs / matmul rate), both rates measured in the same process
(`common.ceilings`); on a mesh, bytes and FLOPs are split evenly over its devices. The modelled
speedup is tau x AR step / iteration at the workload's tau (or --tau).

--tensor-parallel N  the same on an N-device mesh (`longspec_jax.sharding.tensor_parallel_mesh`).
--profile DIR        a profiler trace of the AR loop and of each loop tree's iteration at every
                     context, summarised per op and per phase (the loop's named scopes).

    python -m bench latency --workload llama3-8b-32k
    python -m bench latency --workload qwq-32b-32k --tensor-parallel 2
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bench import common, workloads
from longspec_jax.infer import runtime
from longspec_jax.infer.loop import DecodeLoop, run_jit
from longspec_jax.infer.state import DecodeState
from longspec_jax import kv_cache, sharding, verify
from longspec_jax.draft import ring_capacity
from longspec_jax.draft_vocab import head_columns
from longspec_jax.transformer import fuse_projections
from longspec_jax.tree import TreeShape
from pallas_kernels import default_implementation


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "llama3-8b-32k")
    parser.add_argument("--contexts", type=int, nargs="+", help="default: the workload's")
    parser.add_argument("--trees", nargs="+", help='trees to verify, e.g. "4 16 16 16 16" (default: the workload\'s)')
    parser.add_argument("--loop-trees", nargs="*", help="trees whose draft, commit and iteration are timed too "
                        "(default: the first tree; none given: verification only)")
    parser.add_argument("--draft-vocab-sizes", type=int, nargs="*", help="default: the workload's")
    parser.add_argument("--draft-levels", action="store_true", help="time each draft level (a compile per level)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed loop")
    parser.add_argument("--tau", type=float, help="acceptance length of the modelled speedup (default: the workload's)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="devices of the mesh")
    parser.add_argument("--profile", metavar="DIR", help="write profiler traces here; summaries go in the JSON")
    parser.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "pallas"))
    parser.add_argument("--prefill-chunk", type=int, default=None, help="default: runtime.default_prefill_chunk()")
    parser.add_argument("--prefill-chunks", type=int, nargs="*", default=[],
                        help="also time the prefill at these chunk widths (a compile each)")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def restart(st: DecodeState, ctx: int) -> DecodeState:
    """The state back at `ctx` committed tokens with nothing emitted (the caches are left as they are)."""
    zero = jnp.zeros_like(st.committed)
    return st.replace(committed=zero + ctx, out_len=zero, iters=zero, stop_reason=zero, done=st.done & False)


class Bench:
    """The models (split once), where small arrays go, the ceilings, and one method per timed part."""

    def __init__(self, args, wl):
        cfg, dcfg = self.cfg, self.dcfg = wl.configs()
        self.dtype, self.steps, self.args = jnp.dtype(wl.dtype), args.steps, args
        self.impl = default_implementation() if args.attention_impl == "auto" else args.attention_impl
        self.n = args.tensor_parallel
        self.mesh = sharding.tensor_parallel_mesh(self.n) if self.n > 1 else None
        # Small arrays: the default device, or replicated over the mesh.
        self.put = functools.partial(jax.device_put, device=self.mesh and NamedSharding(self.mesh, PartitionSpec()))
        self.ceil = common.ceilings(wl.dtype)
        self.target, draft = common.random_models(cfg, dcfg, self.impl, dtype=self.dtype, mesh=self.mesh)
        # Fused q|k|v and gate|up projections, as `Decoder` runs the models.
        fuse_projections(self.target)
        fuse_projections(draft)
        self.t_graph, self.t_state = nnx.split(self.target)
        self.d_graph, self.d_state = nnx.split(draft)
        self.w_bytes = common.param_bytes(self.target)  # a decode step gathers one embedding row
        self.d_bytes = common.param_bytes(draft, skip_embedding=False)
        self.params = self.w_bytes // self.dtype.itemsize
        self.kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize  # K, V; all layers

    def floor_ms(self, nbytes, flops=0.0):
        return self.ceil.floor_s(nbytes / self.n, flops / self.n) * 1e3

    def state(self, ctx, trees):
        """A state at `ctx` committed tokens with room for --steps steps of any of `trees`, and a ring
        of random K/V (`prefill` fills the cache)."""
        cfg, G, nodes = self.cfg, max(t.max_accept for t in trees), max(t.num_nodes for t in trees)
        padded, _ = runtime.prompt_bucket(ctx, self.args.prefill_chunk)
        cap = max(-(-(ctx + self.steps * G + nodes) // 128) * 128, padded)  # the Pallas kernels read 128-slot blocks
        kv = None if self.mesh is None else sharding.cache_sharding(
            self.mesh, shape=(1, cap, cfg.num_kv_heads, cfg.head_dim))
        # The decoder's ring size: 128-slot blocks for the Pallas kernels, 8 for XLA.
        slots = ring_capacity(self.dcfg.window, G, 8 if self.impl == "xla" else 128)
        st = DecodeState.initial(cfg, batch=1, capacity=cap, out_size=self.steps * G, max_accept=G, ring_slots=slots,
                                 draft_cfg=self.dcfg, committed=ctx, dtype=self.dtype, cache_sharding=kv)
        keys = iter(jax.random.split(jax.random.key(ctx), 2))
        ring = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), st.ring)
        if self.mesh is not None:
            ring = jax.tree.map(lambda x: jax.device_put(x, sharding.cache_sharding(self.mesh, shape=x.shape)), ring)
            st = jax.tree.map(self.put, st.replace(cache=None, ring=None)).replace(cache=st.cache)
        return st.replace(ring=ring)

    def prefill(self, st, ctx, chunk=None):
        """(state with its cache prefilled by `ctx` random tokens in chunks of `chunk` (default
        --prefill-chunk), the row's prefill fields)."""
        cfg = self.cfg
        padded, chunk = runtime.prompt_bucket(ctx, chunk or self.args.prefill_chunk)
        tokens = runtime.padded_tokens([np.random.default_rng(ctx).integers(0, cfg.vocab_size, ctx)], padded)
        cache, compiler = st.cache, runtime.Compiler()
        for _ in range(2):  # the first call compiles and warms up
            t0 = time.perf_counter()
            cache, hidden = runtime.prefill(compiler, self.t_graph, self.t_state, cache, tokens,
                                            np.array([ctx], np.int32), chunk, hidden_size=cfg.hidden_size, put=self.put)
            jax.block_until_ready(hidden)
            seconds = time.perf_counter() - t0
        # The weights without the LM head (a prefill keeps hidden states only), and causal attention.
        body = self.params - (0 if cfg.tie_word_embeddings else cfg.hidden_size * cfg.vocab_size)
        floor = self.floor_ms(0, 2 * body * ctx + 2 * cfg.num_heads * cfg.head_dim * cfg.num_layers * ctx * (ctx + 1))
        return st.replace(cache=cache), dict(prefill_s=seconds, prefill_tokens_per_s=ctx / seconds,
                                             prefill_floor_s=floor / 1e3, prefill_vs_floor=seconds / floor * 1e3,
                                             prefill_compile_s=compiler.seconds)

    def loop(self, st, ctx, tree, vocab=None, profile=None):
        """(ms per step, state, profile summary) of `DecodeLoop(tree)` run --steps steps by `run_jit`."""
        ring = st.ring
        st = st if tree else st.replace(ring=None)  # AR: the target alone
        statics = dict(loop=DecodeLoop(tree), t_graph=self.t_graph, d_graph=self.d_graph if tree else None)
        args = (self.t_state, self.d_state if tree else None)
        budget = (vocab, self.put(np.int32(self.steps)), self.put(np.bool_(False)))

        def once(s):
            return run_jit(*args, restart(s, ctx), *budget, **statics)

        t, st = common.time_carry(once, st)
        iters, summary = int(st.iters[0]), None
        if profile:
            text = run_jit.lower(*args, st, *budget, **statics).compile().as_text()
            jax.profiler.start_trace(profile)
            st = jax.block_until_ready(once(st))
            jax.profiler.stop_trace()
            summary = common.summarize_trace(profile, iters, compiled_text=text)
        return t / max(iters, 1) * 1e3, st if tree else st.replace(ring=ring), summary

    def draft(self, st, shape: TreeShape, vocab=None):
        """ms of the tree's draft levels: --steps trees in one loop, each rooted at the last one's token."""
        graphs, loop, steps = (self.t_graph, self.d_graph), DecodeLoop(shape), self.steps

        @jax.jit
        def run(t_state, d_state, st, vocab):
            target, draft = nnx.merge(graphs[0], t_state), nnx.merge(graphs[1], d_state)
            return jax.lax.fori_loop(0, steps, lambda _, root: loop.draft_tree(
                target, draft, st.replace(root=root), vocab)[0].tokens[:, -1], st.root)

        return common.timeit(run, self.t_state, self.d_state, st, vocab) / steps * 1e3

    def verify(self, st, tree, positions):
        """(ms, state): one target forward over the tree's tokens at the committed length, with the LM
        head and a greedy choice per node (the next forward's tokens depend on it: nothing is hoisted)."""
        graph, steps = self.t_graph, self.steps

        @functools.partial(jax.jit, donate_argnums=1)
        def run(t_state, cache, committed):
            target = nnx.merge(graph, t_state)

            def body(_, carry):
                cache, prev = carry
                h, cache = target(jnp.where(prev[:, None] < 0, 0, tree.tokens), positions, cache, committed, tree.mask)
                return cache, jnp.argmax(target.logits(h), axis=-1).sum(axis=1)

            return jax.lax.fori_loop(0, steps, body, (cache, committed))[0]

        t, cache = common.time_carry(lambda c: run(self.t_state, c, st.committed), st.cache)
        return t / steps * 1e3, st.replace(cache=cache)

    def commit(self, st, shape: TreeShape, drafted):
        """(ms, state): the iteration's work after verification as `DecodeLoop.step` does it in its
        "accept" and "commit" scopes: target choices from random logits, acceptance, KV compaction of
        the accepted path (not for a chain: its path is in place), the draft ring write."""
        tree, _, tree_k, tree_v, _ = drafted
        steps, V, G = self.steps, self.cfg.vocab_size, shape.max_accept

        @functools.partial(jax.jit, donate_argnums=0)
        def run(st, key):
            logits = jax.random.normal(key, tree.tokens.shape + (V,), jnp.float32)
            c, j = st.committed, jnp.arange(G)[None, :]

            def body(i, s):
                lg = jnp.where(s.root[:, None, None] < 0, 0.0, logits)  # depends on the carry: not hoisted
                acc = verify.accept(tree, shape, verify.target_choices(jax.random.fold_in(key, i), lg, s.sampling))
                cache = s.cache if shape.is_chain else kv_cache.compact(s.cache, c, acc.path, acc.num_accepted + 1)
                path = acc.path[:, :, None, None]
                ring = s.ring.write(jnp.take_along_axis(tree_k, path, 1), jnp.take_along_axis(tree_v, path, 1),
                                    c[:, None] + j, j <= acc.num_accepted[:, None])
                return s.replace(cache=cache, ring=ring, root=acc.tokens[:, 0])

            return jax.lax.fori_loop(0, steps, body, st)

        t, st = common.time_carry(lambda s: run(s, jax.random.key(3)), st)
        return t / steps * 1e3, st

    def draft_floor_ms(self, ctx, shape: TreeShape, vocab_size: int, ring_slots: int):
        """Per level: the draft's weights, the head's V' columns, the target's last-layer cache (the
        cross-attention's keys) and the ring read once; every row of the level costs its FLOPs."""
        cfg, isz = self.cfg, self.dtype.itemsize
        head, keys = cfg.hidden_size * vocab_size, ctx + ring_slots
        nbytes = self.d_bytes + head * isz + keys * 2 * cfg.num_kv_heads * cfg.head_dim * isz
        flops_row = 2 * (self.d_bytes // isz + head) + 4 * cfg.num_heads * cfg.head_dim * keys
        return sum(self.floor_ms(nbytes, flops_row * n) for n in shape.level_sizes)


def measure_context(b: Bench, ctx, trees, loop_trees, vocab_sizes, tau, save):
    """One row: prefill, AR, and every tree's parts at context `ctx`; `save(row)` after each part."""
    cfg, prof = b.cfg, b.args.profile
    st, row = b.prefill(b.state(ctx, trees), ctx)
    row = {"context": ctx, **row}
    for chunk in b.args.prefill_chunks:  # the same prompt in other chunk widths (the cache is rewritten alike)
        st, other = b.prefill(st, ctx, chunk)
        row.setdefault("prefill_by_chunk", {})[str(chunk)] = other
        common.log(f"ctx {ctx}: prefill in chunks of {chunk}: {other['prefill_s']:.3f} s "
                   f"({other['prefill_vs_floor']:.2f}x floor), compile {other['prefill_compile_s']:.1f} s")
    ar_ms, st, row["ar_profile"] = b.loop(st, ctx, None, profile=prof and os.path.join(prof, f"ctx{ctx}_ar"))
    ar_floor = b.floor_ms(b.w_bytes + ctx * b.kv_token)
    row.update(ar_ms=ar_ms, ar_floor_ms=ar_floor, ar_vs_floor=ar_ms / ar_floor, trees={})
    common.log(f"ctx {ctx}: prefill {row['prefill_tokens_per_s']:.0f} tokens/s ({row['prefill_vs_floor']:.2f}x "
               f"floor); AR {ar_ms:.3f} ms/step, floor {ar_floor:.3f} ({ar_ms / ar_floor:.2f}x)")
    save(row)
    for shape in trees:
        # A real tree at this context: the random draft's beam search from the state's root.
        drafted = jax.jit(lambda ts, ds, s, shape=shape: DecodeLoop(shape).draft_tree(
            nnx.merge(b.t_graph, ts), nnx.merge(b.d_graph, ds), s))(b.t_state, b.d_state, st)
        ver_ms, st = b.verify(st, drafted[0], drafted[1])
        # The target's weights and cache read once; every node costs its weight and attention FLOPs.
        v_floor = b.floor_ms(b.w_bytes + ctx * b.kv_token, shape.num_nodes * (
            2 * b.params + 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers * ctx))
        tr = row["trees"][str(shape)] = dict(nodes=shape.num_nodes, verify_ms=ver_ms, verify_floor_ms=v_floor,
                                              verify_vs_floor=ver_ms / v_floor, verify_vs_ar=ver_ms / ar_ms)
        line = f"  tree {shape!s:>16} ({shape.num_nodes} nodes): verify {ver_ms:.3f} ms ({ver_ms / ar_ms:.2f}x AR)"
        if shape in loop_trees:
            levels = range(1, shape.depth + 1) if b.args.draft_levels else [shape.depth]
            cumulative = [b.draft(st, TreeShape(shape.widths[:d])) for d in levels]
            d_floor = b.draft_floor_ms(ctx, shape, cfg.vocab_size, st.ring.capacity)
            tr.update(draft_ms=cumulative[-1], draft_level_ms=list(np.diff([0.0] + cumulative)), draft_floor_ms=d_floor)
            tr["commit_ms"], st = b.commit(st, shape, drafted)
            pdir = prof and os.path.join(prof, f"ctx{ctx}_" + "-".join(map(str, shape.widths)))
            it_ms, st, tr["profile"] = b.loop(st, ctx, shape, profile=pdir)
            tr.update(iteration_ms=it_ms, iteration_floor_ms=v_floor + d_floor, iteration_vs_ar=it_ms / ar_ms,
                      rest_of_iteration_ms=it_ms - ver_ms - tr["draft_ms"], modelled_speedup=tau * ar_ms / it_ms)
            line += (f", draft {tr['draft_ms']:.3f}, commit {tr['commit_ms']:.3f}, iteration {it_ms:.3f} "
                     f"({it_ms / ar_ms:.2f}x AR) -> modelled speedup {tau * ar_ms / it_ms:.2f}x at tau {tau}")
            for size in vocab_sizes:
                ids = np.arange(size, dtype=np.int32) * (cfg.vocab_size // size)  # which ids does not change the cost
                vocab = b.put((ids, head_columns(b.target, ids)))
                d_ms = b.draft(st, shape, vocab)
                v_ms, st, _ = b.loop(st, ctx, shape, vocab)
                tr.setdefault("draft_vocab", {})[str(size)] = dict(
                    draft_ms=d_ms, draft_floor_ms=b.draft_floor_ms(ctx, shape, size, st.ring.capacity),
                    iteration_ms=v_ms, iteration_vs_ar=v_ms / ar_ms, modelled_speedup=tau * ar_ms / v_ms)
                line += f"; draft vocab {size}: draft {d_ms:.3f}, iteration {v_ms:.3f} ms"
        common.log(line)
        save(row)
    return row


def main(args) -> int:
    wl = workloads.get(args.workload)
    trees = [TreeShape.parse(t) for t in (args.trees or wl.trees)]
    loop_trees = trees[:1] if args.loop_trees is None else [TreeShape.parse(t) for t in args.loop_trees]
    trees += [t for t in loop_trees if t not in trees]
    vocab_sizes = wl.draft_vocab_sizes if args.draft_vocab_sizes is None else args.draft_vocab_sizes
    tau = args.tau or wl.tau
    args.prefill_chunk = args.prefill_chunk or runtime.default_prefill_chunk()
    b = Bench(args, wl)
    record, c = common.header("latency", args.workload, args.argv), b.ceil
    record.update(model_shapes=wl.model, weights=f"random {wl.dtype}", attention_impl=b.impl, tensor_parallel=b.n,
                  steps=args.steps, tau=tau, ceilings={**vars(c), "bandwidth_Bps": c.bandwidth_Bps},
                  matmul_precision=str(jax.config.jax_default_matmul_precision or "default"),
                  target_weight_bytes_excl_embedding=b.w_bytes, draft_param_bytes=b.d_bytes, rows=[])
    path = common.result_path(args.out, "latency", args.workload, device=common.device_slug(b.n))
    common.log(f"{record['device']} x{b.n}, {wl.model}, {b.impl} attention: bandwidth {c.bandwidth_Bps / 1e12:.3f} "
               f"TB/s, matmul {c.matmul_flops / 1e12:.1f} TFLOP/s")

    def save(row):  # after every part: a run cut short keeps what it measured
        common.write_json(path, {**record, "rows": record["rows"] + [row]})

    for ctx in args.contexts or wl.contexts:
        record["rows"].append(measure_context(b, ctx, trees, loop_trees, vocab_sizes, tau, save))
    common.write_json(path, record)
    common.log(f"wrote {path}")
    return 0
