"""Training metrics sinks: a JSONL file (one object per logged step) and optional TensorBoard.

Only process 0 writes. Lines are flushed at once so a killed run keeps everything it logged.
"""

from __future__ import annotations

import json
import os
import warnings

import jax


class MetricsWriter:
    """Append metrics dicts to `path` (JSONL) and, if `tensorboard` is set and available, to TensorBoard."""

    def __init__(self, path: str = "", tensorboard: str = ""):
        self.enabled = jax.process_index() == 0
        self.file = None
        self.tb = None
        if not self.enabled:
            return
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
