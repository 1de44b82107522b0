"""Supervised fine-tuning: the SFT baseline and the Cold-Start SFT before RL, as a learner.

Targets are built from the label (no reasoning traces): `boxed` is `\\boxed{label}` (the SFT
baseline / Cold-Start-Emo), `set_template` wraps it in the three SET steps with fixed,
image-independent sentences so a model learns the format without learning anything about the
image, and `set_caption` puts the example's `caption` feature (what the image shows, never the
emotion) in step 1, so a model also learns to describe the image. With `random_labels` the
label itself is drawn uniformly, so accuracy stays at chance: the CPU demo uses this (with
`set_caption`) to show that the mapping from what the image shows to the emotion, which GRPO
later learns, comes from the reward.

One step: the batch's target texts -> token-mean negative log-likelihood of the target tokens
(end-of-turn included) -> one optimizer step (AdamW at sft.lr).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emor3_jax import metric_names as names, recipe
from emor3_jax.learners.base import Context, Learner
from emor3_jax.rl import batching as batching_lib
from emor3_jax.rl import train_state as train_state_lib
from emor3_jax.rl import update as update_lib
from emor3_jax.rl.logprobs import response_logprobs

TARGETS = ("boxed", "set_template", "set_caption")
_FIXED_STEP1 = "The scene shows colors, shapes and light."


def sft_target(label: str, target: str, caption: str = "") -> str:
    if target == "boxed":
        return f"\\boxed{{{label}}}"
    if target in ("set_template", "set_caption"):
        step1 = caption if target == "set_caption" else _FIXED_STEP1
        valence, arousal = recipe.VALENCE_AROUSAL.get(label, ("mixed", "moderate"))
        return (f"<step1>{step1}</step1>\n"
                "<step2>A person would feel something about it.</step2>\n"
                f"<step3>The emotion is {valence}, with {arousal} arousal.</step3>\n"
                f"\\boxed{{{label}}}")
    raise ValueError(f"sft.target={target!r}; choose one of {TARGETS}")


def target_tokens(tokenizer, texts: Sequence[str], end_id: int, pad_id: int, length: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """[B, length] target ids (text + end-of-turn, right-padded) and their mask."""
    ids = np.full((len(texts), length), pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        row = tokenizer.encode(text, add_special_tokens=False) + [end_id]
        if len(row) > length:
            raise ValueError(f"SFT target of {len(row)} tokens exceeds sft max length {length}: "
                             f"{text[:80]!r}...; raise config.sft.max_len")
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def batch_labels(batch, *, random_labels: bool, rng: np.random.Generator) -> list[str]:
    names = list(batch.labels_of_dataset)
    if random_labels:
        return [names[i] for i in rng.integers(0, len(names), batch.num_rows)]
    return [str(t) for t in batch.label_text]


def batch_captions(batch) -> list[str]:
    """Each row's `caption` (filler rows: the fixed sentence). A real row without one is an
    error: `set_caption` would otherwise teach an empty step 1."""
    valid = batch.row_valid
    captions = [""] * len(valid) if batch.caption is None else [str(c) for c in batch.caption]
    missing = [str(i) for i, c, v in zip(batch.example_id, captions, valid)
               if v and not c.strip()]
    if missing:
        raise ValueError(f"sft.target='set_caption' needs a `caption` feature on every example; "
                         f"{len(missing)} rows of this batch have none (e.g. {missing[:3]}). Use "
                         "a data set with captions (emo_synth) or sft.target='set_template'")
    return [c if v else _FIXED_STEP1 for c, v in zip(captions, valid)]


def make_sft_step(model, optimizer, mesh, *, chunk: int):
    """Jitted step(state, batch: UpdateBatch) -> (state, metrics); loss = token-mean NLL.

    The batch is an `UpdateBatch` with group size 1 (advantages / old_logp unused), so SFT
    shares the packing, shardings and non-finite guard of the GRPO update.
    """
    def loss_and_grad(params, batch):
        token_count = jnp.maximum(batch.response_mask.sum().astype(jnp.float32), 1.0)

        def micro(params, mb):
            t = mb.response_mask.shape[-1]
            logp, _ = response_logprobs(model, params, mb.inputs, t, chunk=chunk,
                                        with_entropy=False)
            mask = mb.response_mask.astype(jnp.float32)
            return -jnp.sum(jnp.where(mask > 0, logp, 0.0)) / token_count

        grad_fn = jax.value_and_grad(micro)

        def body(acc, mb):
            loss, g = grad_fn(params, mb)
            return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g), loss

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, losses = jax.lax.scan(body, zeros, batch)
        loss = losses.sum()
        return loss, {"loss": loss, "tokens": batch.response_mask.sum().astype(jnp.float32)}, grads

    return update_lib.make_train_step(loss_and_grad, model, optimizer, mesh)


def pack_sft_batch(model_config, batch, tokenizer, ids, *, labels: Sequence[str], target: str,
                   max_len: int, micro_batch_rows: int) -> batching_lib.UpdateBatch:
    captions = batch_captions(batch) if target == "set_caption" else [""] * len(labels)
    texts = [sft_target(label, target, caption) for label, caption in zip(labels, captions)]
    tokens, mask = target_tokens(tokenizer, texts, ids.im_end, ids.pad, max_len)
    mask = mask * batch.row_valid.astype(np.int32)[:, None]   # filler rows teach nothing
    n = tokens.shape[0]
    zeros = np.zeros((n,), np.float32)
    return batching_lib.pack_update_batch(model_config, batch, tokens, mask, zeros,
                                        np.zeros(tokens.shape, np.float32), group_size=1,
                                        micro_batch_rows=micro_batch_rows)


def make_sft_optimizer(sft_config, optim_config) -> optax.GradientTransformation:
    """The run's AdamW settings with the SFT learning rate (constant after the warm-up: the RL
    schedule's decay_steps count RL updates)."""
    cfg = optim_config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.lr = float(sft_config.lr)
        cfg.schedule = "constant"
    return train_state_lib.make_optimizer(cfg)


class SFTLearner(Learner):
    phase = "sft"
    metric_prefix = names.SFT_PREFIX
    lr_field = "sft.lr"

    @classmethod
    def check_config(cls, config, *, data_parallel: int, process_count: int) -> None:
        if config.sft.target not in TARGETS:
            raise ValueError(f"config.sft.target={config.sft.target!r}; choose one of "
                             f"{TARGETS}")
        if config.sft.batch_size % (config.rl.micro_batch_size * data_parallel):
            raise ValueError(f"config.sft.batch_size={config.sft.batch_size} does not split "
                             f"into micro-batches of rl.micro_batch_size="
                             f"{config.rl.micro_batch_size} x {data_parallel} data-parallel "
                             "devices")

    @classmethod
    def make_optimizer(cls, config):
        return make_sft_optimizer(config.sft, config.optim)

    def __init__(self, ctx: Context, *, start_params=None, saved: dict | None = None):
        super().__init__(ctx, start_params=start_params, saved=saved)
        c = self.config
        self.step_fn = make_sft_step(self.model, self.make_optimizer(c), self.mesh,
                                     chunk=c.rl.logprob_chunk)
        self.micro_rows = batching_lib.micro_batch_rows(c.rl.micro_batch_size, self.mesh)

    def step(self, state, batch, step, batches):
        c, policy = self.config, self.ctx.policy
        labels = batch_labels(batch, random_labels=c.sft.random_labels,
                              rng=np.random.default_rng([c.seed, step]))
        ub = pack_sft_batch(self.model.config, batch, policy.tokenizer, policy.ids,
                            labels=labels, target=c.sft.target, max_len=c.sft.max_len,
                            micro_batch_rows=self.micro_rows)
        state, m = self.step_fn(state, ub)
        return state, names.update(m)

    def progress(self, metrics: dict) -> dict[str, float]:
        return {"sft_loss": metrics[names.LOSS]}
