"""The demo pair on held-out code: acceptance, speed and exactness against the target alone.

What the paper measures, on repositories no model saw (`longspec_jax/demo/heldout_prompts.jsonl`,
cut by `scripts/make_demo_prompts.py` from held-out packages): for each prompt length (default
2k, 4k, 8k, 16k tokens) and each prompt, the target alone (AR) and the speculative decoder with a
chain and with tree shapes, at temperature 0 and 1, each generating the same number of tokens
(EOS ignored, so every run produces exactly --new-tokens).

Reported per (context, method, temperature), pooled over the prompts:
  tau                 emitted tokens / target forwards (prefill forward and its token included)
  accept_by_depth     fraction of iterations that accepted a drafted token at depth d
  decode_tok_s        generated tokens / decode-loop seconds (prefill and compilation excluded)
  speedup             decode_tok_s / the AR decode_tok_s of the same context and temperature,
                      measured in the same process, interleaved with it prompt by prompt
  greedy_equal        (T = 0) the speculative tokens equal AR's on every prompt: checked here,
                      the benchmark exits with status 1 after writing its JSON when one differs
and, per context, the draft's cache bytes (its constant ring + tree buffer) against the bytes a
full-length draft cache and the target's cache need at that length.

Ablation (--ablation NAME=DIR ...): more drafts run with the default tree at T = 0 only.

    python -m bench.bench_demo --out bench/results/demo_cpu.json
    python -m bench.bench_demo --ablation draft_noao=runs/demo/pack/draft_noao --out ...

Plots: `python -m bench plot FILE...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from infer import ar
from infer.speculative import SpeculativeDecoder
from longspec_jax import draft_weights, weights
from longspec_jax.sampling import SamplingParams
from longspec_jax.tree import TreeShape

ROOT = common.ROOT
DEMO = os.path.join(ROOT, "longspec_jax", "demo")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_prompts(path: str, tokenizer, count: int, packages=None) -> list[tuple[str, list[int]]]:
    """(package, token ids with BOS) of the first `count` held-out prompt records (or of `packages`)."""
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if packages and r["package"] not in packages:
                continue
            ids = [tokenizer.bos_token_id] + tokenizer(r["text"], add_special_tokens=False)["input_ids"]
            out.append((r["package"], ids))
    missing = set(packages or ()) - {name for name, _ in out}
    if missing:
        raise SystemExit(f"--packages: {sorted(missing)} not in {path} (it holds {[n for n, _ in out]})")
    return out if packages else out[:count]


def parse_tree(spec: str) -> tuple[str, TreeShape | None]:
    """"default" (by context, as the decoder picks it), or NAME=W1,W2,... (e.g. chain=1,1,1,1,1)."""
    if spec == "default":
        return "default", None
    name, _, widths = spec.partition("=")
    if not widths:
        raise SystemExit(f"--trees: {spec!r} is neither 'default' nor NAME=W1,W2,... (e.g. chain=1,1,1,1,1)")
    return name, TreeShape(tuple(int(w) for w in widths.split(",")))


def cache_bytes(tcfg, ring_slots: int, tree_nodes: int, context: int, itemsize: int) -> dict:
    """Draft ring + tree buffer bytes against a full-length draft cache and the target cache."""
    per_token = 2 * tcfg.num_kv_heads * tcfg.head_dim * itemsize  # K and V of one layer
    return {"draft_ring_and_tree": (ring_slots + tree_nodes) * per_token,
            "draft_full_cache_would_be": context * per_token,
            "target_cache": context * per_token * tcfg.num_layers}


def tie_margin(target, context: list[int], spec_token: int, ar_token: int) -> dict:
    """Where greedy speculative output first differs from AR: the target's float32 logits for the
    next token after `context`, recomputed at "highest" matmul precision in one causal pass, and
    the gap between the two paths' choices (a near-tie when it is within the run's arithmetic
    error, e.g. TF32's ~1e-3 relative; a bug when it is large)."""
    tokens = jnp.asarray(context, jnp.int32)[None]
    with jax.default_matmul_precision("highest"):
        h, _ = jax.jit(target.forward_train)(tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])
        logits = np.asarray(target.logits(h[:, -1:])[0, 0], np.float64)
    top2 = np.sort(logits)[-2:]
    return {"spec_token": spec_token, "ar_token": ar_token, "best_token": int(np.argmax(logits)),
            "logit_spec_minus_ar": float(logits[spec_token] - logits[ar_token]),
            "top2_gap": float(top2[1] - top2[0]), "max_abs_logit": float(np.abs(logits).max())}


def summarize(runs: list[dict], ar_rate: float | None) -> dict:
    toks = sum(r["tokens"] for r in runs)
    secs = sum(r["decode_s"] for r in runs)
    out = {"prompts": len(runs), "tokens": toks, "decode_s": secs, "decode_tok_s": toks / secs if secs else None,
           "ms_per_token": 1e3 * secs / toks if toks else None}
    if "forwards" in runs[0]:
        forwards = sum(r["forwards"] for r in runs)
        # The paper's tau: (emitted + prefill token) / (verification forwards + the prefill forward).
        out["tau"] = (toks + len(runs)) / (forwards + len(runs))
        out["ms_per_iteration"] = 1e3 * secs / forwards if forwards else None
        depth = np.sum([r["accepted_by_depth"] for r in runs], axis=0)
        out["accept_by_depth"] = (depth / max(forwards, 1)).round(4).tolist()
        out["tau_per_prompt"] = [round(r["tau"], 3) for r in runs]
        checked = [r["greedy_equal"] for r in runs if "greedy_equal" in r]
        out["greedy_equal"] = all(checked) if checked else None  # None: not checked (T > 0)
    if ar_rate:
        out["speedup"] = out["decode_tok_s"] / ar_rate
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=os.path.join(DEMO, "target"))
    p.add_argument("--draft", default=os.path.join(DEMO, "draft"))
    p.add_argument("--prompts", default=os.path.join(DEMO, "heldout_prompts.jsonl"))
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--packages", nargs="*", default=None, help="use these held-out prompts (by package name)")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--trees", nargs="+", default=["chain=1,1,1,1,1", "default", "wide=4,16,16,16,16"],
                   help="'default' (chosen by the decoder from the context) or NAME=W1,W2,...")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--ablation", nargs="*", default=[], metavar="NAME=DIR",
                   help="more drafts, run with the default tree at T = 0")
    p.add_argument("--draft-vocab", nargs="*", default=[], metavar="NAME=PATH",
                   help="draft vocabularies (scripts/draft_vocab.py .npy files): the main draft runs with each "
                        "and every --trees shape at T = 0")
    p.add_argument("--argmax-chains", action="store_true",
                   help="at T > 0 also run every chain configuration with argmax drafts and sample-and-match "
                        "acceptance (the rule trees use), to measure what sampled drafts gain")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="compute dtype (float32: greedy equality is exact up to reduction order)")
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of the first prompt per configuration before the timed ones (a fresh "
                        "executable's first run pays allocation and set-up costs)")
    p.add_argument("--matmul-precision", default="auto", choices=("auto", "default", "high", "highest"),
                   help="jax_default_matmul_precision (auto: highest for float32 on GPUs, see below; else "
                        "JAX's default)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/demo_<device>.json)")
    a = p.parse_args(argv)

    dtype = DTYPES[a.dtype]
    if a.matmul_precision not in ("auto", "default"):
        jax.config.update("jax_default_matmul_precision", a.matmul_precision)
    elif a.matmul_precision == "auto" and a.dtype == "float32" and jax.default_backend() == "gpu":
        # True float32 matmuls (GPUs otherwise may round f32 dots to TF32): the tree verification and
        # the AR step compute the same logits with different row counts, so only full-precision
        # arithmetic keeps near-ties from flipping the greedy token between the two. CPUs compute
        # f32 dots in f32 already, and pinning "highest" there made XLA:CPU up to 5x slower.
        jax.config.update("jax_default_matmul_precision", "highest")
    dev = jax.devices()[0]
    device = dev.device_kind if dev.platform != "cpu" else f"cpu ({platform.processor() or platform.machine()}, " \
        f"{os.cpu_count()} cores)"
    out = a.out or os.path.join(ROOT, "bench", "results",
                                f"demo_{'cpu' if dev.platform == 'cpu' else dev.device_kind.replace(' ', '_')}.json")
    target, tcfg, tok = weights.load_target(a.target, dtype=dtype, attention_impl=a.attention_impl)
    drafts = {"draft": a.draft}
    for spec in a.ablation:
        name, _, path = spec.partition("=")
        drafts[name] = path
    loaded = {name: draft_weights.load_draft(path, tcfg, dtype=dtype, attention_impl=a.attention_impl)
              for name, path in drafts.items()}
    prompts = load_prompts(a.prompts, tok, a.num_prompts, a.packages)
    short = [(n, len(ids)) for n, ids in prompts if len(ids) < max(a.contexts)]
    if short:
        raise SystemExit(f"prompts shorter than the longest context {max(a.contexts)}: {short}")
    trees = [parse_tree(s) for s in a.trees]
    command = ["python", "-m", "bench.bench_demo", *(sys.argv[1:] if argv is None else argv)]
    result = {
        **common.header("demo", "demo", command), "benchmark": "demo pair on held-out packages",
        "device": device, "jax_version": jax.__version__, "command": " ".join(command),
        "target": os.path.relpath(a.target, ROOT), "drafts": {k: os.path.relpath(v, ROOT) for k, v in drafts.items()},
        "warmup_runs": a.warmup, "dtype": a.dtype, "matmul_precision": jax.config.jax_default_matmul_precision or "default",
        "attention_impl": a.attention_impl, "new_tokens": a.new_tokens,
        "prompts": [n for n, _ in prompts], "rows": [], "cache_bytes": {},
    }

    def save():
        common.write_json(out, result)

    vocabs = {}
    for spec in a.draft_vocab:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--draft-vocab: {spec!r} is not NAME=PATH")
        vocabs[name] = np.load(path)
    result["draft_vocabs"] = {k: {"path": os.path.relpath(v, ROOT), "size": int(vocabs[k].size)}
                              for k, v in (s.partition("=")[::2] for s in a.draft_vocab)}

    decoders = {}

    def decoder(draft_name, shape, vocab_name=None, sample_drafts=True):
        key = (draft_name, None if shape is None else shape.widths, vocab_name, sample_drafts)
        if key not in decoders:
            decoders[key] = SpeculativeDecoder(target, loaded[draft_name], tree_shape=shape,
                                               sample_drafts=sample_drafts,
                                               draft_vocab=None if vocab_name is None else vocabs[vocab_name])
        return decoders[key]

    mismatches = []
    print(f"{device} | jax {jax.__version__} | {a.dtype} | {len(prompts)} prompts x {a.new_tokens} tokens",
          flush=True)

    def run_ar(ids, sampling):
        r = ar.generate_ar(target, ids, max_new_tokens=a.new_tokens, sampling=sampling, eos_ids=(), seed=a.seed)
        return r.sequences()[0], {"tokens": int(r.timings.decode_tokens), "decode_s": r.timings.decode_s}

    def run_spec(dec, ids, sampling):
        res = dec.generate(ids, max_new_tokens=a.new_tokens, sampling=sampling, eos_ids=(), seed=a.seed)
        s = res.stats
        # The loop's decode time covers every token after the prefill's first one, as AR's does.
        return res, {"tokens": len(res.tokens[0]) - 1, "decode_s": s["decode_time_s"], "tau": s["tau"],
                     "forwards": int(np.sum(s["target_forwards"])), "accepted_by_depth": list(s["accepted_by_depth"])}

    for ctx in a.contexts:
        for temp in a.temperatures:
            sampling = SamplingParams(temperature=temp)
            combos = [("draft", n, s, None) for n, s in trees]
            if temp == 0.0:
                combos += [(d, "default", None, None) for d in drafts if d != "draft"]
                combos += [("draft", n, s, v) for v in vocabs for n, s in trees]
            # T > 0: chains sample their drafts (speculative sampling); --argmax-chains adds the same
            # chains with argmax drafts and sample-and-match acceptance, labelled NAME-argmax.
            decs = [decoder(d, s, v) for d, _, s, v in combos]
            if temp > 0.0 and a.argmax_chains:
                extra = [(d, n, s, v) for d, n, s, v in combos
                         if decoder(d, s, v).tree_shape_for(ctx, a.new_tokens, sampling).is_chain]
                combos += [(d, n + "-argmax", s, v) for d, n, s, v in extra]
                decs += [decoder(d, s, v, sample_drafts=False) for d, _, s, v in extra]
            for _ in range(a.warmup):  # every executable's first run, untimed
                run_ar(prompts[0][1][:ctx], sampling)
                for dec in decs:
                    run_spec(dec, prompts[0][1][:ctx], sampling)
            # Interleaved by prompt (AR, then every configuration, on the same prompt) so that a
            # slow drift of the machine's speed biases no configuration against AR.
            ar_runs, runs = [], [[] for _ in combos]
            stats_last = [None] * len(combos)
            for name, ids in prompts:
                ref_tokens, ar_run = run_ar(ids[:ctx], sampling)
                ar_runs.append(ar_run)
                for i, ((draft_name, tree_name, _, vocab_name), dec) in enumerate(zip(combos, decs)):
                    res, run = run_spec(dec, ids[:ctx], sampling)
                    if temp == 0.0:
                        run["greedy_equal"] = res.tokens[0] == ref_tokens
                        if not run["greedy_equal"]:
                            first = next((j for j, (x, y) in enumerate(zip(res.tokens[0], ref_tokens)) if x != y),
                                         min(len(res.tokens[0]), len(ref_tokens)))
                            try:
                                margin = tie_margin(target, list(ids[:ctx]) + ref_tokens[:first],
                                                    int(res.tokens[0][first]), int(ref_tokens[first]))
                            except Exception as e:  # (e.g. out of memory) the mismatch itself is kept
                                margin = {"error": repr(e)[:200]}
                            print(f"  greedy mismatch at token {first}: {margin}", flush=True)
                            mismatches.append((ctx, draft_name, tree_name + (f"+{vocab_name}" if vocab_name else ""),
                                               name, first, margin))
                    runs[i].append(run)
                    stats_last[i] = res.stats
            ar_sum = summarize(ar_runs, None)
            result["rows"].append({"context": ctx, "temperature": temp, "method": "ar", "draft": None, **ar_sum})
            print(f"ctx {ctx:6d} T={temp:g} ar            {ar_sum['decode_tok_s']:9.1f} tok/s", flush=True)
            for (draft_name, tree_name, shape, vocab_name), dec, rs, st in zip(combos, decs, runs, stats_last):
                shape_used = dec.tree_shape_for(ctx, a.new_tokens, sampling)
                summ = summarize(rs, ar_sum["decode_tok_s"])
                result["rows"].append({"context": ctx, "temperature": temp, "method": tree_name, "draft": draft_name,
                                       "tree_shape": list(shape_used.widths), "tree_nodes": shape_used.num_nodes,
                                       "draft_vocab": vocab_name,
                                       "sampled_drafts": bool(dec.sample_drafts and shape_used.is_chain and temp > 0),
                                       "draft_vocab_size": int(st["draft_vocab_size"]), **summ})
                if draft_name == "draft" and tree_name == "default" and vocab_name is None and temp == a.temperatures[0]:
                    result["cache_bytes"][str(ctx)] = cache_bytes(
                        tcfg, int(st["ring_capacity"]), shape_used.num_nodes, ctx + a.new_tokens,
                        jnp.dtype(dec.cache_dtype).itemsize)
                label = tree_name if vocab_name is None else f"{tree_name}+{vocab_name}"
                print(f"ctx {ctx:6d} T={temp:g} {draft_name[:10]:10s} {label:8s} tau {summ['tau']:5.2f} "
                      f"{summ['decode_tok_s']:9.1f} tok/s  x{summ['speedup']:.2f}"
                      + ("" if temp else f"  greedy==AR {summ['greedy_equal']}"), flush=True)
            save()
    result["greedy_mismatches"] = [dict(zip(("context", "draft", "tree", "prompt", "first_diff", "margin"), m))
                                   for m in mismatches]
    save()
    print(f"wrote {out}")
    if mismatches:
        print(f"GREEDY MISMATCH on {len(mismatches)} runs: {mismatches}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
