"""Training metrics sinks: a JSONL file (one object per logged step) and optional TensorBoard.

Only process 0 writes metrics; with `log.rows` every process also logs the data rows it read
(`RowsLog`). Lines are flushed at once so a killed run keeps everything it logged. A run resumed
from step s first drops the records after s (and a line cut short by the kill) from its files, so
each log reads as one uninterrupted run: each step once, in order.
"""

from __future__ import annotations

import json
import os
import warnings

import jax


class MetricsWriter:
    """Append metrics dicts to `path` (JSONL) and, if `tensorboard` is set and available, to TensorBoard.

    resumed_at: the step a resumed run restarts from; the JSONL records after it are dropped first.
    """

    def __init__(self, path: str = "", tensorboard: str = "", *, resumed_at: int | None = None):
        self.enabled = jax.process_index() == 0
        self.file = None
        self.tb = None
        if not self.enabled:
            return
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if resumed_at is not None and os.path.exists(path):
                _truncate(path, resumed_at)
            self.file = open(path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is None:
                warnings.warn("log.tensorboard is set but neither tensorboard nor tensorboardX is installed; "
                              "writing metrics JSONL only (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(tensorboard)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class RowsLog:
    """`log.rows`: each process appends {"step", "epoch", "rows"} (the global row indices of the epoch
    that it read for the step) to `<log.rows>.<process index>`, to audit how a pod splits the data.

    resumed_at: as for `MetricsWriter`.
    """

    def __init__(self, path: str, *, resumed_at: int | None = None):
        self.file = None
        if path:
            path = f"{path}.{jax.process_index()}"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if resumed_at is not None and os.path.exists(path):
                _truncate(path, resumed_at)
            self.file = open(path, "a", buffering=1)

    def write(self, step: int, epoch: int, rows: list[int]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "epoch": epoch, "rows": rows}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _truncate(path: str, step: int) -> None:
    """Keep the records of steps <= `step` (rewritten to a temporary file, then renamed into place)."""
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run may be cut short
            if record.get("step", 0) <= step:
                keep.append(json.dumps(record) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
