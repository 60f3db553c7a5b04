"""Orbax checkpoints of the training state (async, keep-last-N, atomic) and HF-format export.

A checkpoint at step s is the directory `<dir>/<s>/` holding two items:
  state  the `TrainState` pytree (trained params, optimizer state, step, base RNG key), sharded
         arrays written by every process, restored straight into the current mesh's shardings;
  meta   JSON: the data loader position {"epoch", "index"} and the config it was trained with.

Atomicity is orbax's: a save is written under a temporary name (`<s>.orbax-checkpoint-tmp-*`) and
renamed only once every item is complete, and `CheckpointManager` lists only finalized steps, so a
run killed while saving resumes from the previous complete checkpoint. `latest_step` re-checks this.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names the directory and the fix."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the two items above.

    Args:
      directory: checkpoint root (created if missing; must be absolute for orbax, made so here).
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread; `wait()` before reading or exiting.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest *finalized* step, or None (temporary, half-written directories are skipped)."""
        self.manager.reload()
        steps = [s for s in self.manager.all_steps() if _finalized(self.directory, s)]
        return max(steps) if steps else None

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving `state` and `meta` at `step` (asynchronously when enabled)."""
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore (state, meta) at `step` into the shardings / dtypes of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` (or real arrays),
        e.g. the freshly initialised state of this run; a different model shape is an error.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this run's model / optimizer ({e}). "
                "Resume with the config it was written with, or use a new checkpoint.dir.") from e
        return out["state"], out["meta"]

    def wait(self) -> None:
        """Block until pending async saves are finalized."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _finalized(directory: str, step: int) -> bool:
    """A step directory is complete when it exists under its final name and holds both items."""
    path = os.path.join(directory, str(step))
    return os.path.isdir(path) and all(os.path.isdir(os.path.join(path, item)) for item in ("state", "meta"))
