"""Ahead-of-time compilation for a TPU slice from a CPU host: does a configuration fit?

    python -m emor3_jax.aot --config=configs/tpu_v4.py [--topology=v4-8] [--image=typical]
        [--lengths=max|typical|P,R]

TPU slices are rented by the hour; this answers "does it fit, and roughly how fast" before
renting one. With libtpu installed (`pip install "jax[tpu]"`, no TPU needed) jax describes a
slice (`jax.experimental.topologies`) and XLA's TPU compiler compiles for it. Every program
of one GRPO step is compiled at the config's real shapes and shardings, from abstract inputs
(shapes only, no weights), through the same jitted functions the trainer calls
(`Sampler.trace_*`, `make_logprob_fn(...).trace`, `make_update_step(...).trace`):

  1. rollout prefill + decode: one sampler chunk, rollout.chunk_size prompts x G rows,
     prompts of data.max_prompt_len tokens with one image each, rollout.max_new_tokens new;
  2. the judge (reward.judge_mode): generate = prefill + decode at the judge's shapes
     (2 prompts per response, one sample each); score = prefill + the score program;
  3. the reference log-prob pass over one mini-batch (rl.logprob_micro_batch_size per device);
  4. the GRPO update of one mini-batch (rl.micro_batch_size per device, train state donated).

Per program: XLA's per-device memory (arguments, outputs, temporaries, aliased = donated
outputs reusing argument buffers; total = args + outputs - aliased + temporaries + code),
FLOPs (XLA's cost analysis, plus the Pallas kernels' counted from their shapes) and a
roofline time (FLOPs at the chip's peak or XLA's bytes accessed at its HBM bandwidth,
whichever is longer), and the MFU they imply.
Run level: the programs run one after another, while the train state (params + AdamW
moments), the reference params (and a checkpoint judge's params) stay resident; the
sampler's KV cache exists only inside the sampling programs. Each program's live memory is
its own total plus every resident tree it does not take as an argument. The configuration
fits when every program compiles and the largest live memory is within --hbm_fraction of
the chip's HBM (a program that fails to compile, e.g. XLA's RESOURCE_EXHAUSTED, is listed
with its error and does not fit); otherwise the tool names each failing family's knob
(rl.micro_batch_size, rl.logprob_micro_batch_size, rollout.chunk_size,
reward.judge_chunk_size; model.remat=full; more chips), recompiles it at values predicted
from the measured memory (up to --fix_attempts times) to report one that fits, and exits 1.
Exit codes: 0 fits, 1 does not fit, 2 bad usage or configuration. `cli(argv)` runs it
in-process (tests).

Shape assumptions (printed with the tables):
- Images: `--image=typical` is a 512x512 photo through the release's pre-resize and
  smart_resize under data.min/max_pixels (the recipe: 532x532 px, 38x38 = 1,444 patches,
  361 tokens); `max` is the largest square image a prompt can hold (data.max_pixels, shrunk
  until its tokens fit data.max_prompt_len - PROMPT_TEXT_TOKENS); `HxW` is that image size.
- Lengths are the worst case: prompts at data.max_prompt_len, responses at
  rollout.max_new_tokens, judge prompts holding a whole response (+ image + template),
  every judge prompt of a chunk with its own image. That decides the fit. `--lengths=typical`
  (TYPICAL_PROMPT_TEXT_TOKENS of text + the image, TYPICAL_RESPONSE_TOKENS-token responses,
  TYPICAL_JUDGE_ANSWER_TOKENS-token judge answers) or `--lengths=P,R` (prompt and response
  tokens) also compiles every program at those lengths, padded to the buckets they fall in
  as the trainer pads them, and prints its per-program time and the step time beside the
  worst case's. The sampler's decode programs keep their maximum new-token buffers (the
  trainer asks for rollout.max_new_tokens); their loops are counted at the expected lengths
  (optimistic: a chunk decodes until its longest row ends).
- Multi-host slices: shapes are global (one SPMD program over the slice).
- FLOPs and time: XLA's cost analysis counts a while-loop body once (scanned layers, the
  micro-batch scan, the decode loop). Both are scaled by the loop trip counts, taken from the
  traced jaxpr (matmul FLOPs with and without trip counts); the decode loop is counted at
  max_new_tokens steps (an upper bound: rows stop at EOS). MFU is unaffected by the scaling.
  The roofline leaves out collectives' latency and imperfect overlap (a lower bound on
  time); XLA's bytes accessed count some buffers more than once (an upper bound on traffic).
- The reference pass is compiled at rl.logprob_micro_batch_size, as the trainer runs it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Sequence

if "jax" not in sys.modules:
    # Compile for TPU, run nothing: no runtime TPU backend (this host has none).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from emor3_jax import model_source, policy as policy_lib  # noqa: E402
from emor3_jax import sharding  # noqa: E402
from emor3_jax.batches import PromptBatch  # noqa: E402
from emor3_jax.configs import base  # noqa: E402
from emor3_jax.models import qwen2_5_vl  # noqa: E402
from emor3_jax.models.config import Qwen2_5_VLConfig  # noqa: E402
from emor3_jax.processing import image as image_lib  # noqa: E402
from emor3_jax.rewards import emotion  # noqa: E402
from emor3_jax.rl import update as update_lib  # noqa: E402
from emor3_jax.sampling import Sampler, SamplerBuckets  # noqa: E402
from emor3_jax.sampling.sampler import geometric_buckets  # noqa: E402

GiB = 1 << 30
# Tokens of a prompt besides its image (chat template, system prompt, question, SET text).
PROMPT_TEXT_TOKENS = 256
# Tokens of a judge prompt besides the response span and image (chat template + question).
JUDGE_TEMPLATE_TOKENS = 96
# Tokens of a score-mode candidate answer when no tokenizer is at hand (word + <|im_end|>).
JUDGE_CANDIDATE_TOKENS = 4
TYPICAL_IMAGE = (512, 512)
# --lengths=typical: an EmoSet prompt's text (chat template, system prompt, question, SET
# instructions) besides its image, a SET response, a judge answer (a word or yes/no + EOS).
TYPICAL_PROMPT_TEXT_TOKENS = 200
TYPICAL_RESPONSE_TOKENS = 300
TYPICAL_JUDGE_ANSWER_TOKENS = 8


# ------------------------------------------------------------------------------------------
# Topologies.

@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float        # bf16 FLOP/s per chip
    chip_config: str         # jax topology chip_config_name (megacore: one device per chip)
    hbm_bandwidth: float     # bytes/s per chip


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, "megacore", 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, "default", 0.82e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, "megacore", 2.76e12),
}
# Slice names -> topology names. v4/v5p names count TensorCores (v4-8 = 4 megacore chips),
# v5e names count chips.
SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v4-128": "v4:4x4x4",
    "v5e": "v5e:2x2", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4",
    "v5litepod-4": "v5e:2x2", "v5litepod-8": "v5e:2x4", "v5litepod-16": "v5e:4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str             # as asked for (e.g. v4-8)
    topology_name: str    # jax's (e.g. v4:2x2x1)
    chip: Chip

    @property
    def num_chips(self) -> int:
        return math.prod(int(d) for d in self.topology_name.split(":")[1].split("x"))


def resolve_topology(name: str) -> Topology:
    """A slice name (v4-8, v4-32, v5e-4, v5p-8, ...) or a topology name (v4:2x2x1)."""
    key = name.strip().lower()
    topo = SLICES.get(key, key)
    gen, _, dims = topo.partition(":")
    if gen not in CHIPS or not dims or not all(d.isdigit() for d in dims.split("x")):
        raise ValueError(f"topology {name!r}: give a slice name ({', '.join(SLICES)}) or a "
                         "topology like v4:2x2x1 (generations: " + ", ".join(CHIPS) + ")")
    return Topology(name, topo, CHIPS[gen])


def _libtpu_env(topology: Topology) -> None:
    """libtpu reads these when it loads (at the first topology query). A CPU host has no TPU
    metadata: without them it warns about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES, and it
    refuses to load while another process (e.g. a test run) holds /tmp/libtpu_lockfile."""
    gen = topology.topology_name.split(":")[0]
    for key, value in (("TPU_ACCELERATOR_TYPE", f"{gen}-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_WORKER_ID", "0"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)


def topology_devices(topology: Topology) -> list:
    """The (compile-only) TPU devices of a slice, one per chip."""
    _libtpu_env(topology)
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.topology_name,
            chip_config_name=topology.chip.chip_config, chips_per_host_bounds=(2, 2, 1),
            num_slices=1)
    except Exception as e:  # noqa: BLE001 (libtpu missing or unknown topology)
        raise RuntimeError(f"cannot describe TPU topology {topology.topology_name}: {e}. "
                           "AOT compilation needs libtpu: pip install 'jax[tpu]'") from e
    return list(desc.devices)


# ------------------------------------------------------------------------------------------
# What is compiled: model, image and program shapes from the config.

def model_config(config) -> Qwen2_5_VLConfig:
    """Model shapes: model.hf_dir's config.json (never its weights), else model.arch, else
    model.tiny (with the demo tokenizer's ids, as the trainer builds it)."""
    m = config.model
    if m.hf_dir:
        hf_dir = model_source.resolve(m.hf_dir, "config.model.hf_dir", patterns=("config.json",))
        return Qwen2_5_VLConfig.from_json_file(os.path.join(hf_dir, "config.json"),
                                               **policy_lib.runtime_fields(m))
    if m.arch:
        return policy_lib.arch_config(m)
    if m.tiny:
        from emor3_jax.processing import tokenizer as tok_lib
        ids = tok_lib.token_ids(policy_lib.load_tokenizer(m))
        return policy_lib.tiny_model_config(m, ids)
    raise ValueError("config.model: set arch (one of " + ", ".join(policy_lib.ARCHS) + "), "
                     "hf_dir (a directory with config.json) or tiny for AOT compilation")


@dataclasses.dataclass(frozen=True)
class Image:
    grid_thw: tuple[int, int, int]
    height: int
    width: int
    what: str

    @property
    def patches(self) -> int:
        return math.prod(self.grid_thw)

    @property
    def tokens(self) -> int:
        return self.patches // (base.MERGE_SIZE ** 2)

    def describe(self) -> str:
        return (f"{self.what} -> {self.height}x{self.width} px = {self.grid_thw[1]}x"
                f"{self.grid_thw[2]} patches ({self.patches:,}), {self.tokens:,} tokens")


def image_for(data_config, image: str, model: Qwen2_5_VLConfig) -> Image:
    """The image each prompt carries (see the module docstring)."""
    v = model.vision
    factor = v.patch_size * v.spatial_merge_size
    resize = lambda h, w: image_lib.target_size(h, w, factor=factor,
                                                min_pixels=data_config.min_pixels,
                                                max_pixels=data_config.max_pixels)
    if image == "typical":
        h, w = resize(*TYPICAL_IMAGE)
        what = f"typical {TYPICAL_IMAGE[0]}x{TYPICAL_IMAGE[1]} photo"
    elif image == "max":
        side = math.isqrt(int(data_config.max_pixels))
        h, w = resize(side, side)
        budget = data_config.max_prompt_len - PROMPT_TEXT_TOKENS
        while h > factor and (h // factor) * (w // factor) > budget:
            h, w = h - factor, w - factor      # the pipeline drops prompts longer than that
        what = f"largest image a {data_config.max_prompt_len}-token prompt holds"
    else:
        try:
            hh, ww = (int(x) for x in image.lower().split("x"))
        except ValueError:
            raise ValueError(f"--image={image!r}: use typical, max or HxW "
                             "(e.g. 768x1024)") from None
        h, w = resize(hh, ww)
        what = f"{hh}x{ww} image"
    return Image((1, h // v.patch_size, w // v.patch_size), h, w, what)


def _round_up(n: int, buckets: Sequence[int]) -> int:
    fits = [int(b) for b in buckets if b >= n]
    return min(fits) if fits else int(n)


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Expected (not worst-case) lengths for a step-time estimate (`--lengths`)."""
    name: str
    prompt: int            # tokens of a prompt, image included
    response: int          # tokens of a response
    judge_answer: int      # tokens the judge generates

    def describe(self, s: "Shapes") -> str:
        return (f"prompts of {self.prompt} tokens (bucket {s.prompt_len}), responses of "
                f"{self.response} (bucket {s.response_len}; the rollout decodes "
                f"{s.rollout_decode_steps} steps), judge prompts in bucket "
                f"{s.judge_prompt_len}, judge answers of {s.judge_decode_steps} tokens")


def lengths_for(spec: str, config, image: Image) -> Lengths | None:
    """--lengths: max (None: the config's maxima, the worst case), typical
    (TYPICAL_PROMPT_TEXT_TOKENS + the image, TYPICAL_RESPONSE_TOKENS,
    TYPICAL_JUDGE_ANSWER_TOKENS) or P,R (prompt and response tokens; typical judge answers)."""
    key = spec.strip().lower()
    if key == "max":
        return None
    if key == "typical":
        return Lengths("typical", TYPICAL_PROMPT_TEXT_TOKENS + image.tokens,
                       TYPICAL_RESPONSE_TOKENS, TYPICAL_JUDGE_ANSWER_TOKENS)
    try:
        prompt, response = (int(x) for x in key.split(","))
    except ValueError:
        raise ValueError(f"--lengths={spec!r}: use max, typical or P,R (prompt and response "
                         "tokens, e.g. 600,300)") from None
    d, r = config.data, config.rollout
    if not image.tokens < prompt <= d.max_prompt_len or not 0 < response <= r.max_new_tokens:
        raise ValueError(f"--lengths={spec}: prompts need more than the image's {image.tokens} "
                         f"tokens and at most data.max_prompt_len={d.max_prompt_len}; "
                         f"responses 1 to rollout.max_new_tokens={r.max_new_tokens}")
    return Lengths(f"{prompt},{response}", prompt, response, TYPICAL_JUDGE_ANSWER_TOKENS)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Global batch sizes and lengths of the step's programs."""
    group: int
    prompt_len: int
    response_len: int
    rollout_prompts: int
    rollout_chunk: int
    judge_prompts: int           # per judge call
    judge_calls: int             # answer() calls per step (score mode: 2)
    judge_chunk: int
    judge_prompt_len: int
    judge_prompt_need: int       # tokens the longest judge prompt needs
    judge_new_tokens: int
    mini_batch_rows: int
    mini_batches: int
    micro_rows: int
    logprob_micro_rows: int
    dp: int
    hosts: int
    rollout_decode_steps: int = 0  # decode loop iterations counted (FLOPs, time)
    judge_decode_steps: int = 0

    def describe(self, config) -> list[str]:
        r, rw, rl = config.rollout, config.reward, config.rl
        out = [f"lengths: prompt {self.prompt_len}, response {self.response_len}; "
               f"G = {self.group}",
               f"rollout: {self.rollout_prompts} prompts in chunks of {self.rollout_chunk} "
               f"(rollout.chunk_size={r.chunk_size}) = {self.rollout_chunk * self.group} rows "
               "per sampler call"]
        if self.judge_prompts:
            out.append(
                f"judge ({rw.judge_mode}, {rw.judge_source}): {self.judge_calls} x "
                f"{self.judge_prompts} prompts in chunks of {self.judge_chunk} "
                f"(reward.judge_chunk_size={rw.judge_chunk_size}), prompt bucket "
                f"{self.judge_prompt_len}" + (f", {self.judge_new_tokens} new tokens"
                                              if rw.judge_mode == "generate" else "") +
                (", shared prefixes" if rw.judge_share_prefix else
                 ", whole prompts (reward.judge_share_prefix=False)"))
        es = "es" if self.mini_batches > 1 else ""
        out.append(f"update: {self.mini_batches} mini-batch{es} of {self.mini_batch_rows} "
                   f"responses, micro-batches of {rl.micro_batch_size}/device = "
                   f"{self.micro_rows} rows; reference log-probs "
                   f"{rl.logprob_micro_batch_size}/device = {self.logprob_micro_rows} rows")
        return out


def step_shapes(config, mesh, image: Image, hosts: int, lengths: Lengths | None = None
                ) -> Shapes:
    """The step's shapes at the config's maximum lengths, or at `lengths` (programs padded to
    the buckets those lengths fall in; the sampler's decode programs keep their maximum
    new-token buffers, their loops counted at the expected number of steps)."""
    d, r, rw, rl = config.data, config.rollout, config.reward, config.rl
    g = int(r.group_size)
    dp = sharding.data_parallel_size(mesh)
    response_len = _round_up(r.max_new_tokens if lengths is None else lengths.response,
                             r.response_buckets)
    n_responses = r.batch_size * g
    judge_prompts = judge_calls = 0
    preset = emotion.get_preset(rw.preset)
    if preset.needs_coherence or preset.needs_consistency:
        both = preset.needs_coherence and preset.needs_consistency
        if rw.judge_mode == "generate":      # coherence + consistency prompts in one call
            judge_prompts, judge_calls = n_responses * (2 if both else 1), 1
        else:
            judge_prompts, judge_calls = n_responses, 2 if both else 1
    need = response_len + JUDGE_TEMPLATE_TOKENS + (image.tokens if preset.needs_consistency
                                                   else 0)
    mini_rows = rl.mini_batch_size * g
    return Shapes(
        group=g, prompt_len=_round_up(d.max_prompt_len if lengths is None else lengths.prompt,
                                      d.prompt_buckets),
        response_len=response_len, rollout_prompts=r.batch_size,
        rollout_chunk=min(r.chunk_size or r.batch_size, r.batch_size),
        judge_prompts=judge_prompts, judge_calls=judge_calls,
        judge_chunk=min(rw.judge_chunk_size or judge_prompts, judge_prompts),
        judge_prompt_len=min(_round_up(need, rw.judge_prompt_buckets),
                             max(rw.judge_prompt_buckets)),
        judge_prompt_need=need, judge_new_tokens=int(rw.judge_max_new_tokens),
        mini_batch_rows=mini_rows, mini_batches=max(1, r.batch_size // rl.mini_batch_size),
        micro_rows=update_lib.micro_batch_rows(rl.micro_batch_size, mesh),
        logprob_micro_rows=update_lib.micro_batch_rows(rl.logprob_micro_batch_size, mesh),
        dp=dp, hosts=hosts,
        rollout_decode_steps=int(r.max_new_tokens if lengths is None else lengths.response),
        judge_decode_steps=int(rw.judge_max_new_tokens if lengths is None else
                               min(lengths.judge_answer, rw.judge_max_new_tokens)))


# ------------------------------------------------------------------------------------------
# Abstract inputs.

def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def abstract_params(model, mesh):
    """The parameter tree as ShapeDtypeStructs placed with the model's shardings."""
    shapes = nn.unbox(qwen2_5_vl.abstract_params(model))
    return _with_shardings(shapes, qwen2_5_vl.param_shardings(model, mesh))


def abstract_train_state(model, optimizer, mesh) -> update_lib.TrainState:
    """TrainState (params + optimizer state) as ShapeDtypeStructs with its shardings."""
    params = nn.unbox(qwen2_5_vl.abstract_params(model))
    state = update_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                  opt_state=jax.eval_shape(optimizer.init, params))
    return _with_shardings(state, update_lib.train_state_shardings(model, optimizer, mesh))


def _stack_micro_batches(tree, num_micro_batches: int):
    """Host arrays [M0, ...] -> ShapeDtypeStructs [M, ...] (every micro-batch is alike)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_micro_batches,) + x.shape[1:],
                                                       x.dtype), tree)


def abstract_update_batch(model_cfg: Qwen2_5_VLConfig, shapes: Shapes, image: Image,
                          micro_rows: int, *, with_ref: bool) -> update_lib.UpdateBatch:
    """An UpdateBatch of one mini-batch, shapes only: the smallest rollout that packs into
    whole micro-batches goes through `pack_update_batch` (the trainer's packing), then its
    micro-batch axis is widened to the mini-batch's."""
    g, lp, t = shapes.group, shapes.prompt_len, shapes.response_len
    rows = math.lcm(micro_rows, g)
    prompts_n = rows // g
    if shapes.mini_batch_rows % micro_rows:
        raise ValueError(f"a mini-batch of {shapes.mini_batch_rows} responses does not split "
                         f"into micro-batches of {micro_rows} rows (per-device micro-batch x "
                         f"{shapes.dp} data-parallel devices); change rl.micro_batch_size, "
                         "rl.logprob_micro_batch_size or rl.mini_batch_size")
    if image.tokens + 1 > lp:
        raise ValueError(f"an image of {image.tokens} tokens does not fit a {lp}-token prompt")
    ids = np.full((prompts_n, lp), 0, np.int32)
    ids[:, lp - image.tokens - 1:-1] = model_cfg.image_token_id      # image, then text
    pixels = np.zeros((image.patches, model_cfg.vision.patch_dim), np.float32)
    prompts = PromptBatch.create(ids, np.ones_like(ids), np.zeros((3, prompts_n, lp), np.int32),
                                 images=[[(pixels, image.grid_thw)]] * prompts_n)
    responses = np.zeros((rows, t), np.int32)
    batch = update_lib.pack_update_batch(
        model_cfg, prompts, responses, np.ones_like(responses), np.zeros(rows, np.float32),
        np.zeros((rows, t), np.float32), np.zeros((rows, t), np.float32) if with_ref else None,
        group_size=g, micro_batch_rows=micro_rows)
    return _stack_micro_batches(batch, shapes.mini_batch_rows // micro_rows)


# ------------------------------------------------------------------------------------------
# FLOPs: loop trip counts from the jaxpr.

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


# ------------------------------------------------------------------------------------------
# Compiling and measuring one program.

RESIDENT = ("policy params", "optimizer state", "reference params", "judge params")


@dataclasses.dataclass
class Program:
    name: str
    shapes: str
    uses: tuple[str, ...]            # resident trees it takes as arguments
    calls: int                       # calls per training step
    group: str                       # which knob family it belongs to (for suggestions)
    memory: dict | None = None       # per-device bytes: args, out, temp, alias, code
    xla_flops: float = 0.0           # per device, loop bodies once (XLA cost analysis)
    xla_bytes: float = 0.0           # HBM bytes accessed, the same way
    kernel_flops: float = 0.0        # per device, Pallas kernels (analytic, loops counted)
    loop_scale: float = 1.0
    compile_s: float = 0.0
    error: str | None = None
    extra_live: int = 0              # bytes live beside it that belong to no resident tree
    extra_what: str = ""

    @property
    def total(self) -> int:
        m = self.memory or {}
        return m.get("args", 0) + m.get("out", 0) - m.get("alias", 0) + m.get("temp", 0) + \
            m.get("code", 0)

    @property
    def flops(self) -> float:
        return self.xla_flops * self.loop_scale + self.kernel_flops

    def seconds(self, chip: Chip) -> float:
        """Roofline time on `chip`: FLOPs at the MXU's peak or bytes at HBM bandwidth,
        whichever takes longer (a lower bound where overlap or collectives fall short)."""
        return max(self.flops / chip.peak_flops,
                   self.xla_bytes * self.loop_scale / chip.hbm_bandwidth)


# Pallas kernels are custom calls whose inside XLA's cost analysis does not see; their FLOPs
# are counted from the kernel's operands. Splash attention (model.attention=splash): q
# [..., T, D] and k [..., S, D] are its first two float operands; the forward computes
# Q K^T and P V (4 T S D per head), the backward's dK/dV kernel 8 T S D and its dQ kernel
# 6 T S D; every call here is causal, so about half the tiles run.
_KERNEL_FLOPS_PER_TSD = {"fwd": 4.0, "dkv": 8.0, "dq": 6.0}
CAUSAL_FRACTION = 0.5


def _pallas_flops(eqn) -> float | None:
    if eqn.primitive.name != "pallas_call":
        return None
    name = str(eqn.params.get("name_and_src_info", eqn.params.get("name", "")))
    phase = next((p for p in _KERNEL_FLOPS_PER_TSD if p in name), None)
    floats = [v.aval for v in eqn.invars if jnp.issubdtype(v.aval.dtype, jnp.floating)]
    if phase is None or len(floats) < 2:
        return 0.0
    q, k = floats[:2]
    return _KERNEL_FLOPS_PER_TSD[phase] * CAUSAL_FRACTION * math.prod(q.shape) * k.shape[-2]


def kernel_flops(jaxpr, while_trips: int = 1) -> float:
    """FLOPs of the Pallas kernels in a traced jaxpr, summed over devices, with loop trip
    counts (as `matmul_flops`)."""
    return _loop_sums(jaxpr, _pallas_flops, while_trips, per_device=True)[0]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "RESOURCE_EXHAUSTED" in line or "memory" in line.lower():
            return line.strip()[:400]
    return (text.splitlines() or [type(e).__name__])[0][:400]


def compile_program(program: Program, traced, *, while_trips: int = 1, log=None):
    """Lower + compile a traced program; fill in its memory, FLOPs and time (or its error)."""
    t0 = time.time()
    if log:
        log(f"compiling {program.name} ({program.shapes}) ...")
    try:
        compiled = traced.lower().compile()
    except Exception as e:  # noqa: BLE001 (XLA reports out-of-memory as a runtime error)
        program.error = _first_line(e)
        program.compile_s = time.time() - t0
        return None
    program.compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    program.memory = {"args": mem.argument_size_in_bytes, "out": mem.output_size_in_bytes,
                      "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes,
                      "code": mem.generated_code_size_in_bytes}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    program.xla_flops = float(cost.get("flops", 0.0))
    program.xla_bytes = float(cost.get("bytes accessed", 0.0))
    full, once = matmul_flops(traced.jaxpr.jaxpr, while_trips)
    program.loop_scale = full / once if once else 1.0
    # the jaxpr has global shapes: per device, as XLA's figures
    devices = max(len(x.device_set) for x in jax.tree.leaves(compiled.input_shardings))
    program.kernel_flops = kernel_flops(traced.jaxpr.jaxpr, while_trips) / devices
    if log:
        log(f"  {program.name}: {program.total / GiB:.2f} GiB per device, "
            f"compiled in {program.compile_s:.0f} s")
    return compiled


def _abstract_outputs(traced, compiled):
    """A program's outputs as ShapeDtypeStructs with the shardings XLA gave them (what the
    next program receives at run time)."""
    return jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s),
                        traced.out_info, compiled.output_shardings)


# ------------------------------------------------------------------------------------------
# The step's programs.

@dataclasses.dataclass
class Context:
    """Everything the program builders share (one config variant)."""
    config: Any
    topology: Topology
    mesh: Any
    model: Any
    params: Any                  # abstract, sharded
    image: Image
    shapes: Shapes
    log: Any = None
    lengths: Lengths | None = None
    sample_mesh: Any = None      # the sampler's and judge's (config.rollout.mesh)

    @property
    def sampling_params(self):
        """What the rollout and a policy judge read: policy.sampling_params (abstract)."""
        return policy_lib.sampling_params(self.model, self.params, self.sample_mesh)


def make_context(config, topology: Topology, devices, image_name: str, log=None,
                 lengths: str = "max") -> Context:
    m = config.mesh
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    model = qwen2_5_vl.build_model(model_config(config))
    image = image_for(config.data, image_name, model.config)
    hosts = len({d.process_index for d in devices})
    expected = lengths_for(lengths, config, image)
    return Context(config=config, topology=topology, mesh=mesh, model=model,
                   params=abstract_params(model, mesh), image=image,
                   shapes=step_shapes(config, mesh, image, hosts, expected), log=log,
                   lengths=expected, sample_mesh=policy_lib.sampling_mesh(config, mesh))


def _sampler_programs(ctx: Context, sampler: Sampler, params, *, what: str, num_prompts: int,
                      prompt_len: int, images: int, group: int, new_tokens: int,
                      calls: int, uses: tuple[str, ...], knob: str,
                      score: tuple[int, int] | None = None, steps: int = 0,
                      shared: tuple[int, int, int] | None = None) -> list[Program]:
    """steps: decode loop iterations to count (default new_tokens). shared: (unit, prefix
    tokens, suffix tokens): the share_prefix prefill (units of `unit` prompts sharing a prefix;
    `images`: one per prefix) instead of whole prompts of `prompt_len`."""
    grid = [ctx.image.grid_thw] * images if images else None
    if shared is None:                           # what the sampler really runs per call
        rows, why = sampler._chunk_rows(num_prompts), "bucket"
    else:
        b, m = sampler.shared_chunk_rows(num_prompts, shared[0])
        rows, why = b * m, "buckets"
    chunk = f"{num_prompts}" + ("" if rows == num_prompts else
                                f" (compiled as {rows}: the sampler's num_prompts {why})")
    if shared is None:
        pre = Program(f"{what} prefill", f"{chunk} prompts x {prompt_len} tokens"
                      + (f", {images} images" if images else ""), uses, calls, knob)
        traced = sampler.trace_prefill(params, num_prompts=num_prompts, prompt_len=prompt_len,
                                       image_grid_thw=grid)
    else:
        unit, prefix_len, suffix_len = shared
        pre = Program(f"{what} prefill", f"{chunk} prompts = {b} shared prefixes of "
                      f"{prefix_len} tokens" + (" with an image" if images else "") +
                      f", {m} suffixes of {suffix_len} tokens each", uses, calls, knob)
        traced = sampler.trace_prefill_shared(params, num_prompts=num_prompts, unit=unit,
                                              prefix_len=prefix_len, suffix_len=suffix_len,
                                              image_grid_thw=grid)
    compiled = compile_program(pre, traced, log=ctx.log)
    if score is None:
        dec = Program(f"{what} decode", f"{chunk} x G={group} rows, {new_tokens} "
                      "new tokens", uses, calls, knob)
    else:
        n_cont, width = score
        dec = Program(f"{what} score", f"{chunk} prompts x {n_cont} continuations of "
                      f"<= {width} tokens", uses, calls, knob)
    if compiled is None:      # its input layout (the prefill's output shardings) is unknown
        dec.error = "not compiled, it takes the prefill's output and the prefill failed"
        return [pre, dec]
    state = _abstract_outputs(traced, compiled)
    if score is None:
        traced = sampler.trace_decode(params, state, group=group, new_tokens=new_tokens)
        compile_program(dec, traced, while_trips=max(1, (steps or new_tokens) - 1),
                        log=ctx.log)
    else:
        traced = sampler.trace_score(params, state, num_continuations=n_cont, width=width)
        compile_program(dec, traced, log=ctx.log)
    return [pre, dec]


def rollout_programs(ctx: Context) -> list[Program]:
    """The rollout sampler's prefill and decode for one chunk (as Trainer builds it)."""
    c, s = ctx.config, ctx.shapes
    r = c.rollout
    buckets = SamplerBuckets(prompt_len=tuple(c.data.prompt_buckets),
                             new_tokens=tuple(sorted(set(r.response_buckets) | {
                                 c.eval.max_new_tokens, r.max_new_tokens})))
    sampler = Sampler(ctx.model, mesh=ctx.sample_mesh, buckets=buckets,
                      chunk_size=s.rollout_chunk)
    chunks = math.ceil(s.rollout_prompts / s.rollout_chunk)
    programs = _sampler_programs(ctx, sampler, ctx.sampling_params, what="rollout",
                                 num_prompts=s.rollout_chunk, prompt_len=s.prompt_len,
                                 images=s.rollout_chunk, group=s.group,
                                 new_tokens=r.max_new_tokens, calls=chunks,
                                 uses=("sampling params",), knob="rollout",
                                 steps=s.rollout_decode_steps)
    _earlier_chunks(programs[1], sampler, s.rollout_chunk, s.group, s.response_len, chunks)
    return programs


def _earlier_chunks(decode: Program, sampler: Sampler, chunk: int, group: int,
                    new_tokens: int, chunks: int) -> None:
    """Sampler.generate fetches after dispatching every chunk: the sampled tokens, log-probs
    and lengths of the earlier chunks of one call wait on the device beside the last decode."""
    if chunks > 1:
        rows = sampler._chunk_rows(chunk) * group
        decode.extra_live = ((chunks - 1) * (rows * new_tokens * 8 + rows * 4)
                             // sampler.data_parallel)
        decode.extra_what = f"outputs of {chunks - 1} earlier chunk{'s' if chunks > 2 else ''}"


def judge_model(ctx: Context):
    """(model, abstract params) of the judge: the policy's sampling copy, or reward.judge_dir's
    shapes (on the sampler's mesh)."""
    rw = ctx.config.reward
    if rw.judge_source != "checkpoint":
        return ctx.model, ctx.sampling_params
    if not rw.judge_dir:
        raise ValueError("config.reward.judge_source='checkpoint': AOT needs "
                         "reward.judge_dir (the judge's config.json)")
    judge_dir = model_source.resolve(rw.judge_dir, "config.reward.judge_dir",
                                     patterns=("config.json",))
    cfg = Qwen2_5_VLConfig.from_json_file(os.path.join(judge_dir, "config.json"),
                                          **policy_lib.runtime_fields(ctx.config.model))
    model = qwen2_5_vl.build_model(cfg)
    return model, abstract_params(model, ctx.sample_mesh)


def _score_continuations(ctx: Context) -> tuple[int, int]:
    """(count, longest) of the coherence candidates' continuations (the larger set)."""
    from emor3_jax.rewards import judge as judge_lib
    from emor3_jax.data import pipeline as data_lib
    labels = data_lib.dataset_labels(ctx.config, ctx.config.data.train)
    candidates = judge_lib.coherence_candidates(labels)
    m = ctx.config.model
    if m.tiny or m.tokenizer or m.hf_dir:
        try:
            from emor3_jax.processing import tokenizer as tok_lib
            tok = policy_lib.load_tokenizer(m)
            conts, _ = judge_lib.candidate_tokens(tok, tok_lib.token_ids(tok).im_end, candidates)
            return len(conts), max(map(len, conts))
        except (OSError, ValueError):
            pass
    spellings = sum(len({x.lower(), x.capitalize()}) for x in candidates)
    return spellings, JUDGE_CANDIDATE_TOKENS


def judge_programs(ctx: Context) -> list[Program]:
    """The judge's programs over one chunk of its prompts (as Trainer._judge builds it)."""
    c, s = ctx.config, ctx.shapes
    rw = c.reward
    if not s.judge_prompts:
        return []
    model, params = judge_model(ctx)
    buckets = SamplerBuckets(prompt_len=tuple(rw.judge_prompt_buckets),
                             new_tokens=(rw.judge_max_new_tokens,))
    sampler = Sampler(model, mesh=ctx.sample_mesh, buckets=buckets, chunk_size=s.judge_chunk)
    uses = ("judge params",) if rw.judge_source == "checkpoint" else ("sampling params",)
    calls = s.judge_calls * math.ceil(s.judge_prompts / s.judge_chunk)
    images = s.judge_chunk if emotion.get_preset(rw.preset).needs_consistency else 0
    # reward.judge_share_prefix: a rollout prompt's G consistency prompts share the template
    # and image (the worst chunk: consistency units, the response in the suffix)
    shared = (s.group, s.judge_prompt_need - s.response_len, s.response_len +
              JUDGE_TEMPLATE_TOKENS) if rw.judge_share_prefix else None
    programs = _sampler_programs(
        ctx, sampler, params, what="judge", num_prompts=s.judge_chunk,
        prompt_len=s.judge_prompt_len, images=images, group=1,
        new_tokens=rw.judge_max_new_tokens, calls=calls, uses=uses, knob="judge",
        score=None if rw.judge_mode == "generate" else _score_continuations(ctx),
        steps=s.judge_decode_steps, shared=shared)
    if rw.judge_mode == "generate":
        _earlier_chunks(programs[1], sampler, s.judge_chunk, 1,
                        _round_up(rw.judge_max_new_tokens, sampler.buckets.new_tokens),
                        math.ceil(s.judge_prompts / s.judge_chunk))
    return programs


def reference_programs(ctx: Context) -> list[Program]:
    """The log-prob passes over one mini-batch (make_logprob_fn): the frozen reference's
    (rl.kl_coef != 0, compute-dtype params) and, with rl.recompute_old_logp, the current
    policy's (its master params: another dtype, so another program)."""
    c, s = ctx.config, ctx.shapes
    passes = []
    if c.rl.kl_coef:
        passes.append(("reference log-probs", ("reference params",), _reference(ctx)))
    if c.rl.recompute_old_logp:
        passes.append(("old log-probs", ("policy params",), ctx.params))
    if not passes:
        return []
    fn = update_lib.make_logprob_fn(ctx.model, ctx.mesh, chunk=c.rl.logprob_chunk)
    batch = abstract_update_batch(ctx.model.config, s, ctx.image, s.logprob_micro_rows,
                                  with_ref=False)
    m = s.mini_batch_rows // s.logprob_micro_rows
    programs = []
    for name, uses, params in passes:
        prog = Program(name, f"{s.mini_batch_rows} responses = {m} x "
                       f"{s.logprob_micro_rows} rows, {s.prompt_len}+{s.response_len} tokens",
                       uses, s.mini_batches, "reference")
        compile_program(prog, fn.trace(params, batch.inputs), log=ctx.log)
        programs.append(prog)
    return programs


def _reference(ctx: Context):
    """The frozen reference as the trainer keeps it: a copy in the compute dtype."""
    return policy_lib.reference_params(ctx.params, ctx.config.model.dtype)


def update_programs(ctx: Context) -> list[Program]:
    """One GRPO update of a mini-batch (make_update_step: train state donated)."""
    c, s = ctx.config, ctx.shapes
    optimizer = update_lib.make_optimizer(c.optim)
    step = update_lib.make_update_step(ctx.model, optimizer, ctx.mesh, c.rl,
                                       chunk=c.rl.logprob_chunk, optim_config=c.optim)
    state = abstract_train_state(ctx.model, optimizer, ctx.mesh)
    batch = abstract_update_batch(ctx.model.config, s, ctx.image, s.micro_rows,
                                  with_ref=bool(c.rl.kl_coef))
    m = s.mini_batch_rows // s.micro_rows
    prog = Program("update", f"{s.mini_batch_rows} responses = {m} x {s.micro_rows} rows, "
                   f"{s.prompt_len}+{s.response_len} tokens, remat {c.model.remat}",
                   ("policy params", "optimizer state"), s.mini_batches, "update")
    compile_program(prog, step.trace(state, batch), log=ctx.log)
    return [prog]


BUILDERS = {"rollout": rollout_programs, "judge": judge_programs,
            "reference": reference_programs, "update": update_programs}


def _compile_all(ctx: Context, names: Sequence[str]) -> list[Program]:
    compiled = []
    for name in names:
        compiled += BUILDERS[name](ctx)
    return compiled


def resident_bytes(ctx: Context) -> dict[str, int]:
    """Per-device bytes of what stays on the chips for the whole run."""
    c = ctx.config
    optimizer = update_lib.make_optimizer(c.optim)
    state = abstract_train_state(ctx.model, optimizer, ctx.mesh)
    out = {"policy params": per_device_bytes(state.params),
           "optimizer state": per_device_bytes((state.opt_state, state.step)),
           "reference params": per_device_bytes(_reference(ctx)) if c.rl.kl_coef else 0,
           "judge params": 0}
    if c.reward.judge_source == "checkpoint" and ctx.shapes.judge_prompts:
        out["judge params"] = per_device_bytes(judge_model(ctx)[1])
    return out


def live_bytes(program: Program, resident: dict[str, int]) -> int:
    """A program's peak plus the resident trees it does not take as arguments."""
    return program.total + program.extra_live + sum(
        v for k, v in resident.items() if k not in program.uses)


# ------------------------------------------------------------------------------------------
# Report.

def _gib(n: float) -> str:
    """GiB with 2 decimals (4 below 0.1 GiB: tiny test models)."""
    g = n / GiB
    return f"{g:.4f}" if 0 < abs(g) < 0.1 else f"{g:.2f}"


def _flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOP"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _mfu(p: Program, chip: Chip) -> str:
    t = p.seconds(chip)
    return f"{100 * p.flops / (t * chip.peak_flops):.0f}%" if t > 0 else "n/a"


def _secs(t: float) -> str:
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
        rows.append(f"| {p.name} | {p.shapes} | {_gib(m['args'])} | {_gib(m['out'])} | "
                    f"{_gib(m['temp'])} | {_gib(m['alias'])} | {_gib(p.total)} | "
                    f"{100 * p.total / chip.hbm_bytes:.0f}% | {_flops(p.flops)} | "
                    f"{_secs(p.seconds(chip))} | {_mfu(p, chip)} | "
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
        rows.append(f"| {p.name} | {_gib(p.total)} | {_gib(res)} ({', '.join(outside) or '-'}) "
                    f"| {_gib(p.extra_live)}{' (' + p.extra_what + ')' if p.extra_what else ''} "
                    f"| {_gib(live)} | {100 * live / chip.hbm_bytes:.0f}% | "
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
        rows.append(f"| {p.name} | {p.shapes} | {_flops(p.flops)} | {_secs(p.seconds(chip))} | "
                    f"{_mfu(p, chip)} | {p.calls} | {_secs(p.seconds(chip) * p.calls)} | "
                    f"{p.compile_s:.0f} s |")
    return rows


def _fits(programs: list[Program], resident: dict[str, int], limit: float) -> bool:
    return all(p.error is None and live_bytes(p, resident) <= limit for p in programs)


def step_time(programs: list[Program], chip: Chip) -> float:
    return sum(p.seconds(chip) * p.calls for p in programs if not p.error)


# ------------------------------------------------------------------------------------------
# Suggestions: the knob of each program family, and a value that fits.
#
# Each family has one batch-like knob (micro-batch rows, prompts per sampler call) that its
# memory grows with roughly linearly: live(v) = fixed + v * per_unit. The search predicts the
# largest valid value that fits from what it measured (first point: fixed = the resident trees;
# then a secant through the last two points), compiles it, and repeats while attempts last.
# Lengths are never touched (they change the recipe); remat=full is tried first for the update.

KNOBS = {"update": "rl.micro_batch_size", "reference": "rl.logprob_micro_batch_size",
         "rollout": "rollout.chunk_size", "judge": "reward.judge_chunk_size"}
_REQUIRED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGTP]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40, "P": 1 << 50}


def knob_value(ctx: Context, group: str) -> int:
    c, s = ctx.config, ctx.shapes
    return {"update": c.rl.micro_batch_size, "reference": c.rl.logprob_micro_batch_size,
            "rollout": s.rollout_chunk, "judge": s.judge_chunk}[group]


def knob_candidates(ctx: Context, group: str) -> list[int]:
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
        m = _REQUIRED.search(p.error)
        if not m:
            return None, False
        lives.append(float(m.group(1)) * _UNITS[m.group(2)] + sum(resident.values()))
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


def _try(ctx: Context, devices, image_name: str, field: str, value, group: str, log):
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
    verdict = "fits" if _fits(programs, resident, limit) else "still does not fit"
    return (f"  - {field}={value}: {verdict} (live {_gib(live)} GiB = "
            f"{100 * live / chip.hbm_bytes:.0f}% of HBM)")


def suggest(ctx: Context, programs: list[Program], resident: dict[str, int], limit: float,
            devices, image_name: str, attempts: int, log=None) -> list[str]:
    """Lines naming what to change; recompiles each failing family (at most `attempts` times)
    with values predicted to fit and reports the first that does, else the next to try."""
    chip = ctx.topology.chip
    lines = []
    fixed = sum(resident.values())
    if fixed > limit:
        lines.append(f"- the resident train state alone needs {_gib(fixed)} GiB per chip "
                     f"(> {_gib(limit)}): use a bigger topology (more chips, a larger "
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
                if _fits(*got, limit):
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
            if _fits(*got, limit):
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


# ------------------------------------------------------------------------------------------
# Driver.

def analyze(config, topology: Topology, *, image: str = "typical", hbm_fraction: float = 0.95,
            programs: Sequence[str] = tuple(BUILDERS), fix_attempts: int = 2,
            config_name: str = "", log=None, lengths: str = "max") -> tuple[bool, str]:
    """Compile the step's programs for `topology`; return (fits, the printed report).
    lengths (max|typical|P,R): other than max, the programs are compiled a second time at
    those lengths for a step-time estimate (the memory verdict stays the maximum lengths')."""
    devices = topology_devices(topology)
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
           f"- model: {src}, {_count(n_params)} parameters; params {mc.param_dtype}, "
           f"compute {mc.dtype}, remat {mc.remat}, attention {mc.attention_impl}",
           f"- mesh: {mesh}; the sampler reads a {mc.dtype} copy of the policy "
           "(policy.sampling_params)",
           f"- image per prompt: {ctx.image.describe()} (--image=typical|max|HxW)"]
    out += ["- " + line for line in s.describe(config)]
    out += ["", "Per program (memory per device in GiB, from XLA's memory analysis; total = args "
            "+ output - alias + temp + generated code; FLOPs and time per call):", ""]
    out += program_table(compiled, chip)
    out += ["", "Run level (per device, GiB): resident for the whole run: " + ", ".join(
        f"{k} {_gib(v)}" for k, v in resident.items() if v) +
        f" = {_gib(sum(resident.values()))}", ""]
    out += run_table(compiled, resident, chip, limit)
    at_lengths = []
    if expected is not None:
        ectx = make_context(config, topology, devices, image, log=log, lengths=lengths)
        at_lengths = _compile_all(ectx, programs)
        out += ["", f"At {expected.name} lengths: {expected.describe(ectx.shapes)} (time only; "
                "the memory verdict is at the maximum lengths above):", ""]
        out += time_table(at_lengths, chip)
    ok_programs = [p for p in compiled if not p.error]
    peak = max((live_bytes(p, resident) for p in ok_programs), default=0)
    fits = _fits(compiled, resident, limit) and bool(compiled)
    failed = len(compiled) - len(ok_programs)
    but = f", {failed} program{'s' if failed > 1 else ''} failed to compile" if failed else ""
    shown = (f"{_gib(peak)} GiB of {_gib(chip.hbm_bytes)} GiB per chip "
             f"({100 * peak / chip.hbm_bytes:.0f}%; " if ok_programs else "n/a (")
    out += ["", f"peak live memory: {shown}limit {100 * hbm_fraction:g}% = "
            f"{_gib(limit)} GiB{but})",
            f"estimated step time (roofline time x calls per step, decode to "
            f"max_new_tokens{but}): {_secs(step_time(compiled, chip))}"]
    if expected is not None:
        failed = sum(1 for p in at_lengths if p.error)
        out.append(f"estimated step time at {expected.name} lengths (decode to the expected "
                   f"lengths{f', {failed} failed to compile' if failed else ''}): "
                   f"{_secs(step_time(at_lengths, chip))}")
    notes = []
    largest = max(config.reward.judge_prompt_buckets)
    if s.judge_prompts and s.judge_prompt_need > largest:
        notes.append(f"judge prompts may need {s.judge_prompt_need} tokens, more than the "
                     f"largest reward.judge_prompt_buckets ({largest}); compiled at that bucket")
    if s.hosts > 1:
        notes.append(f"multi-host slice ({s.hosts} hosts): shapes are global, one SPMD "
                     "program over the whole slice")
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
    flags.DEFINE_string("topology", "", "TPU slice (v4-8, v4-16, v4-32, v5e-4, v5p-8, ...) or "
                        "topology name (v4:2x2x1); default: config.aot.topology", flag_values=fv)
    flags.DEFINE_string("image", "typical", "image per prompt: typical (512x512 photo), max "
                        "(largest a prompt holds) or HxW", flag_values=fv)
    flags.DEFINE_string("lengths", "max", "max: fit and step time at the config's maximum "
                        "lengths; typical (a typical prompt with its image, ~300-token "
                        "responses, short judge answers) or P,R (prompt, response tokens): also "
                        "the step time at those lengths (the programs compiled twice)",
                        flag_values=fv)
    flags.DEFINE_float("hbm_fraction", 0.95, "usable share of HBM for the fit verdict",
                       flag_values=fv)
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


if __name__ == "__main__":
    sys.exit(cli(sys.argv))
