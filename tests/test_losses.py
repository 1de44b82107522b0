"""GRPO advantages and policy loss vs plain-Python references; split-invariance of the token mean."""
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from emor3_jax.rl import losses
from emor3_jax.sharding import make_mesh


# ---------------------------------------------------------------------------- references
def reference_advantages(rewards, group_size, eps=1e-6):
    """(r - mean) / (Bessel std + eps) per prompt-major group, with exact rational statistics."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        mean, std = statistics.mean(group), statistics.stdev(group)
        out.extend((r - mean) / (std + eps) for r in group)
    return np.array(out)


def reference_token_terms(logp, old, ref, adv, clip_low=0.2, clip_high=0.3, dual=3.0):
    """Per-token (pg, kl) of docs/method.md "RL update", one token at a time."""
    log_ratio = logp - old
    ratio = math.exp(min(max(log_ratio, -20.0), 20.0))
    clipped = math.exp(min(max(log_ratio, math.log(1 - clip_low)), math.log(1 + clip_high)))
    pg = max(-adv * ratio, -adv * clipped)
    if adv < 0:
        pg = min(pg, -dual * adv)
    d = min(max(ref - logp, -20.0), 20.0)
    kl = min(max(math.exp(d) - d - 1.0, -10.0), 10.0)
    return pg, kl


def reference_loss(logp, old, ref, adv, mask, kl_coef=0.01, micro_rows=None):
    """Token mean over the whole batch, or (micro_rows) the mean of per-micro-batch token means."""
    rows = logp.shape[0]
    micro_rows = micro_rows or rows
    micro_losses = []
    for start in range(0, rows, micro_rows):
        pg_sum = kl_sum = count = 0.0
        for i in range(start, start + micro_rows):
            for t in range(logp.shape[1]):
                if mask[i, t]:
                    pg, kl = reference_token_terms(logp[i, t], old[i, t], ref[i, t], adv[i])
                    pg_sum, kl_sum, count = pg_sum + pg, kl_sum + kl, count + 1
        count = max(count, 1)
        micro_losses.append(pg_sum / count + kl_coef * kl_sum / count)
    return float(np.mean(micro_losses))


def make_batch(rows=16, length=12, seed=0):
    rng = np.random.default_rng(seed)
    old = -rng.gamma(2.0, 1.0, size=(rows, length))
    # log-ratios spanning the clip windows, the dual clip and the +-20 clamp
    log_ratio = rng.normal(0.0, 0.4, size=(rows, length))
    log_ratio[0, :4] = [25.0, -25.0, math.log(1.3) + 1e-3, math.log(0.8) - 1e-3]
    logp = old + log_ratio
    ref = logp + rng.normal(0.0, 0.5, size=(rows, length))
    ref[1, :2] = logp[1, :2] + np.array([30.0, -30.0])     # k3 clamps
    log_ratio_pos = np.array([25.0, -25.0, 1.0])
    adv = rng.normal(0.0, 1.0, size=rows)
    adv[0], adv[4], adv[2] = -0.7, 0.9, 0.0                # row 0 hits the dual clip, row 4 the upper
    logp[4, :3] = old[4, :3] + log_ratio_pos
    lengths = rng.integers(1, length + 1, size=rows)
    lengths[0] = lengths[4] = length
    lengths[3] = 0                                         # an all-padding row
    mask = np.arange(length)[None, :] < lengths[:, None]
    return logp, old, ref, adv, mask


# ---------------------------------------------------------------------------- advantages
def test_group_advantages_match_reference():
    rng = np.random.default_rng(1)
    rewards = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0, 1.1], size=4 * 8)
    rewards[8:16] = 0.1                                    # identical group
    rewards[16:24] = 1.1                                   # another one (float sums not exact)
    got = np.asarray(losses.group_advantages(rewards, 8))
    np.testing.assert_allclose(got, reference_advantages(rewards, 8), rtol=1e-5, atol=1e-5)
    assert np.all(got[8:24] == 0.0)                        # identical rewards -> exactly 0


def test_group_advantages_hand_values():
    # group [0, 1]: mean 0.5, Bessel std sqrt(0.5) -> +-0.5/(0.70710678 + 1e-6)
    got = np.asarray(losses.group_advantages(np.array([0.0, 1.0, 1.0, 1.0]), 2))
    expected = 0.5 / (math.sqrt(0.5) + 1e-6)
    np.testing.assert_allclose(got, [-expected, expected, 0.0, 0.0], rtol=1e-6)
    # eps is used as given
    got = np.asarray(losses.group_advantages(np.array([0.0, 1.0]), 2, eps=1.0))
    np.testing.assert_allclose(got, [-0.5 / (math.sqrt(0.5) + 1), 0.5 / (math.sqrt(0.5) + 1)],
                               rtol=1e-6)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="at least 2"):
        losses.group_advantages(np.zeros(4), 1)
    with pytest.raises(ValueError, match="prompt-major"):
        losses.group_advantages(np.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        losses.group_advantages(np.zeros((2, 4)), 4)


# ---------------------------------------------------------------------------- loss values
@pytest.mark.parametrize("log_ratio, adv, expected_pg", [
    (math.log(2.0), 1.0, -1.3),      # A>0, r=2: max(-2, -1.3) -> upper clip
    (math.log(0.5), 1.0, -0.5),      # A>0, r=0.5: max(-0.5, -0.8) -> unclipped
    (math.log(0.5), -1.0, 0.8),      # A<0, r=0.5: max(0.5, 0.8) -> lower clip
    (math.log(2.0), -1.0, 2.0),      # A<0, r=2: max(2, 1.3)=2 < 3 -> unclipped
    (math.log(5.0), -1.0, 3.0),      # A<0, r=5: max(5, 1.3)=5 -> dual clip min(5, 3)
    (30.0, 1.0, -1.3),               # huge ratio, A>0 -> clipped at 1.3
    (30.0, -0.5, 1.5),               # clamp to +-20 then dual clip 3*0.5
    (0.0, 0.0, 0.0),                 # A = 0
])
def test_policy_loss_hand_values(log_ratio, adv, expected_pg):
    logp = jnp.array([[-1.0]])
    loss, metrics = losses.policy_loss(logp, logp - log_ratio, logp, jnp.array([adv]),
                                       jnp.ones((1, 1)))
    np.testing.assert_allclose(metrics["pg_loss"], expected_pg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-7)     # ref == logp -> k3 = 0
    np.testing.assert_allclose(loss, expected_pg, rtol=1e-5, atol=1e-6)


def test_low_var_kl_hand_values():
    logp = jnp.zeros(4)
    ref = jnp.array([0.0, math.log(2.0), 30.0, -30.0])
    # k3 = e^d - d - 1: 0; 2 - ln2 - 1; clamp(e^20 - 21) = 10; d=-20 -> e^-20 + 19 -> 10
    np.testing.assert_allclose(losses.low_var_kl(logp, ref),
                               [0.0, 1.0 - math.log(2.0), 10.0, 10.0], rtol=1e-6)


def test_policy_loss_matches_reference():
    logp, old, ref, adv, mask = make_batch()
    loss, metrics = losses.policy_loss(logp, old, ref, adv, mask)
    np.testing.assert_allclose(loss, reference_loss(logp, old, ref, adv, mask), rtol=1e-5)
    # released averaging: token mean per micro-batch of 4 rows, then the mean of those
    released, _ = losses.policy_loss(logp, old, ref, adv, mask, loss_agg="microbatch_token_mean",
                                     micro_batch_size=4)
    np.testing.assert_allclose(released, reference_loss(logp, old, ref, adv, mask, micro_rows=4),
                               rtol=1e-5)
    assert abs(float(released) - float(loss)) > 1e-3       # the two averages really differ here
    # hand-made metrics: fractions of masked tokens
    ratio = np.exp(np.clip(logp - old, -20, 20))
    a = np.broadcast_to(adv[:, None], mask.shape)
    n = mask.sum()
    np.testing.assert_allclose(metrics["ratio_mean"], ratio[mask].sum() / n, rtol=1e-5)
    np.testing.assert_allclose(metrics["clipfrac_upper"], ((a > 0) & (ratio > 1.3))[mask].sum() / n,
                               rtol=1e-6)
    np.testing.assert_allclose(metrics["clipfrac_lower"], ((a < 0) & (ratio < 0.8))[mask].sum() / n,
                               rtol=1e-6)
    dual = (a < 0) & (np.maximum(ratio, np.clip(ratio, 0.8, 1.3)) > 3.0)
    np.testing.assert_allclose(metrics["clipfrac_dual"], dual[mask].sum() / n, rtol=1e-6)
    assert metrics["clipfrac_dual"] > 0 and metrics["clipfrac_upper"] > 0
    np.testing.assert_allclose(metrics["ppo_kl"], (old - logp)[mask].sum() / n, rtol=1e-5)


def test_policy_loss_inputs():
    logp, old, ref, adv, mask = make_batch(rows=6, length=5)
    base, _ = losses.policy_loss(logp, old, ref, adv, mask)
    # per-token advantages give the same loss as per-response ones
    per_token, _ = losses.policy_loss(logp, old, ref, np.repeat(adv[:, None], 5, 1), mask)
    np.testing.assert_allclose(per_token, base, rtol=1e-6)
    # masked positions contribute nothing, even non-finite ones
    bad_old = np.where(mask, old, -np.inf)
    bad_ref = np.where(mask, ref, np.nan)
    masked, _ = losses.policy_loss(logp, bad_old, bad_ref, adv, mask)
    np.testing.assert_allclose(masked, base, rtol=1e-6)
    bad_logp = np.where(mask, logp, np.nan)
    grad_of = lambda lp, o, r: jax.grad(lambda x: losses.policy_loss(x, o, r, adv, mask)[0])(
        jnp.asarray(lp, jnp.float32))
    grads = grad_of(bad_logp, bad_old, bad_ref)
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[~mask] == 0)
    np.testing.assert_allclose(grads, grad_of(logp, old, ref), rtol=1e-6, atol=1e-9)
    # kl_coef = 0 allows no reference model
    no_ref, m = losses.policy_loss(logp, old, None, adv, mask, kl_coef=0.0)
    np.testing.assert_allclose(no_ref, m["pg_loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="ref_logp is None"):
        losses.policy_loss(logp, old, None, adv, mask)
    with pytest.raises(ValueError, match="loss_agg"):
        losses.policy_loss(logp, old, ref, adv, mask, loss_agg="seq_mean")
    with pytest.raises(ValueError, match="token_count"):
        losses.policy_loss(logp, old, ref, adv, mask, num_micro_batches=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        losses.policy_loss(logp, old, ref, adv, mask, loss_agg="microbatch_token_mean",
                           micro_batch_size=4)
    with pytest.raises(ValueError, match="advantages shape"):
        losses.policy_loss(logp, old, ref, adv[:2], mask)


# ---------------------------------------------------------------------------- split invariance
VOCAB, DIM = 11, 6


def make_model_batch(rows=16, length=10, seed=3):
    """A tiny 'policy': logits = feats @ w + b; logp of the sampled tokens is a function of params."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(0, 0.5, (DIM, VOCAB)), jnp.float32),
              "b": jnp.asarray(rng.normal(0, 0.1, (VOCAB,)), jnp.float32)}
    feats = jnp.asarray(rng.normal(0, 1, (rows, length, DIM)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (rows, length)), jnp.int32)
    logp = np.asarray(token_logp(params, feats, tokens))
    old = logp + rng.normal(0, 0.3, logp.shape)
    ref = logp + rng.normal(0, 0.3, logp.shape)
    adv = rng.normal(0, 1, rows)
    lengths = rng.integers(1, length + 1, rows)
    mask = np.arange(length)[None, :] < lengths[:, None]
    batch = {"feats": feats, "tokens": tokens, "old": jnp.asarray(old, jnp.float32),
             "ref": jnp.asarray(ref, jnp.float32), "adv": jnp.asarray(adv, jnp.float32),
             "mask": jnp.asarray(mask)}
    return params, batch


def token_logp(params, feats, tokens):
    logits = feats @ params["w"] + params["b"]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]


def loss_of_params(params, batch, **kwargs):
    logp = token_logp(params, batch["feats"], batch["tokens"])
    return losses.policy_loss(logp, batch["old"], batch["ref"], batch["adv"], batch["mask"],
                              **kwargs)


value_and_grad = jax.jit(jax.value_and_grad(loss_of_params, has_aux=True),
                         static_argnames=("loss_agg", "num_micro_batches", "micro_batch_size"))


def accumulate(params, batch, splits, **kwargs):
    """Gradient accumulation: sum of per-micro-batch losses, metrics and grads."""
    rows = batch["mask"].shape[0] // splits
    total_loss, total_metrics, total_grads = 0.0, None, None
    for k in range(splits):
        micro = jax.tree.map(lambda x: x[k * rows:(k + 1) * rows], batch)
        (loss, metrics), grads = value_and_grad(params, micro, **kwargs)
        total_loss += loss
        total_metrics = metrics if total_metrics is None else jax.tree.map(jnp.add, total_metrics, metrics)
        total_grads = grads if total_grads is None else jax.tree.map(jnp.add, total_grads, grads)
    return total_loss, total_metrics, total_grads


def assert_same(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_token_mean_is_independent_of_micro_batches():
    params, batch = make_model_batch()
    (loss1, metrics1), grads1 = value_and_grad(params, batch)
    token_count = batch["mask"].sum()
    loss4, metrics4, grads4 = accumulate(params, batch, 4, token_count=token_count)
    assert_same((loss1, grads1, metrics1), (loss4, grads4, metrics4))
    assert float(jnp.abs(grads1["w"]).max()) > 1e-3                  # gradients are not trivially 0
    # without the global token count each micro-batch is its own mean: a different value
    loss_local, _, _ = accumulate(params, batch, 4)
    assert abs(float(loss_local) / 4 - float(loss1)) > 1e-4


def test_released_microbatch_mean_accumulates_exactly():
    params, batch = make_model_batch()
    (loss1, metrics1), grads1 = value_and_grad(params, batch, loss_agg="microbatch_token_mean",
                                               micro_batch_size=4)
    loss4, metrics4, grads4 = accumulate(params, batch, 4, loss_agg="microbatch_token_mean",
                                         num_micro_batches=4)
    assert_same((loss1, grads1, metrics1), (loss4, grads4, metrics4))
    logp = np.asarray(token_logp(params, batch["feats"], batch["tokens"]), np.float64)
    np.testing.assert_allclose(loss1, reference_loss(logp, np.asarray(batch["old"]),
                                                     np.asarray(batch["ref"]),
                                                     np.asarray(batch["adv"]),
                                                     np.asarray(batch["mask"]), micro_rows=4),
                               rtol=1e-5)


@pytest.mark.parametrize("loss_agg, kwargs", [
    ("token_mean", {}),
    ("microbatch_token_mean", {"micro_batch_size": 2}),      # one released micro-batch per device
])
def test_eight_devices_match_one(devices8, loss_agg, kwargs):
    params, batch = make_model_batch()
    one = jax.devices()[0]
    single = value_and_grad(jax.device_put(params, one), jax.device_put(batch, one),
                            loss_agg=loss_agg, **kwargs)
    mesh = make_mesh()                                       # data=1, fsdp=8
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    sharded_batch = jax.device_put(batch, rows)
    assert len(sharded_batch["feats"].sharding.device_set) == 8
    assert sharded_batch["feats"].addressable_shards[0].data.shape[0] == 2
    sharded = value_and_grad(jax.device_put(params, NamedSharding(mesh, P())), sharded_batch,
                             loss_agg=loss_agg, **kwargs)
    assert_same(single, sharded)
    if loss_agg == "microbatch_token_mean":
        # = mean over the 8 devices of each device's own token mean (the released FSDP average)
        logp = np.asarray(token_logp(params, batch["feats"], batch["tokens"]), np.float64)
        np.testing.assert_allclose(
            sharded[0][0], reference_loss(logp, np.asarray(batch["old"]), np.asarray(batch["ref"]),
                                          np.asarray(batch["adv"]), np.asarray(batch["mask"]),
                                          micro_rows=2), rtol=1e-5)
