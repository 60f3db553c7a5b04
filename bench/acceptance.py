"""Held-out acceptance and speed of a trained pair against its target alone (the paper's table).

For each context C and temperature of the workload, each prompt (the demo's held-out packages, which
no model saw in training) cut to C tokens is decoded by the target alone (AR) and then by every
configuration: each tree (the workload's, or --trees; "default" lets the decoder choose), each tree
again with each --draft-vocab, and at T = 0 each --ablation draft with the first tree. The methods
take turns prompt by prompt, so a drift of the machine's speed biases none of them against AR; one
untimed run per configuration (--warmup) comes first. EOS is ignored: every run emits --new-tokens.

Per (context, temperature, configuration), pooled over the prompts:
  tau              emitted tokens / target forwards, the prefill's forward and token included
  accept_by_depth  fraction of iterations that accepted a drafted token at depth d
  decode_tok_s     decode tokens / decode-loop seconds (prefill and compilation excluded)
  speedup          decode_tok_s / AR's decode_tok_s at the same context and temperature, same run
  greedy_equal     (T = 0) the output equals AR's on every prompt. Decoding is lossless, and float32
                   leaves only reduction-order differences, far below a trained model's logit gaps:
                   a difference fails the suite (exit 1, after the JSON is written). In bfloat16 a
                   near-tie may flip a token; it is reported, not failed.
--methods          at T > 0, how drafts are made and verified ("SHAPE/METHOD" rows): "block" (children
                   drawn from the draft distribution, whole-path verification: the decoder's
                   default), "token" (the same drafts, token-wise rejection sampling), "beam" (beam
                   search drafts, sample-and-match).

    python -m bench acceptance --workload demo-8k --draft-vocab longspec_jax/demo/draft_vocab/top2048.npy
    python -m bench acceptance --workload demo --draft DIR --ablation first=DIR2
    python -m bench acceptance --workload demo-8k --temperatures 1 0.7 --trees 1,1,1,1,1 2,2,2,2,2 --methods block token
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, workloads
from longspec_jax.infer.decoder import Decoder
from longspec_jax import draft_vocab
from longspec_jax.sampling import SamplingParams
from longspec_jax.tree import TreeShape

METHODS = ("block", "token", "beam")  # at T > 0: (sampled drafts?, verification) of each, see `decoder`


def add_cli_args(parser) -> None:
    workloads.add_workload_arg(parser, "demo-8k")
    parser.add_argument("--contexts", type=int, nargs="+", help="prompt lengths (default: the workload's)")
    parser.add_argument("--num-prompts", type=int, help="default: the workload's")
    parser.add_argument("--new-tokens", type=int, help="default: the workload's")
    parser.add_argument("--temperatures", type=float, nargs="+", help="default: the workload's")
    parser.add_argument("--trees", nargs="+", help='"default" or widths, e.g. 1,1,1,1,1 (default: the workload\'s)')
    parser.add_argument("--draft", help="the draft checkpoint (default: the demo's)")
    parser.add_argument("--ablation", nargs="*", default=[], metavar="NAME=DIR", help="more drafts (first tree, T = 0)")
    parser.add_argument("--draft-vocab", nargs="*", default=[], metavar="FILE",
                        help="draft vocabularies (.npy / .json ids, scripts/draft_vocab.py), each with every tree")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the workload's")
    parser.add_argument("--methods", nargs="+", default=["block"], choices=METHODS,
                        help="at T > 0: block / token (sampled drafts, whole-path / token-wise verification), "
                             "beam (beam-search drafts, sample-and-match); default block")
    parser.add_argument("--matmul-precision", default="auto", choices=("auto", "default", "high", "highest"),
                        help="auto: highest for float32 on a GPU, else JAX's default")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=common.RESULTS_DIR, help="results folder, or a .json path")


def load(args, wl, dtype, length: int):
    """(target, {draft name: draft}, prompts as token-id lists of at least `length` tokens)."""
    if wl.model == "demo":
        from longspec_jax import demo, draft_weights, weights

        bad = [s for s in args.ablation if "=" not in s]
        if bad:
            raise SystemExit(f"--ablation takes NAME=DIR (a draft checkpoint directory), got {bad}")
        target, tcfg, tok = weights.load_target(demo.TARGET_DIR, dtype=dtype, attention_impl="auto")
        paths = {"draft": args.draft or demo.DRAFT_DIR, **dict(s.split("=", 1) for s in args.ablation)}
        drafts = {n: draft_weights.load_draft(p, tcfg, dtype=dtype, attention_impl="auto") for n, p in paths.items()}
        prompts = [[tok.bos_token_id] + tok(r["text"], add_special_tokens=False)["input_ids"]
                   for r in demo.heldout_prompts()]
    elif wl.model == "tiny" and not (args.draft or args.ablation):  # random weights: a smoke run
        cfg, dcfg = wl.configs()
        target, draft = common.random_models(cfg, dcfg, "xla", dtype=dtype)
        drafts = {"draft": draft}
        prompts = np.random.default_rng(args.seed).integers(3, cfg.vocab_size, (8, length)).tolist()
    else:
        raise SystemExit(f"acceptance needs a trained pair: --workload demo or demo-8k (tiny: a random smoke run, "
                         f"without --draft / --ablation); {args.workload!r} has random weights at {wl.model!r} "
                         "shapes: time it with `python -m bench latency`")
    prompts = prompts[:args.num_prompts or wl.num_prompts]
    short = [len(p) for p in prompts if len(p) < length]
    if short:
        raise SystemExit(f"prompts of {short} tokens are shorter than the longest context {length}: lower --contexts")
    return target, drafts, prompts


def pooled(runs, ar_rate=None) -> dict:
    """Totals over the prompts of one configuration (module docstring)."""
    toks, secs = sum(r.timings.decode_tokens for r in runs), sum(r.timings.decode_s for r in runs)
    out = {"prompts": len(runs), "tokens": toks, "decode_s": secs, "decode_tok_s": toks / secs}
    if runs[0].spec is not None:
        forwards = sum(r.timings.decode_steps for r in runs)
        out.update(tau=sum(len(r.tokens[0]) for r in runs) / (forwards + len(runs)),
                   accept_by_depth=(np.sum([r.spec.accepted_by_depth for r in runs], 0) / forwards).round(4).tolist(),
                   tau_per_prompt=[round(r.spec.tau, 3) for r in runs], ms_per_iteration=1e3 * secs / forwards,
                   speedup=out["decode_tok_s"] / ar_rate)
    return out


def main(args) -> int:
    wl = workloads.get(args.workload)
    contexts, new, dtype = args.contexts or wl.contexts, args.new_tokens or wl.new_tokens, args.dtype or wl.dtype
    if args.matmul_precision != "auto":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    elif dtype == "float32" and jax.default_backend() == "gpu":
        # GPUs may round float32 dots to TF32; AR and verification compute the same logits with
        # different row counts, so only full precision keeps near-ties from flipping greedy tokens.
        jax.config.update("jax_default_matmul_precision", "highest")
    target, drafts, prompts = load(args, wl, jnp.dtype(dtype), max(contexts))
    trees = [None if t == "default" else TreeShape.parse(t) for t in (args.trees or wl.trees)]
    vocabs = {os.path.splitext(os.path.basename(f))[0]: draft_vocab.read(f) for f in args.draft_vocab}
    ar = Decoder(target)

    @functools.cache  # one decoder per configuration: its executables are compiled once
    def decoder(name, shape, vocab, method="block"):
        return Decoder(target, drafts[name], tree_shape=shape, sample_drafts=method != "beam",
                       verification="token" if method == "token" else "block",
                       draft_vocab=None if vocab is None else vocabs[vocab])

    def generate(dec, ids, ctx, sampling):  # EOS ignored: every run emits `new` tokens
        return dec.generate(ids[:ctx], max_new_tokens=new, sampling=sampling, eos_ids=(), seed=args.seed)

    record = common.header("acceptance", args.workload, args.argv)
    record.update(dtype=dtype, matmul_precision=str(jax.config.jax_default_matmul_precision or "default"),
                  new_tokens=new, warmup_runs=args.warmup, num_prompts=len(prompts), drafts=sorted(drafts),
                  draft_vocabs={k: int(v.size) for k, v in vocabs.items()}, rows=[], greedy_mismatches=[])
    path = common.result_path(args.out, "acceptance", args.workload)
    for ctx in contexts:
        for temp in args.temperatures or wl.temperatures:
            sampling = SamplingParams(temperature=temp)
            if temp == 0:  # greedy: every method is the beam's sample-and-match
                configs = [("draft", s, v, None) for v in (None, *vocabs) for s in trees]
                configs += [(d, trees[0], None, None) for d in drafts if d != "draft"]
            else:
                configs = [("draft", s, v, m) for v in (None, *vocabs) for s in trees for m in args.methods]

            for _ in range(args.warmup):  # each executable's first run, untimed
                for dec in [ar] + [decoder(*c) for c in configs]:
                    generate(dec, prompts[0], ctx, sampling)
            ar_runs, runs = [], [[] for _ in configs]
            for ids in prompts:  # interleaved: AR, then every configuration, per prompt
                ar_runs.append(generate(ar, ids, ctx, sampling))
                for c, out in zip(configs, runs):
                    out.append(generate(decoder(*c), ids, ctx, sampling))
            ar_row = pooled(ar_runs)
            record["rows"].append({"context": ctx, "temperature": temp, "method": "ar", "draft": None, **ar_row})
            common.log(f"ctx {ctx} T={temp:g}: AR {ar_row['decode_tok_s']:.1f} tokens/s")
            for (name, shape, vocab, how), rs in zip(configs, runs):
                used = rs[0].spec.tree_shape
                method = ("default" if shape is None else str(shape)) + ("" if how is None else f"/{how}")
                row = {"context": ctx, "temperature": temp, "method": method, "draft": name, "tree_shape": used,
                       "tree_nodes": TreeShape(tuple(used)).num_nodes, "draft_vocab": vocab,
                       "draft_vocab_size": rs[0].spec.draft_vocab_size, **pooled(rs, ar_row["decode_tok_s"])}
                if temp == 0:
                    diffs = [(i, next((j for j, (x, y) in enumerate(zip(r.tokens[0], a.tokens[0])) if x != y), None))
                             for i, (r, a) in enumerate(zip(rs, ar_runs)) if r.tokens[0] != a.tokens[0]]
                    row["greedy_equal"] = not diffs
                    record["greedy_mismatches"] += [dict(context=ctx, method=method, draft=name, draft_vocab=vocab,
                                                         prompt=i, first_diff=j) for i, j in diffs]
                record["rows"].append(row)
                common.log(f"  {name} {method}{'+' + vocab if vocab else ''}: tau {row['tau']:.2f}, "
                           f"{row['decode_tok_s']:.1f} tokens/s, {row['speedup']:.2f}x AR"
                           + (f", greedy == AR: {row['greedy_equal']}" if temp == 0 else ""))
            common.write_json(path, record)
    common.log(f"wrote {path}")
    if record["greedy_mismatches"]:
        common.log(f"GREEDY OUTPUT DIFFERS FROM AR ({dtype}): {record['greedy_mismatches']}")
    return 1 if record["greedy_mismatches"] and dtype == "float32" else 0
