"""Write a random-weight Hugging Face checkpoint of a preset's shapes, and a LongSpec draft for it.

For measuring the real command lines at scale without downloading weights: `python -m
infer.generate --checkpoint DIR --draft DRAFT_DIR` and `python -m infer.serve ...` load these like
any checkpoint (safetensors shards, config.json, a tokenizer). The tokenizer is the byte tokenizer
(`longspec_jax.init.byte_tokenizer`): any text encodes to ids < 256, the rest of the vocabulary
decodes to nothing.

    python scripts/make_random_checkpoint.py llama3-8b /tmp/llama3-8b-random --draft /tmp/llama3-8b-draft

`--agreeing` zeroes the target's attention-output and MLP-down projections and the draft's three
output projections (every matrix is still multiplied: the costs are the real ones), so the draft's
argmax always equals the target's: every draft is accepted, tau is the tree's maximum. With random
weights otherwise almost nothing is accepted; the two bound what a trained draft achieves.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from longspec_jax import configs, draft_weights, init, weights

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", help=f"preset name ({', '.join(sorted(configs.PRESETS))})")
    p.add_argument("out", help="checkpoint directory to write (must not exist or be empty)")
    p.add_argument("--draft", default=None, metavar="DIR", help="also write a random draft here")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--agreeing", action="store_true", help="a target / draft pair whose argmaxes agree (see above)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        cfg = configs.get_preset(args.preset).config
    except configs.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    target = init.random_target(cfg, seed=args.seed, dtype=dtype)
    if args.agreeing:
        for layer in target.layers:
            layer.attn.o_kernel.set_value(jnp.zeros_like(layer.attn.o_kernel.get_value()))
            layer.mlp.down_kernel.set_value(jnp.zeros_like(layer.mlp.down_kernel.get_value()))
    jax.block_until_ready(jax.tree.leaves(target))
    path = weights.save_target(target, cfg, args.out, tokenizer=init.byte_tokenizer(), overwrite=False,
                               max_shard_bytes=int(args.shard_gb * 2**30))
    print(f"target: {path} ({time.perf_counter() - t0:.1f} s)")
    if args.draft:
        t0 = time.perf_counter()
        draft = init.random_draft(configs.DraftConfig.from_target(cfg), cfg.rope, seed=args.seed + 1, dtype=dtype)
        if args.agreeing:
            for w in (draft.self_attn.o_kernel, draft.cross_attn.o_kernel, draft.mlp.down_kernel):
                w.set_value(jnp.zeros_like(w.get_value()))
        dpath = draft_weights.save_draft(draft, args.draft, target_cfg=cfg, overwrite=False)
        print(f"draft: {dpath} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
