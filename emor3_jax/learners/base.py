"""The interface between the training loop (emor3_jax/trainer.py) and an algorithm.

The loop owns everything around a step: the data iterator, the RNG base key, checkpoints,
evaluation, metrics, preemption, profiling and the export. A learner owns one step of one
algorithm: what it does with a batch of prompts (sample, score, update; or a supervised step)
and the compiled programs it needs for that. The loop calls, per phase:

    cls = the phase's learner class
    cls.check_config(config, ...)                    # before anything is built (classmethod)
    state = init_train_state(..., cls.make_optimizer(config))  # or restored onto its shapes,
    tree = {..., **cls.saved_like(config, params)}  # with what else the phase's checkpoints hold
    learner = cls(context, start_params=..., saved=...)
    for step in ...:
        state, metrics = learner.step(state, next(batches), step, batches)
        checkpoint {"train": state, **learner.saved()}

`state` is the `update.TrainState` (params, optimizer state, step) and is always passed in and
returned; a learner's own fields are set in `__init__` and fixed for the phase (compiled
programs, the frozen KL reference, the judge).

A new algorithm is a subclass (see dapo.py: DAPO is GRPO with another way to fill the batch)
and a preset in configs/base.py `apply_method` that selects it (learners/__init__.py).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Iterator

import jax
import optax

from emor3_jax import policy as policy_lib
from emor3_jax.rl import train_state as train_state_lib


@dataclasses.dataclass(frozen=True)
class Context:
    """What every learner is built from; the loop builds it once per run."""
    config: Any                      # the run's ml_collections config (configs/base.py fields)
    mesh: jax.sharding.Mesh
    policy: policy_lib.Policy        # model, loaded params, tokenizer, token ids
    sampler: Any                     # emor3_jax.sampling.Sampler of the policy
    base_key: jax.Array              # the run's RNG key (config.seed); learners fold their own
    sample_mesh: jax.sharding.Mesh   # the sampler's and judge's (config.rollout.mesh)

    def sampling_params(self, params):
        """What the sampler and a policy judge read (policy.sampling_params)."""
        return policy_lib.sampling_params(self.model, params, self.sample_mesh)

    @property
    def model(self):
        return self.policy.model


class Learner(abc.ABC):
    """One algorithm's training step."""

    # Checkpoint phase ("sft" steps are indexed before "rl" ones) and metric layout: SFT rows
    # are "sft/"-prefixed at the 0-based step, RL rows at the step they complete
    # (metrics.MetricWriter.resume relies on both). A step's metrics are named by
    # emor3_jax.metric_names (skipped updates: metric_names.SKIPPED in every learner).
    phase: ClassVar[str] = "rl"
    metric_prefix: ClassVar[str] = ""
    # the config field to lower when updates are skipped for non-finite values
    lr_field: ClassVar[str] = "optim.lr"

    def __init__(self, ctx: Context, *, start_params=None, saved: dict | None = None):
        """`start_params`: the params this phase starts from (used by learners that keep a
        frozen copy, e.g. the KL reference); `saved`: what `saved()` returned, restored from a
        checkpoint of this phase (None: a fresh phase or a checkpoint that holds nothing)."""
        del start_params, saved
        self.ctx = ctx
        self.config = ctx.config
        self.model = ctx.model
        self.mesh = ctx.mesh

    # ------------------------------------------------------------ class-level (no build) --
    @classmethod
    def check_config(cls, config, *, data_parallel: int, process_count: int) -> None:
        """Raise a ValueError naming the field to change (before anything is built)."""

    @classmethod
    def make_optimizer(cls, config) -> optax.GradientTransformation:
        return train_state_lib.make_optimizer(config.optim)

    @classmethod
    def saved_like(cls, config, params) -> dict:
        """Abstract (shape-only is enough) pytrees that this phase's checkpoints hold beside the
        train state and the RNG key, keyed by their checkpoint name; `params`: like the
        policy's."""
        return {}

    # --------------------------------------------------------------------------- the step --
    def saved(self) -> dict:
        """The pytrees `saved_like` describes, for a checkpoint."""
        return {}

    @abc.abstractmethod
    def step(self, state: train_state_lib.TrainState, batch: dict, step: int,
             batches: Iterator[dict]) -> tuple[train_state_lib.TrainState, dict]:
        """One training step on `batch` (the next global batch of the phase's data);
        `batches` is the iterator it came from (a learner may draw more); returns the new state
        and host-side float metrics."""

    def progress(self, metrics: dict) -> dict[str, float]:
        """The few numbers the progress bar shows."""
        return {}
