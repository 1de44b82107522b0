"""Command line: `python -m emor3_jax.main --config=configs/tpu_v4.py --workdir=/path`.

Modes (`--config.mode=`): train (EMO-R3 or a baseline, optionally after a Cold-Start SFT),
sft (supervised baseline), eval (accuracy report of the configured model), export (Hugging Face
directory of the latest checkpoint). Without `--config` the embedded CPU demo runs.
Config files may name a method: `--config=configs/tpu_v4.py:grpo` (see configs/base.py).

`run(config, workdir)` is the same from Python (a notebook): it picks what each mode runs; the
loop is emor3_jax/trainer.py, each training phase's algorithm a learner (emor3_jax/learners/).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import emor3_jax.configs as _configs

_DEMO = os.path.join(os.path.dirname(_configs.__file__), "demo_cpu.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "ml_collections config file "
                                          "(default: the embedded CPU demo)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "where checkpoints, metrics and the "
                               "report go (local path or gs://)")


def run(config, workdir: str):
    """Everything `python -m emor3_jax.main` does for `config.mode`; returns the report's
    contents (export: the export directory; None when SIGTERM stopped training)."""
    from emor3_jax import fileio, trainer
    fileio.check_writable(workdir)
    trainer.use_compile_cache(config, workdir)
    with trainer.sigterm_saves():
        loop = trainer.Trainer(config, workdir)
        try:
            mode = config.mode
            if mode == "export":
                return loop.export(loop.latest_params())
            if mode == "eval":
                return loop.finish(loop.policy.params, method=f"{config.method} (eval only)")
            done = loop.train(trainer.phases(config))     # mode sft or train
            if done is None:        # stopped by SIGTERM after saving
                return None
            state, step = done
            return loop.finish(state.params, method="SFT" if mode == "sft" else config.method,
                               step=step)
        finally:
            loop.close()


# What a bad config, path or environment raises with a message that says what to do (and a
# run halted for non-finite updates): shown alone, without the traceback (EMOR3_TRACEBACK=1 or
# --verbosity=1 shows it).
USER_ERRORS = (ValueError, OSError, ImportError)


def _tpu_hint(config) -> str:
    """For a TPU config run where no TPU is: how to check it on this host instead."""
    import jax
    topology = config.aot.get("topology", "")
    if not topology or jax.default_backend() == "tpu":
        return ""
    return (f"\n(this config is for TPU {topology}; this host has {jax.device_count()} "
            f"{jax.default_backend().upper()} device(s). Check its fit from here with `python -m "
            f"emor3_jax.aot --config={flags.FLAGS['config'].config_filename}`, or run it on the TPU VM: "
            "launch/tpu_pod.sh)")


def main(argv):
    del argv
    verbose = flags.FLAGS.verbosity >= 1 or os.environ.get("EMOR3_TRACEBACK", "") not in ("", "0")
    # Our progress at INFO; libraries (orbax, tfds, grain) only when something is wrong.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("emor3_jax").setLevel(logging.INFO)
    from emor3_jax import distributed, trainer
    distributed.cpu_without_accelerator()   # before any backend starts
    try:
        distributed.initialize()       # no-op on one host; TPU pods / SLURM from the environment
        run(_CONFIG.value, _WORKDIR.value)
    except (*USER_ERRORS, trainer.NonFiniteError) as e:
        if verbose:
            raise
        print(f"error: {e}{_tpu_hint(_CONFIG.value)}\n(the traceback: --verbosity=1 or "
              "EMOR3_TRACEBACK=1)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
