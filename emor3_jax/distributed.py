"""Multi-host start-up and the few host-level collectives the driver needs.

`initialize()` runs `jax.distributed.initialize()` when the environment says we are one of
several processes (TPU VM pods, SLURM, or explicit EMOR3_* variables), nothing otherwise.

How a multi-host run works (docs/architecture.md): every host reads its shard of the data; the
host batches' small fields are gathered (`allgather_objects`) and each host's pixel rows stay on
its own devices (`patches.DevicePatches`), so every process holds the same global batch and
runs the same host logic (sampling loop, rewards, judge prompts, advantages, packing). Device
arrays are global (`sharding.put_global` / `sharding.to_host`), so one process and N processes
with the same global batch and mesh shape compute the same thing.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def cpu_without_accelerator() -> bool:
    """Make JAX use only its CPU backend on a host with no TPU chip or GPU attached, unless
    JAX_PLATFORMS says otherwise; returns whether it did. Must run before the first backend
    query. Where libtpu is installed (the `tpu` and `test` extras) JAX otherwise tries the TPU
    backend on any host, and libtpu prints "could not determine TPU accelerator type" and an
    INVALID_ARGUMENT error as a run's first lines. A TPU VM (TPU chips on its PCI bus) or a GPU
    host keeps JAX's own choice."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return False
    try:
        from jax._src import hardware_utils as hw        # what JAX itself reads
        if (hw.num_available_tpu_chips_and_device_id()[0] or hw.has_visible_nvidia_gpu()
                or hw.num_available_amd_gpus(stop_at=1)):
            return False
    except Exception:  # noqa: BLE001  (a private module moved: leave the choice to JAX)
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


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


def _requested() -> bool:
    """EMOR3_DISTRIBUTED=1 (set by launch/tpu_pod.sh): TPU VM workers learn their peers from
    the GCE metadata server, not from environment variables, so the launcher says so."""
    return os.environ.get("EMOR3_DISTRIBUTED", "").lower() in ("1", "true", "yes")


CPU_COLLECTIVE_ORDER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _serialize_cpu_collectives() -> None:
    """Make XLA:CPU issue a program's collectives in program order on every device, when a
    CPU run has several devices (virtual ones, or other processes).

    Its concurrency-optimized scheduler may start two independent collectives of one program
    (e.g. an all-to-all and an all-reduce) in different orders on different devices; each
    device then waits in a different collective for ever (the Cold-Start SFT step hung this
    way across 2 processes, and a 4-device process aborted on the rendezvous timeout). Only
    XLA:CPU reads the flag; XLA_FLAGS is read when a backend starts, which is after this.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    count = re.search(r"xla_force_host_platform_device_count=(\d+)", flags)
    several = (count is not None and int(count.group(1)) > 1) or _explicit_env() is not None
    if several and "concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + CPU_COLLECTIVE_ORDER_FLAG).strip()


def initialize() -> None:
    """Join the job's other processes if there are any; a no-op when already joined."""
    if jax.distributed.is_initialized():
        return
    _serialize_cpu_collectives()
    explicit = _explicit_env()
    if explicit is not None:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            # CPU processes exchange data through gloo (TCP); must be set before initialize
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**explicit)
    elif _requested() or _on_tpu_pod() or _under_slurm():
        jax.distributed.initialize()   # jax reads the TPU / SLURM environment itself
    else:
        return
    log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


# --------------------------------------------------------------------------------------------
# Host-level collectives. Every process must call them, in the same order.

def _process_mesh() -> jax.sharding.Mesh:
    """One device per process (its first), so a gathered payload lands on one device per host
    rather than on every local device."""
    first: dict[int, Any] = {}
    for d in jax.devices():
        first.setdefault(d.process_index, d)
    return jax.sharding.Mesh(np.array([first[p] for p in range(jax.process_count())]),
                             ("processes",))


def _bucket(n: int) -> int:
    """Payload sizes rounded up to 2^k or 3 * 2^(k-1): a handful of compiled gathers per run."""
    size = 1024
    while size < n:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


_SENT = {"bytes": 0}


def bytes_sent() -> int:
    """Bytes this process has put into host-level gathers so far (every other process
    receives them): what a step costs the hosts' network besides the programs' collectives."""
    return _SENT["bytes"]


def allgather_rows(row: np.ndarray) -> np.ndarray:
    """[...] numpy of the same shape and dtype on every process -> [process_count, ...]."""
    row = np.asarray(row)
    if jax.process_count() == 1:
        return row[None]
    _SENT["bytes"] += row.nbytes
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = _process_mesh()
    mine = mesh.devices[jax.process_index()]
    stacked = jax.make_array_from_single_device_arrays(
        (jax.process_count(),) + row.shape, NamedSharding(mesh, P("processes")),
        [jax.device_put(row[None], mine)])
    out = _replicate(stacked, NamedSharding(mesh, P()))
    return np.asarray(out.addressable_data(0))


_REPLICATE = {}


def _replicate(x, sharding):
    key = (x.shape, x.dtype, sharding)
    if key not in _REPLICATE:
        _REPLICATE[key] = jax.jit(lambda y: y, out_shardings=sharding)
    return _REPLICATE[key](x)


# bytes per gather: each process's piece of a payload lands on one device of every process
_CHUNK_BYTES = 64 << 20


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in process order (e.g. host batches of different
    shapes, or iterator states). One process: [obj]."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = allgather_rows(np.array([data.size], np.int64))[:, 0]
    longest = int(sizes.max())
    size = (_bucket(longest) if longest <= _CHUNK_BYTES
            else -(-longest // _CHUNK_BYTES) * _CHUNK_BYTES)
    padded = np.zeros((size,), np.uint8)
    padded[:data.size] = data
    step = min(size, _CHUNK_BYTES)       # large payloads (image batches) go in pieces
    rows = np.concatenate([allgather_rows(padded[i:i + step]) for i in range(0, size, step)], 1)
    return [pickle.loads(rows[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. SIGTERM seen by some hosts):
    decisions that lead to collectives must be taken by all processes together."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(allgather_rows(np.array([bool(flag)], np.int32)).any())
