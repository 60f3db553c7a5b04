"""Draft vocabularies: the draft scores only V' of the target's V tokens (its LM head cost shrinks by
V / V'); verification keeps the full vocabulary, so the output is unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longspec_jax.draft import cut_logits, head_columns  # noqa: F401
from longspec_jax.draft_weights import find_draft_vocab as find  # noqa: F401
from longspec_jax.draft_weights import read_draft_vocab as read  # noqa: F401


def validate(ids, vocab_size: int) -> np.ndarray:
    """A non-empty 1-D list of distinct integer token ids in [0, vocab_size), as sorted int32
    (ascending, so beam-search ties resolve to the lower token id as over the full vocabulary)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"draft_vocab must be a non-empty 1-D list of token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"draft_vocab must hold integer token ids, got dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ValueError(f"draft_vocab has {bad.size} ids outside the target vocabulary [0, {vocab_size}) "
                         f"(e.g. {bad[:5].tolist()}); was it built with another tokenizer? "
                         "Rebuild it with scripts/draft_vocab.py for this model's tokenizer.")
    uniq = np.unique(arr)
    if uniq.size != arr.size:
        raise ValueError(f"draft_vocab has {arr.size - uniq.size} duplicate ids; every id must appear once")
    return uniq.astype(np.int32)
