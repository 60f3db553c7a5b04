"""Draft vocabularies (EAGLE-3 / FR-Spec style): the draft scores only V' of the target's V tokens.

A draft vocabulary is a sorted list of distinct token ids. It is stored as a .npy int array or a
.json list / {"ids": [...], ...} object (`scripts/draft_vocab.py` writes both), and a draft
directory may ship one as `FILE` beside its weights, which `python -m infer.generate` then uses by
default. The draft's logits over it are the target's LM head restricted to those columns
(`head_columns`, gathered once per decoder) applied to the draft output (`cut_logits`).
Verification always uses the full vocabulary, so the output does not depend on the cut.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

FILE = "draft_vocab.json"  # the vocabulary a draft directory ships (EAGLE-3 keeps its d2t map the same way)
_BUILD = "Rebuild it with scripts/draft_vocab.py."


def read(path: str | os.PathLike) -> np.ndarray:
    """The token ids stored in `path`: a .npy array, or a .json list or {"ids": [...]} of ints.

    Only the file format is checked here; `validate` checks the ids against a vocabulary.

    Raises:
      ValueError: naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    if not path.endswith((".npy", ".json")):
        raise ValueError(f"draft vocabulary {path!r} must be a .npy or .json file of token ids "
                         "(scripts/draft_vocab.py writes both)")
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"cannot read the draft vocabulary {path!r}: {reason}. {_BUILD}") from e
    if isinstance(data, dict):
        if "ids" not in data:
            raise ValueError(f"draft vocabulary {path!r} is a JSON object without an \"ids\" list (keys: "
                             f"{sorted(data)[:5]}); expected a list of token ids or {{\"ids\": [...]}}. {_BUILD}")
        data = data["ids"]
    if not isinstance(data, list):
        raise ValueError(f"draft vocabulary {path!r} holds a JSON {type(data).__name__}; expected a list of "
                         f"token ids or {{\"ids\": [...]}}. {_BUILD}")
    try:
        return np.asarray(data)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"draft vocabulary {path!r} is not a flat list of token ids ({e}). {_BUILD}") from e


def validate(ids, vocab_size: int) -> np.ndarray:
    """Check a draft vocabulary: a non-empty 1-D list of distinct integer token ids in
    [0, vocab_size). Returns them as sorted int32 (ascending, so beam-search ties resolve to the
    lower token id, as over the full vocabulary).

    Raises:
      ValueError: naming the problem (shape, dtype, out-of-range or duplicate ids).
    """
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


def find(draft_dir: str | os.PathLike) -> str | None:
    """The vocabulary file shipped in a draft directory (or beside a draft weight file), or None."""
    path = os.fspath(draft_dir)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    candidate = os.path.join(directory, FILE)
    return candidate if os.path.isfile(candidate) else None


def head_columns(target, ids) -> jax.Array:
    """The target's LM head restricted to a draft vocabulary: columns `ids` [V'] of
    `target.head_weight()` [D, V'] in the head's storage dtype. Gathered once per decoder, not per
    draft step."""
    return jnp.take(target.head_weight(), jnp.asarray(ids, jnp.int32), axis=1)  # [D, V']


def cut_logits(target, h: jax.Array, head: jax.Array) -> jax.Array:
    """Draft logits [B, T, V'] float32 over a draft vocabulary: `target.logits` restricted to the
    columns in `head` [D, V'] (from `head_columns`), with the same operand dtype and float32
    accumulation."""
    dt = target.head_dtype
    return jnp.einsum("BTD,DV->BTV", h.astype(dt), head.astype(dt), preferred_element_type=jnp.float32)
