"""Fixed-shape, resumable batches of training rows from encoded documents (`data.load_documents`).

Rows are addressed by (epoch, index): the epoch's document order is a permutation drawn from
`numpy.random.default_rng([seed, epoch])`, and a packed row is a slice of the concatenated token
stream found by binary search, so any position can be resumed without replaying the epoch.
The position is saved in checkpoints (`DataLoader.position`, `DataLoader.restore`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from longspec_jax.train.config import DataSection
from longspec_jax.train.data import DataError, Document


class DataLoader:
    """Deterministic, resumable batches of fixed-shape rows.

    A step's global batch is rows `index .. index + rows_per_step` of the epoch's order, as
    [A, B, T] (A micro-batches of B rows). On a mesh, `device_batch` reads only the rows the local
    devices hold: on a multi-host pod every host reads its own share of each global batch (all
    hosts must see the same files, so that they agree on the order).

    Args:
      docs: encoded documents.
      cfg: the data section (seq_len, packing, truncate, shuffle, seed).
      pad_id: id written into padding slots (masked out of the loss).
      rows_per_step: A * B rows consumed per optimizer step (the global batch).
    """

    def __init__(self, docs: list[Document], cfg: DataSection, *, pad_id: int, rows_per_step: int):
        self.docs, self.cfg, self.pad_id = docs, cfg, int(pad_id)
        self.T = cfg.seq_len
        self.rows_per_step = rows_per_step
        self.lengths = np.asarray([len(d.ids) for d in docs], np.int64)
        if not cfg.packing and not cfg.truncate:
            too_long = np.nonzero(self.lengths > self.T)[0]
            if len(too_long):
                d = docs[too_long[0]]
                raise DataError(f"{d.where}: {len(d.ids)} tokens > data.seq_len={self.T} ({len(too_long)} such "
                                "documents); set data.truncate=true, data.packing=true, or a larger seq_len")
        if cfg.packing:
            self.rows_per_epoch = int(self.lengths.sum() // self.T)
        else:
            self.rows_per_epoch = len(docs)
        if self.rows_per_epoch < rows_per_step:
            raise DataError(f"the dataset gives {self.rows_per_epoch} rows of {self.T} tokens per epoch, fewer than "
                            f"one optimizer step needs ({rows_per_step} = batch_size x grad_accum); add data or "
                            "lower train.batch_size / train.grad_accum / data.seq_len")
        self.epoch, self.index = 0, 0
        self._order_epoch = None

    # -- resumable position ------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.rows_per_epoch // self.rows_per_step

    def position(self) -> dict[str, int]:
        """The next row to read, as saved in checkpoints."""
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

    # -- rows ----------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.docs)
            self._perm = (np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.shuffle
                          else np.arange(n))
            self._cum = np.concatenate([[0], np.cumsum(self.lengths[self._perm])])
            self._order_epoch = epoch
        return self._perm

    def row(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row i of an epoch: (tokens [T] int32, loss_mask [T] uint8)."""
        perm = self._order(epoch)
        T = self.T
        if not self.cfg.packing:
            d = self.docs[perm[i]]
            n = min(len(d.ids), T)
            toks = np.full(T, self.pad_id, np.int32)
            mask = np.zeros(T, np.uint8)
            toks[:n], mask[:n] = d.ids[:n], d.mask[:n]
            return toks, mask
        start, end = i * T, (i + 1) * T
        j = int(np.searchsorted(self._cum, start, side="right")) - 1
        toks, masks, pos = [], [], start
        while pos < end:
            d = self.docs[perm[j]]
            lo = pos - self._cum[j]
            take = min(len(d.ids) - lo, end - pos)
            toks.append(d.ids[lo:lo + take])
            masks.append(d.mask[lo:lo + take])
            pos += take
            j += 1
        return np.concatenate(toks), np.concatenate(masks)

    # -- batches -------------------------------------------------------------------------------
    def next_step(self, accum: int) -> tuple[int, np.ndarray]:
        """(epoch, row indices [A, B]) of the next optimizer step's global batch; advances the position."""
        if self.index + self.rows_per_step > self.rows_per_epoch:
            # Drop the epoch's remainder (it would give a ragged step), start the next epoch.
            self.epoch, self.index = self.epoch + 1, 0
        ids = self.index + np.arange(self.rows_per_step).reshape(accum, -1)
        self.index += self.rows_per_step
        return self.epoch, ids

    def batch(self, epoch: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The rows `ids` (any shape) of an epoch: tokens int32 / loss_mask uint8 [*ids.shape, T]."""
        rows = [self.row(epoch, int(i)) for i in ids.ravel()]
        return {"tokens": np.stack([r[0] for r in rows]).reshape(ids.shape + (self.T,)),
                "loss_mask": np.stack([r[1] for r in rows]).reshape(ids.shape + (self.T,))}

    def device_batch(self, epoch: int, ids: np.ndarray, sharding) -> tuple[dict[str, Any], list[int]]:
        """The global batch of rows `ids` [A, B] as jax Arrays [A, B, T] int32 laid out by `sharding`,
        reading only the rows held by this process's devices; also returns those row indices."""
        import jax

        shape = ids.shape + (self.T,)
        where = sharding.addressable_devices_indices_map(shape).values()
        local = sorted({int(i) for index in where for i in ids[index[:2]].ravel()})
        rows = dict(zip(local, (self.row(epoch, i) for i in local)))

        def field(k):
            def shard(index):  # index: slices of the [A, B, T] global shape
                return np.stack([rows[int(i)][k] for i in ids[index[:2]].ravel()]).reshape(
                    ids[index[:2]].shape + (self.T,))[..., index[2]].astype(np.int32)

            return jax.make_array_from_callback(shape, sharding, shard)

        return {"tokens": field(0), "loss_mask": field(1)}, local
