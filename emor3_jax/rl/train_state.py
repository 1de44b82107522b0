"""The train state and its optimizer: AdamW (moments in fp32 for bf16 parameters), the
learning-rate schedules, and the state laid out on a mesh (FSDP / tensor axes of the model)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from emor3_jax import sharding
from emor3_jax.models import qwen2_5_vl


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # optimizer steps applied (skipped steps do not count)
    params: Any
    opt_state: Any


# ------------------------------------------------------------------------------------------
# Optimizer and train state.

def _float_cast(tree, dtype):
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x
    return jax.tree.map(cast, tree)


def with_state_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """Run `inner` in `dtype` (e.g. fp32 Adam moments and updates for bf16 parameters)."""
    if dtype is None:
        return inner

    def init(params):
        return inner.init(_float_cast(params, dtype))

    def update(updates, state, params=None):
        return inner.update(_float_cast(updates, dtype), state,
                            None if params is None else _float_cast(params, dtype))
    return optax.GradientTransformation(init, update)


SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim_config):
    """lr by optimizer step: with warmup_steps > 0, lr * min(1, (step + 1) / warmup_steps); then
    constant, or (schedule "cosine") a cosine decay over `decay_steps` steps after the warm-up
    to lr * min_lr_ratio, which stays from there on (EasyR1's `cosine` scheduler)."""
    lr, warmup = float(optim_config.lr), int(getattr(optim_config, "warmup_steps", 0) or 0)
    schedule = getattr(optim_config, "schedule", "constant")
    if schedule not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={schedule!r}; choose one of {SCHEDULES}")
    if schedule == "constant" and warmup <= 0:
        return optax.constant_schedule(lr)
    decay = int(getattr(optim_config, "decay_steps", 0) or 0)
    if schedule == "cosine" and decay <= 0:
        raise ValueError(f"config.optim.decay_steps={decay}: the cosine schedule needs the "
                         "number of optimizer steps to decay over (RL steps x updates per "
                         "rollout x ppo_epochs)")
    floor = float(getattr(optim_config, "min_lr_ratio", 0.0) or 0.0)
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"config.optim.min_lr_ratio={floor}: the final lr / lr must be in "
                         "[0, 1]")

    def fn(count):
        count = jnp.asarray(count, jnp.float32)
        scale = jnp.minimum(1.0, (count + 1.0) / warmup) if warmup > 0 else 1.0
        if schedule == "cosine":
            t = jnp.clip((count - warmup) / decay, 0.0, 1.0)
            scale = scale * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)))
        return lr * scale
    return fn


def make_optimizer(optim_config, moment_dtype=jnp.float32) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW (EasyR1 / torch AdamW semantics: decoupled
    weight decay on every parameter, eps 1e-8), moments and updates in `moment_dtype`.

    `optim_config`: configs/base.py `optim` (lr, b1, b2, weight_decay, grad_clip, warmup_steps).
    With bf16 parameters, an update smaller than half a bf16 ulp of the weight rounds away;
    for long runs prefer model param_dtype float32 with dtype bfloat16 (mixed precision).
    """
    chain = []
    if optim_config.grad_clip and optim_config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
    chain.append(optax.adamw(learning_rate_schedule(optim_config), b1=float(optim_config.b1),
                             b2=float(optim_config.b2), eps=1e-8,
                             weight_decay=float(optim_config.weight_decay)))
    return with_state_dtype(optax.chain(*chain), moment_dtype)


def train_state_shardings(model, optimizer, mesh) -> TrainState:
    """NamedShardings of the TrainState: moments like their parameters, scalars replicated."""
    params_sh = qwen2_5_vl.param_shardings(model, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            nn.unbox(qwen2_5_vl.abstract_params(model)))
    opt_abstract = jax.eval_shape(optimizer.init, abstract)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, params_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=params_sh, opt_state=opt_sh)


def init_train_state(model, params, optimizer, mesh=None) -> TrainState:
    """TrainState at step 0 (optimizer state placed like the parameters when mesh is given)."""
    if mesh is None:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=jax.jit(optimizer.init)(params))
    sh = train_state_shardings(model, optimizer, mesh)
    params = jax.device_put(params, sh.params)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), sh.step), params=params,
                      opt_state=opt_state)
