"""Compile the prefix kernel under several knob sets with Mosaic GPU's dumps on and summarise what
ptxas says about each: registers, stack and spills, and warnings such as C7513 (wgmma serialised).

    python bench/dump_prefix.py --T 69 --S 32768 --out bench/results   # on a Hopper GPU (native compile)

Writes <out>/dump_prefix_<T>_<S>.txt: per knob set, ptxas's resource lines and warnings.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=69)
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--configs", default='[{"overlap": false}, {"overlap": true}, '
                    '{"overlap": true, "pingpong": false}, {"overlap": false, "pingpong": false}]',
                    help="JSON list of prefix_attention knob dicts")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    lines = []
    for cfg in json.loads(args.configs):
        d = tempfile.mkdtemp()
        # one process per config: the dump settings are read when a kernel is compiled
        code = (f"import os; os.environ.update(MOSAIC_GPU_DUMP_PTXAS='1', MOSAIC_GPU_DUMP_TO={d!r});"
                "import jax, jax.numpy as jnp;"
                "from pallas_kernels import prefix_decode as pd;"
                f"B, T, N, K, H, S = 1, {args.T}, 32, 8, 128, {args.S};"
                "q = jnp.ones((B, T, N, H), jnp.bfloat16); kv = jnp.ones((B, S, K, H), jnp.bfloat16);"
                "l = jnp.full((B,), S - 200, jnp.int32);"
                f"jax.block_until_ready(pd.prefix_attention(q, kv, kv, l, **{cfg!r}))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        rc = res.returncode
        with open(os.path.join(d, "stdout.txt"), "w") as fh:
            fh.write(res.stdout + res.stderr)
        lines.append(f"=== {cfg} rc={rc}")
        for f in sorted(glob.glob(d + "/*")):
            if not f.endswith(("ptxas", "stdout.txt")):
                continue  # MLIR and PTX dumps: not summarised
            text = open(f, errors="replace").read()
            keep = [ln for ln in text.splitlines()
                    if re.search(r"(?i)ptxas|used \d+ registers|spill|stack frame|serializ|error", ln)]
            lines += ["  " + ln[:300] for ln in keep[:40]]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"dump_prefix_{args.T}_{args.S}.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("wrote", path)


if __name__ == "__main__":
    main()
