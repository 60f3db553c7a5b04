"""Checkpoint location: a local directory, or a Hugging Face repo id looked up offline in the HF
cache first. Nothing is downloaded unless asked (`allow_download=True`); when files are missing the
error lists them, says where we looked and how to fetch them.
"""

from __future__ import annotations

import json
import os

from longspec_jax.weights import INDEX_FILE, SINGLE_FILE, CheckpointError

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")  # either one suffices
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def _missing(find) -> list[str]:
    """Files a complete checkpoint lacks (config, weights incl. every indexed shard, tokenizer).

    `find(name)` returns a readable path for a file of the checkpoint, or None.
    """
    missing = [] if find(CONFIG_FILE) else [CONFIG_FILE]
    index = find(INDEX_FILE)
    if index:
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError):
            shards = []
            missing.append(f"{INDEX_FILE} (unreadable)")
        missing += [s for s in shards if not find(s)]
    elif not find(SINGLE_FILE):
        missing.append(f"{SINGLE_FILE} (or {INDEX_FILE} and its shards)")
    if not find(TOKENIZER_CONFIG):
        missing.append(TOKENIZER_CONFIG)
    if not any(find(t) for t in TOKENIZER_MODELS):
        missing.append(" or ".join(TOKENIZER_MODELS))
    return missing


def missing_files(directory: str) -> list[str]:
    """Files a complete checkpoint directory lacks."""

    def find(name):
        path = os.path.join(directory, name)
        return path if os.path.exists(path) else None

    return _missing(find)


def _cached_missing(repo_id: str, cache_dir, revision) -> list[str]:
    """Like `missing_files`, file by file in the HF cache (used when no complete snapshot exists)."""
    from huggingface_hub import try_to_load_from_cache

    def find(name):
        p = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        return p if isinstance(p, str) else None

    return _missing(find)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not os.path.isabs(name)


def resolve_checkpoint(name_or_path: str | os.PathLike, *, allow_download: bool = False, cache_dir=None,
                       revision: str | None = None) -> str:
    """A local directory holding the checkpoint `name_or_path` names.

    An existing directory is returned as is (its contents are checked by the loader). Otherwise the
    name is a repo id ("owner/name"), looked up in the HF cache without network access; with
    `allow_download=True` missing files are downloaded.

    Raises:
      CheckpointError: naming the missing files, the cache directory searched, and the command that
        provides them.
    """
    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if not _looks_like_repo_id(name):
        raise CheckpointError(f"checkpoint directory {expanded!r} does not exist (and {name!r} is not a "
                              "Hugging Face repo id of the form owner/name).")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        snapshot = snapshot_download(name, local_files_only=True, cache_dir=cache_dir, revision=revision,
                                     allow_patterns=DOWNLOAD_PATTERNS)
        missing = missing_files(snapshot)
    except LocalEntryNotFoundError:
        snapshot, missing = None, _cached_missing(name, cache_dir, revision)
    if not missing:
        return snapshot
    if allow_download:
        snapshot = snapshot_download(name, cache_dir=cache_dir, revision=revision, allow_patterns=DOWNLOAD_PATTERNS)
        missing = missing_files(snapshot)
        if not missing:
            return snapshot
        raise CheckpointError(f"downloaded {name} to {snapshot} but it lacks {missing}; it is not a safetensors "
                              "Llama/Qwen2 checkpoint.")
    raise CheckpointError(
        f"checkpoint {name!r} is not available offline: missing {missing} in the Hugging Face cache {where}"
        f"{' (partial snapshot at ' + snapshot + ')' if snapshot else ''}. Provide it with\n"
        f"  huggingface-cli download {name} --local-dir DIR   (newer huggingface_hub: hf download ...)\n"
        "and pass --checkpoint DIR (or allow downloads).")
