"""Orbax checkpoints of the training state (async, keep-last-N, atomic) and HF-format export.

A checkpoint at step s is the directory `<dir>/<s>/` holding two items:
  state  the `TrainState` pytree (trained params, optimizer state, step, base RNG key), sharded
         arrays written by every process, restored straight into the current mesh's shardings;
  meta   JSON: the data loader position {"epoch", "index"} and the config it was trained with.

Atomicity is orbax's: a save is written under a temporary name (`<s>.orbax-checkpoint-tmp-*`) and
renamed only once every item is complete, and `CheckpointManager` lists only finalized steps, so a
run killed while saving resumes from the previous complete checkpoint. `latest_step` re-checks this.

`resume_step` decides, before anything is built or written, whether a run may start or resume in
`checkpoint.dir`: a --resume needs an existing directory and the config its newest checkpoint was
written with, up to the keys in `RESUMABLE`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from longspec_jax.train.config import TrainConfig, TrainConfigError


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names the directory and the fix."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the two items above.

    Args:
      directory: checkpoint root (created if missing; must be absolute for orbax, made so here).
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread; `wait()` before reading or exiting.
      create: create the directory (False: only read an existing one).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create)
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

    def meta(self, step: int) -> dict[str, Any]:
        """The `meta` item of `step` alone (data position and config), without the state."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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


# Keys a --resume may change: they decide how long the run goes, where outputs go, how often it logs
# and saves, how the devices are arranged, and how much memory the same maths takes; they never
# change the optimizer trajectory (train.steps moves the end of the LR schedule: the rest of the
# schedule follows the new total; with a constant LR the trajectory is unchanged). Every other key
# is the run's identity (model, data, positions, optimizer, objective, seeds): changing it would not
# continue the checkpointed run, so --resume refuses it.
RESUMABLE = (
    "train.steps",
    "train.remat", "train.attention", "train.attention_chunk", "train.loss_chunk",
    "mesh.", "log.", "data.cache_dir",
    "checkpoint.dir", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save", "checkpoint.export_dir",
)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def resume_differences(saved: Mapping[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, value now)} for every key outside `RESUMABLE` whose value differs
    between the config a checkpoint was written with (`TrainConfig.to_dict()`) and `cfg`. A key the
    saved config lacks (written before the key existed) counts with its default value."""
    old, now = _flatten(saved), _flatten(cfg.to_dict())
    defaults = _flatten(TrainConfig().to_dict())
    missing = "(absent)"
    diff = {}
    for key in sorted(set(old) | set(now)):
        if any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE):
            continue
        a, b = old.get(key, defaults.get(key, missing)), now.get(key, missing)
        if a != b:
            diff[key] = (a, b)
    return diff


def resume_step(cfg: TrainConfig, resume: bool) -> int | None:
    """The finalized step a run continues from (None: a fresh start), after the checks that must come
    before anything is built or written. Refuses: --resume without checkpoint.dir, or into a directory
    that does not exist, or with a config that differs from the checkpoint's outside `RESUMABLE`; and
    a run without --resume into a directory that already holds a checkpoint."""
    directory = cfg.checkpoint.dir
    if not directory:
        if resume:
            raise TrainConfigError("--resume needs checkpoint.dir (the directory of the run to continue)")
        return None
    if not os.path.isdir(directory):
        if resume:
            raise TrainConfigError(f"--resume: checkpoint.dir={directory} does not exist; give the directory of "
                                   "the run to continue, or drop --resume to start a new run there")
        return None
    ckpt = Checkpointer(directory, create=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            if resume and jax.process_index() == 0:
                print(f"--resume: no finalized checkpoint in {directory}; starting from step 0", file=sys.stderr)
            return None
        if not resume:
            raise TrainConfigError(f"checkpoint.dir={directory} already holds step {step}; pass --resume to "
                                   "continue it, or choose a new checkpoint.dir")
        diff = resume_differences(ckpt.meta(step).get("config", {}), cfg)
    finally:
        ckpt.close()
    if diff:
        lines = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise TrainConfigError(
            f"--resume: the config differs from the one {directory}/{step} was written with ({lines}). Resume "
            "with the checkpoint's values (its meta item holds the whole config), or start a new checkpoint.dir. "
            f"Keys that may change on resume: {', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE)}")
    return step
