"""What XLA's TPU cost analysis counts as "bytes accessed" for collectives, against what a chip
reads, writes and receives: the AOT tool prices decode steps by that count, so a program that
trades an all-reduce for all-gathers and all-to-alls can look slower than it is.

Compiles, for a v4-8 (4 chips, libtpu, no TPU needed), programs over one bf16 [N, D] block of
4 MiB per chip: an elementwise negate, a psum, an all-gather to the whole array and an
all-to-all, and prints XLA's bytes accessed beside the bytes each moves per chip (its input
read + its output written). `pip install "jax[tpu]"`; `python bench/xla_collective_bytes.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emor3_jax.aot.chips import resolve_topology, topology_devices

N, D = 4096, 2048                     # bf16, 16 MiB in all, 4 MiB per chip
MIB = 2 ** 20


def main():
    mesh = Mesh(np.array(topology_devices(resolve_topology("v4-8"))), ("x",))
    block = jax.ShapeDtypeStruct((N, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    shard = N * D * 2 // 4
    on_chips = lambda f, out=P("x"): jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=out,
                                                   check_vma=False)
    programs = [
        ("negate", lambda x: -x, 2 * shard),
        ("psum", on_chips(lambda x: jax.lax.psum(x, "x")), 2 * shard),
        ("all-gather to the whole array",
         on_chips(lambda x: jax.lax.all_gather(x, "x", tiled=True), P()), shard + 4 * shard),
        ("all-to-all", on_chips(lambda x: jax.lax.all_to_all(x, "x", 1, 0, tiled=True)),
         2 * shard),
    ]
    print("| program (4 MiB per chip) | read + written per chip | XLA bytes accessed | ratio |")
    print("|---|---|---|---|")
    for name, fn, moved in programs:
        cost = jax.jit(fn).lower(block).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla = float(cost.get("bytes accessed", 0.0))
        print(f"| {name} | {moved / MIB:.0f} MiB | {xla / MIB:.0f} MiB | {xla / moved:.2f}x |")


if __name__ == "__main__":
    main()
