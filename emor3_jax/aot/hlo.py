"""What XLA's compile errors say: the line worth showing, and the temporaries an
out-of-memory error names (the knob search extrapolates from them)."""
from __future__ import annotations

import re

from emor3_jax.aot.chips import GiB

_REQUIRED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGTP]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40, "P": 1 << 50}


def error_line(e: Exception) -> str:
    """The line of a compile error that says what went wrong (out of memory first)."""
    text = str(e).strip()
    for line in text.splitlines():
        if "RESOURCE_EXHAUSTED" in line or "memory" in line.lower():
            return line.strip()[:400]
    return (text.splitlines() or [type(e).__name__])[0][:400]


def required_temp_bytes(error: str) -> float | None:
    """The bytes of HLO temporaries an out-of-memory error says it needed (None: not one)."""
    m = _REQUIRED.search(error)
    return None if m is None else float(m.group(1)) * _UNITS[m.group(2)]


# ---- what a compiled loop moves between devices --------------------------------------------

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z][a-z0-9-]*)\(")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast", "ragged-all-to-all")


def _array_bytes(shapes: str, scalars: bool = True) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(shapes):
        if not (dims or scalars):
            continue
        n = _ITEMSIZE[dtype]
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n)
    return out


def _computations(hlo_text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if head and line.rstrip().endswith("{"):
            name = head.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name:
            comps[name].append(line)
    return comps


def loop_collective_bytes(hlo_text: str) -> dict[str, int]:
    """Per device, the bytes each kind of collective produces in one iteration of the
    program's longest while loop (compiled HLO text, `Compiled.as_text()`): what one decode
    step moves between chips, which its memory roofline does not show. An async collective
    counts at its start, once: its result (an all-gather's or a collective-permute's, not the
    operand or the scalar contexts its start also returns)."""
    comps = _computations(hlo_text)
    loops = [line for lines in comps.values() for line in lines if " while(" in line]
    if not loops:
        return {}
    body = re.search(r"body=%([\w.\-]+)", max(
        loops, key=lambda line: len(comps.get(re.search(r"body=%([\w.\-]+)", line).group(1),
                                              ())))).group(1)
    moved: dict[str, int] = {}
    for line in comps[body]:
        m = _INSTRUCTION.match(line)
        if not m or m.group(2).removesuffix("-start") not in _COLLECTIVES:
            continue
        kind, start = m.group(2).removesuffix("-start"), m.group(2).endswith("-start")
        sizes = _array_bytes(m.group(1), scalars=not start)
        if start and kind != "all-reduce" and len(sizes) > 1:
            sizes = sizes[len(sizes) // 2:]        # (operands, results): the results
        moved[kind] = moved.get(kind, 0) + sum(sizes)
    return moved
