"""The embedded demo pair: a small code model trained here and its LongSpec draft.

`target/` is a 12-layer GQA Llama (22M parameters, vocabulary 8192) trained from scratch on the
Python corpus of `scripts/collect_corpus.py` at 16k tokens; `draft/` is its LongSpec draft, trained
with `train.run` by the paper's recipe scaled down (see MODEL_CARD.md and `scripts/train_demo.sh`).
`heldout_prompts.jsonl` holds the starts of four packages no model saw in training.

    python -m infer.generate                      # the demo pair is the default model
    from longspec_jax import demo
    target, cfg, tok = weights.load_target(demo.TARGET_DIR)
"""

from __future__ import annotations

import json
import os

NAME = "longspec-demo"
HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_DIR = os.path.join(HERE, "target")
DRAFT_DIR = os.path.join(HERE, "draft")
PROMPTS_FILE = os.path.join(HERE, "heldout_prompts.jsonl")
TOKENIZER_DIR = os.path.join(HERE, "tokenizer")
# The draft ships its draft vocabulary (`draft/draft_vocab.json`, the 2048 most frequent ids of the
# train split, a copy of `draft_vocab/top2048.json`; found by `draft_weights.find_draft_vocab`), so
# `python -m infer.generate` lets the draft score only those: cheaper draft levels, at some cost in
# tau on prompts whose continuations use rarer ids (docs/perf_notes.md, "Draft vocabulary");
# verification keeps the full vocabulary, so the output is unchanged.


def available() -> bool:
    """True when the trained pair is present (config and weights of both)."""
    return (os.path.isfile(os.path.join(TARGET_DIR, "config.json"))
            and os.path.isfile(os.path.join(DRAFT_DIR, "model.safetensors")))


def heldout_prompts() -> list[dict]:
    """The held-out prompt records: {"package", "tokens", "text"} (text starts a package's code)."""
    with open(PROMPTS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
