"""TPU chips and slices: what a topology name means and the figures the roofline uses."""
from __future__ import annotations

import dataclasses
import math
import os

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float        # bf16 FLOP/s per chip
    chip_config: str         # jax topology chip_config_name (megacore: one device per chip)
    hbm_bandwidth: float     # bytes/s per chip
    host_chips: tuple[int, int, int] = (2, 2, 1)   # the largest block of chips one host drives


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, "megacore", 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, "default", 0.82e12, host_chips=(2, 4, 1)),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, "megacore", 2.76e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, "default", 1.64e12, host_chips=(2, 4, 1)),
}
# Slice names -> topology names. v4/v5p names count TensorCores (v4-8 = 4 megacore chips),
# v5e/v6e names count chips (v5e-8 and v6e-8 are one host with 8 chips).
SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v4-128": "v4:4x4x4",
    "v5e-1": "v5e:1x1", "v5e": "v5e:2x2", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4",
    "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5litepod-1": "v5e:1x1", "v5litepod-4": "v5e:2x2", "v5litepod-8": "v5e:2x4",
    "v5litepod-16": "v5e:4x4", "v5litepod-32": "v5e:4x8",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
    "v6e-32": "v6e:4x8",
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str             # as asked for (e.g. v4-8)
    topology_name: str    # jax's (e.g. v4:2x2x1)
    chip: Chip

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.topology_name.split(":")[1].split("x"))

    @property
    def num_chips(self) -> int:
        return math.prod(self.dims)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """One host's block of chips, cut to the slice (v5e-4 is one host of 2x2 chips)."""
        dims = (*self.dims, 1, 1)[:3]
        return tuple(min(h, d) for h, d in zip(self.chip.host_chips, dims))


def resolve_topology(name: str) -> Topology:
    """A slice name (v4-8, v4-32, v5e-4, v5p-8, ...) or a topology name (v4:2x2x1)."""
    key = name.strip().lower()
    topo = SLICES.get(key, key)
    gen, _, dims = topo.partition(":")
    if gen not in CHIPS or not dims or not all(d.isdigit() for d in dims.split("x")):
        raise ValueError(f"topology {name!r}: give a slice name ({', '.join(SLICES)}) or a "
                         "topology like v4:2x2x1 (generations: " + ", ".join(CHIPS) + ")")
    return Topology(name, topo, CHIPS[gen])


def _libtpu_env(topology: Topology) -> None:
    """libtpu reads these when it loads (at the first topology query). A CPU host has no TPU
    metadata: without them it warns about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES, and it
    refuses to load while another process (e.g. a test run) holds /tmp/libtpu_lockfile."""
    gen = topology.topology_name.split(":")[0]
    for key, value in (("TPU_ACCELERATOR_TYPE", f"{gen}-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_WORKER_ID", "0"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)


def topology_devices(topology: Topology) -> list:
    """The (compile-only) TPU devices of a slice, one per chip."""
    _libtpu_env(topology)
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.topology_name,
            chip_config_name=topology.chip.chip_config, chips_per_host_bounds=topology.chips_per_host_bounds,
            num_slices=1)
    except Exception as e:  # noqa: BLE001 (libtpu missing or unknown topology)
        raise RuntimeError(f"cannot describe TPU topology {topology.topology_name}: {e}. "
                           "AOT compilation needs libtpu: pip install 'jax[tpu]'") from e
    return list(desc.devices)
