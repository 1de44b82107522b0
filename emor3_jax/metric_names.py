"""Every metric name a run writes, built here: the learners and the trainer name their numbers
with these, and the non-finite guard, the reports and the metric writer read them back, so a
name never drifts between the code that writes it and the code that reads it.

A row's keys are "<group>/<name>"; SFT rows carry the same names under "sft/", eval rows theirs
under "eval/" (`metrics.MetricWriter.resume` tells rows apart by these prefixes).
"""
from __future__ import annotations

from typing import Mapping

SFT_PREFIX = "sft/"
EVAL_PREFIX = "eval/"

# the update function's raw metrics (rl/update.py) that are loss terms: "loss/<term>"; the
# others are "update/<name>"; tokens and skipped updates are counted over a step, the rest
# averaged over its updates
LOSS_TERMS = ("loss", "pg_loss", "kl", "ppo_kl", "entropy")
COUNTED = ("tokens", "skipped")

SKIPPED = "update/skipped"          # updates skipped for a non-finite loss or gradient
LOSS = "loss/loss"
KL = "loss/kl"
TOKENS_PER_S = "update/tokens_per_s"

TIME_STEP = "time/step"
TIME_SAMPLE = "time/sample"
TIME_REWARD = "time/reward"
TIME_UPDATE = "time/update"
ROLLOUT_TOKENS_PER_S = "rollout/tokens_per_s"

REWARD_MEAN = "reward/mean"
ACCURACY = "reward/accuracy"
RESPONSE_LENGTH_MEAN = "response/length_mean"
DATA_SKIPPED = "data/skipped"
HOST_BYTES_SENT = "host/bytes_sent"
HOST_PIXEL_BYTES_KEPT = "host/pixel_bytes_kept"
EVAL_ACCURACY = "accuracy"          # the mean over the eval sets, under EVAL_PREFIX


def update(raw: Mapping[str, float], updates: int = 1) -> dict[str, float]:
    """Raw update metrics summed over `updates` calls -> row names: loss terms under "loss/",
    the rest under "update/"; tokens and skipped counted, the rest averaged."""
    return {(f"loss/{k}" if k in LOSS_TERMS else f"update/{k}"):
            float(v) if k in COUNTED else float(v) / updates for k, v in raw.items()}


def grouped(group: str, values: Mapping[str, float]) -> dict[str, float]:
    """{name: v} -> {"<group>/<name>": v} (reward components, judge answers, DAPO counts)."""
    return {f"{group}/{k}": float(v) for k, v in values.items()}


def evaluation(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per eval set results -> "<set>/<name>" and the mean accuracy (written under "eval/")."""
    out = {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()}
    out[EVAL_ACCURACY] = float(sum(r["accuracy"] for r in results.values()) / len(results))
    return out
