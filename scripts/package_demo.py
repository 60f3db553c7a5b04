"""Turn the float32 exports of `scripts/train_demo.sh` into the shipped bfloat16 demo pair.

    python scripts/package_demo.py --runs runs/demo --out longspec_jax/demo

Writes OUT/target (sharded bfloat16 safetensors, each file under --shard-mib, config.json and the
tokenizer; skipped with --skip-target) and OUT/NAME for every draft export RUNS/NAME named in
--drafts (the sail format, bfloat16). Everything written is re-read with the inference loaders
before the command returns, so a broken package fails here, not at a user's first run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from longspec_jax import draft_weights, weights  # noqa: E402


def package(runs: str, out: str, *, shard_mib: float, drafts: list[str], target: str | None = None,
            skip_target: bool = False) -> None:
    model, cfg, tok = weights.load_target(target or os.path.join(runs, "target"), dtype=jnp.bfloat16)
    if not skip_target:
        weights.save_target(model, cfg, os.path.join(out, "target"), tok, max_shard_bytes=int(shard_mib * 2**20))
        weights.load_target(os.path.join(out, "target"), dtype=jnp.bfloat16)
    for name in drafts:
        d = draft_weights.load_draft(os.path.join(runs, name), cfg, dtype=jnp.bfloat16)
        draft_weights.save_draft(d, os.path.join(out, name), target_cfg=cfg, dtype=jnp.bfloat16)
        draft_weights.load_draft(os.path.join(out, name), cfg, dtype=jnp.bfloat16)
    for root, _, files in os.walk(out):
        for f in sorted(files):
            p = os.path.join(root, f)
            print(f"{os.path.getsize(p) / 2**20:8.2f} MiB  {p}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/demo", help="the output directory of scripts/train_demo.sh")
    p.add_argument("--out", default="longspec_jax/demo")
    p.add_argument("--shard-mib", type=float, default=15.0)
    p.add_argument("--drafts", nargs="+", default=["draft"], help="draft exports under RUNS to package")
    p.add_argument("--target", default=None, help="the target the drafts belong to (default RUNS/target)")
    p.add_argument("--skip-target", action="store_true", help="package the drafts only")
    a = p.parse_args(argv)
    package(a.runs, a.out, shard_mib=a.shard_mib, drafts=a.drafts, target=a.target, skip_target=a.skip_target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
