"""What produced a run: its resolved config, the package version and git revision.

`record` writes `<workdir>/run/config.json` and `provenance.json` (process 0); `check_resume`
compares a resumed run's config with the recorded one and refuses changes that would make
the resumed run another experiment (model, data, recipe), while changes of cadence, limits,
batch splitting or placement are allowed and logged.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from typing import Any

from emor3_jax import fileio

log = logging.getLogger(__name__)

# Fields a resumed run may change: when to evaluate, save and stop, how a step is split into
# micro-batches and chunks (the loss is independent of the split), where things run and live.
HARMLESS = ("mode", "train.eval_every", "train.max_steps", "train.epochs",
            "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
            "train.max_nonfinite_in_a_row", "eval.", "profile.", "mesh.", "aot.",
            "rl.micro_batch_size", "rl.logprob_micro_batch_size", "rl.logprob_chunk",
            "rl.micro_batch_tokens", "rl.logprob_micro_batch_tokens", "rl.length_buckets",
            "rl.length_aware",
            "rollout.chunk_size", "reward.judge_chunk_size", "data.num_workers",
            "data.data_dir", "data.manual_dir", "model.attention", "model.remat",
            "compile_cache_dir", "metrics.")


def flat_config(config) -> dict[str, Any]:
    """{"rl.kl_coef": 0.01, ...}: JSON-able leaves of a ConfigDict (tuples as lists)."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        for key, value in sorted(node.items()):
            name = f"{prefix}{key}"
            if hasattr(value, "items"):
                walk(value, name + ".")
            else:
                out[name] = list(value) if isinstance(value, tuple) else value
    walk(config, "")
    return out


def _git_revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode:
        return "unknown (not a git checkout)"
    return rev.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def provenance() -> dict[str, Any]:
    from importlib import metadata
    import jax

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    return {"emor3_jax": version("emor3_jax"), "git_revision": _git_revision(),
            "jax": jax.__version__, "flax": version("flax"), "python": platform.python_version(),
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "processes": jax.process_count(), "argv": sys.argv,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def check_resume(workdir: str, config) -> list[str]:
    """Raise ValueError naming the changed fields that matter; return (and log) the harmless
    changes. A workdir without a checkpoint or without a recorded config passes."""
    path = fileio.join(workdir, "run", "config.json")
    ckpts = fileio.path(fileio.join(workdir, "checkpoints"))
    if not fileio.exists(path) or not ckpts.exists() or not any(
            p.name.isdigit() for p in ckpts.iterdir()):
        return []
    old, new = json.loads(fileio.read_text(path)), json.loads(json.dumps(flat_config(config)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    harmless = [k for k in changed if k.startswith(HARMLESS)]
    matters = [k for k in changed if k not in harmless]
    if matters:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in matters)
        raise ValueError(f"{workdir} holds a run with another config ({diffs}). A resumed run "
                         "must keep the model, data and recipe: resume with that config, or "
                         "start afresh with a new --workdir")
    for k in harmless:
        log.info("resume: config.%s changed %r -> %r (allowed)", k, old.get(k), new.get(k))
    return harmless


def record(workdir: str, config) -> None:
    """`run/config.json` (the resolved config, flat) and `run/provenance.json`."""
    fileio.write_atomic(fileio.join(workdir, "run", "config.json"),
                        json.dumps(flat_config(config), indent=1, sort_keys=True))
    fileio.write_atomic(fileio.join(workdir, "run", "provenance.json"),
                        json.dumps(provenance(), indent=1))
