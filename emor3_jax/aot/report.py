"""The report's tables: per program (memory, FLOPs, roofline time), per run (live memory
beside the resident trees) and the step time."""
from __future__ import annotations

from emor3_jax.aot.chips import GiB, Chip
from emor3_jax.aot.programs import RESIDENT, Program, live_bytes


def gib(n: float) -> str:
    """GiB with 2 decimals (4 below 0.1 GiB: tiny test models)."""
    g = n / GiB
    return f"{g:.4f}" if 0 < abs(g) < 0.1 else f"{g:.2f}"


def _flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOP"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _mfu(p: Program, chip: Chip) -> str:
    t = p.seconds(chip)
    return f"{100 * p.flops / (t * chip.peak_flops):.0f}%" if t > 0 else "n/a"


def secs(t: float) -> str:
    if not t > 0:
        return "n/a"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.0f} us"


def program_table(programs: list[Program], chip: Chip) -> list[str]:
    rows = ["| program | shapes (global) | args | output | temp | alias | total | % HBM | "
            "FLOPs/device | est. time | MFU | calls/step | compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in programs:
        if p.error:
            rows.append(f"| {p.name} | {p.shapes} | - | - | - | - | - | - | - | - | - | "
                        f"{p.calls} | FAILED (below) |")
            continue
        m = p.memory
        rows.append(f"| {p.name} | {p.shapes} | {gib(m['args'])} | {gib(m['out'])} | "
                    f"{gib(m['temp'])} | {gib(m['alias'])} | {gib(p.total)} | "
                    f"{100 * p.total / chip.hbm_bytes:.0f}% | {_flops(p.flops)} | "
                    f"{secs(p.seconds(chip))} | {_mfu(p, chip)} | "
                    f"{p.calls} | "
                    f"{p.compile_s:.0f} s |")
    failed = [p for p in programs if p.error]
    if failed:
        rows += [""] + [f"FAILED: {p.name}: {p.error}" for p in failed]
    return rows


def run_table(programs: list[Program], resident: dict[str, int], chip: Chip,
              limit: float) -> list[str]:
    rows = ["| program | program total | + resident outside it | + other | live | % HBM | fits |",
            "|---|---|---|---|---|---|---|"]
    for p in programs:
        if p.error:
            rows.append(f"| {p.name} | FAILED | | | | | no |")
            continue
        outside = [k for k in RESIDENT if k not in p.uses and resident.get(k)]
        res = sum(resident[k] for k in outside)
        live = live_bytes(p, resident)
        rows.append(f"| {p.name} | {gib(p.total)} | {gib(res)} ({', '.join(outside) or '-'}) "
                    f"| {gib(p.extra_live)}{' (' + p.extra_what + ')' if p.extra_what else ''} "
                    f"| {gib(live)} | {100 * live / chip.hbm_bytes:.0f}% | "
                    f"{'yes' if live <= limit else 'no'} |")
    return rows


def time_table(programs: list[Program], chip: Chip) -> list[str]:
    """FLOPs and time per program (a second set of lengths: no memory columns)."""
    rows = ["| program | shapes (global) | FLOPs/device | est. time | MFU | calls/step | "
            "time/step | compile |", "|---|---|---|---|---|---|---|---|"]
    for p in programs:
        if p.error:
            rows.append(f"| {p.name} | {p.shapes} | - | - | - | {p.calls} | - | FAILED: "
                        f"{p.error} |")
            continue
        rows.append(f"| {p.name} | {p.shapes} | {_flops(p.flops)} | {secs(p.seconds(chip))} | "
                    f"{_mfu(p, chip)} | {p.calls} | {secs(p.seconds(chip) * p.calls)} | "
                    f"{p.compile_s:.0f} s |")
    return rows


def decode_table(programs: list[Program], chip: Chip) -> list[str]:
    """Per decode program, a step's memory roofline: the bytes it cannot avoid reading
    (`programs.decode_step_bytes`) beside the HBM bytes its compiled loop moves per step
    (`hlo.loop_hbm_bytes`) and XLA's bytes accessed per step, and the ratios; and what its
    collectives move between chips per step (`hlo.loop_collective_bytes`), which the memory
    roofline does not see."""
    decodes = [p for p in programs if p.min_step_bytes and not p.error]
    if not decodes:
        return []
    rows = ["| decode program | minimal bytes/step | HBM bytes/step | minimal / HBM | "
            "XLA bytes/step | minimal / XLA | roofline/step | est./step | collectives/step |",
            "|---|---|---|---|---|---|---|---|---|"]
    ratio = lambda p, n: (f"{gib(n)} GiB", f"{100 * p.min_step_bytes / n:.0f}%") if n else (
        "n/a", "n/a")                   # no XLA bytes without a cost analysis (deviceless CUDA)
    for p in decodes:
        moved = ", ".join(f"{kind} {mib(n)}" for kind, n in sorted(
            (p.collective_bytes or {}).items(), key=lambda kv: -kv[1]) if n) or "none"
        est = secs(p.xla_bytes / chip.hbm_bandwidth) if p.xla_bytes else "n/a"
        rows.append(f"| {p.name} | {gib(p.min_step_bytes)} GiB | "
                    f"{' | '.join(ratio(p, p.hbm_step_bytes))} | "
                    f"{' | '.join(ratio(p, p.xla_bytes))} | "
                    f"{secs(p.min_step_bytes / chip.hbm_bandwidth)} | {est} | {moved} |")
    return ["", "Decode steps against their memory roofline (per device; minimal = every "
            "decoder weight and the live KV cache read once, at the window's mean length; "
            "HBM = what one iteration of the compiled loop reads and writes in HBM, counted "
            "per instruction (arrays in on-chip memory spaces left out, slices as sliced, "
            "in-place updates as their update); XLA = its bytes accessed in one iteration, "
            "on-chip copies included, which the estimated times use; collectives = the bytes "
            "its all-reduces, all-gathers and all-to-alls produce in one iteration):",
            ""] + rows


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 2**10:.1f} KiB"


def step_time(programs: list[Program], chip: Chip, hbm: bool = False) -> float:
    """hbm: decode priced at its compiled loop's HBM bytes (`Program.seconds`)."""
    return sum(p.seconds(chip, hbm) * p.calls for p in programs if not p.error)
