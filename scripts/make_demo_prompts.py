"""Cut the benchmark prompts of the demo pair from held-out packages (never seen in training).

    python scripts/make_demo_prompts.py            # writes longspec_jax/demo/heldout_prompts.jsonl

Each record is the start of one held-out package's text (its files in the corpus order, see
scripts/collect_corpus.py), cut at the first line end after MAX_TOKENS tokens of the demo tokenizer.
Prompts of N tokens are the first N tokens of it (BOS included, as in training), so every context
length reads the same repository from its beginning. The packages are fixed by name below and all
belong to the held-out split (data/split.json); the command checks that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("asyncio", "click", "email", "jinja2")
MAX_TOKENS = 16384 + 64


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heldout", default=os.path.join(ROOT, "data", "corpus", "heldout.jsonl"))
    p.add_argument("--out", default=os.path.join(ROOT, "longspec_jax", "demo", "heldout_prompts.jsonl"))
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    with open(os.path.join(ROOT, "data", "split.json")) as f:
        split = json.load(f)
    heldout_names = set(split["heldout"])
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "longspec_jax", "demo", "tokenizer"))
    records = {}
    with open(a.heldout) as f:
        for line in f:
            r = json.loads(line)
            records[r["name"]] = r["text"]
    with open(a.out, "w") as out:
        for name in PACKAGES:
            if name not in heldout_names:
                raise SystemExit(f"{name} is not a held-out package in data/split.json")
            text = records[name]
            ends = [i + 1 for i, ch in enumerate(text) if ch == "\n"] + [len(text)]
            lo, hi = 0, len(ends) - 1  # binary search: the first line end with > MAX_TOKENS tokens
            while lo < hi:
                mid = (lo + hi) // 2
                if len(tok(text[:ends[mid]])["input_ids"]) > MAX_TOKENS:
                    hi = mid
                else:
                    lo = mid + 1
            cut = text[:ends[lo]]
            n = len(tok(cut)["input_ids"])
            if n < MAX_TOKENS:
                raise SystemExit(f"{name}: only {n} tokens")
            out.write(json.dumps({"package": name, "tokens": n, "text": cut}) + "\n")
            print(f"{name}: {len(cut)} chars, {n} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
