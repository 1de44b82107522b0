"""One learner per algorithm behind one small interface (base.py); the loop is trainer.py.

    sft.py    SFTLearner   supervised fine-tuning (SFT baseline, Cold-Start SFT)
    grpo.py   GRPOLearner  GRPO and EMO-R3 (the reward preset picks rule or reflective rewards)
    dapo.py   DAPOLearner  GRPO + dynamic sampling (rollout.dynamic_sampling)

A new algorithm: a learner file (subclass GRPOLearner and override what differs, as dapo.py
overrides `rollout`), a preset in configs/base.py `apply_method` that sets its config, and its
line in `learner_class`.
"""
from __future__ import annotations

from emor3_jax.learners.base import Context, Learner
from emor3_jax.learners.dapo import DAPOLearner
from emor3_jax.learners.grpo import GRPOLearner
from emor3_jax.learners.sft import SFTLearner

__all__ = ["Context", "Learner", "SFTLearner", "GRPOLearner", "DAPOLearner", "learner_class"]


def learner_class(config, phase: str) -> type[Learner]:
    """The learner of a run's `phase`: "sft" (sft.steps before RL, or mode sft) or "rl"."""
    if phase == "sft":
        return SFTLearner
    if phase != "rl":
        raise ValueError(f"unknown training phase {phase!r} (sft or rl)")
    if config.rollout.dynamic_sampling:
        return DAPOLearner
    return GRPOLearner
