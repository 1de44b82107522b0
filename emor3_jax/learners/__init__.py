"""One learner per algorithm behind one small interface (base.py); the loop is trainer.py.

    sft.py    SFTLearner   supervised fine-tuning (SFT baseline, Cold-Start SFT)
    grpo.py   GRPOLearner  GRPO and EMO-R3 (the reward preset picks rule or reflective rewards)
    dapo.py   DAPOLearner  GRPO + dynamic sampling

`config.rl.learner` names the RL phase's learner (a key of LEARNERS). A new algorithm: a learner
file (subclass GRPOLearner and override what differs, as dapo.py overrides `rollout`), its line
in LEARNERS, and a preset in configs/base.py `apply_method` that sets `rl.learner` and its
config.
"""
from __future__ import annotations

from emor3_jax.learners.base import Context, Learner
from emor3_jax.learners.dapo import DAPOLearner
from emor3_jax.learners.grpo import GRPOLearner
from emor3_jax.learners.sft import SFTLearner

__all__ = ["Context", "Learner", "SFTLearner", "GRPOLearner", "DAPOLearner", "LEARNERS",
           "learner_class"]

LEARNERS: dict[str, type[Learner]] = {"grpo": GRPOLearner, "dapo": DAPOLearner}


def learner_class(config, phase: str) -> type[Learner]:
    """The learner of a run's `phase`: "sft" (sft.steps before RL, or mode sft) or "rl"
    (`config.rl.learner`)."""
    if phase == "sft":
        return SFTLearner
    if phase != "rl":
        raise ValueError(f"unknown training phase {phase!r} (sft or rl)")
    name = config.rl.learner
    if name not in LEARNERS:
        raise ValueError(f"config.rl.learner={name!r} is not a learner; choose one of "
                         f"{sorted(LEARNERS)} (emor3_jax/learners/)")
    return LEARNERS[name]
