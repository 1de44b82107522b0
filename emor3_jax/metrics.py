"""Run metrics: a JSONL log, TensorBoard event files, optionally Weights & Biases, and a console
progress bar with ETA.

Only process 0 writes; other hosts get a writer that does nothing, so the driver never
branches on the process index. The workdir may be local or gs:// (emor3_jax/fileio.py): the
JSONL rows are kept in memory and the file is rewritten whole after each row (a GCS object
cannot be appended to; metrics are a few hundred rows). A resumed run first drops the rows
its checkpoint does not cover (`resume`), so no row is lost or written twice (W&B cannot take
rows back: a resumed run continues the same W&B run, whose steps after the checkpoint then hold
the stopped run's rows and the resumed run's).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Mapping, Sequence

import numpy as np

from emor3_jax import fileio, metric_names as names


def _scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        return float(np.asarray(v))
    except (TypeError, ValueError):
        return None


BACKENDS = ("tensorboard", "wandb")


class MetricWriter:
    """One JSON row per `write` in `<workdir>/metrics.jsonl`, the scalars mirrored to the
    `backends`: TensorBoard (`<workdir>/tensorboard`, local or gs://, as tensorboardX writes
    both) and Weights & Biases (`wandb`: project, entity and run name from `wandb_settings`;
    one W&B run per workdir, so a resumed run continues it; the config as the run's config)."""

    def __init__(self, workdir: str, *, total_steps: int | None = None, enabled: bool = True,
                 progress: bool = True, start_step: int = 0, filename: str = "metrics.jsonl",
                 backends: Sequence[str] = ("tensorboard",), wandb_settings=None):
        self.enabled = enabled
        self.path = fileio.join(workdir, filename)
        self._tb = None
        self._wandb = None
        self._bar = None
        self._rows: list[dict] = []
        unknown = sorted(set(backends) - set(BACKENDS))
        if unknown:
            raise ValueError(f"config.metrics.backends: {unknown} unknown; choose from {BACKENDS}")
        if not enabled:
            return
        fileio.makedirs(workdir)
        self._rows = read_jsonl(self.path)
        if "tensorboard" in backends:
            self._tb = _summary_writer_class()(fileio.join(workdir, "tensorboard"))
        if "wandb" in backends:
            self._wandb = _wandb_run(workdir, dict(wandb_settings or {}))
        if progress and total_steps:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             desc="train", mininterval=1.0)
        self._t0 = time.time()

    def resume(self, phase: str, step: int) -> int:
        """Keep only the rows a checkpoint of `phase` ("sft" | "rl") at `step` covers (SFT rows
        are 0-based steps, RL and eval rows the RL step they follow; ("sft", 0) = no
        checkpoint: none); returns how many rows were dropped (written after that checkpoint
        by the run that was stopped)."""
        if not self.enabled:
            return 0
        def covered(row):
            kind = _kind(row)
            if phase == "sft":
                return kind == "sft" and row["step"] < step
            return kind == "sft" or row["step"] <= step
        kept = [r for r in self._rows if covered(r)]
        dropped = len(self._rows) - len(kept)
        if dropped:
            self._rows = kept
            fileio.write_atomic(self.path, _dumps(self._rows))
        return dropped

    def write(self, step: int, metrics: Mapping[str, object], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is None or (isinstance(s, float) and not math.isfinite(s) and k != "loss"):
                continue
            row[prefix + k] = s
            if self._tb is not None:
                self._tb.add_scalar(prefix + k, s, int(step))
        self._rows.append(row)
        fileio.write_atomic(self.path, _dumps(self._rows))
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "time"})

    def hparams(self, config: Mapping[str, object]) -> None:
        """The run's config as TensorBoard hparams and W&B config (flat dotted names; values as
        text or numbers)."""
        if not self.enabled:
            return
        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                  for k, v in config.items()}
        if self._tb is not None:
            self._tb.add_hparams(values, {}, name="hparams")
        if self._wandb is not None:
            self._wandb.config.update(values, allow_val_change=True)

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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_run(workdir: str, settings: dict):
    """A W&B run for this workdir: its id derives from the workdir, so every resume of the run
    continues it; rows are plotted against their `step` (SFT, RL and eval rows keep their own
    step counters, so W&B's own counter is not the x axis). W&B keeps its local files beside
    a local workdir, under $EMOR3_CACHE for a gs:// one."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("config.metrics.backends has 'wandb' but wandb is not installed: "
                          "pip install -e \".[wandb]\" (or drop it from the backends)") from e
    if fileio.is_remote(workdir):
        local = os.path.join(os.environ.get("EMOR3_CACHE", os.path.expanduser(
            "~/.cache/emor3_jax")), "wandb", hashlib.sha1(workdir.encode()).hexdigest()[:12])
    else:
        local = workdir
    os.makedirs(local, exist_ok=True)
    run = wandb.init(project=settings.get("project") or "emor3_jax",
                     entity=settings.get("entity") or None,
                     name=settings.get("name") or os.path.basename(workdir.rstrip("/")),
                     id=hashlib.sha1(workdir.encode()).hexdigest()[:16], resume="allow",
                     dir=local)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _kind(row: dict) -> str:
    """"sft", "eval" or "rl": what a row logs (from its metric names' prefix)."""
    for key in row:
        if key.startswith(names.SFT_PREFIX):
            return "sft"
        if key.startswith(names.EVAL_PREFIX):
            return "eval"
    return "rl"


def _dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_jsonl(path: str) -> list[dict]:
    if not fileio.exists(path):
        return []
    return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: where torch is installed (the
    tests' HF reference) tensorboardX imports it only to accept torch tensors, 2 s of every
    run's start; we log floats. torch stays importable afterwards."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None           # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
