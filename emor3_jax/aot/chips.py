"""Chips and slices (TPU slices, GPU nodes): what a topology name means and the figures the
roofline uses."""
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
    platform: str = "tpu"
    target_config: str = dataclasses.field(default="", repr=False)  # GPU: XLA's GpuTargetConfigProto (text)
    usable: float = 0.95     # share of its memory a run can use (GPU: the SLURM script's
                             # XLA_PYTHON_CLIENT_MEM_FRACTION; NCCL and cuDNN need the rest)


def _gpu_target(cc: tuple[int, int], sms: int, smem_block_optin: int, smem_core: int,
                fpus: int, bandwidth: float, l2: int, clock_ghz: float, memory: int) -> str:
    """XLA's GpuTargetConfigProto for a GPU, from NVIDIA's published figures (what deviceless
    CUDA compilation needs instead of a device to query)."""
    return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {cc[0]} minor: {cc[1]} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {smem_block_optin}
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock_ghz}
  device_memory_size: {memory}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "sm_{cc[0]}.{cc[1]} with {memory}B RAM, {sms} cores"
"""


_H100_MEMORY = 85_520_809_984       # H100 SXM5 80 GB: 81,559 MiB addressable
_A100_MEMORY = 85_899_345_920       # A100 SXM4 80 GB: 81,920 MiB


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, "megacore", 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, "default", 0.82e12, host_chips=(2, 4, 1)),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, "megacore", 2.76e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, "default", 1.64e12, host_chips=(2, 4, 1)),
    # bf16 dense tensor-core peaks; one node of 8 GPUs per host
    "h100": Chip("NVIDIA H100 SXM 80GB", _H100_MEMORY, 989e12, "", 3.35e12, (1, 1, 8), "cuda",
                 _gpu_target((9, 0), 132, 232448, 233472, 128, 3.35e12, 52428800, 1.98,
                             _H100_MEMORY), usable=0.9),
    "a100": Chip("NVIDIA A100 SXM 80GB", _A100_MEMORY, 312e12, "", 2.039e12, (1, 1, 8), "cuda",
                 _gpu_target((8, 0), 108, 166912, 167936, 64, 2.039e12, 41943040, 1.41,
                             _A100_MEMORY), usable=0.9),
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
    # GPU nodes of 8: <slices>x<hosts>x<GPUs per host>, as jax's CUDA topologies count them
    "h100x8": "h100:1x1x8", "h100x16": "h100:1x2x8", "a100x8": "a100:1x1x8",
    "a100x16": "a100:1x2x8",
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
    """The (compile-only) devices of a slice or GPU nodes, one per chip."""
    if topology.chip.platform == "cuda":
        return _cuda_devices(topology)
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


def _cuda_devices(topology: Topology) -> list:
    """Compile-only CUDA devices, from the chip's target config: no GPU or driver needed, but
    jax's CUDA plugin (`pip install -e ".[aot-gpu]"`)."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")   # no driver to check here
    from jax.experimental import topologies
    dims = topology.topology_name.split(":")[1]
    try:
        desc = topologies.get_topology_desc(platform="cuda", topology=dims,
                                            target_config=topology.chip.target_config)
    except Exception as e:  # noqa: BLE001 (no CUDA plugin, or it refused the target)
        raise RuntimeError(f"cannot describe CUDA topology {topology.name} ({dims}): {e}. "
                           "AOT compilation for GPUs needs jax's CUDA plugin: pip install -e "
                           "'.[aot-gpu]' (JAX_PLATFORMS=cpu keeps the CPU as the host "
                           "backend)") from e
    return list(desc.devices)
