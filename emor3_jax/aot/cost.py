"""FLOPs from the traced jaxpr: XLA's cost analysis counts a loop body once, does not see
inside Pallas kernels or cuDNN calls, and is empty for deviceless CUDA compiles, so matmuls
and kernels are counted here with loop trip counts."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _loop_sums(jaxpr, count, while_trips: int, per_device: bool = False
               ) -> tuple[float, float]:
    """(sum of count(eqn) over the jaxpr's equations with loop trip counts, the same with every
    loop body counted once, as XLA's cost analysis counts it). `count` returns None for an
    equation to look inside; `while_trips`: iterations of data-dependent while loops (scan
    lengths are known); `cond` counts its most expensive branch. per_device: a shard_map body
    has per-device shapes, so it counts once per device of its mesh."""
    full = once = 0.0
    for eqn in jaxpr.eqns:
        f = count(eqn)
        if f is not None:
            full, once = full + f, once + f
            continue
        subs = [_loop_sums(j, count, while_trips, per_device) for j in _sub_jaxprs(eqn)]
        if not subs:
            continue
        name = eqn.primitive.name
        if name == "cond":
            full += max(s[0] for s in subs)
            once += max(s[1] for s in subs)
            continue
        devices = eqn.params["mesh"].size if per_device and name == "shard_map" else 1
        trips = eqn.params["length"] if name == "scan" else while_trips if name == "while" else 1
        full += devices * trips * sum(s[0] for s in subs)
        once += devices * sum(s[1] for s in subs)
    return full, once


def _dot_flops(eqn) -> float | None:
    if eqn.primitive.name != "dot_general":
        return None
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    free = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in rb)
    return 2.0 * math.prod(lhs) * free


def matmul_flops(jaxpr, while_trips: int = 1) -> tuple[float, float]:
    """(matmul FLOPs with loop trip counts, the same with every loop body counted once)."""
    return _loop_sums(jaxpr, _dot_flops, while_trips)


# Pallas kernels are custom calls whose inside XLA's cost analysis does not see; their FLOPs
# are counted from the kernel's operands. Splash attention (model.attention=splash): q
# [..., T, D] and k [..., S, D] are its first two float operands; the forward computes
# Q K^T and P V (4 T S D per head), the backward's dK/dV kernel 8 T S D and its dQ kernel
# 6 T S D; every call here is causal, so about half the tiles run.
_KERNEL_FLOPS_PER_TSD = {"fwd": 4.0, "dkv": 8.0, "dq": 6.0}
CAUSAL_FRACTION = 0.5


# cuDNN's fused attention (model.attention=cudnn, GPU): q [B, T, N, H], k [B, S, K, H]; the
# forward 4 T S H per head, the backward about 2.5x that (FlashAttention-2's count). A causal
# mask_type skips half the tiles; the model passes its mask as a dense array, so all run.
_CUDNN_FLOPS_PER_TSH = {"dot_product_attention_fwd": 4.0, "dot_product_attention_bwd": 10.0}


def _cudnn_flops(eqn) -> float | None:
    kind = next((k for k in _CUDNN_FLOPS_PER_TSH
                 if eqn.primitive.name in (k, k + "_wrapper")), None)
    if kind is None:
        return None
    q, k = (v.aval.shape for v in eqn.invars[:2])
    causal = "CAUSAL" in str(eqn.params.get("mask_type", "")).upper()
    return _CUDNN_FLOPS_PER_TSH[kind] * (CAUSAL_FRACTION if causal else 1.0) * \
        math.prod(q) * k[1]


def _pallas_flops(eqn) -> float | None:
    if eqn.primitive.name != "pallas_call":
        return _cudnn_flops(eqn)
    name = str(eqn.params.get("name_and_src_info", eqn.params.get("name", "")))
    phase = next((p for p in _KERNEL_FLOPS_PER_TSD if p in name), None)
    floats = [v.aval for v in eqn.invars if jnp.issubdtype(v.aval.dtype, jnp.floating)]
    if phase is None or len(floats) < 2:
        return 0.0
    q, k = floats[:2]
    return _KERNEL_FLOPS_PER_TSD[phase] * CAUSAL_FRACTION * math.prod(q.shape) * k.shape[-2]


def kernel_flops(jaxpr, while_trips: int = 1) -> float:
    """FLOPs of the Pallas kernels (and cuDNN attention calls) in a traced jaxpr, summed over
    devices, with loop trip counts (as `matmul_flops`)."""
    return _loop_sums(jaxpr, _pallas_flops, while_trips, per_device=True)[0]
