"""Multi-host start-up: `jax.distributed.initialize()` when the environment says we are one of
several processes (TPU VM pods, SLURM, or explicit EMOR3_* variables), nothing otherwise."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _explicit_env() -> dict | None:
    """EMOR3_COORDINATOR / EMOR3_NUM_PROCESSES / EMOR3_PROCESS_ID (tests, bare clusters)."""
    if "EMOR3_COORDINATOR" not in os.environ:
        return None
    return dict(coordinator_address=os.environ["EMOR3_COORDINATOR"],
                num_processes=int(os.environ["EMOR3_NUM_PROCESSES"]),
                process_id=int(os.environ["EMOR3_PROCESS_ID"]))


def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    return bool(hosts) and "," in os.environ.get("TPU_WORKER_HOSTNAMES", ",")


def _under_slurm() -> bool:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize() -> None:
    """Join the job's other processes if there are any; safe to call once per process."""
    explicit = _explicit_env()
    if explicit is not None:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**explicit)
    elif _on_tpu_pod() or _under_slurm():
        jax.distributed.initialize()   # jax reads the TPU / SLURM environment itself
    else:
        return
    log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
