"""Checkpoint directories: the files a target or draft checkpoint is made of, where a checkpoint
named by a path or a Hugging Face repo id lives, and writing one so that nothing is half-written.

A name is a local directory or an "owner/name" repo id, looked up offline in the HF cache; nothing
is downloaded unless asked (`allow_download=True`). When files are missing the error lists them,
says where we looked and how to fetch them. `weights` and `draft_weights` import their file names
and `CheckpointError` from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Callable, Iterator

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")  # either one suffices
# A draft is one decoder block in one file: ours and the released repos' safetensors, the released
# PyTorch export, or the training code's state dict (spec 1.5). The first one present is read.
DRAFT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "draft_model_weights.pth")

KINDS = ("target", "draft")
_DOWNLOAD_PATTERNS = {"target": ["*.json", "*.safetensors", "tokenizer.model", "*.txt"],
                      "draft": ["*.json", *DRAFT_WEIGHT_FILES]}
_FLAG = {"target": "--checkpoint", "draft": "--draft"}  # where the CLI takes a directory of each kind


class CheckpointError(ValueError):
    """A checkpoint we cannot find, read or write; the message names the file and what to do."""


# --------------------------------------------------------------------------------------------
# Finding a checkpoint


def _missing(find: Callable[[str], str | None], kind: str) -> list[str]:
    """Files a complete checkpoint of `kind` lacks; `find(name)` gives a readable path or None.

    target: config.json, the weights (incl. every indexed shard) and a tokenizer.
    draft: one of DRAFT_WEIGHT_FILES (its config.json is optional: the shapes also follow from the
    target's config and the tensors).
    """
    if kind == "draft":
        return [] if any(find(n) for n in DRAFT_WEIGHT_FILES) else [" or ".join(DRAFT_WEIGHT_FILES)]
    missing = [] if find(CONFIG_FILE) else [CONFIG_FILE]
    index = find(INDEX_FILE)
    if index:
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
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


def missing_files(directory: str, kind: str = "target") -> list[str]:
    """Files a complete checkpoint directory of `kind` ("target" or "draft") lacks."""

    def find(name):
        path = os.path.join(directory, name)
        return path if os.path.exists(path) else None

    return _missing(find, kind)


def _cached_missing(repo_id: str, kind: str, cache_dir, revision) -> list[str]:
    """Like `missing_files`, file by file in the HF cache (used when no complete snapshot exists)."""
    from huggingface_hub import try_to_load_from_cache

    def find(name):
        p = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        return p if isinstance(p, str) else None

    return _missing(find, kind)


def _could_be_repo_id(name: str) -> bool:
    """True when `name` is also a valid Hugging Face repo id of the form owner/name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "~", "/")) or (os.sep != "/" and os.sep in name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_checkpoint(name_or_path: str | os.PathLike, *, kind: str = "target", allow_download: bool = False,
                       cache_dir=None, revision: str | None = None) -> str:
    """A local path holding the checkpoint `name_or_path` names.

    An existing directory is returned as is (the loader checks its contents); so is an existing
    file for kind="draft" (a bare weight file). Otherwise the name must be a repo id
    ("owner/name"), looked up in the HF cache without network access; with `allow_download=True`
    missing files are downloaded.

    Args:
      name_or_path: a directory, (draft only) a weight file, or a repo id.
      kind: "target" (config, safetensors weights, tokenizer) or "draft" (one weight file of
        DRAFT_WEIGHT_FILES): which files a cached snapshot must hold.
      allow_download: fetch a repo's missing files.
      cache_dir, revision: passed to huggingface_hub (default: its cache, the main revision).

    Raises:
      CheckpointError: naming the directory that does not exist or the files that are missing,
        the cache directory searched, and the command that provides them.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        if kind == "draft":
            return expanded
        raise CheckpointError(f"{expanded!r} is a file; pass the checkpoint directory that holds config.json, the "
                              "weights and the tokenizer.")
    if not _could_be_repo_id(name):
        raise CheckpointError(f"{kind} checkpoint directory {expanded!r} does not exist; check the path.")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = _DOWNLOAD_PATTERNS[kind]
    where = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        snapshot = snapshot_download(name, local_files_only=True, cache_dir=cache_dir, revision=revision,
                                     allow_patterns=patterns)
        missing = missing_files(snapshot, kind)
    except LocalEntryNotFoundError:
        snapshot, missing = None, _cached_missing(name, kind, cache_dir, revision)
    if not missing:
        return snapshot
    if allow_download:
        snapshot = snapshot_download(name, cache_dir=cache_dir, revision=revision, allow_patterns=patterns)
        missing = missing_files(snapshot, kind)
        if not missing:
            return snapshot
        raise CheckpointError(f"downloaded {name} to {snapshot} but it lacks {missing}; it is not a "
                              f"{'LongSpec draft' if kind == 'draft' else 'safetensors Llama/Qwen2 checkpoint'}.")
    nothing_cached = snapshot is None and missing == _missing(lambda _: None, kind)
    if nothing_cached:
        where_not = (f"the directory {expanded!r} does not exist, and the Hugging Face repo {name!r} is not in the "
                     f"local cache {where} either (it needs {missing})")
    else:
        where_not = (f"missing {missing} in the Hugging Face cache {where}"
                     f"{' (partial snapshot at ' + snapshot + ')' if snapshot else ''}")
    raise CheckpointError(
        f"{kind} checkpoint {name!r} is not available offline: {where_not}. "
        f"{'If it is a repo, download' if nothing_cached else 'Download'} it with\n"
        f"  huggingface-cli download {name} --local-dir DIR   (newer huggingface_hub: hf download ...)\n"
        f"and pass {_FLAG[kind]} DIR (or allow downloads).")


# --------------------------------------------------------------------------------------------
# Writing a checkpoint


def check_output_dir(directory: str | os.PathLike, *, overwrite: bool = False) -> str:
    """The absolute path of `directory` if a checkpoint may be written there, else CheckpointError.

    A missing or empty directory is fine. A non-empty one is replaced only with `overwrite`, and
    never when it holds subdirectories (a checkpoint is flat, so it is probably something else).
    """
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory} exists and is a file, not a directory; choose another output "
                              "directory (or remove the file).")
    entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if entries and not overwrite:
        raise CheckpointError(f"output directory {directory} is not empty ({', '.join(entries[:5])}"
                              f"{', ...' if len(entries) > 5 else ''}); choose a new directory, or replace it and "
                              "everything in it with --force (overwrite=True).")
    subdirs = [e for e in entries if os.path.isdir(os.path.join(directory, e))]
    if subdirs:
        raise CheckpointError(f"output directory {directory} holds subdirectories {subdirs[:5]}: it does not look "
                              "like a checkpoint directory, so it is not replaced; choose another output directory.")
    return directory


@contextlib.contextmanager
def writing_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Write a checkpoint directory atomically: yields an empty temporary directory beside
    `directory`; when the block completes, it becomes `directory` by one rename (an existing
    directory, allowed by `check_output_dir`, is moved aside first and deleted after). If the
    block raises, the temporary directory is removed and `directory` is untouched.
    """
    directory = check_output_dir(directory, overwrite=overwrite)
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's private 0o700
    try:
        yield tmp
        if os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
        if os.path.exists(directory):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except OSError:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
