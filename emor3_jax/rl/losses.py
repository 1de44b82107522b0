"""GRPO math: group-normalized advantages and the clipped policy loss with a k3 KL term.

Semantics are EasyR1's (the released EMO-R3 code), docs/method.md "RL update":
  ratio r = exp(clamp(logp - old_logp, -20, 20)); clip(r) = exp(clamp(logp - old_logp,
  log(1 - clip_low), log(1 + clip_high))); l = max(-A*r, -A*clip(r)); for A < 0,
  l = min(l, -dual_clip*A); k3 KL = exp(d) - d - 1 with d = clamp(ref - logp, -20, 20), result
  clamped to [-10, 10]; total = pg + kl_coef*KL, each averaged over response tokens.

Loss aggregation (`loss_agg`) and why `token_count` exists:
  * "token_mean" (this project's default): sum over every response token of the mini-batch
    divided by the mini-batch's token count. Inside one jit over a sharded batch, jnp.sum is
    already global, so any device count gives the same value. For gradient accumulation, pass
    the *mini-batch* token count as `token_count` to every micro-batch call: each call then
    returns its share, and the shares (and their gradients) sum to the one-big-batch result.
  * "microbatch_token_mean" (released): token-mean inside each micro-batch of `micro_batch_size`
    rows (per device in the release), then the mean over all `num_micro_batches` micro-batches
    of the mini-batch (accumulation steps x devices). One call may hold several micro-batches
    (e.g. one per device, contiguous rows, as batch_sharding lays them out); it returns the sum
    of their means divided by `num_micro_batches`, so calls again sum to the mini-batch value.
Metrics are aggregated the same way, so they also sum over micro-batch calls.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_RATIO_CLAMP = 20.0   # |logp - old_logp| and |ref - logp| are clamped to this before exp
KL_CLAMP = 10.0          # |k3 KL| per token is clamped to this
LOSS_AGG_MODES = ("token_mean", "microbatch_token_mean")


def group_advantages(rewards, group_size: int, eps: float = 1e-6) -> jax.Array:
    """(r - group mean) / (unbiased group std + eps) for prompt-major rows b*G + g.

    A group whose rewards are all identical gets exactly 0 (not rounding noise / eps).
    group_size == 1 is an error: the unbiased std of one sample is undefined (EasyR1 asserts
    rollout.n > 1 for GRPO); use G >= 2.
    """
    rewards = jnp.asarray(rewards, dtype=jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [batch*group_size], got shape "
                         f"{rewards.shape}")
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size={group_size}; GRPO needs at least 2 "
                         f"responses per prompt (config.rollout.group_size >= 2)")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_advantages: {rewards.shape[0]} rewards are not a whole number of "
                         f"groups of {group_size}; rows must be prompt-major (b*G + g)")
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, ddof=1, keepdims=True)
    adv = (groups - mean) / (std + eps)
    constant = groups.max(axis=1, keepdims=True) == groups.min(axis=1, keepdims=True)
    return jnp.where(constant, 0.0, adv).reshape(-1)


def low_var_kl(logp, ref_logp) -> jax.Array:
    """Per-token k3 estimator of KL(policy || ref), clamped as EasyR1's `low_var_kl`."""
    log_ratio = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -KL_CLAMP, KL_CLAMP)


def _aggregator(mask, loss_agg, token_count, num_micro_batches, micro_batch_size):
    """A function mapping a per-token [B, T] array to its (share of the) mini-batch average."""
    if loss_agg == "token_mean":
        if num_micro_batches is not None or micro_batch_size is not None:
            raise ValueError("policy_loss: num_micro_batches/micro_batch_size belong to "
                             "loss_agg='microbatch_token_mean'; for 'token_mean' pass the "
                             "mini-batch token_count to each micro-batch call instead")
        count = mask.sum() if token_count is None else jnp.asarray(token_count, jnp.float32)
        denominator = jnp.maximum(count, 1.0)
        return lambda values: jnp.sum(jnp.where(mask > 0, values, 0.0)) / denominator

    if loss_agg != "microbatch_token_mean":
        raise ValueError(f"policy_loss: loss_agg={loss_agg!r}; choose one of {LOSS_AGG_MODES} "
                         f"(config.rl.loss_agg)")
    if token_count is not None:
        raise ValueError("policy_loss: token_count is for loss_agg='token_mean'; the released "
                         "'microbatch_token_mean' averages inside each micro-batch")
    rows = mask.shape[0]
    size = rows if micro_batch_size is None else micro_batch_size
    if size <= 0 or rows % size:
        raise ValueError(f"policy_loss: {rows} rows cannot be split into micro-batches of "
                         f"{size} rows (micro_batch_size)")
    chunks = rows // size
    total = chunks if num_micro_batches is None else num_micro_batches
    chunk_mask = mask.reshape(chunks, size, -1)
    chunk_count = jnp.maximum(chunk_mask.sum(axis=(1, 2)), 1.0)

    def aggregate(values):
        values = jnp.broadcast_to(values, mask.shape).reshape(chunks, size, -1)
        sums = jnp.sum(jnp.where(chunk_mask > 0, values, 0.0), axis=(1, 2))
        return jnp.sum(sums / chunk_count) / total
    return aggregate


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_low: float = 0.2,
                clip_high: float = 0.3, dual_clip: float = 3.0, kl_coef: float = 0.01,
                loss_agg: str = "token_mean", num_micro_batches: int | None = None,
                token_count=None, micro_batch_size: int | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped GRPO policy loss + kl_coef * k3 KL, aggregated over response tokens.

    Args:
      logp, old_logp, ref_logp: [B, T] per-token log-probs of the current, rollout and frozen
        reference policies (ref_logp may be None when kl_coef == 0). Computed in float32.
      advantages: [B] per response (broadcast to its tokens) or [B, T].
      mask: [B, T] response-token mask (bool or 0/1); masked tokens contribute nothing to the
        loss, metrics or gradients, even if their log-probs are not finite.
      loss_agg, token_count, num_micro_batches, micro_batch_size: see the module docstring.
    Returns:
      (loss, metrics): metrics pg_loss, kl, ppo_kl (mean old - logp), ratio_mean, clipfrac_upper
      (A > 0 and r > 1 + clip_high), clipfrac_lower (A < 0 and r < 1 - clip_low), clipfrac_dual
      (A < 0 and the dual clip bound is active; EasyR1's pg_clipfrac_lower), all aggregated like
      the loss.
    """
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jnp.asarray(old_logp, jnp.float32)
    mask = jnp.asarray(mask).astype(jnp.float32)
    if logp.ndim != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"policy_loss: logp {logp.shape}, old_logp {old_logp.shape} and mask "
                         f"{mask.shape} must all be the same [batch, length] shape")
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.shape == logp.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"policy_loss: advantages shape {advantages.shape} must be [batch] "
                         f"{logp.shape[:1]} or [batch, length] {logp.shape}")
    if ref_logp is None and kl_coef != 0:
        raise ValueError("policy_loss: ref_logp is None but kl_coef != 0; pass the reference "
                         "log-probs or set config.rl.kl_coef = 0")
    average = _aggregator(mask, loss_agg, token_count, num_micro_batches, micro_batch_size)
    # Zero padded positions first so non-finite padding can reach neither the value nor the grads.
    valid = mask > 0
    logp = jnp.where(valid, logp, 0.0)
    old_logp = jnp.where(valid, old_logp, 0.0)

    log_ratio = logp - old_logp
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped_ratio = jnp.exp(jnp.clip(log_ratio, math.log(1.0 - clip_low), math.log(1.0 + clip_high)))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * clipped_ratio
    loss_dual = -advantages * dual_clip
    loss_ppo = jnp.maximum(loss_unclipped, loss_clipped)
    negative = advantages < 0
    per_token_pg = jnp.where(negative, jnp.minimum(loss_ppo, loss_dual), loss_ppo)

    pg_loss = average(per_token_pg)
    if ref_logp is None:
        kl = jnp.zeros((), jnp.float32)
    else:
        ref_logp = jnp.where(valid, jnp.asarray(ref_logp, jnp.float32), 0.0)
        kl = average(low_var_kl(logp, ref_logp))
    loss = pg_loss + kl_coef * kl

    as_float = lambda condition: condition.astype(jnp.float32)
    metrics = {
        "pg_loss": pg_loss,
        "kl": kl,
        "ppo_kl": average(-log_ratio),
        "ratio_mean": average(ratio),
        "clipfrac_upper": average(as_float((advantages > 0) & (ratio > 1.0 + clip_high))),
        "clipfrac_lower": average(as_float(negative & (ratio < 1.0 - clip_low))),
        "clipfrac_dual": average(as_float(negative & (loss_ppo > loss_dual))),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
