"""Build a draft vocabulary (EAGLE-3 / FR-Spec style): the V' most frequent token ids of a corpus.

Counts token frequencies with a Hugging Face tokenizer over text files (.txt: one document per
file) and/or JSON-lines files (.jsonl: one record per line, text in the --field key), and writes

    OUT.npy    int32 [V'] the chosen ids, sorted ascending (`--draft-vocab OUT.npy`)
    OUT.json   {"ids": [...], "tokenizer", "vocab_size", "draft_vocab_size", "coverage",
                "tokens_counted", "sources", "always"}

`coverage` is the fraction of counted tokens that fall inside the chosen ids: an upper bound on
how often the target's next token is draftable at all (acceptance ends at a node whose target
choice lies outside). Ids in --always (default: the tokenizer's special tokens: EOS, BOS, ...)
are always included. Output stays lossless whatever the vocabulary: verification uses the target's
full vocabulary (longspec_jax/infer/speculative.py).

Usage:
    python scripts/draft_vocab.py --tokenizer meta-llama/Meta-Llama-3-8B-Instruct \
        --size 32768 --out draft_vocab_32k data/corpus/train.jsonl
    python -m infer.generate --model llama3-8b --draft-vocab draft_vocab_32k.npy
    # or ship it with the draft (DIR/draft_vocab.json, `longspec_jax.draft_vocab.FILE`, used by default by
    # infer.generate --draft DIR):
    python scripts/draft_vocab.py --tokenizer ... --size 32768 --draft-dir DIR data/corpus/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Iterator

import numpy as np

from longspec_jax import draft_vocab


def iter_texts(paths: Iterable[str], field: str = "text") -> Iterator[str]:
    """Documents of .txt files (whole file), .jsonl files (record[field]) and directories of them."""
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith((".txt", ".jsonl")))
            yield from iter_texts([os.path.join(path, n) for n in names], field)
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if field not in rec:
                        raise SystemExit(f"error: {path}:{i} has no {field!r} field (pass --field NAME)")
                    yield rec[field]
        else:
            with open(path, encoding="utf-8") as f:
                yield f.read()


def count_tokens(texts: Iterable[str], encode, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size] token counts; `encode(text) -> list of ids` (no special tokens added)."""
    counts = np.zeros(vocab_size, np.int64)
    for text in texts:
        ids = np.asarray(encode(text), np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"tokenizer produced ids outside [0, {vocab_size}); pass --vocab-size")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def top_ids(counts: np.ndarray, size: int, always: Iterable[int] = ()) -> np.ndarray:
    """The `size` most frequent ids (ties: lower id first), `always` included; sorted ascending."""
    always = sorted({int(a) for a in always if 0 <= int(a) < counts.size})
    if size < len(always) or size > counts.size:
        raise ValueError(f"--size {size} must be in [{len(always)} (the --always ids), {counts.size} (vocab)]")
    order = np.lexsort((np.arange(counts.size), -counts))  # count descending, then id ascending
    chosen = list(always)
    seen = set(always)
    for i in order:
        if len(chosen) == size:
            break
        if int(i) not in seen:
            chosen.append(int(i))
            seen.add(int(i))
    return np.array(sorted(chosen), np.int32)


def write_outputs(ids: np.ndarray, meta: dict, json_path: str, npy_path: str | None = None) -> list[str]:
    """Write the ids (with `meta`) to `json_path`, and to `npy_path` when given, atomically
    (temporary files renamed: nothing half-written). Returns the paths written."""
    written = [json_path] + ([npy_path] if npy_path else [])
    for path in written:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if npy_path:
        with open(npy_path + ".tmp", "wb") as f:
            np.save(f, ids)
    with open(json_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(dict(meta, ids=ids.tolist()), f)
    for path in written:
        os.replace(path + ".tmp", path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help=".txt / .jsonl files or directories of them")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory or repo id (local cache)")
    p.add_argument("--size", type=int, default=32768, help="V': ids to keep")
    p.add_argument("--out", default=None, help="output prefix: writes OUT.npy and OUT.json")
    p.add_argument("--draft-dir", default=None,
                   help="also (or only) write DRAFT_DIR/draft_vocab.json, the file a draft directory ships so "
                        "that `python -m infer.generate --draft DRAFT_DIR` uses the vocabulary by default")
    p.add_argument("--field", default="text", help="text field of .jsonl records")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="target vocabulary size (default: len(tokenizer), which includes added tokens)")
    p.add_argument("--always", type=int, nargs="*", default=None,
                   help="ids always kept (default: the tokenizer's special token ids)")
    args = p.parse_args(argv)
    if args.out is None and args.draft_dir is None:
        p.error("pass --out PREFIX and/or --draft-dir DIR (where to write the vocabulary)")
    if args.draft_dir is not None and not os.path.isdir(args.draft_dir):
        p.error(f"--draft-dir {args.draft_dir!r} is not a directory (a draft checkpoint directory is expected)")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab_size = args.vocab_size or len(tok)
    always = args.always if args.always is not None else tok.all_special_ids
    counts = count_tokens(iter_texts(args.inputs, args.field),
                          lambda t: tok.encode(t, add_special_tokens=False), vocab_size)
    total = int(counts.sum())
    if total == 0:
        print("error: no tokens counted; are the inputs empty?", file=sys.stderr)
        return 2
    try:
        ids = top_ids(counts, args.size, always)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    coverage = float(counts[ids].sum() / total)
    meta = dict(tokenizer=args.tokenizer, vocab_size=vocab_size, draft_vocab_size=int(ids.size),
                coverage=coverage, tokens_counted=total, sources=list(args.inputs), always=sorted(set(always)))
    written = []
    if args.out is not None:
        written += write_outputs(ids, meta, args.out + ".json", args.out + ".npy")
    if args.draft_dir is not None:  # what a draft directory ships is the JSON alone
        written += write_outputs(ids, meta, os.path.join(args.draft_dir, draft_vocab.FILE))
    print(f"{ids.size} of {vocab_size} ids cover {coverage:.2%} of {total:,} tokens -> {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
