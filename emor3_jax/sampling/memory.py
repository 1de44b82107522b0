"""Does a compiled program fit the device? XLA's own figures, not a hand-written formula.

The sampler checks each executable before its first run and the AOT tool (emor3_jax/aot/)
reports the same numbers, so both read them through `program_memory`.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


class SamplerMemoryError(ValueError):
    """The sampling configuration cannot fit the device; the message says how much it needs."""


def program_memory(compiled) -> dict[str, int] | None:
    """Per-device bytes of a compiled program (XLA's memory analysis): args, out, temp, alias
    (donated outputs reusing argument buffers) and code; None where the backend has none."""
    try:
        mem = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):       # backends without it
        mem = None
    if mem is None:
        return None
    return {"args": mem.argument_size_in_bytes, "out": mem.output_size_in_bytes,
            "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes,
            "code": mem.generated_code_size_in_bytes}


def total_bytes(memory: dict[str, int]) -> int:
    """Peak per-device bytes of a program: args + outputs - aliased + temporaries + code."""
    m = memory
    return m.get("args", 0) + m.get("out", 0) - m.get("alias", 0) + m.get("temp", 0) + \
        m.get("code", 0)


def host_limit_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def fmt_gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def device_limit(mesh=None, memory_limit_bytes: int | None = None) -> tuple[int, str]:
    """(per-device byte budget, where it comes from): memory_limit_bytes if given, else the
    device's bytes_limit, else the host's RAM (CPU)."""
    if memory_limit_bytes is not None:
        return memory_limit_bytes, "memory_limit_bytes"
    dev = jax.local_devices()[0] if mesh is None else next(
        (d for d in mesh.devices.flat if d.process_index == jax.process_index()),
        mesh.devices.flat[0])
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends without memory stats)
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    return host_limit_bytes(), "host RAM"


def check_fits(compiled, what: str, limit: int, source: str) -> None:
    """Raise SamplerMemoryError if `compiled` (described by `what`) needs more than `limit`
    bytes per device (0: no check)."""
    if not limit:
        return
    memory = program_memory(compiled)
    if memory is None:
        log.debug("sampler: no memory analysis for the %s on this backend; not checked", what)
        return
    need = total_bytes(memory)
    log.info("sampler: the %s needs %s per device (limit %s, %s)", what, fmt_gib(need),
             fmt_gib(limit), source)
    if need > limit:
        raise SamplerMemoryError(
            f"sampling: the {what} needs about {fmt_gib(need)} per device (XLA's memory "
            f"analysis: arguments {fmt_gib(memory['args'])} (params, KV cache, inputs), "
            f"outputs {fmt_gib(memory['out'])}, temporaries {fmt_gib(memory['temp'])}, "
            f"aliased {fmt_gib(memory['alias'])}) but the limit is {fmt_gib(limit)} "
            f"({source}); lower chunk_size, max_new_tokens or the prompt length, or shard "
            "over more devices")
