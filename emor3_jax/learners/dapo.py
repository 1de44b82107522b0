"""DAPO (EasyR1's online filtering, "dynamic sampling"): GRPO whose batch is filled by resampling.

Groups whose mean reward is not strictly inside (rollout.filter_low, rollout.filter_high) carry
no learning signal (all right or all wrong) and are dropped; mini rollout batches of
`rollout.mini_batch_size` prompts (the data iterator's batches) are drawn until
`rollout.batch_size` prompts are kept, each draw one try of at most
`rollout.max_resample_tries`. Everything else (rewards, advantages, update, clip-high, no KL) is
GRPO with the `:dapo` preset's config (configs/base.py `apply_method`).

This file is the whole algorithm: it overrides only how the step's scored rollout is obtained
(`rollout`) and what the config must satisfy for it.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from emor3_jax import metric_names as names
from emor3_jax.data import pipeline as data_lib
from emor3_jax.learners.grpo import GRPOLearner
from emor3_jax.rl import rollout as rollout_lib


class DAPOLearner(GRPOLearner):

    @classmethod
    def check_config(cls, config, *, data_parallel: int, process_count: int) -> None:
        super().check_config(config, data_parallel=data_parallel, process_count=process_count)
        r = config.rollout
        if not r.filter_low < r.filter_high:
            raise ValueError(f"config.rollout.filter_low={r.filter_low} / filter_high="
                             f"{r.filter_high}: the DAPO filter keeps group means strictly "
                             "between them; give filter_low < filter_high")
        mini = data_lib.generation_batch_size(config)
        if mini % process_count or mini < 1:
            raise ValueError(f"config.rollout.mini_batch_size={mini} (prompts per DAPO "
                             f"generation try) must be a positive multiple of the "
                             f"{process_count} hosts")

    def rollout(self, state, batch, key, batches):
        r, g = self.config.rollout, self.config.rollout.group_size
        kept: list[rollout_lib.Rollout] = []
        need = int(r.batch_size)
        have, tries, dropped, t0 = 0, 0, 0, time.time()
        params = self.ctx.sampling_params(state.params)   # freed on return, before the update
        while have < need:
            tries += 1
            if tries > r.max_resample_tries:
                raise RuntimeError(
                    f"DAPO dynamic sampling failed: after {r.max_resample_tries} tries only "
                    f"{have} of {need} prompts had a mean reward strictly inside "
                    f"({r.filter_low}, {r.filter_high}) (the rest were all right or all wrong). "
                    "This is the failure EMO-R3 reports for DAPO; raise "
                    "rollout.max_resample_tries, widen the filter band or use another method.")
            k = jax.random.fold_in(key, tries)
            ro = self.sample(params, batch, k)
            ro = self.score(ro, params, jax.random.fold_in(k, 1))
            valid = batch.row_valid
            band = rollout_lib.groups_in_band(ro.rewards, g, r.filter_low, r.filter_high)
            dropped += int((valid & ~band).sum())
            keep = np.nonzero(band & valid)[0][:need - have]
            if len(keep):
                kept.append(ro.take(keep))
                have += len(keep)
            if have < need:
                batch = next(batches)
        ro = rollout_lib.concat_rollouts(kept)
        out = rollout_lib.metrics(ro)
        out.update(names.grouped("dapo", {"tries": tries, "dropped_groups": dropped}))
        out[names.TIME_SAMPLE] = time.time() - t0
        return ro, out
