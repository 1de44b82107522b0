"""The step's programs, compiled from abstract inputs through the functions the trainer calls
(`Sampler.trace_*`, `make_logprob_fn(...).trace`, `make_micro_batch_update(...).trace_*`),
and what each one needs beside the trees that stay resident."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax import model_source, policy as policy_lib
from emor3_jax import sharding
from emor3_jax.batches import PromptBatch
from emor3_jax.aot import hlo
from emor3_jax.aot.chips import GiB, Chip, Topology
from emor3_jax.aot.cost import kernel_flops, matmul_flops
from emor3_jax.aot.shapes import (JUDGE_CANDIDATE_TOKENS, JUDGE_TEMPLATE_TOKENS, Image,
                                  Lengths, Shapes, _round_up, image_for, lengths_for,
                                  model_config, step_shapes)
from emor3_jax.learners.grpo import judge_buckets, rollout_buckets, row_cap, token_budget
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import Qwen2_5_VLConfig
from emor3_jax.rewards import emotion
from emor3_jax.rl import batching as batching_lib
from emor3_jax.rl import train_state as train_state_lib
from emor3_jax.rl import update as update_lib
from emor3_jax.sampling import Sampler, decode_windows, packing
from emor3_jax.sampling import memory as memory_lib


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


def abstract_params(model, mesh, rules=None):
    """The parameter tree as ShapeDtypeStructs placed with the model's shardings (`rules`:
    sharding's LOGICAL_RULES by default)."""
    shapes = nn.unbox(qwen2_5_vl.abstract_params(model))
    return _with_shardings(shapes, qwen2_5_vl.param_shardings(model, mesh, rules))


def abstract_train_state(model, optimizer, mesh) -> train_state_lib.TrainState:
    """TrainState (params + optimizer state) as ShapeDtypeStructs with its shardings."""
    params = nn.unbox(qwen2_5_vl.abstract_params(model))
    state = train_state_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                  opt_state=jax.eval_shape(optimizer.init, params))
    return _with_shardings(state, train_state_lib.train_state_shardings(model, optimizer, mesh))


def _stack_micro_batches(tree, num_micro_batches: int):
    """Host arrays [M0, ...] -> ShapeDtypeStructs [M, ...] (every micro-batch is alike)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_micro_batches,) + x.shape[1:],
                                                       x.dtype), tree)


def abstract_update_batch(model_cfg: Qwen2_5_VLConfig, shapes: Shapes, image: Image,
                          micro_rows: int, *, with_ref: bool) -> batching_lib.UpdateBatch:
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
    batch = batching_lib.pack_update_batch(
        model_cfg, prompts, responses, np.ones_like(responses), np.zeros(rows, np.float32),
        np.zeros((rows, t), np.float32), np.zeros((rows, t), np.float32) if with_ref else None,
        group_size=g, micro_batch_rows=micro_rows)
    return _stack_micro_batches(batch, shapes.mini_batch_rows // micro_rows)


def micro_batch_shapes(ctx: BuildContext, base_rows: int, token_budget: int, max_rows: int = 0
                       ) -> list[tuple[int, int, int]]:
    """(rows, response length, calls per step) of the micro-batches the trainer's packer
    (`pack_micro_batches`) cuts a mini-batch into at the context's lengths. Fixed rows: one
    shape. With a token budget at the maximum lengths: for every row count the budget can
    choose, the longest response bucket it is chosen at (the fit is the worst of them; only
    the longest bucket's is called when every response is at the maximum); at expected
    lengths, the shape those lengths give."""
    s, c = ctx.shapes, ctx.config
    calls = lambda n: -(-s.mini_batch_rows // n) * s.mini_batches
    if not token_budget:
        return [(base_rows, s.response_len, calls(base_rows))]
    most = min(s.mini_batch_rows, max_rows) if max_rows else s.mini_batch_rows
    rows_at = lambda t: batching_lib.budget_rows(token_budget, base_rows, most, s.group,
                                               s.prompt_len, t, s.dp)
    if ctx.lengths is not None:
        n = rows_at(s.response_len)
        return [(n, s.response_len, calls(n))]
    longest = {}
    for t in batching_lib.bucket_lengths(s.response_len, tuple(c.rl.length_buckets)):
        longest[rows_at(t)] = t                 # ascending t: the last one per row count
    return [(n, t, calls(n) if t == s.response_len else 0)
            for n, t in sorted(longest.items(), key=lambda nt: -nt[1]) if n]


def one_micro_batch(ctx: BuildContext, rows: int, response_len: int, *, with_ref: bool):
    """An UpdateBatch of one micro-batch of `rows` responses (leading axis 1), shapes only."""
    shapes = dataclasses.replace(ctx.shapes, response_len=response_len,
                                 mini_batch_rows=math.lcm(rows, ctx.shapes.group))
    batch = abstract_update_batch(ctx.model.config, shapes, ctx.image, rows, with_ref=with_ref)
    return _stack_micro_batches(batch, 1)


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
    min_step_bytes: float = 0.0      # decode: per device, what one step must read
    hbm_step_bytes: float = 0.0      # decode: per device, what its loop moves in HBM per step
    collective_bytes: dict | None = None  # decode: per device, what one step's collectives move

    @property
    def total(self) -> int:
        return memory_lib.total_bytes(self.memory or {})

    @property
    def flops(self) -> float:
        return self.xla_flops * self.loop_scale + self.kernel_flops

    def seconds(self, chip: Chip, hbm: bool = False) -> float:
        """Roofline time on `chip`: FLOPs at the MXU's peak or bytes at HBM bandwidth,
        whichever takes longer (a lower bound where overlap or collectives fall short).
        Without XLA's bytes (no cost analysis: deviceless CUDA) a decode step still reads
        its minimal bytes (`min_step_bytes`), so decode is not priced as if FLOP-bound.
        hbm: a decode loop priced at the HBM bytes of its compiled step (`hbm_step_bytes`)
        instead of XLA's bytes accessed, which count on-chip copies too (hlo.py)."""
        step_bytes = (hbm and self.hbm_step_bytes) or self.xla_bytes or self.min_step_bytes
        return max(self.flops / chip.peak_flops,
                   step_bytes * self.loop_scale / chip.hbm_bandwidth)


def compile_program(program: Program, traced, *, while_trips: int = 1, log=None):
    """Lower + compile a traced program; fill in its memory, FLOPs and time (or its error)."""
    t0 = time.time()
    if log:
        log(f"compiling {program.name} ({program.shapes}) ...")
    try:
        compiled = traced.lower().compile()
    except Exception as e:  # noqa: BLE001 (XLA reports out-of-memory as a runtime error)
        program.error = hlo.error_line(e)
        program.compile_s = time.time() - t0
        return None
    program.compile_s = time.time() - t0
    program.memory = memory_lib.program_memory(compiled)     # as the sampler's fit check
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    program.xla_flops = float((cost or {}).get("flops", 0.0))
    program.xla_bytes = float((cost or {}).get("bytes accessed", 0.0))
    full, once = matmul_flops(traced.jaxpr.jaxpr, while_trips)
    program.loop_scale = full / once if once else 1.0
    # the jaxpr has global shapes: per device, as XLA's figures
    devices = max(len(x.device_set) for x in jax.tree.leaves(compiled.input_shardings))
    if not program.xla_flops:       # no cost analysis (deviceless CUDA): the jaxpr's matmuls
        program.xla_flops = once / devices
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


@dataclasses.dataclass
class BuildContext:
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
                 lengths: str = "max") -> BuildContext:
    m = config.mesh
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    model = qwen2_5_vl.build_model(model_config(config))
    image = image_for(config.data, image_name, model.config)
    hosts = len({d.process_index for d in devices})
    expected = lengths_for(lengths, config, image)
    return BuildContext(config=config, topology=topology, mesh=mesh, model=model,
                   params=abstract_params(model, mesh), image=image,
                   shapes=step_shapes(config, mesh, image, hosts, expected), log=log,
                   lengths=expected, sample_mesh=policy_lib.sampling_mesh(config, mesh))


def _sampler_programs(ctx: BuildContext, sampler: Sampler, params, *, what: str, num_prompts: int,
                      prompt_len: int, images: int, group: int, new_tokens: int,
                      calls: int, uses: tuple[str, ...], knob: str,
                      score: tuple[int, int] | None = None, steps: int = 0,
                      shared: tuple[int, int, int] | None = None,
                      top_p: float = 1.0) -> list[Program]:
    """steps: decode loop iterations to count (default new_tokens). top_p: the sampler's (its
    decode traces a vocabulary sort only below 1). shared: (unit, prefix
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
    if score is not None:
        n_cont, width = score
        dec = Program(f"{what} score", f"{chunk} prompts x {n_cont} continuations of "
                      f"<= {width} tokens", uses, calls, knob)
        if compiled is None:
            return [pre, _not_compiled(dec)]
        traced = sampler.trace_score(params, _abstract_outputs(traced, compiled),
                                     num_continuations=n_cont, width=width)
        compile_program(dec, traced, log=ctx.log)
        return [pre, dec]
    # decode_start, then the windows (`decode_windows`): at the maximum lengths every one (the
    # fit); at expected lengths those the expected steps reach (the time)
    steps = steps or new_tokens
    bucket = packing.round_to(new_tokens, sampler.buckets.new_tokens, "new_tokens")
    windows = decode_windows(bucket, sampler.buckets.decode_window)
    programs, start = [pre], 1
    for k, window in enumerate((None,) + windows):
        trips = 0 if window is None else min(steps, window) - start
        if k > 1 and ctx.lengths is not None and trips <= 0:
            break
        span = (" start" if window is None else "" if len(windows) == 1 else
                f", steps < {window}" if k == 1 else f", steps {start}-{window - 1}")
        dec = Program(f"{what} decode{span}", f"{chunk} x G={group} rows, {new_tokens} new "
                      "tokens" + (": empty cache, first token" if window is None else
                                  f", attention over {window} slots" if span else ""),
                      uses, calls, knob)
        programs.append(dec)
        if compiled is None:      # its inputs' layout (the previous program's outputs) is unknown
            _not_compiled(dec)
            continue
        outputs = _abstract_outputs(traced, compiled)
        state, carry = (outputs, None) if window is None else outputs
        traced = sampler.trace_decode(params, state, carry, group=group, new_tokens=new_tokens,
                                      window=window, top_p=top_p)
        compiled = compile_program(dec, traced, while_trips=max(1, trips), log=ctx.log)
        if compiled is not None and window is not None:
            dec.min_step_bytes = decode_step_bytes(params, *_abstract_outputs(traced, compiled),
                                                   start + max(0, trips) / 2)
            text = compiled.as_text()
            dec.collective_bytes = hlo.loop_collective_bytes(text)
            dec.hbm_step_bytes = hlo.loop_hbm_bytes(text)
        start = window or start
    return programs


def decode_step_bytes(params, state, carry, written: float) -> float:
    """Per device, the bytes a decode step cannot avoid reading: every decoder weight once
    (the vision tower is not run; the placement's share, so a replicated copy counts in full)
    and the live KV cache once: the prompts' (and their shared prefixes') and `written` of the
    gen slots of every row (a window's mean). Its time at HBM bandwidth is the step's memory
    roofline."""
    weights = per_device_bytes(params) - per_device_bytes(params["model"].get("visual", {}))
    prompt = per_device_bytes((state.prompt_k, state.prompt_v, state.suffix_k, state.suffix_v))
    gen = per_device_bytes((carry.gen_k, carry.gen_v)) * written / carry.tokens.shape[1]
    return weights + prompt + gen


def _not_compiled(program: Program) -> Program:
    program.error = "not compiled: it takes the program before it, which failed"
    return program


def rollout_programs(ctx: BuildContext) -> list[Program]:
    """The rollout sampler's prefill and decode for one chunk (as Trainer builds it)."""
    c, s = ctx.config, ctx.shapes
    r = c.rollout
    sampler = Sampler(ctx.model, mesh=ctx.sample_mesh, buckets=rollout_buckets(c),
                      chunk_size=s.rollout_chunk)
    chunks = math.ceil(s.rollout_prompts / s.rollout_chunk)
    programs = _sampler_programs(ctx, sampler, ctx.sampling_params, what="rollout",
                                 num_prompts=s.rollout_chunk, prompt_len=s.prompt_len,
                                 images=s.rollout_chunk, group=s.group,
                                 new_tokens=r.max_new_tokens, calls=chunks,
                                 uses=("sampling params",), knob="rollout",
                                 steps=s.rollout_decode_steps, top_p=r.top_p)
    _earlier_chunks(programs[1:], sampler, s.rollout_chunk, s.group, s.response_len, chunks)
    return programs


def _earlier_chunks(decodes: list[Program], sampler: Sampler, chunk: int, group: int,
                    new_tokens: int, chunks: int) -> None:
    """Sampler.generate fetches after dispatching every chunk: the sampled tokens, log-probs
    and lengths of the earlier chunks of one call wait on the device beside the last decode."""
    if chunks > 1:
        rows = sampler._chunk_rows(chunk) * group
        for decode in decodes:
            decode.extra_live = ((chunks - 1) * (rows * new_tokens * 8 + rows * 4)
                                 // sampler.data_parallel)
            decode.extra_what = (f"outputs of {chunks - 1} earlier "
                                 f"chunk{'s' if chunks > 2 else ''}")


def judge_model(ctx: BuildContext):
    """(model, abstract params) of the judge: the policy's sampling copy, or reward.judge_dir's
    shapes (on the sampler's mesh)."""
    rw = ctx.config.reward
    if rw.judge_source != "checkpoint":
        return ctx.model, ctx.sampling_params
    from emor3_jax.rewards.judge import checkpoint_dir
    judge_dir = model_source.resolve(checkpoint_dir(rw), "config.reward.judge_dir",
                                     patterns=("config.json",))
    cfg = Qwen2_5_VLConfig.from_json_file(os.path.join(judge_dir, "config.json"),
                                          **policy_lib.runtime_fields(ctx.config.model))
    model = qwen2_5_vl.build_model(cfg)
    return model, abstract_params(model, ctx.sample_mesh, sharding.SAMPLING_RULES)


def _score_continuations(ctx: BuildContext) -> tuple[int, int]:
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


def judge_programs(ctx: BuildContext) -> list[Program]:
    """The judge's programs over one chunk of its prompts (the sampler `Judge.from_config`
    builds for the GRPO learner, with the same buckets and chunk)."""
    c, s = ctx.config, ctx.shapes
    rw = c.reward
    if not s.judge_prompts:
        return []
    model, params = judge_model(ctx)
    sampler = Sampler(model, mesh=ctx.sample_mesh, buckets=judge_buckets(c),
                      chunk_size=s.judge_chunk)
    uses = ("judge params",) if rw.judge_source == "checkpoint" else ("sampling params",)
    calls = s.judge_calls * math.ceil(s.judge_prompts / s.judge_chunk)
    images = s.judge_chunk if emotion.get_preset(rw.preset).needs_consistency else 0
    # reward.judge_share_prefix: a rollout prompt's G consistency prompts share the template
    # and image (the worst chunk: consistency units, the response in the suffix); prompts whose
    # suffix needs more than reward.judge_shared_suffix_max run whole. When those are the
    # prompts at these lengths, the shared programs at that limit are compiled too (at the
    # maximum lengths, for the fit: shorter responses share; no call is priced).
    prefix, suffix, limit = (s.judge_prompt_need - s.response_len,
                             s.response_len + JUDGE_TEMPLATE_TOKENS, rw.judge_shared_suffix_max)
    kinds = [("judge", calls, None)]
    if rw.judge_share_prefix:
        if not limit or suffix <= limit:
            kinds = [("judge", calls, (s.group, prefix, suffix))]
        elif ctx.lengths is None:
            kinds.append(("judge shared-prefix", 0, (s.group, prefix, limit)))
    programs = []
    for what, n_calls, shared in kinds:
        programs += _judge_sampler_programs(ctx, sampler, params, what, n_calls, uses, images,
                                            shared)
    return programs


def _judge_sampler_programs(ctx: BuildContext, sampler: Sampler, params, what: str, calls: int,
                            uses, images: int, shared) -> list[Program]:
    c, s = ctx.config, ctx.shapes
    rw = c.reward
    programs = _sampler_programs(
        ctx, sampler, params, what=what, num_prompts=s.judge_chunk,
        prompt_len=s.judge_prompt_len, images=images, group=1,
        new_tokens=rw.judge_max_new_tokens, calls=calls, uses=uses, knob="judge",
        score=None if rw.judge_mode == "generate" else _score_continuations(ctx),
        steps=s.judge_decode_steps, shared=shared, top_p=rw.judge_top_p)
    if rw.judge_mode == "generate":
        _earlier_chunks(programs[1:], sampler, s.judge_chunk, 1,
                        _round_up(rw.judge_max_new_tokens, sampler.buckets.new_tokens),
                        math.ceil(s.judge_prompts / s.judge_chunk))
    return programs


def reference_programs(ctx: BuildContext) -> list[Program]:
    """The log-prob passes over one mini-batch (make_logprob_fn): the frozen reference's
    (rl.kl_coef != 0, compute-dtype params) and, with rl.recompute_old_logp, the current
    policy's (its master params: another dtype, so another program); one call per
    micro-batch (`micro_batch_logprobs`), at the shapes the trainer's packer cuts
    (`micro_batch_shapes`, rl.logprob_micro_batch_tokens)."""
    c, s = ctx.config, ctx.shapes
    passes = []
    if c.rl.kl_coef:
        passes.append(("reference log-probs", ("reference params",), _reference(ctx)))
    if c.rl.recompute_old_logp:
        passes.append(("old log-probs", ("policy params",), ctx.params))
    fn = update_lib.make_logprob_fn(ctx.model, ctx.mesh, chunk=c.rl.logprob_chunk)
    shapes = micro_batch_shapes(ctx, s.logprob_micro_rows,
                                token_budget(c, s.dp, "logprob_micro_batch_tokens"),
                                row_cap(c, s.dp, "logprob_micro_batch_tokens"))
    programs = []
    for name, uses, params in passes:
        for k, (n, t, calls) in enumerate(shapes):
            m = -(-s.mini_batch_rows // n)
            prog = Program(name if k == 0 else f"{name}, {n} rows",
                           f"1 micro-batch of {n} rows ({m} per mini-batch), "
                           f"{s.prompt_len}+{t} tokens", uses, calls, "reference")
            inputs = one_micro_batch(ctx, n, t, with_ref=False).inputs
            compile_program(prog, fn.trace(params, inputs), log=ctx.log)
            if m > 1 and prog.memory:
                # micro_batch_logprobs dispatches every call before fetching any: the earlier
                # calls' log-probs wait on the device beside the last call
                prog.extra_live = (m - 1) * prog.memory["out"]
                prog.extra_what = f"outputs of {m - 1} earlier call{'s' if m > 2 else ''}"
            programs.append(prog)
    return programs


def _reference(ctx: BuildContext):
    """The frozen reference as the trainer keeps it: a copy in the compute dtype."""
    return policy_lib.reference_params(ctx.params, ctx.config.model.dtype)


def update_programs(ctx: BuildContext) -> list[Program]:
    """One GRPO update of a mini-batch, as the trainer runs it (make_micro_batch_update): one
    gradient call per micro-batch at the shapes the packer cuts (`micro_batch_shapes`,
    rl.micro_batch_tokens; the fp32 gradient accumulator donated from call to call), then
    one optimizer call (train state donated)."""
    c, s = ctx.config, ctx.shapes
    optimizer = train_state_lib.make_optimizer(c.optim)
    state = abstract_train_state(ctx.model, optimizer, ctx.mesh)
    step = update_lib.make_micro_batch_update(ctx.model, optimizer, ctx.mesh, c.rl,
                                              chunk=c.rl.logprob_chunk, optim_config=c.optim)
    rep = sharding.replicated(ctx.mesh)
    grads = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32,
                                                        sharding=p.sharding), state.params)
    sums = jax.ShapeDtypeStruct((step.num_summed_metrics,), jnp.float32, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    programs = []
    shapes = micro_batch_shapes(ctx, s.micro_rows, token_budget(c, s.dp, "micro_batch_tokens"),
                                row_cap(c, s.dp, "micro_batch_tokens"))
    for k, (n, t, calls) in enumerate(shapes):
        prog = Program("update gradients" if k == 0 else f"update gradients, {n} rows",
                       f"1 micro-batch of {n} rows ({-(-s.mini_batch_rows // n)} per "
                       f"mini-batch), {s.prompt_len}+{t} tokens, remat {c.model.remat}",
                       ("policy params",), calls, "update")
        batch = one_micro_batch(ctx, n, t, with_ref=bool(c.rl.kl_coef))
        compile_program(prog, step.trace_accumulate(state.params, grads, sums, batch, scalar,
                                                    scalar), log=ctx.log)
        programs.append(prog)
    opt_prog = Program("update optimizer step", "AdamW on the accumulated fp32 gradients",
                       ("policy params", "optimizer state"), s.mini_batches, "update")
    compile_program(opt_prog, step.trace_apply(state, grads, sums), log=ctx.log)
    return programs + [opt_prog]


BUILDERS = {"rollout": rollout_programs, "judge": judge_programs,
            "reference": reference_programs, "update": update_programs}


def _compile_all(ctx: BuildContext, names: Sequence[str]) -> list[Program]:
    compiled = []
    for name in names:
        compiled += BUILDERS[name](ctx)
    return compiled


def resident_bytes(ctx: BuildContext) -> dict[str, int]:
    """Per-device bytes of what stays on the chips for the whole run."""
    c = ctx.config
    optimizer = train_state_lib.make_optimizer(c.optim)
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


def all_fit(programs: list[Program], resident: dict[str, int], limit: float) -> bool:
    return all(p.error is None and live_bytes(p, resident) <= limit for p in programs)
