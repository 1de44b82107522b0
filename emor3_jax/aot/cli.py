"""The tool's driver and flags: compile, report, suggest; `cli(argv)` runs it in-process."""
from __future__ import annotations

import sys
from typing import Sequence

from emor3_jax.aot.chips import GiB, Topology, resolve_topology, topology_devices
from emor3_jax.aot.programs import (BUILDERS, _compile_all, all_fit, live_bytes, make_context,
                                    resident_bytes)
from emor3_jax.aot.report import (count, decode_table, gib, program_table, run_table, secs,
                                  step_time, time_table)
from emor3_jax.aot.search import suggest
from emor3_jax.aot.shapes import lengths_for
from emor3_jax.models import qwen2_5_vl


def analyze(config, topology: Topology, *, image: str = "typical",
            hbm_fraction: float | None = None,
            programs: Sequence[str] = tuple(BUILDERS), fix_attempts: int = 2,
            config_name: str = "", log=None, lengths: str = "max",
            devices=None) -> tuple[bool, str]:
    """Compile the step's programs for `topology`; return (fits, the printed report).
    lengths (max|typical|P,R): other than max, the programs are compiled a second time at
    those lengths for a step-time estimate (the memory verdict stays the maximum lengths').
    devices: the chips to compile for (default: the topology's compile-only devices; a TPU
    runtime passes its own)."""
    devices = topology_devices(topology) if devices is None else devices
    hbm_fraction = topology.chip.usable if hbm_fraction is None else hbm_fraction
    ctx = make_context(config, topology, devices, image, log=log)
    expected = lengths_for(lengths, config, ctx.image)          # bad --lengths: before compiling
    chip, s, mc = topology.chip, ctx.shapes, ctx.model.config
    limit = hbm_fraction * chip.hbm_bytes
    compiled = _compile_all(ctx, programs)
    resident = resident_bytes(ctx)
    n_params = qwen2_5_vl.count_params(ctx.params)
    mesh = ", ".join(f"{k} {v}" for k, v in ctx.mesh.shape.items())
    if ctx.sample_mesh is not ctx.mesh:
        mesh += "; rollout and judge: " + ", ".join(
            f"{k} {v}" for k, v in ctx.sample_mesh.shape.items()) + " (rollout.mesh)"
    src = config.model.hf_dir or config.model.arch or f"tiny:{config.model.tiny}"
    out = [f"## AOT: {config_name or 'config'} on {topology.name} ({topology.topology_name}: "
           f"{len(devices)} x {chip.name}, {chip.hbm_bytes / GiB:.0f} GiB HBM and "
           f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip, {s.hosts} host"
           f"{'s' if s.hosts > 1 else ''})",
           "",
           f"- model: {src}, {count(n_params)} parameters; params {mc.param_dtype}, "
           f"compute {mc.dtype}, remat {mc.remat}, attention {mc.attention_impl}",
           f"- mesh: {mesh}; the sampler reads a {mc.dtype} copy of the policy "
           "(policy.sampling_params)",
           f"- image per prompt: {ctx.image.describe()} (--image=typical|max|HxW)"]
    out += ["- " + line for line in s.describe(config)]
    out += ["", "Per program (memory per device in GiB, from XLA's memory analysis; total = args "
            "+ output - alias + temp + generated code; FLOPs and time per call):", ""]
    out += program_table(compiled, chip)
    out += decode_table(compiled, chip)
    out += ["", "Run level (per device, GiB): resident for the whole run: " + ", ".join(
        f"{k} {gib(v)}" for k, v in resident.items() if v) +
        f" = {gib(sum(resident.values()))}", ""]
    out += run_table(compiled, resident, chip, limit)
    at_lengths = []
    if expected is not None:
        ectx = make_context(config, topology, devices, image, log=log, lengths=lengths)
        at_lengths = _compile_all(ectx, programs)
        out += ["", f"At {expected.name} lengths: {expected.describe(ectx.shapes)} (time only; "
                "the memory verdict is at the maximum lengths above):", ""]
        out += time_table(at_lengths, chip)
        out += decode_table(at_lengths, chip)
    ok_programs = [p for p in compiled if not p.error]
    peak = max((live_bytes(p, resident) for p in ok_programs), default=0)
    fits = all_fit(compiled, resident, limit) and bool(compiled)
    failed = len(compiled) - len(ok_programs)
    but = f", {failed} program{'s' if failed > 1 else ''} failed to compile" if failed else ""
    shown = (f"{gib(peak)} GiB of {gib(chip.hbm_bytes)} GiB per chip "
             f"({100 * peak / chip.hbm_bytes:.0f}%; " if ok_programs else "n/a (")
    out += ["", f"peak live memory: {shown}limit {100 * hbm_fraction:g}% = "
            f"{gib(limit)} GiB{but})",
            f"estimated step time (roofline time x calls per step, decode to "
            f"max_new_tokens{but}): {secs(step_time(compiled, chip))}"]
    if expected is not None:
        failed = sum(1 for p in at_lengths if p.error)
        out.append(f"estimated step time at {expected.name} lengths (decode to the expected "
                   f"lengths{f', {failed} failed to compile' if failed else ''}): "
                   f"{secs(step_time(at_lengths, chip))}")
        if any(p.hbm_step_bytes for p in at_lengths):
            out.append(f"  the same with decode priced at its compiled loop's HBM bytes "
                       f"instead of XLA's bytes accessed: "
                       f"{secs(step_time(at_lengths, chip, hbm=True))}")
    notes = []
    largest = max(config.reward.judge_prompt_buckets)
    if s.judge_prompts and s.judge_prompt_need > largest:
        notes.append(f"judge prompts may need {s.judge_prompt_need} tokens, more than the "
                     f"largest reward.judge_prompt_buckets ({largest}); compiled at that bucket")
    if s.hosts > 1:
        notes.append(f"multi-host slice ({s.hosts} hosts): shapes are global, one SPMD "
                     "program over the whole slice")
    if topology.chip.platform == "cuda":
        notes.append("deviceless CUDA compilation gives no cost analysis: FLOPs are the "
                     "jaxpr's matmuls and cuDNN attention calls (forward 4*T*S*head_dim per "
                     "head, backward 10*T*S*head_dim), and times are FLOP-bound (no bytes "
                     "figure) except decode, priced at its minimal bytes per step (the decoder "
                     f"weights and the live KV cache read once); the memory limit is {100 * hbm_fraction:g}% of each GPU, the "
                     "share launch/slurm_gpu.sbatch lets XLA's allocator take "
                     "(XLA_PYTHON_CLIENT_MEM_FRACTION)")
    if mc.attention_impl == "splash":
        notes.append("attention runs in the splash Pallas kernel, which XLA's cost analysis "
                     "does not see: its FLOPs are counted from the kernel's shapes (forward "
                     "4*T*S*head_dim per head, backward 14*T*S*head_dim, half the tiles with "
                     "the causal mask) and are in the FLOPs, time and MFU columns")
    if notes:
        out += [""] + [f"note: {n}" for n in notes]
    if not fits:
        out += ["", "does not fit; suggestions:"]
        out += suggest(ctx, compiled, resident, limit, devices, image, fix_attempts, log=log)
    out += ["", f"fits: {'yes' if fits else 'no'}"]
    return fits, "\n".join(out)


def define_flags(flag_values=None, argv: Sequence[str] | None = None):
    """The tool's flags on `flag_values` (absl's global FLAGS by default); `argv`: the
    command line the --config.x.y overrides are read from (default sys.argv)."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FLAGS if flag_values is None else flag_values
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (e.g. "
                                    "configs/tpu_v4.py)", flag_values=fv, lock_config=True,
                                    sys_argv=None if argv is None else list(argv))
    flags.DEFINE_string("topology", "", "TPU slice (v4-8, v4-32, v5e-8, v6e-8, v5p-8, ...), "
                        "topology name (v4:2x2x1) or GPU nodes (h100x8, a100x8, h100x16: needs "
                        "the aot-gpu extra); default: config.aot.topology", flag_values=fv)
    flags.DEFINE_string("image", "typical", "image per prompt: typical (512x512 photo), max "
                        "(largest a prompt holds) or HxW", flag_values=fv)
    flags.DEFINE_string("lengths", "max", "max: fit and step time at the config's maximum "
                        "lengths; typical (a typical prompt with its image, ~300-token "
                        "responses, short judge answers) or P,R (prompt, response tokens): also "
                        "the step time at those lengths (the programs compiled twice)",
                        flag_values=fv)
    flags.DEFINE_float("hbm_fraction", None, "usable share of HBM for the fit verdict "
                       "(default: the chip's, 0.95 on TPU, 0.9 on GPU)", flag_values=fv)
    flags.DEFINE_list("programs", list(BUILDERS), "program families to compile",
                      flag_values=fv)
    flags.DEFINE_integer("fix_attempts", 2, "recompilations per failing program family when "
                         "it does not fit (0 = only name the knobs)", flag_values=fv)
    return fv


def run(fv, out=None, err=None) -> int:
    """Run the tool on parsed flags: the report goes to `out`, progress and errors to `err`.
    Exit code: 0 fits, 1 does not fit, 2 bad usage or configuration."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    config = fv["config"].value
    if config is None:
        print("error: --config=<file> is required (e.g. configs/tpu_v4.py)", file=err)
        return 2
    name = fv.topology or config.aot.topology
    if not name:
        print("error: no topology: pass --topology=v4-8 or set config.aot.topology", file=err)
        return 2
    unknown = [p for p in fv.programs if p not in BUILDERS]
    if unknown:
        print(f"error: --programs {unknown}: choose from {list(BUILDERS)}", file=err)
        return 2
    log = lambda msg: print(msg, file=err, flush=True)  # noqa: E731
    try:
        fits, report = analyze(config, resolve_topology(name), image=fv.image,
                               hbm_fraction=fv.hbm_fraction, programs=fv.programs,
                               fix_attempts=fv.fix_attempts,
                               config_name=fv["config"].config_filename, log=log,
                               lengths=fv.lengths)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=err)
        return 2
    print(report, file=out, flush=True)
    return 0 if fits else 1


def cli(argv: Sequence[str], out=None, err=None) -> int:
    """`python -m emor3_jax.aot ...` in-process: argv[0] is the program name. Flags are parsed
    into a fresh FlagValues, so it can run many times in one process (tests)."""
    from absl import flags
    fv = define_flags(flags.FlagValues(), argv)
    try:
        fv(list(argv))
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr if err is None else err)
        return 2
    return run(fv, out, err)
