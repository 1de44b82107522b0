"""When a configuration does not fit: name each failing family's knob and search for a value
that fits, recompiling at values predicted from the memory measured so far."""
from __future__ import annotations

from emor3_jax import sharding
from emor3_jax.aot import hlo
from emor3_jax.aot.chips import Chip
from emor3_jax.aot.programs import (BUILDERS, BuildContext, Program, all_fit, live_bytes,
                                    make_context, resident_bytes)
from emor3_jax.aot.report import gib
from emor3_jax.sampling.sampler import geometric_buckets

# Suggestions: the knob of each program family, and a value that fits.
#
# Each family has one batch-like knob (micro-batch rows, prompts per sampler call) that its
# memory grows with roughly linearly: live(v) = fixed + v * per_unit. The search predicts the
# largest valid value that fits from what it measured (first point: fixed = the resident trees;
# then a secant through the last two points), compiles it, and repeats while attempts last.
# Lengths are never touched (they change the recipe); remat=full is tried first for the update.

KNOBS = {"update": "rl.micro_batch_size", "reference": "rl.logprob_micro_batch_size",
         "rollout": "rollout.chunk_size", "judge": "reward.judge_chunk_size"}


def knob_value(ctx: BuildContext, group: str) -> int:
    c, s = ctx.config, ctx.shapes
    return {"update": c.rl.micro_batch_size, "reference": c.rl.logprob_micro_batch_size,
            "rollout": s.rollout_chunk, "judge": s.judge_chunk}[group]


def knob_candidates(ctx: BuildContext, group: str) -> list[int]:
    """Valid values below the current one, ascending: micro-batches that split the mini-batch;
    chunk sizes the sampler runs without filler rows (a bucket size, a multiple of dp)."""
    s, value = ctx.shapes, knob_value(ctx, group)
    if group in ("update", "reference"):
        return [v for v in range(1, value) if s.mini_batch_rows % (v * s.dp) == 0]
    dp = sharding.data_parallel_size(ctx.sample_mesh)
    sizes = geometric_buckets(1)
    return sorted({v for v in sizes if v < value and v % dp == 0} | ({dp} if dp < value else set()))


def family_live(programs: list[Program], resident: dict[str, int]
                ) -> tuple[float | None, bool]:
    """(the family's largest live bytes, exact): for a program that failed for memory, the
    temporaries its error names plus the resident trees (not exact); None: no figure."""
    lives, exact = [], True
    for p in programs:
        if p.error is None:
            lives.append(live_bytes(p, resident))
            continue
        temp = hlo.required_temp_bytes(p.error)
        if temp is None:
            return None, False
        lives.append(temp + sum(resident.values()))
        exact = False
    return max(lives, default=None), exact


def predict_value(points: list[tuple[int, float, bool]], fixed: float, limit: float,
                  candidates: list[int]) -> int:
    """The largest candidate whose predicted live bytes fit (the smallest if none does).
    points: (value, live bytes, exact) measured so far, latest last; fixed: the bytes that do
    not grow with the value (the resident trees) for a one-point prediction."""
    exact = [(v, live) for v, live, ok in points if ok]
    slope = 0.0
    if len(exact) >= 2:
        (v1, l1), (v2, l2) = exact[-2:]
        if v1 != v2 and (l1 - l2) / (v1 - v2) > 0:
            slope = (l1 - l2) / (v1 - v2)
            fixed = l1 - slope * v1
    if slope <= 0:
        v0, l0, _ = points[-1]
        slope = max(l0 - fixed, 1.0) / v0
    fitting = [v for v in candidates if fixed + slope * v <= 0.97 * limit]
    return fitting[-1] if fitting else candidates[0]


def _with_override(config, field: str, value):
    new = config.copy_and_resolve_references()
    section, name = field.split(".")
    new[section][name] = value
    return new


def _try(ctx: BuildContext, devices, image_name: str, field: str, value, group: str, log):
    """Recompile one family with config field = value: (programs, resident) or the error."""
    trial = _with_override(ctx.config, field, value)
    try:
        tctx = make_context(trial, ctx.topology, devices, image_name, log=log)
        return BUILDERS[group](tctx), resident_bytes(tctx)
    except ValueError as e:
        return str(e)


def _trial_line(field: str, value, programs: list[Program], resident: dict[str, int],
                limit: float, chip: Chip) -> str:
    if any(p.error for p in programs):
        error = next(p.error for p in programs if p.error)
        return f"  - {field}={value}: still does not fit ({error})"
    live, _ = family_live(programs, resident)
    verdict = "fits" if all_fit(programs, resident, limit) else "still does not fit"
    return (f"  - {field}={value}: {verdict} (live {gib(live)} GiB = "
            f"{100 * live / chip.hbm_bytes:.0f}% of HBM)")


def suggest(ctx: BuildContext, programs: list[Program], resident: dict[str, int], limit: float,
            devices, image_name: str, attempts: int, log=None) -> list[str]:
    """Lines naming what to change; recompiles each failing family (at most `attempts` times)
    with values predicted to fit and reports the first that does, else the next to try."""
    chip = ctx.topology.chip
    lines = []
    fixed = sum(resident.values())
    if fixed > limit:
        lines.append(f"- the resident train state alone needs {gib(fixed)} GiB per chip "
                     f"(> {gib(limit)}): use a bigger topology (more chips, a larger "
                     "mesh.fsdp), or fewer resident copies (rl.kl_coef=0 drops the reference)")
    failing = [p for p in programs if p.error or live_bytes(p, resident) > limit]
    for group in dict.fromkeys(p.group for p in failing):
        names = ", ".join(p.name for p in failing if p.group == group)
        field, value0 = KNOBS[group], knob_value(ctx, group)
        remat = group == "update" and ctx.config.model.remat != "full"
        lines.append(f"- {names}: try {'model.remat=full, ' if remat else ''}a smaller {field} "
                     f"(now {value0}), a larger mesh.fsdp or a bigger topology")
        left = attempts
        if remat and left > 0:
            left -= 1
            got = _try(ctx, devices, image_name, "model.remat", "full", group, log)
            if isinstance(got, str):
                lines.append(f"  - model.remat=full: not possible ({got})")
            else:
                lines.append(_trial_line("model.remat", "full", *got, limit, chip))
                if all_fit(*got, limit):
                    continue
        candidates = knob_candidates(ctx, group)
        if not candidates:
            lines.append(f"  - {field} cannot go lower: shard over more chips")
            continue
        live0, exact0 = family_live([p for p in programs if p.group == group], resident)
        points = [] if live0 is None else [(value0, live0, exact0)]
        fitted = False
        while left > 0 and candidates:
            left -= 1
            value = (predict_value(points, fixed, limit, candidates) if points
                     else candidates[len(candidates) // 2])
            got = _try(ctx, devices, image_name, field, value, group, log)
            if isinstance(got, str):
                lines.append(f"  - {field}={value}: not possible ({got})")
                candidates = [v for v in candidates if v != value]
                continue
            lines.append(_trial_line(field, value, *got, limit, chip))
            if all_fit(*got, limit):
                fitted = True
                break
            live, exact = family_live(*got)
            if live is not None:
                points.append((value, live, exact))
            candidates = [v for v in candidates if v < value]
        if not fitted and candidates:
            guess = (predict_value(points, fixed, limit, candidates) if points
                     else candidates[len(candidates) // 2])
            lines.append(f"  - next to try: {field}={guess} (predicted from the memory "
                         "measured so far; raise --fix_attempts to compile it)")
        elif not fitted:
            lines.append(f"  - {field} cannot go lower: shard over more chips")
    return lines
