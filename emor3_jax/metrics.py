"""Run metrics: TensorBoard event files, a JSONL log, and a console progress bar with ETA.

Only process 0 writes; other hosts get a writer that does nothing, so the driver never
branches on the process index.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import numpy as np


def _scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        return float(np.asarray(v))
    except (TypeError, ValueError):
        return None


class MetricWriter:
    """Appends one JSON line per `write` and mirrors the scalars to TensorBoard."""

    def __init__(self, workdir: str, *, total_steps: int | None = None, enabled: bool = True,
                 progress: bool = True, start_step: int = 0, filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = os.path.join(workdir, filename)
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress and total_steps:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             desc="train", mininterval=1.0)
        self._t0 = time.time()

    def write(self, step: int, metrics: Mapping[str, object], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is None or (isinstance(s, float) and not math.isfinite(s) and k != "loss"):
                continue
            row[prefix + k] = s
            self._tb.add_scalar(prefix + k, s, int(step))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._tb.flush()

    def progress(self, step: int, summary: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.n = int(step)
        self._bar.set_postfix({k: f"{v:.3g}" for k, v in summary.items()}, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
