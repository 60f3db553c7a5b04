"""The serving engine's decode iteration cost by tree shape and running requests: what the load
tables (`longspec_jax/infer/defaults.py`) rest on.

    python -m bench steps --workload serve-llama3-8b                          # GPU, random weights
    python -m bench steps --workload tiny --shapes ar 1,1 --rows 1 2          # CPU smoke run

Per shape ("ar" or tree widths like 2,4,4,4,4), one engine of --max-slots slots that runs that
shape at every load (planned as the server plans it: the whole batch, or a bucket of rows where
idle rows would cost compute), on random weights of the workload's model. For each count of
running rows, that many requests with prompts of the workload's first context are admitted, then
--steps engine steps are timed after --warmup; the wall time over the iterations each row ran is
the cost of one iteration (every row steps together). The random draft accepts about nothing, so
tau is not measured here: multiply by a measured tau per shape (`bench acceptance`).
"""

from __future__ import annotations

import time

import numpy as np

from bench import common, workloads


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "serve-llama3-8b")
    parser.add_argument("--shapes", nargs="+", default=["ar", "1,1,1,1,1", "2,4,4,4,4", "4,8,8,8,8",
                                                         "4,16,16,16,16"], help='"ar" or tree widths, e.g. 2,4,4,4,4')
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="running requests")
    parser.add_argument("--max-slots", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="engine steps timed per point")
    parser.add_argument("--warmup", type=int, default=3, help="engine steps run before the timed ones")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


def _point(eng, rng, n: int, prompt_len: int, vocab: int, steps: int, warmup: int) -> dict:
    from longspec_jax.infer.slots import Request

    max_tokens = eng.max_context - prompt_len
    ids = [eng.submit(Request(rng.integers(2, vocab, prompt_len).tolist(), max_tokens, stop_ids=()))
           for _ in range(n)]
    while eng.running < n or eng._loading() or eng.waiting:
        eng.step()
    for _ in range(warmup):
        eng.step()
    forwards, t = eng.stats["forwards"], time.perf_counter()
    for _ in range(steps):
        eng.step()
    eng._settle([])  # the last call's end
    wall, iters = time.perf_counter() - t, (eng.stats["forwards"] - forwards) / n
    for rid in ids:
        eng.cancel(rid)
    while eng.has_work():
        eng.step()
    return dict(rows=n, ms_per_iteration=1e3 * wall / max(iters, 1.0), iterations=iters, wall_s=wall)


def main(args) -> int:
    import jax.numpy as jnp

    from longspec_jax.infer.engine import Engine
    from longspec_jax.infer.runtime import Compiler

    wl = workloads.get(args.workload)
    cfg, dcfg = wl.configs()
    prompt_len = wl.contexts[0]
    target, draft = common.random_models(cfg, dcfg, "auto", dtype=jnp.dtype(wl.dtype))
    record = common.header("steps", args.workload, args.argv)
    record.update(context=prompt_len, max_slots=args.max_slots, steps=args.steps, shapes={})
    path, rng, compiler = common.result_path(args.out, "steps", args.workload), np.random.default_rng(0), Compiler()
    for name in args.shapes:
        shape = "ar" if name == "ar" else tuple(int(w) for w in name.split(","))
        # Room for every token a row can emit while the others load, warm up and are timed (4 steps a
        # call, depth + 1 tokens a step), so no row stops early.
        new = (args.warmup + args.steps + max(args.rows) + 4) * 4 * (1 if shape == "ar" else len(shape) + 1)
        eng = Engine(target, draft, max_slots=args.max_slots, max_context=prompt_len + new, tree_shape=shape,
                     compiler=compiler)
        points = [_point(eng, rng, n, prompt_len, cfg.vocab_size, args.steps, args.warmup)
                  for n in args.rows if n <= args.max_slots]
        record["shapes"][name] = dict(plan=sorted({b for _, b in eng.plan.values()}), points=points)
        common.log(f"{name}: " + ", ".join(f"{p['rows']} rows {p['ms_per_iteration']:.2f} ms" for p in points))
        common.write_json(path, record)
        del eng
    common.log(f"wrote {path}")
    return 0
