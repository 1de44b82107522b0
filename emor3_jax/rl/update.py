"""The sharded GRPO update and the forward-only log-prob passes, on micro-batches packed by
`rl/batching.py` (formats there).

The padded update step (`make_update_step`: the reference the tests compare the trainer's
update with) is one jit with explicit shardings (parameters and Adam moments laid out by the
model's logical axes: FSDP over `fsdp`, tensor-parallel over `tensor`; batch rows over
data x fsdp), donating the train state. It scans over the M micro-batches
accumulating fp32 gradients of `losses.policy_loss` (token-mean over the whole mini-batch by
default, independent of M and the device count; the released per-micro-batch mean as
`loss_agg="microbatch_token_mean"`), then takes one AdamW step. A non-finite loss or gradient
norm skips the step: the returned state is the input state, and metrics["skipped"] = 1.

The trainer's update (`make_micro_batch_update`) is one jitted call per length-aware micro-batch
accumulating fp32 gradients into a donated accumulator, then one optimizer call; each call's
loss is its share of the whole mini-batch's token-mean, so loss, gradients and the step equal
the padded ones up to float rounding.
metrics["padded_fraction"]: padded response slots / all response slots computed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from emor3_jax import sharding
from emor3_jax.models import layers, qwen2_5_vl
from emor3_jax.rl import losses
from emor3_jax.rl.batching import MicroBatches, UpdateBatch
from emor3_jax.rl.logprobs import PolicyInputs, response_logprobs
from emor3_jax.rl.train_state import TrainState, learning_rate_schedule, train_state_shardings

_BATCH_AXES = ("data", "fsdp")


def micro_batch_logprobs(logprob_fn, params, micro_batches: MicroBatches) -> np.ndarray:
    """[N, T] fp32 log-probs of a `pack_micro_batches` mini-batch (no advantages) in the
    mini-batch's row order, by `logprob_fn = make_logprob_fn(...)` one micro-batch per call
    (one program per (Lp_i, T_i)); 0 past each micro-batch's length and in the left-out
    (token-less) micro-batches. Every process must call it (the results are gathered)."""
    mb = micro_batches
    outs = [logprob_fn(params, x) for x in mb.items]      # all dispatched before any wait
    full = np.zeros((mb.num_rows, mb.response_len), np.float32)
    for rows, out in zip(mb.rows, outs):
        out = sharding.to_host(out)[0]
        full[rows, :out.shape[1]] = out
    return full


# ------------------------------------------------------------------------------------------
# Shardings.

def _stacked_rows_sharding(mesh, x, row_axis: int):
    """Rows (axis `row_axis`) over data x fsdp; replicated when rows do not divide evenly."""
    if x is None:
        return None
    spec = [None] * np.ndim(x)
    spec[row_axis] = _BATCH_AXES
    return NamedSharding(mesh, sharding._fit_spec(P(*spec), np.shape(x), mesh))


def policy_inputs_shardings(mesh, inputs: PolicyInputs) -> PolicyInputs:
    """Shardings of stacked PolicyInputs: rows over data x fsdp, the vision index arrays
    replicated, pixel rows over data x fsdp (the whole mini-batch's pixels, fp32, replicated
    would take 1.7 GiB per device for 256 Qwen2.5-VL-3B micro-batches; the vision tower
    gathers one micro-batch's at a time)."""
    rep = sharding.replicated(mesh)
    rows = lambda x, axis=1: _stacked_rows_sharding(mesh, x, axis)
    return PolicyInputs(
        prompt_ids=rows(inputs.prompt_ids), prompt_mask=rows(inputs.prompt_mask),
        prompt_position_ids=rows(inputs.prompt_position_ids, 2),
        pixel_values=None if inputs.pixel_values is None else rows(inputs.pixel_values),
        vision_inputs=None if inputs.vision_inputs is None else
        jax.tree.map(lambda _: rep, inputs.vision_inputs),
        response_ids=rows(inputs.response_ids), response_mask=rows(inputs.response_mask),
        response_position_ids=rows(inputs.response_position_ids, 2),
        prompt_index=rows(inputs.prompt_index))


def update_batch_shardings(mesh, batch: UpdateBatch) -> UpdateBatch:
    rows = lambda x: _stacked_rows_sharding(mesh, x, 1)
    return UpdateBatch(inputs=policy_inputs_shardings(mesh, batch.inputs),
                       advantages=rows(batch.advantages), old_logp=rows(batch.old_logp),
                       ref_logp=rows(batch.ref_logp))


def _check_rows(mesh, rows: int, what: str):
    dp = sharding.data_parallel_size(mesh)
    if rows % dp:
        raise ValueError(f"{what}: micro-batches of {rows} rows cannot be split over the "
                         f"{dp} data-parallel devices (data x fsdp); use micro_batch_rows(...) "
                         "= per-device rows x data-parallel size")


# ------------------------------------------------------------------------------------------
# Forward-only log-probs (reference / old policy).

def make_logprob_fn(model, mesh, *, chunk: int):
    """Jitted fn(params, inputs: PolicyInputs [M, ...]) -> log-probs [M, n, T] fp32.

    (An optional third argument, the response length T, is only checked against the inputs.)

    Forward only, one micro-batch at a time (lax.map); pack `inputs` with
    rows = rl.logprob_micro_batch_size x data-parallel size. `params` may be the frozen
    reference's or the current policy's (old log-probs); no gradient is ever taken.
    Use `merge_micro_batches` to get [N, T] back.
    """
    params_sh = qwen2_5_vl.param_shardings(model, mesh)
    compiled = {}

    def run(params, inputs):
        params = jax.lax.stop_gradient(params)
        one = lambda mb: response_logprobs(model, params, mb, chunk=chunk, with_entropy=False)[0]
        with layers.kernel_mesh(mesh):
            return jax.lax.map(one, inputs)

    def jitted(inputs: PolicyInputs):
        _check_rows(mesh, inputs.response_ids.shape[1], "make_logprob_fn")
        key = jax.tree.structure(inputs)
        if key not in compiled:
            compiled[key] = jax.jit(run, in_shardings=(params_sh, policy_inputs_shardings(
                mesh, inputs)), out_shardings=_stacked_rows_sharding(mesh, inputs.response_ids, 1))
        return compiled[key]

    def fn(params, inputs: PolicyInputs, response_len: int | None = None):
        if response_len is not None and int(response_len) != inputs.response_ids.shape[-1]:
            raise ValueError(f"make_logprob_fn: response_len={response_len} but the packed "
                             f"responses have T = {inputs.response_ids.shape[-1]} tokens")
        # several processes: host numpy -> global arrays (jit refuses numpy for those)
        inputs = sharding.host_to_global(inputs, policy_inputs_shardings(mesh, inputs))
        return jitted(inputs)(params, inputs)
    fn.compiled = compiled
    # AOT (emor3_jax/aot/): the same program traced from abstract (ShapeDtypeStruct) inputs
    fn.trace = lambda params, inputs: jitted(inputs).trace(params, inputs)
    return fn


# ------------------------------------------------------------------------------------------
# The update step.

METRIC_NAMES = ("loss", "pg_loss", "kl", "ppo_kl", "ratio_mean", "clipfrac_upper",
                "clipfrac_lower", "clipfrac_dual", "entropy", "grad_norm", "response_length",
                "tokens", "padded_fraction", "lr", "skipped")


def make_loss_and_grad(model, mesh, rl_config, *, chunk: int | None = None):
    """fn(params, batch: UpdateBatch) -> (loss, metrics, grads): gradient accumulation over the
    micro-batches (lax.scan), grads in fp32 and laid out like the parameters. Not jitted
    (`make_update_step` jits it with the optimizer; tests jit it alone).

    rl_config: configs/base.py `rl` (clip_low/high, dual_clip, kl_coef, loss_agg,
    logprob_chunk = the default `chunk`).
    """
    chunk = int(rl_config.logprob_chunk if chunk is None else chunk)
    loss_agg = rl_config.loss_agg
    if loss_agg not in losses.LOSS_AGG_MODES:
        raise ValueError(f"rl.loss_agg={loss_agg!r}; choose one of {losses.LOSS_AGG_MODES}")
    dp = sharding.data_parallel_size(mesh)
    loss_kw = dict(clip_low=float(rl_config.clip_low), clip_high=float(rl_config.clip_high),
                   dual_clip=float(rl_config.dual_clip), kl_coef=float(rl_config.kl_coef),
                   loss_agg=loss_agg)
    params_sh = qwen2_5_vl.param_shardings(model, mesh)

    def micro_loss(params, mb: UpdateBatch, token_count, num_micro_batches):
        logp, entropy = response_logprobs(model, params, mb.inputs, chunk=chunk)
        if loss_agg == "token_mean":
            agg = dict(token_count=token_count)
        else:  # released: token-mean per micro-batch of each device, then mean of those
            agg = dict(micro_batch_size=mb.response_mask.shape[0] // dp,
                       num_micro_batches=num_micro_batches)
        ref = None if float(rl_config.kl_coef) == 0 else mb.ref_logp
        loss, metrics = losses.policy_loss(logp, mb.old_logp, ref, mb.advantages,
                                           mb.response_mask, **loss_kw, **agg)
        mask = mb.response_mask.astype(jnp.float32)
        metrics["entropy"] = jnp.sum(jnp.where(mask > 0, entropy, 0.0)) / token_count
        return loss, metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def loss_and_grad(params, batch: UpdateBatch, token_count=None, num_micro_batches=None):
        # token_count / num_micro_batches: the whole mini-batch's token count and micro-batch
        # count when `batch` is only part of it (length-aware micro-batches, accumulated over
        # several calls by `make_micro_batch_update`); None: `batch` is the whole mini-batch.
        m = batch.response_mask.shape[0]
        _check_rows(mesh, batch.response_mask.shape[1], "update step")
        if float(rl_config.kl_coef) != 0 and batch.ref_logp is None:
            raise ValueError("update step: rl.kl_coef != 0 but the batch has no ref_logp; "
                             "compute them with make_logprob_fn(reference params) or set "
                             "rl.kl_coef = 0")
        if token_count is None:
            token_count = batch.response_mask.sum()
        token_count = jnp.maximum(jnp.asarray(token_count, jnp.float32), 1.0)
        total = m * dp if num_micro_batches is None else num_micro_batches * dp
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, params_sh)

        def body(acc, mb):
            (loss, metrics), grads = grad_fn(params, mb, token_count, total)
            acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
            return jax.lax.with_sharding_constraint(acc, params_sh), (loss, metrics)

        grads, (loss, metrics) = jax.lax.scan(body, zeros, batch)
        metrics = jax.tree.map(jnp.sum, metrics)
        metrics["loss"] = loss.sum()
        metrics["tokens"] = batch.response_mask.sum().astype(jnp.float32)
        metrics["response_length"] = metrics["tokens"] / (m * batch.response_mask.shape[1])
        metrics["padded_fraction"] = 1.0 - metrics["tokens"] / batch.response_mask.size
        return metrics["loss"], metrics, grads
    return loss_and_grad


def make_update_step(model, optimizer, mesh, rl_config, optim_config=None, *,
                     chunk: int | None = None, donate: bool = True):
    """Jitted GRPO step(state, batch) -> (state, metrics), explicit shardings (module docstring).

    optimizer: `make_optimizer(optim_config)`; optim_config (configs/base.py `optim`) gives the
    lr metric. metrics (replicated fp32 scalars): METRIC_NAMES: loss, pg_loss, kl, ppo_kl,
    ratio_mean, clip fractions, entropy (token-mean), grad_norm (before clipping),
    response_length (mean response tokens per row), tokens, lr (of this step; only with
    optim_config), skipped (1 = non-finite loss or grads: the state is returned unchanged, step
    included, so the trainer can count skips in a row). One program is compiled per batch
    structure and shape bucket (`step.compiled`; `step.trace` for AOT).
    """
    return make_train_step(make_loss_and_grad(model, mesh, rl_config, chunk=chunk), model,
                           optimizer, mesh, optim_config, donate=donate)


def _apply_if_finite(optimizer, schedule, state: TrainState, loss, metrics, grads):
    """One optimizer step on `grads` unless the loss or the gradient norm is not finite (then
    `state` unchanged); adds grad_norm, skipped and (schedule given) lr to the metrics."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(state):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state)

    # A branch, not a select over the whole state (which reads the new and the old params
    # and moments and writes a third copy): a third less optimizer time on CPU.
    new = jax.lax.cond(finite, apply, lambda state: state, state)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return new, metrics


def make_train_step(loss_and_grad, model, optimizer, mesh, optim_config=None, *,
                    donate: bool = True):
    """Jit one optimizer step around `loss_and_grad(params, batch) -> (loss, metrics, grads)`
    (e.g. `make_loss_and_grad`, or SFT's NLL) with the TrainState shardings, the batch's
    shardings (`update_batch_shardings`), state donation and the non-finite skip; adds
    grad_norm, skipped and (with optim_config) lr to the metrics."""
    state_sh = train_state_shardings(model, optimizer, mesh)
    schedule = None if optim_config is None else learning_rate_schedule(optim_config)
    rep = sharding.replicated(mesh)
    compiled = {}

    def step(state: TrainState, batch: UpdateBatch):
        with layers.kernel_mesh(mesh):
            loss, metrics, grads = loss_and_grad(state.params, batch)
        return _apply_if_finite(optimizer, schedule, state, loss, metrics, grads)

    def jitted(batch: UpdateBatch):
        key = jax.tree.structure(batch)
        if key not in compiled:
            compiled[key] = jax.jit(step, in_shardings=(state_sh, update_batch_shardings(mesh, batch)),
                                    out_shardings=(state_sh, rep),
                                    donate_argnums=(0,) if donate else ())
        return compiled[key]

    def call(state: TrainState, batch: UpdateBatch):
        # several processes: host numpy -> global arrays (jit refuses numpy for those)
        batch = sharding.host_to_global(batch, update_batch_shardings(mesh, batch))
        return jitted(batch)(state, batch)
    call.compiled = compiled
    # AOT (emor3_jax/aot/): the same program traced from abstract (ShapeDtypeStruct) inputs
    call.trace = lambda state, batch: jitted(batch).trace(state, batch)
    return call


# Metrics of `make_loss_and_grad` that add up over the calls of one mini-batch (each call's
# value is its share of the mini-batch's).
_SUMMED_METRICS = ("loss", "pg_loss", "kl", "ppo_kl", "ratio_mean", "clipfrac_upper",
                   "clipfrac_lower", "clipfrac_dual", "entropy", "tokens")


def make_micro_batch_update(model, optimizer, mesh, rl_config, optim_config=None, *,
                            chunk: int | None = None, donate: bool = True):
    """GRPO step(state, micro_batches: MicroBatches) -> (state, metrics) over length-aware
    micro-batches (`pack_micro_batches`): the same loss, gradients and update as
    `make_update_step` on the mini-batch padded to its longest response, up to float rounding.

    Micro-batches of different lengths have different shapes, so the step is several jitted
    calls: one that zeroes an fp32 gradient accumulator laid out like the parameters, one per
    micro-batch that adds its gradients (`make_loss_and_grad` with the mini-batch's token
    count and micro-batch count, so its loss is its share of the mini-batch token-mean; the
    released per-micro-batch mean likewise) and its metrics, the accumulator donated to the
    next call; then one that takes the AdamW step (state donated; skipped, state unchanged,
    when the loss or the gradient norm is not finite, as make_update_step). One accumulate
    program per micro-batch shape (Lp_i, T_i, images; `step.compiled`), so the number of
    programs is bounded by the length buckets. Calls run in the same order on every process
    (the packing is deterministic). The order of the micro-batches changes the sums only by
    float rounding. Metrics: METRIC_NAMES, padded_fraction and response_length computed on
    the host (numpy scalars), the rest replicated fp32 scalars.
    """
    loss_and_grad = make_loss_and_grad(model, mesh, rl_config, chunk=chunk)
    loss_agg = rl_config.loss_agg
    state_sh = train_state_shardings(model, optimizer, mesh)
    params_sh, rep = state_sh.params, sharding.replicated(mesh)
    schedule = None if optim_config is None else learning_rate_schedule(optim_config)
    as_fp32 = lambda tree: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), tree)
    zeros = jax.jit(lambda params: (as_fp32(params), jnp.zeros(len(_SUMMED_METRICS))),
                    in_shardings=(params_sh,), out_shardings=(params_sh, rep))

    def accumulate(params, grads, sums, batch, token_count, num_micro_batches):
        with layers.kernel_mesh(mesh):
            _, metrics, g = loss_and_grad(params, batch, token_count=token_count,
                                          num_micro_batches=num_micro_batches)
        unknown = set(metrics) - set(_SUMMED_METRICS) - {"response_length", "padded_fraction"}
        if unknown:
            raise ValueError(f"make_micro_batch_update: metrics {sorted(unknown)} are not known "
                             "to add up over micro-batches; list them in _SUMMED_METRICS")
        grads = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), grads, g)
        sums = sums + jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in _SUMMED_METRICS])
        return grads, sums

    def apply(state, grads, sums):
        metrics = {k: sums[i] for i, k in enumerate(_SUMMED_METRICS)}
        return _apply_if_finite(optimizer, schedule, state, metrics["loss"], metrics, grads)

    apply_jit = jax.jit(apply, in_shardings=(state_sh, params_sh, rep),
                        out_shardings=(state_sh, rep), donate_argnums=(0,) if donate else ())
    compiled = {}

    def accumulate_jit(batch: UpdateBatch):
        key = (jax.tree.structure(batch), tuple(np.shape(x) for x in jax.tree.leaves(batch)))
        if key not in compiled:
            compiled[key] = jax.jit(
                accumulate, in_shardings=(params_sh, params_sh, rep,
                                          update_batch_shardings(mesh, batch), rep, rep),
                out_shardings=(params_sh, rep), donate_argnums=(1, 2))
        return compiled[key]

    def call(state: TrainState, micro_batches: MicroBatches):
        mbs = micro_batches
        if loss_agg == "microbatch_token_mean" and mbs.sorted:
            raise ValueError("rl.loss_agg='microbatch_token_mean' averages inside each "
                             "micro-batch, so sorting rows by length would change the loss; "
                             "pack with pack_micro_batches(..., sort=False)")
        if mbs.items and not isinstance(mbs.items[0], UpdateBatch):
            raise ValueError("make_micro_batch_update: pack the micro-batches with "
                             "advantages and old_logp (pack_micro_batches)")
        grads, sums = accumulate_all(state.params, mbs)
        state, metrics = apply_jit(state, grads, sums)
        metrics["response_length"] = np.float32(mbs.token_count / mbs.num_rows)
        metrics["padded_fraction"] = np.float32(mbs.padded_fraction)
        return state, metrics

    def accumulate_all(params, mbs: MicroBatches):
        put = lambda x: sharding.host_to_global(x, rep)
        token_count = put(np.float32(max(mbs.token_count, 1)))
        num_micro_batches = put(np.float32(mbs.num_micro_batches))
        grads, sums = zeros(params)
        for batch in mbs.items:
            batch = sharding.host_to_global(batch, update_batch_shardings(mesh, batch))
            grads, sums = accumulate_jit(batch)(params, grads, sums, batch, token_count,
                                                num_micro_batches)
        return grads, sums

    def gradients(params, mbs: MicroBatches):
        """(loss, metrics, fp32 grads) of the mini-batch without the optimizer step."""
        grads, sums = accumulate_all(params, mbs)
        metrics = {k: sums[i] for i, k in enumerate(_SUMMED_METRICS)}
        return metrics["loss"], metrics, grads
    def apply_gradients(state: TrainState, grads, metrics):
        """The optimizer call alone, on given fp32 grads and summed metrics (tests: the
        padded path's gradients through the same step)."""
        return apply_jit(state, grads, jnp.stack([jnp.asarray(metrics[k], jnp.float32)
                                                  for k in _SUMMED_METRICS]))
    call.compiled = compiled
    call.gradients = gradients
    call.apply_gradients = apply_gradients
    # AOT (emor3_jax/aot/): the two programs a step runs, traced from abstract inputs
    call.trace_accumulate = lambda params, grads, sums, batch, token_count, num_micro_batches: (
        accumulate_jit(batch).trace(params, grads, sums, batch, token_count, num_micro_batches))
    call.trace_apply = apply_jit.trace
    call.num_summed_metrics = len(_SUMMED_METRICS)
    return call
