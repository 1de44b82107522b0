"""Image patch rows that stay on the devices of the host that read them.

With several processes, a global batch's pixels are not sent to every host (a v4-32 rollout
batch is ~3.5 GB of fp32 patches): each host places its own rows on its own devices
(`jax.make_array_from_process_local_data`, `PatchStore`) and the global batch carries a
`DevicePatches` view: which store rows it holds, as a small integer index. Host code takes,
slices, concatenates and pads such a view as it does numpy pixel rows (the helpers below accept
both), so the host logic stays the same on every process; the program's placement
(`sharding.put_global`) gathers the rows on device into the sharding the program takes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _host_mesh() -> Mesh:
    """Every device, grouped by process in process order: a row-sharded array on it holds
    process p's rows on process p's devices."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    local = jax.local_device_count()
    return Mesh(np.array(devices).reshape(jax.process_count(), local), ("hosts", "local"))


class PatchStore:
    """A global batch's patch rows [N, D] fp32 on device (from `from_host_rows`: each host's
    block on its own devices); `on(mesh)` the same rows re-laid over another mesh's devices."""

    def __init__(self, array: jax.Array):
        self.array, self.dim = array, int(array.shape[1])
        self._placed: dict = {}

    @classmethod
    def from_host_rows(cls, local_rows: np.ndarray, rows_per_host: int) -> "PatchStore":
        """local_rows [b, P, D]: this host's rows (b <= rows_per_host, the same P and D on
        every host; rows past b are zero). Every process calls it, with its own rows; host h's
        batch row r, patch j is store row (h * rows_per_host + r) * P + j (`host_rows_index`)."""
        b, p, d = local_rows.shape
        block = np.zeros((rows_per_host * p, d), np.float32)
        block[:b * p] = local_rows.reshape(b * p, d)
        mesh = _host_mesh()
        axes = ("hosts", "local") if (rows_per_host * p) % mesh.shape["local"] == 0 else "hosts"
        return cls(jax.make_array_from_process_local_data(
            NamedSharding(mesh, P(axes)), block, (jax.process_count() * rows_per_host * p, d)))

    def on(self, mesh: Mesh) -> jax.Array:
        """The rows laid over `mesh`'s devices (rows split over all its axes where they divide,
        else replicated); placed once per mesh."""
        if mesh not in self._placed:
            n = self.array.shape[0]
            axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
            spec = P(axes) if axes and n % np.prod([mesh.shape[a] for a in axes]) == 0 else P()
            self._placed[mesh] = jax.device_put(self.array, NamedSharding(mesh, spec))
        return self._placed[mesh]


def host_rows_index(rows: Sequence[int], rows_per_host: int, patches: int) -> np.ndarray:
    """[sum(rows), P] store row indices of the hosts' batch rows in process order (host h
    has rows[h] of them) in a `PatchStore.from_host_rows` store."""
    return np.concatenate([(h * rows_per_host + np.arange(n))[:, None] * patches
                           + np.arange(patches)[None] for h, n in enumerate(rows)])


@dataclasses.dataclass(frozen=True, eq=False)
class DevicePatches:
    """A view of a PatchStore shaped like numpy pixel rows: `index.shape + (D,)`; index -1 is
    a zero row (padding). Indexing, slicing and the helpers below act on the index only."""
    store: PatchStore
    index: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.index.shape) + (self.store.dim,)

    @property
    def ndim(self) -> int:
        return self.index.ndim + 1

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> "DevicePatches":
        if isinstance(key, tuple) and len(key) > self.index.ndim:
            raise IndexError(f"DevicePatches {self.shape}: index the rows, not the patch "
                             f"vector ({key!r})")
        return DevicePatches(self.store, np.asarray(self.index[key]))

    def astype(self, dtype) -> "DevicePatches":
        if np.dtype(dtype) != self.dtype:
            raise TypeError(f"DevicePatches are float32, not {np.dtype(dtype)}")
        return self

    def __array__(self, *args, **kwargs):
        raise TypeError("these pixel rows live on the devices of the hosts that read them "
                        "(emor3_jax/patches.py): place them with sharding.put_global, or use "
                        "the helpers of emor3_jax.patches to slice and join them")

    def gather(self, sharding: NamedSharding) -> jax.Array:
        """The rows as one array laid out by `sharding` (a device gather: a collective when
        the store spans processes, so every process calls it)."""
        from emor3_jax import sharding as shd
        table = self.store.on(sharding.mesh)
        index = shd.put_global(self.index.astype(np.int32), NamedSharding(sharding.mesh, P()))
        return _gather_program(sharding)(table, index)


@functools.lru_cache(maxsize=None)
def _gather_program(out_sharding: NamedSharding):
    def take(table, index):
        rows = table[jnp.maximum(index, 0)]
        return jnp.where((index >= 0)[..., None], rows, jnp.zeros((), rows.dtype))
    return jax.jit(take, out_shardings=out_sharding)


# -- numpy-or-device helpers ----------------------------------------------------------------------
def _device(parts) -> DevicePatches | None:
    return next((p for p in parts if isinstance(p, DevicePatches)), None)


def _one_store(parts: Sequence) -> tuple[PatchStore, list[np.ndarray]]:
    """The parts' store and their indices into it; parts from several stores (rollouts of
    several global batches, as DAPO joins them) get one store of all their rows."""
    if not all(isinstance(p, DevicePatches) for p in parts):
        raise TypeError("cannot join device pixel rows with host ones")
    stores = list({id(p.store): p.store for p in parts}.values())
    if len(stores) == 1:
        return stores[0], [p.index for p in parts]
    offsets = dict(zip(map(id, stores), np.cumsum([0] + [s.array.shape[0] for s in stores])))
    array = jax.jit(lambda *a: jnp.concatenate(a), out_shardings=stores[0].array.sharding)(
        *[s.array for s in stores])
    return PatchStore(array), [np.where(p.index >= 0, p.index + offsets[id(p.store)], -1)
                               for p in parts]


def concatenate(parts: Sequence, axis: int = 0):
    if _device(parts) is None:
        return np.concatenate(parts, axis)
    store, indices = _one_store(parts)
    return DevicePatches(store, np.concatenate(indices, axis))


def stack(parts: Sequence):
    if _device(parts) is None:
        return np.stack(parts)
    store, indices = _one_store(parts)
    return DevicePatches(store, np.stack(indices))


def pad_rows(x, before_after: Sequence[tuple[int, int]]):
    """Zero rows added along the leading axes (`np.pad` widths, the patch vector unpadded)."""
    if isinstance(x, DevicePatches):
        return DevicePatches(x.store, np.pad(x.index, list(before_after), constant_values=-1))
    return np.pad(x, list(before_after) + [(0, 0)] * (np.ndim(x) - len(before_after)))


def zero_rows(like, n: int):
    """n zero patch rows, of `like`'s kind (numpy or the same device store)."""
    if isinstance(like, DevicePatches):
        return DevicePatches(like.store, np.full((n,), -1, np.int64))
    return np.zeros((n, np.shape(like)[-1]), np.float32)
