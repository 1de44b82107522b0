"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); which mesh axis a
logical name lands on is decided here only, as in MaxText. The same code runs on 1 CPU device,
8 virtual CPU devices, a GPU or a TPU pod.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from emor3_jax.patches import DevicePatches

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),        # flattened query heads x head_dim
    ("kv_heads", "tensor"),     # flattened key/value heads x head_dim
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("patch", None),            # flattened patch (channels x time x 14 x 14)
    ("norm", None),
    ("length", None),
    ("layers", None),           # stacked (nn.scan) decoder / vision layers
    ("cache_heads", "tensor"),  # KV-cache key/value heads (unflattened)
    ("act_embed", None),        # the residual stream between layers (activations)
)
# The sampling copy of the weights (policy.sampling_params, a checkpoint judge) and the
# sampler's activations: heads, k/v and MLP columns and the vocabulary over fsdp x tensor, the
# devices that also split the rows, so a decode step moves activations, never weights. With the
# weights split over `embed` (FSDP), XLA contracts over the split and sums [rows, 2F] MLP
# activations and [rows, V] fp32 logits across devices at every layer and token
# (docs/architecture.md).
SAMPLING_RULES: tuple[tuple[str, Any], ...] = tuple(
    (name, ("fsdp", "tensor")) for name in ("vocab", "mlp", "heads", "kv_heads")) + LOGICAL_RULES


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int, field: str = "config.mesh"
               ) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`; one size may be -1 (the rest)."""
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or known <= 0 or (-1 in sizes and num_devices % known) or (
            -1 not in sizes and known != num_devices):
        raise ValueError(f"mesh: data={data} fsdp={fsdp} tensor={tensor} does not fit the "
                         f"{num_devices} devices; set {field} so data*fsdp*tensor = "
                         f"{num_devices} (one of them may be -1 for the rest)")
    if -1 in sizes:
        sizes[sizes.index(-1)] = num_devices // known
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None,
              field: str = "config.mesh") -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(data, fsdp, tensor, len(devices), field)
    # Auto axes: XLA propagates shardings from the explicit in/out shardings we give jit.
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(mesh_config) -> Mesh:
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    return nn.logical_to_mesh_axes(tuple(names), rules)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str | None = None) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. 2 KV heads on tensor=4).

    Activations and batches meet this routinely (a chunk of one prompt); for a parameter
    (`what` = its path) a dropped axis means it is replicated over that axis, which costs memory
    a user should know about: logged as a warning, once per parameter and mesh."""
    out = []
    for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axes is None:
            out.append(None)
            continue
        axes_t = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        for a in axes_t:
            size = mesh.shape[a] * math.prod(mesh.shape[k] for k in kept)
            if dim % size == 0:
                kept.append(a)
            elif what is not None and mesh.shape[a] > 1:
                _warn_once(what, mesh, f"parameter {what} {tuple(shape)}: dimension {i} ({dim}) "
                           f"is not divisible by mesh axis {a!r} (x{size}); it is replicated "
                           f"over {a!r} instead of sharded (choose a mesh whose {a} size "
                           f"divides {dim})")
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


_WARNED: set = set()


def _warn_once(what: str, mesh: Mesh, message: str) -> None:
    key = (what, tuple(mesh.shape.items()))
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("sharding: %s", message)


def param_shardings(boxed_params, mesh: Mesh, rules=None):
    """NamedShardings for a (possibly abstract) tree of `nn.LogicallyPartitioned` parameters
    (`rules`: LOGICAL_RULES unless given)."""
    rules = rules or LOGICAL_RULES

    def one(path, x):
        if isinstance(x, nn.LogicallyPartitioned):
            spec = logical_to_spec(x.names, rules)
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            return NamedSharding(mesh, _fit_spec(spec, x.value.shape, mesh, what=name))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(
        one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_size: int | None = None) -> NamedSharding:
    """Shard the leading (batch) dimension over data x fsdp, everything else replicated."""
    spec = P(("data", "fsdp"), *([None] * (ndim - 1)))
    if batch_size is not None:
        spec = _fit_spec(spec, (batch_size,) + (1,) * (ndim - 1), mesh)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


# --------------------------------------------------------------------------------------------
# Host <-> device with meshes that may span several processes (multi-host).
# The driver gives every process the same global host batch (emor3_jax/distributed.py), so
# placing is "each process copies its own devices' shards" and fetching is a gather.

def put_global(x, sharding):
    """Host value `x` (the same on every process) as a jax.Array laid out by `sharding`.

    A sharding over several processes: each process copies only its own devices' shards
    (`jax.make_array_from_callback`; no cross-process check, unlike `jax.device_put`, which
    gathers the value to compare it). Otherwise (and for jax.Arrays) `jax.device_put`.
    """
    if x is None:
        return None
    if isinstance(x, DevicePatches):        # pixel rows kept by the hosts that read them
        return x.gather(sharding)
    if isinstance(x, jax.Array) or sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def host_to_global(tree, shardings):
    """`put_global` over a pytree of host arrays and a matching tree of shardings (None leaves
    stay None). With one process host numpy is left as it is: jit places it itself, which it
    refuses to do for shardings that span processes."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x, s: put_global(x, s) if isinstance(x, DevicePatches)
                            else x, tree, shardings)
    return jax.tree.map(put_global, tree, shardings)


def to_host(x) -> np.ndarray:
    """The whole value of `x` as numpy on this process. An array sharded over several
    processes is gathered first: a collective, so every process must call it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
