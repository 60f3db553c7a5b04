"""A random subset of a JSON-lines corpus by packages (whole lines), under a size budget.

The device tool carries at most 64 MiB of files, so a GPU training run that continues the demo
draft gets a subset of `data/corpus/train.jsonl` (one package per line). The lines are shuffled
with `random.Random(seed)` and taken in that order, skipping any that would take the total past `--max-chars`
(characters of the lines as read; for this ASCII-heavy corpus close to bytes),
so the same corpus, seed and budget always give the same subset:

    python scripts/corpus_subset.py data/corpus/train.jsonl data/corpus/train_s3.jsonl \
        --max-chars 80e6 --seed 3
    xz -6 -k data/corpus/train_s3.jsonl    # 12 MB: what the device call carried
"""

from __future__ import annotations

import argparse
import random
import sys


def subset(lines: list[str], max_chars: float, seed: int) -> list[str]:
    """Lines in shuffled order, each kept while the running total stays within max_chars."""
    order = list(lines)
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for line in order:
        if total + len(line) <= max_chars:
            out.append(line)
            total += len(line)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--max-chars", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.max_chars <= 0:
        p.error(f"--max-chars must be positive, got {a.max_chars}")
    with open(a.src, encoding="utf-8") as f:
        lines = f.readlines()
    kept = subset(lines, a.max_chars, a.seed)
    if not kept:
        p.error(f"no line of {a.src} fits in --max-chars {a.max_chars:.0f}; raise it")
    with open(a.dst, "w", encoding="utf-8") as f:
        f.writelines(kept)
    print(f"{len(kept)} of {len(lines)} lines, {sum(map(len, kept))} characters -> {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
