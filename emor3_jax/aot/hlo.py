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
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z][a-z0-9-]*)\(")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast", "ragged-all-to-all")


def _array_bytes(shapes: str, scalars: bool = True) -> list[int]:
    return [n for n, _, dims in _shaped(shapes) if dims or scalars]


def _shaped(shapes: str) -> list[tuple[int, bool, str]]:
    """(bytes, in HBM: no `S(n)` memory space in its layout, dims) of each array of an HLO
    shape, in order."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shapes):
        n = _ITEMSIZE[dtype]
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append((n, not re.search(r"S\(\d+\)", layout or ""), dims))
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


# ---- what a compiled loop reads and writes in HBM ------------------------------------------
#
# XLA's "bytes accessed" counts every operand and result of every instruction in whatever
# memory it lives: a TPU program that prefetches a weight into on-chip memory (layout `S(n)`)
# counts it three to five times (the async copy's read and write, the slices and concatenation
# that assemble it there, the matmul's read of the copy), and its loop-carried logits several
# more. The memory roofline is about HBM: `loop_hbm_bytes` counts only arrays in the default
# memory space (no `S(n)` in the layout), a fusion's parameter only as far as its slices and
# gathers read it, and an in-place dynamic-update-slice only as its update.

_LINE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
               "partition-id", "replica-id", "iota", "copy-done", "slice-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done"}
_READS_PART = {"slice", "dynamic-slice", "gather"}   # read what they return of their operand


def _arrays(shape: str) -> list[tuple[int, bool]]:
    """(bytes, in HBM) of each array of an HLO shape, in order."""
    return [(n, in_hbm) for n, in_hbm, _ in _shaped(shape)]


def _instructions(lines: list[str]) -> dict[str, dict]:
    out = {}
    for line in lines:
        m = _LINE.match(line)
        if m:
            name, shape, op, rest = m.groups()
            calls = re.search(r"(?:calls|to_apply)=%([\w.\-]+)", rest)
            out[name] = dict(shape=shape, op=op, line=line, calls=calls and calls.group(1),
                             operands=re.findall(r"%([\w.\-]+)", rest.split(")")[0]),
                             branches=re.findall(r"%([\w.\-]+)", (re.search(
                                 r"branch_computations=\{([^}]*)\}", rest) or ["", ""])[1]))
    return out


def _hbm(shape: str) -> int:
    return sum(n for n, in_hbm in _arrays(shape) if in_hbm)


def _param_read(comps, comp: str, index: int, full: int) -> int:
    """Bytes fused computation `comp` reads of its parameter `index` (`full` bytes in HBM):
    what its slices and gathers return when those (or nested fusions that do the same, or
    in-place updates of it) are its only uses, else all of it."""
    insts = _instructions(comps[comp])
    param = next((n for n, x in insts.items() if x["op"] == "parameter"
                  and f"parameter({index})" in x["line"]), None)
    total = 0
    for x in insts.values():
        if param not in x["operands"]:
            continue
        if x["op"] in _READS_PART and x["operands"][0] == param:
            total += sum(n for n, _ in _arrays(x["shape"]))
        elif x["op"] == "dynamic-update-slice" and x["operands"][0] == param:
            continue                                   # written in place, not read
        elif x["op"] == "fusion" and x["calls"]:
            total += _param_read(comps, x["calls"], x["operands"].index(param), full)
        else:
            return full
    return min(total, full)


def _update_bytes(comps, comp: str) -> int | None:
    """The update's bytes when fused computation `comp` ends in a dynamic-update-slice (done
    in place: only the update is written), else None."""
    insts = _instructions(comps[comp])
    root = next((x for x in insts.values() if x["line"].lstrip().startswith("ROOT")), None)
    if root is None or root["op"] != "dynamic-update-slice":
        return None
    update = insts.get(root["operands"][1])
    return sum(n for n, _ in _arrays(update["shape"])) if update else 0


def computation_hbm_bytes(comps: dict[str, list[str]], comp: str) -> int:
    """HBM bytes one run of computation `comp` reads and writes (module comment above); a
    conditional counts its costliest branch, a call its computation."""
    insts = _instructions(comps[comp])
    total = 0
    for x in insts.values():
        op = x["op"]
        if op in _NO_TRAFFIC:
            continue
        operands = [insts[o] for o in x["operands"] if o in insts]
        results = _arrays(x["shape"])
        if op in ("copy-start", "slice-start"):
            # (source, destination, context): the destination's bytes cross from the source
            moved, dst_hbm = results[-2]
            src_hbm = bool(operands) and all(h for _, h in _arrays(operands[0]["shape"]))
            total += moved * (src_hbm + dst_hbm)
        elif op == "dynamic-update-slice":
            total += 2 * (sum(n for n, _ in _arrays(operands[1]["shape"])) if len(operands) > 1
                          else 0)
        elif op in _READS_PART:
            total += 2 * sum(n for n, h in results if h)
        elif op == "fusion" and x["calls"] in comps:
            total += sum(_param_read(comps, x["calls"], i, _hbm(o["shape"]))
                         for i, o in enumerate(operands) if _hbm(o["shape"]))
            update = _update_bytes(comps, x["calls"])
            total += (sum(n for n, h in results if h) if update is None
                      else update * all(h for _, h in results))
        elif op == "conditional":
            total += max((computation_hbm_bytes(comps, b) for b in x["branches"]
                          if b in comps), default=0)
        elif op == "call" and x["calls"] in comps:
            total += computation_hbm_bytes(comps, x["calls"])
        else:
            if op.endswith("-start") and len(results) > 1 and op != "all-reduce-start":
                results = results[len(results) // 2:]        # (operands, results)
            total += sum(_hbm(o["shape"]) for o in operands) + sum(n for n, h in results if h)
    return total


def loop_hbm_bytes(hlo_text: str) -> int:
    """Per device, the HBM bytes one iteration of the program's longest while loop reads and
    writes (compiled HLO text): a decode step's traffic for its memory roofline, without the
    on-chip copies XLA's bytes accessed also counts. 0 when there is no loop."""
    comps = _computations(hlo_text)
    bodies = [re.search(r"body=%([\w.\-]+)", line).group(1)
              for lines in comps.values() for line in lines if " while(" in line]
    bodies = [b for b in bodies if b in comps]
    if not bodies:
        return 0
    return computation_hbm_bytes(comps, max(bodies, key=lambda b: len(comps[b])))
