"""GRPO on the CPU demo raises reward and held-out accuracy from the reward alone, on any host.

`python -m emor3_jax.main` with configs/demo_cpu.py (tiny model, emo_synth, Cold-Start SFT that
teaches the SET format with step 1 describing the image and a *random* label, then GRPO), in a
faster-learning variant that fits CI: the reward is SET-only (0.9 acc + 0.1 format: no judge
calls, and the accuracy signal is not diluted by the judge terms), 50 GRPO steps with the
learning-rate decay the measurements below were taken with (200 updates). Everything else is
the demo's: the question-only prompt, model, SFT, optimizer, KL, G = 8, rollout 32 prompts,
greedy held-out evaluation on 128 images. The shipped demo itself (EMO-R3 judge, 100 steps) is
measured across seeds by bench/demo_seeds.py; it does not fit a CI budget on every host.

After the random-label SFT the policy writes the format but answers at chance (0.125); what GRPO
learns it learns from the reward. Learning starts after a flat phase whose length varies with
the seed and the host's floating-point trajectory (a run on one host is not a property), so the
bounds below come from 5 seeds, each on this variant with these 50 steps, and sit well inside
the weakest seed (the table above REWARD_GAIN). One process on 1 CPU device, as on a laptop.

Marked slow (not in the README's test command): 4-5 minutes on an idle 2-core host and 8-10
beside the other pytest worker, a third of the suite's CPU time, which put `.ci/run` over the
project's 15-minute budget. Run it with `python -m pytest -m slow tests/test_demo_learns.py`
when a change can touch what the demo learns (rewards, advantages, the update, sampling, the
demo config or data).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import conftest

REPO = Path(__file__).resolve().parents[1]
RL_STEPS, WINDOW = 50, 10
SEED = int(os.environ.get("EMOR3_TEST_SEED", "0"))   # any seed of the 5 measured passes
VARIANT = {
    "data.prompt_format": "plain", "data.max_prompt_len": 80, "data.prompt_buckets": "(80,)",
    "reward.preset": "set_only", "optim.decay_steps": 200,
    "train.max_steps": RL_STEPS, "train.eval_every": RL_STEPS,
    "train.checkpoint_every": RL_STEPS, "seed": SEED,
}
# Measured on a 2-core AMD EPYC (AVX2) host, seeds 0-4, this variant, 50 GRPO steps (means over
# steps 1-10 -> 41-50; held-out greedy accuracy on 128 images at GRPO step 0 -> 50):
#   seed  reward          train accuracy   held-out accuracy   format (41-50)
#   0     0.21 -> 0.46    0.12 -> 0.40     0.13 -> 0.51 at step 40, 0.58 at 60     0.97
#   1     0.21 -> 0.62    0.12 -> 0.58     0.12 -> 0.66                            0.99
#   2     0.21 -> 0.59    0.13 -> 0.55     0.13 -> 0.68                            0.97
#   3     0.21 -> 0.69    0.13 -> 0.66     0.13 -> 0.74                            0.98
#   4     0.22 -> 0.59    0.14 -> 0.55     0.13 -> 0.66                            0.97
# Runs of one seed also differ between runs on one host (two xdist workers, thread timing):
# a CI run of seed 0 gave 0.21 -> 0.32 reward, 0.12 -> 0.25 train accuracy, 0.13 -> 0.55
# held-out. The training windows average a curve that rises late, so they vary most; the
# held-out accuracy at step 50 varied least (+0.38 to +0.61). A policy that learnt nothing
# moves these by sampling noise only: the 10-step window means of 2,560 samples have a
# standard error of ~0.01, the held-out accuracy on 128 images of 0.03. The bounds are about
# half of the weakest run's gains and 5 standard errors above no learning. The reward is
# 0.9 acc + 0.1 format, so its bound is about 0.9x the accuracy's.
REWARD_GAIN, ACC_GAIN, EVAL_GAIN = 0.05, 0.06, 0.2


@pytest.mark.slow
def test_demo_reward_and_accuracy_rise(tmp_path):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()       # runtime-bound: full optimization
             if "device_count" not in f and f not in conftest.FAST_COMPILE_FLAGS]
    env.update(XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=1"]),
               JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    workdir = tmp_path / "demo"
    args = [sys.executable, "-m", "emor3_jax.main", f"--config={REPO / 'configs/demo_cpu.py'}",
            f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    args += [f"--config.{k}={v}" for k, v in VARIANT.items()]
    run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/emo_synth/accuracy" in r]
    assert len(rl) == RL_STEPS and [r["step"] for r in evals] == [0, RL_STEPS]

    def window(key, rows_):
        return float(np.mean([r[key] for r in rows_]))

    first, last = rl[:WINDOW], rl[-WINDOW:]
    start, end = evals[0], evals[-1]
    summary = {k: (window(k, first), window(k, last)) for k in
               ("reward/mean", "reward/accuracy", "reward/format")}
    summary["eval"] = (start["eval/emo_synth/accuracy"], end["eval/emo_synth/accuracy"])
    # Random-label SFT: the format is learnt, the emotion is not (chance is 0.125; 128 images
    # give a standard error of 0.03 around it).
    assert start["eval/emo_synth/format"] >= 0.95, summary
    assert start["eval/emo_synth/accuracy"] <= 0.22, summary
    # GRPO raises the reward and the accuracy, in training and on held-out images ...
    assert summary["reward/mean"][1] >= summary["reward/mean"][0] + REWARD_GAIN, summary
    assert summary["reward/accuracy"][1] >= summary["reward/accuracy"][0] + ACC_GAIN, summary
    assert summary["eval"][1] >= summary["eval"][0] + EVAL_GAIN, summary
    # ... while keeping the format.
    assert end["eval/emo_synth/format"] >= 0.9, summary
    report = json.loads((workdir / "report" / "results.json").read_text())
    assert report["accuracy"]["emo_synth"] == end["eval/emo_synth/accuracy"]
    assert (workdir / "report" / "curves.png").stat().st_size > 0
