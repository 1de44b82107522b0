"""Does a config's training fit the chips this process sees (a Colab TPU runtime)? Answered
before any model is downloaded, from what a training run keeps on the chips for its whole
length, and, when that fits, by compiling the step's programs on these chips (as
`python -m emor3_jax.aot` does for a slice); when it does not, what would fit here instead."""
from __future__ import annotations

import dataclasses
import math

from emor3_jax.aot.chips import CHIPS, GiB, Chip, Topology

# jax's device_kind of each TPU generation's chips
KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p",
         "TPU v5": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
# The 3B paper recipe fitted by the AOT tool, per generation: (config, slice).
FITTED = {"v4": ("configs/tpu_v4.py", "v4-8"), "v5e": ("configs/tpu_v5e.py", "v5e-8"),
          "v6e": ("configs/tpu_v6e.py", "v6e-8")}


@dataclasses.dataclass(frozen=True)
class RuntimeFit:
    fits: bool | None            # None: not a TPU runtime, nothing was checked
    message: str
    resident_per_chip: float = 0.0      # bytes


def runtime_topology(devices) -> Topology | None:
    """This runtime's chips as a Topology (None when they are not TPUs)."""
    gen = KINDS.get(devices[0].device_kind)
    if gen is None:
        return None
    return Topology(f"this runtime ({len(devices)} x {devices[0].device_kind})",
                    f"{gen}:{len(devices)}x1", CHIPS[gen])


def _resident(config, devices) -> tuple[dict[str, int], int]:
    """(per-device bytes a training run keeps on the chips: fp32 params, AdamW state, the
    reference and the sampler's copy in the compute dtype; the model's parameter count)."""
    from emor3_jax import policy as policy_lib
    from emor3_jax import sharding
    from emor3_jax.aot import programs
    from emor3_jax.aot.shapes import model_config
    from emor3_jax.models import qwen2_5_vl
    from emor3_jax.rl import train_state as train_state_lib
    m = config.mesh
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    model = qwen2_5_vl.build_model(model_config(config))
    optimizer = train_state_lib.make_optimizer(config.optim)
    state = programs.abstract_train_state(model, optimizer, mesh)
    compute = policy_lib.reference_params(state.params, config.model.dtype)
    out = {"policy params": programs.per_device_bytes(state.params),
           "optimizer state": programs.per_device_bytes((state.opt_state, state.step)),
           "reference params": programs.per_device_bytes(compute) if config.rl.kl_coef else 0,
           "sampling copy": (programs.per_device_bytes(compute)
                             if config.model.param_dtype != config.model.dtype else 0)}
    return out, qwen2_5_vl.count_params(state.params)


def check(config, devices, *, compile_programs: bool = False, hbm_fraction: float = 0.95,
          log=None) -> RuntimeFit:
    """Will training `config` fit these devices? First the trees resident for the whole run
    (seconds, no weights needed); if they leave room and `compile_programs`, every program of
    a step compiled on these chips (minutes), as the AOT tool's verdict."""
    topology = runtime_topology(devices)
    if topology is None:
        return RuntimeFit(None, f"{len(devices)} x {devices[0].device_kind}: not a TPU runtime "
                          "this check knows; a TPU slice's fit: python -m emor3_jax.aot")
    chip, n = topology.chip, len(devices)
    limit = hbm_fraction * chip.hbm_bytes
    resident, n_params = _resident(config, devices)
    per_chip = sum(resident.values())
    head = (f"{n} x {chip.name} ({chip.hbm_bytes / GiB:.0f} GiB each): training keeps "
            f"{per_chip / GiB:.2f} GiB per chip resident (" + ", ".join(
                f"{k} {v / GiB:.2f}" for k, v in resident.items() if v) + ")")
    if per_chip > 0.8 * limit:
        return RuntimeFit(False, head + " before any activation, of "
                          f"{limit / GiB:.1f} GiB usable: it does not fit.\n" +
                          _instead(config, chip, n, n_params, per_chip * n, devices),
                          per_chip)
    if not compile_programs:
        return RuntimeFit(True, head + f" of {limit / GiB:.1f} GiB usable. The step's programs "
                          "are not compiled yet: compile_programs=True (minutes) or python -m "
                          "emor3_jax.aot for the full verdict.", per_chip)
    from emor3_jax.aot.cli import analyze
    fits, report = analyze(config, topology, devices=devices, hbm_fraction=hbm_fraction,
                           log=log)
    return RuntimeFit(fits, head + ".\n" + report, per_chip)


def _instead(config, chip: Chip, n: int, n_params: int, state_bytes: int, devices) -> str:
    """What would fit: the demo; evaluation in the compute dtype; training on a bigger slice
    of this generation (the fitted config where there is one)."""
    gen = KINDS[devices[0].device_kind]
    weights = n_params * 2 / n               # bf16, split over the chips
    lines = ["What fits here instead:",
             "- the CPU demo's tiny model (MODEL_DIR = \"\"), in minutes;"]
    if weights < 0.5 * chip.hbm_bytes:
        lines.append(f"- evaluation of this model in bfloat16 ({weights / GiB:.1f} GiB of weights "
                     "per chip): METHOD=\"\", OVERRIDES={\"mode\": \"eval\", "
                     "\"model.param_dtype\": \"bfloat16\"};")
    chips = 2 ** math.ceil(math.log2(max(1, state_bytes / (0.45 * chip.hbm_bytes))))
    if gen in FITTED:
        file, slice_ = FITTED[gen]
        lines.append(f"- training needs a bigger slice: {file} is fitted for a {slice_} "
                     f"(python -m emor3_jax.aot --config={file} shows its memory per program); "
                     f"launch it with launch/tpu_pod.sh.")
    else:
        lines.append(f"- training needs about {chips} {chip.name} chips for its state alone; "
                     "check a slice with python -m emor3_jax.aot --config=<file> --topology=<slice>.")
    return "\n".join(lines)
