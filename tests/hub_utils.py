"""A Hugging Face cache laid out by hand, for offline lookup tests (no network, no download)."""

from __future__ import annotations

import os
import shutil

REVISION = "0" * 40


def cache_snapshot(cache, repo: str, src, skip=()):
    """Copy `src`'s files into `cache` as the main-revision snapshot of `repo`, in the layout
    huggingface_hub reads: models--owner--name/{refs/main, snapshots/<revision>/...}. Returns the
    snapshot directory."""
    root = os.path.join(os.fspath(cache), f"models--{repo.replace('/', '--')}")
    snap = os.path.join(root, "snapshots", REVISION)
    os.makedirs(snap)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(REVISION)
    for name in os.listdir(src):
        if name not in skip:
            shutil.copy(os.path.join(src, name), os.path.join(snap, name))
    return snap
