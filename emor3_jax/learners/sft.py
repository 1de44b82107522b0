"""Supervised fine-tuning (the SFT baseline and EMO-R3's Cold-Start SFT) as a learner.

One step: the batch's target texts (sft.target: the SET template with the label, or with the
image's caption in step 1; sft.random_labels for the cold start) -> token-mean NLL of the
targets -> one optimizer step (AdamW at sft.lr; emor3_jax/sft.py has the pieces).
"""
from __future__ import annotations

import numpy as np

from emor3_jax import sft
from emor3_jax.learners.base import Context, Learner
from emor3_jax.rl import batching as batching_lib


class SFTLearner(Learner):
    phase = "sft"
    metric_prefix = "sft/"
    skipped_metric = "skipped"
    lr_field = "sft.lr"

    @classmethod
    def check_config(cls, config, *, data_parallel: int, process_count: int) -> None:
        if config.sft.target not in sft.TARGETS:
            raise ValueError(f"config.sft.target={config.sft.target!r}; choose one of "
                             f"{sft.TARGETS}")
        if config.sft.batch_size % (config.rl.micro_batch_size * data_parallel):
            raise ValueError(f"config.sft.batch_size={config.sft.batch_size} does not split "
                             f"into micro-batches of rl.micro_batch_size="
                             f"{config.rl.micro_batch_size} x {data_parallel} data-parallel "
                             "devices")

    @classmethod
    def make_optimizer(cls, config):
        return sft.make_sft_optimizer(config.sft, config.optim)

    def __init__(self, ctx: Context, *, start_params=None, saved: dict | None = None):
        super().__init__(ctx, start_params=start_params, saved=saved)
        c = self.config
        self.step_fn = sft.make_sft_step(self.model, self.make_optimizer(c), self.mesh,
                                         chunk=c.rl.logprob_chunk)
        self.micro_rows = batching_lib.micro_batch_rows(c.rl.micro_batch_size, self.mesh)

    def step(self, state, batch, step, batches):
        c, policy = self.config, self.ctx.policy
        labels = sft.batch_labels(batch, random_labels=c.sft.random_labels,
                                  rng=np.random.default_rng([c.seed, step]))
        ub = sft.pack_sft_batch(self.model.config, batch, policy.tokenizer, policy.ids,
                                labels=labels, target=c.sft.target, max_len=c.sft.max_len,
                                micro_batch_rows=self.micro_rows)
        state, m = self.step_fn(state, ub)
        return state, {k: float(v) for k, v in m.items()}

    def progress(self, metrics: dict) -> dict[str, float]:
        return {"sft_loss": metrics["loss"]}
