"""The EMO-R3 driver: SFT / GRPO training, evaluation, checkpoints, reports, HF export.

`run(config, workdir)` is everything `python -m emor3_jax.main` does. One training step:

    prompts (grain: each host's block, gathered) -> sampler: G responses per prompt (prefill once)
    -> rule rewards + reflective judge -> group advantages (-> DAPO resampling if enabled)
    -> reference log-probs (frozen initial policy) -> one update per mini-batch
    -> metrics (TensorBoard, JSONL, progress bar) -> eval / checkpoint on schedule

All I/O lives here; the stages are pure functions elsewhere. A checkpoint holds the train
state, the reference params when they are not the loaded weights, the base RNG key and the
data iterator state, so a resumed run continues exactly. SIGTERM (TPU preemption) saves a
checkpoint and returns normally. Apart from the last `train.keep_checkpoints` checkpoints,
`checkpoints_best/` keeps the params of the RL evaluation with the best validation score (mean
in-domain accuracy, `evaluation.validation_score`), and the report gives the final and the best
checkpoint's numbers, each with its step.

Multi-host: every process runs this loop on the same global batch (each reads its block of
it; emor3_jax/distributed.py), so the host logic is replicated and device arrays are global.
All processes write their shards of a checkpoint; only process 0 writes metrics, the report and
the Hugging Face export.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax import checkpoint as ckpt_lib
from emor3_jax import distributed, fileio, model_source
from emor3_jax import evaluation, metrics as metrics_lib, policy as policy_lib, report
from emor3_jax import provenance, sharding, sft
from emor3_jax.configs import base
from emor3_jax.data import pipeline as data_lib
from emor3_jax.rewards import emotion
from emor3_jax.rl import rollout as rollout_lib
from emor3_jax.rl import update as update_lib
from emor3_jax.sampling import Sampler, SamplerBuckets

log = logging.getLogger(__name__)

TRAIN_SPLIT, EVAL_SPLIT = "train", "test"


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with a non-finite loss or gradient."""


def _count_nonfinite(bad_in_a_row: int, skipped: float, step: int, config, lr_field: str) -> int:
    """Consecutive skipped (non-finite) updates so far; NonFiniteError at
    `train.max_nonfinite_in_a_row` of them (0 = never halt, only skip and count)."""
    bad_in_a_row = bad_in_a_row + 1 if skipped else 0
    limit = int(config.train.max_nonfinite_in_a_row)
    if limit and bad_in_a_row >= limit:
        raise NonFiniteError(
            f"{bad_in_a_row} consecutive updates had a non-finite loss or gradient (last at "
            f"step {step}); each was skipped (metric 'skipped'). Lower config.{lr_field}, check "
            "the data or use float32 params (config.model.param_dtype); "
            "config.train.max_nonfinite_in_a_row sets how many in a row halt the run")
    return bad_in_a_row


# --------------------------------------------------------------------------------------------
# Checks that run before anything is compiled or loaded.

def check_config(config, num_devices: int | None = None, process_count: int | None = None
                 ) -> None:
    """Raise a ValueError that says what to change, before any compile or load."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    m = config.mesh
    data, fsdp, _ = sharding.mesh_shape(m.data, m.fsdp, m.tensor, num_devices)
    dp = data * fsdp
    s = config.rollout.mesh
    if s.data or s.fsdp or s.tensor:
        sharding.mesh_shape(s.data, s.fsdp, s.tensor, num_devices, "config.rollout.mesh")
    if config.mode not in ("train", "sft", "eval", "export"):
        raise ValueError(f"config.mode={config.mode!r}; choose train, sft, eval or export")
    policy_lib.check_model_config(config.model)
    r, rl = config.rollout, config.rl
    g = r.group_size
    if config.mode == "train":
        if g < 2:
            raise ValueError(f"config.rollout.group_size={g}: GRPO needs at least 2 responses "
                             "per prompt")
        if r.batch_size % process_count:
            raise ValueError(f"config.rollout.batch_size={r.batch_size} is not divisible by the "
                             f"{process_count} hosts")
        if r.batch_size % rl.mini_batch_size:
            raise ValueError(f"config.rollout.batch_size={r.batch_size} is not a multiple of "
                             f"config.rl.mini_batch_size={rl.mini_batch_size}")
        rows = rl.mini_batch_size * g
        if rows % (rl.micro_batch_size * dp):
            raise ValueError(
                f"a mini-batch of {rl.mini_batch_size} prompts x G={g} = {rows} responses does "
                f"not split into micro-batches of rl.micro_batch_size={rl.micro_batch_size} x "
                f"{dp} data-parallel devices; change rl.micro_batch_size or rl.mini_batch_size")
        lp_rows = _logprob_micro_rows(rl.logprob_micro_batch_size * dp, rows)
        if rows % lp_rows:
            raise ValueError(
                f"a mini-batch of {rows} responses does not split into log-prob micro-batches "
                f"of rl.logprob_micro_batch_size={rl.logprob_micro_batch_size} x {dp} "
                "data-parallel devices; change rl.logprob_micro_batch_size")
        if not (isinstance(rl.ppo_epochs, int) and rl.ppo_epochs >= 1):
            raise ValueError(f"config.rl.ppo_epochs={rl.ppo_epochs!r}: passes over a rollout's "
                             "mini-batches must be a positive integer (released: 1)")
        buckets = rl.length_buckets
        if not all(isinstance(b, int) and b > 0 for b in buckets):
            raise ValueError(f"config.rl.length_buckets={tuple(buckets)}: response lengths to "
                             "cut micro-batches to must be positive integers (() = powers of "
                             "two from 64)")
        if r.dynamic_sampling:
            if not r.filter_low < r.filter_high:
                raise ValueError(f"config.rollout.filter_low={r.filter_low} / filter_high="
                                 f"{r.filter_high}: the DAPO filter keeps group means strictly "
                                 "between them; give filter_low < filter_high")
            mini = data_lib.generation_batch_size(config)
            if mini % process_count or mini < 1:
                raise ValueError(f"config.rollout.mini_batch_size={mini} (prompts per DAPO "
                                 f"generation try) must be a positive multiple of the "
                                 f"{process_count} hosts")
        emotion.get_preset(config.reward.preset)
        if config.reward.judge_source == "checkpoint":
            if not config.reward.judge_dir:
                raise ValueError("config.reward.judge_source='checkpoint' needs "
                                 "config.reward.judge_dir (a Hugging Face Qwen2.5-VL directory)")
            model_source.check(config.reward.judge_dir, "config.reward.judge_dir")
        update_lib.learning_rate_schedule(config.optim)     # names a bad schedule field
        if r.max_new_tokens > max(r.response_buckets):
            raise ValueError(f"config.rollout.max_new_tokens={r.max_new_tokens} exceeds the "
                             f"largest response bucket {max(r.response_buckets)}")
    if config.data.prompt_format not in base.PROMPT_FORMATS:
        raise ValueError(f"config.data.prompt_format={config.data.prompt_format!r}; choose one "
                         f"of {tuple(base.PROMPT_FORMATS)}")
    for name in [config.data.train, *config.data.eval]:
        if name not in base.LABELS:
            raise ValueError(f"data set {name!r} is unknown; choose from {tuple(base.LABELS)}")
    for name in config.data.get("labels", {}):
        data_lib.source_config(config, name)        # a bad label-list override fails here
    if config.eval.batch_size % process_count:
        raise ValueError(f"config.eval.batch_size={config.eval.batch_size} is not divisible by "
                         f"the {process_count} hosts")
    if config.sft.steps and config.sft.target not in sft.TARGETS:
        raise ValueError(f"config.sft.target={config.sft.target!r}; choose one of {sft.TARGETS}")
    if config.sft.steps and config.sft.batch_size % (config.rl.micro_batch_size * dp):
        raise ValueError(f"config.sft.batch_size={config.sft.batch_size} does not split into "
                         f"micro-batches of rl.micro_batch_size={config.rl.micro_batch_size} x "
                         f"{dp} data-parallel devices")


# --------------------------------------------------------------------------------------------
def _logprob_micro_rows(rows_per_call: int, mini_batch_rows: int) -> int:
    """Rows per forward-only log-prob call: rl.logprob_micro_batch_size x data-parallel devices,
    at most one whole mini-batch."""
    return min(rows_per_call, mini_batch_rows)


def _round_up(n: int, buckets) -> int:
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    return int(n)


def _stop_requested() -> bool:
    # all hosts together (a host that saw SIGTERM alone would save while others step)
    return distributed.any_process(_SIGNAL["term"])


_SIGNAL = {"term": False}
_LAST_TRACE_STOP: dict[str, int] = {}   # profile dir -> second its last trace stopped


@contextlib.contextmanager
def _sigterm_saves():
    """Turn SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""
    def handler(signum, frame):
        log.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
        _SIGNAL["term"] = True
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:      # not the main thread (e.g. a notebook worker): no handler
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _SIGNAL["term"] = False


class Trainer:
    """State of one `run`: mesh, policy, sampler, judge, data, writers, checkpoints."""

    def __init__(self, config, workdir: str):
        check_config(config)
        policy_lib.check_update_precision(config)
        self.config = config
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        provenance.check_resume(workdir, config)   # before anything is built
        if self.is_main:
            provenance.record(workdir, config)
        self.mesh = sharding.mesh_from_config(config.mesh)
        self.base_key = jax.random.key(config.seed)
        self.policy = policy_lib.build_policy(config.model, self.mesh,
                                              jax.random.fold_in(self.base_key, 0))
        self.model = self.policy.model
        r = config.rollout
        buckets = SamplerBuckets(prompt_len=tuple(config.data.prompt_buckets),
                                 new_tokens=tuple(sorted(set(r.response_buckets) | {
                                     config.eval.max_new_tokens, r.max_new_tokens})))
        self.sample_mesh = policy_lib.sampling_mesh(config, self.mesh)
        self.sampler = Sampler(self.model, mesh=self.sample_mesh, buckets=buckets,
                               chunk_size=r.chunk_size or None)
        self.judge = None
        self.ckpt = ckpt_lib.Checkpointer(fileio.join(workdir, "checkpoints"),
                                          keep=config.train.keep_checkpoints)
        # the best RL evaluation's params, outside the rotation above (ckpt_lib.BestCheckpointer)
        self.best = ckpt_lib.BestCheckpointer(fileio.join(workdir, "checkpoints_best"))
        self.val_sets = evaluation.validation_sets(
            config.data.in_domain, config.data.eval, config.data.train
        ) if config.mode == "train" else ()
        self.final_step: int | None = None     # the RL step of the params train() returns
        self.pipe_kwargs = dict(data_dir=config.data.data_dir or None,
                                manual_dir=config.data.manual_dir or None)
        self.history: list[dict] = []

    # ---------------------------------------------------------------------------- data --
    def _pipeline(self, name: str, split: str, *, eval_mode: bool):
        cfg = data_lib.from_config(self.config, eval_mode=eval_mode)
        return data_lib.make_pipeline(name, split, self.policy.tokenizer, cfg,
                                      **self._source_kwargs(name))

    def _sft_pipeline(self):
        import dataclasses
        cfg = data_lib.from_config(self.config, eval_mode=False)
        cfg = dataclasses.replace(cfg, batch_size=self.config.sft.batch_size
                                  // jax.process_count())
        name = self.config.sft.data or self.config.data.train
        return data_lib.make_pipeline(name, TRAIN_SPLIT, self.policy.tokenizer, cfg,
                                      **self._source_kwargs(name))

    # ---------------------------------------------------------------------------- eval --
    def evaluate(self, params, step: int, writer=None) -> dict[str, dict]:
        """Accuracy on each `data.eval` set (validation: no judge)."""
        c = self.config
        params = policy_lib.sampling_params(self.model, params, self.sample_mesh)
        results, samples = {}, []
        for name in c.data.eval:
            pipe = self._pipeline(name, EVAL_SPLIT, eval_mode=True)

            def generate(batch, key, max_new, **kw):
                return self.sampler.generate(
                    params, batch["input_ids"], batch["attention_mask"],
                    batch.get("pixel_values"), batch.get("image_grid_thw"),
                    max_new_tokens=max_new, num_samples=1, eos_token_ids=self.policy.ids.eos,
                    forbidden_token_ids=self.policy.ids.forbidden,
                    pad_token_id=self.policy.ids.pad, valid_vocab_size=self.policy.ids.vocab_size,
                    rng=key, position_ids=batch["position_ids"], rope_deltas=batch["rope_deltas"],
                    **kw)

            key = jax.random.fold_in(jax.random.fold_in(self.base_key, 7), step + 1)  # final: -1
            results[name] = evaluation.evaluate_dataset(
                generate, pipe.global_iter(), self.policy.tokenizer, preset=c.reward.preset,
                max_new_tokens=c.eval.max_new_tokens, rng=key, eval_config=c.eval,
                max_examples=c.eval.max_examples, samples=samples if not samples else None)
            log.info("eval step %d %s: accuracy %.4f format %.3f (%d examples)", step, name,
                     results[name]["accuracy"], results[name]["format"],
                     results[name]["examples"])
        if writer is not None:
            flat = {f"{n}/{k}": v for n, r in results.items() for k, v in r.items()}
            flat["accuracy"] = float(np.mean([r["accuracy"] for r in results.values()]))
            writer.write(step, flat, prefix="eval/")
        if samples and self.is_main:
            log.info("eval sample (label %s): %s", samples[0]["label"], samples[0]["response"])
        return results

    # ----------------------------------------------------------------------------- SFT --
    def run_sft(self, state, writer, start: int, data_state=None):
        """Cold-start / baseline SFT for `sft.steps` steps; returns the state."""
        c = self.config
        optimizer = sft.make_sft_optimizer(c.sft, c.optim)
        step_fn = sft.make_sft_step(self.model, optimizer, self.mesh, chunk=c.rl.logprob_chunk)
        it = self._sft_pipeline().global_iter()
        if data_state is not None:
            it.set_state(data_state)
        micro = update_lib.micro_batch_rows(c.rl.micro_batch_size, self.mesh)
        bad_in_a_row = 0
        for step in range(start, c.sft.steps):
            batch = next(it)
            labels = sft.batch_labels(batch, random_labels=c.sft.random_labels,
                                      rng=np.random.default_rng([c.seed, step]))
            ub = sft.pack_sft_batch(self.model.config, batch, self.policy.tokenizer,
                                    self.policy.ids, labels=labels, target=c.sft.target,
                                    max_len=c.sft.max_len, micro_batch_rows=micro)
            state, m = step_fn(state, ub)
            m = {k: float(v) for k, v in m.items()}
            writer.write(step, m, prefix="sft/")
            writer.progress(step + 1, {"sft_loss": m["loss"]})     # the bar, not a log line
            if step % max(1, c.train.log_every) == 0:
                log.debug("sft step %d: loss %.4f", step, m["loss"])
            bad_in_a_row = _count_nonfinite(bad_in_a_row, m.get("skipped", 0), step + 1, c,
                                            "sft.lr")
            stop = _stop_requested()     # read once: a signal between two reads loses the save
            if stop or (step + 1) % c.train.checkpoint_every == 0:
                self.save(step + 1, "sft", state, None, it)
            if stop:
                log.warning("SIGTERM: stopped after SFT step %d (checkpoint saved)", step + 1)
                return state, True
        return state, False

    # ---------------------------------------------------------------------------- GRPO --
    def grpo_step(self, state, ref_params, batch, key, judge):
        """One rollout + its mini-batch updates; returns (state, metrics)."""
        ro, t_sample, t_reward = self._rollout(state.params, batch, key, judge)
        out = rollout_lib.metrics(ro)
        out.update(time_sample=t_sample, time_reward=t_reward,
                   rollout_tokens_per_s=float(ro.lengths.sum()) / max(t_sample, 1e-9))
        return self.update(state, ref_params, ro, out)

    def _rollout(self, params, batch, key, judge) -> tuple[rollout_lib.Rollout, float, float]:
        """Sample G responses per prompt and score them (rewards, advantages), from the
        policy's sampling copy (policy.sampling_params), which is freed on return, before the
        update needs the memory; with the seconds each part took."""
        c, r = self.config, self.config.rollout
        t0 = time.time()
        params = policy_lib.sampling_params(self.model, params, self.sample_mesh)
        k_sample, k_judge = jax.random.split(key)
        ro = rollout_lib.sample(self.sampler, params, batch, k_sample,
                                group_size=r.group_size, max_new_tokens=r.max_new_tokens,
                                temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                ids=self.policy.ids, tokenizer=self.policy.tokenizer)
        t_sample = time.time() - t0
        ro = rollout_lib.score(ro, c.reward.preset, judge, judge_params=params, rng=k_judge,
                               adv_eps=c.rl.adv_eps)
        return ro, t_sample, time.time() - t0 - t_sample

    def update(self, state, ref_params, ro: rollout_lib.Rollout, out: dict):
        """The rollout's updates, as the release (EasyR1's `compute_log_prob` /
        `compute_ref_log_prob`, then `update_actor`): first the old (and reference) log-probs of
        every response, all from the params that sampled the rollout, then rl.ppo_epochs passes
        over its mini-batches, one optimizer step each. (Old log-probs recomputed just before
        each mini-batch would come from params the earlier mini-batches had already moved.)"""
        c = self.config
        rl, g = c.rl, c.rollout.group_size
        t0 = time.time()
        length = _round_up(max(int(ro.lengths.max()), 1), c.rollout.response_buckets)
        length = min(length, ro.tokens.shape[1])
        tokens, old = ro.tokens[:, :length], ro.logprobs[:, :length]
        mask = ro.response_mask()[:, :length]
        micro = update_lib.micro_batch_rows(rl.micro_batch_size, self.mesh)
        per_update = rl.mini_batch_size   # prompts; the rollout is global on every host
        lp_micro = _logprob_micro_rows(
            update_lib.micro_batch_rows(rl.logprob_micro_batch_size, self.mesh), per_update * g)
        n_prompts = len(ro.prompts["input_ids"])
        mini_batches = []
        for start in range(0, n_prompts, per_update):
            idx = np.arange(start, min(start + per_update, n_prompts))
            rows = (idx[:, None] * g + np.arange(g)[None]).reshape(-1)
            mini_batches.append((rollout_lib.take_prompts(ro.prompts, idx), rows))
        ref = np.zeros_like(old) if rl.kl_coef else None
        if rl.recompute_old_logp:
            old = np.zeros_like(old)
        for prompts, rows in mini_batches:
            logprobs = functools.partial(self._logprobs, prompts=prompts, tokens=tokens[rows],
                                         mask=mask[rows], lp_micro=lp_micro, length=length)
            if ref is not None:
                ref[rows] = logprobs(ref_params)
            if rl.recompute_old_logp:
                old[rows] = logprobs(state.params)
        agg: dict[str, float] = {}
        for _ in range(rl.ppo_epochs):
            for prompts, rows in mini_batches:
                state, m = self._update_mini_batch(
                    state, prompts, tokens[rows], mask[rows], ro.advantages[rows], old[rows],
                    None if ref is None else ref[rows], micro)
                for k, v in m.items():
                    agg[k] = agg.get(k, 0.0) + float(v)
        n_updates = rl.ppo_epochs * len(mini_batches)
        for k, v in agg.items():
            out[f"loss/{k}" if k in ("loss", "pg_loss", "kl", "ppo_kl", "entropy") else
                f"update/{k}"] = v / n_updates if k not in ("tokens", "skipped") else v
        dt = time.time() - t0
        out["time_update"] = dt
        out["update_tokens_per_s"] = agg.get("tokens", 0.0) / max(dt, 1e-9)
        return state, out

    def _logprobs(self, params, prompts, tokens, mask, lp_micro: int, length: int):
        """[rows, length] fp32 log-probs of one mini-batch's responses under `params`, in
        micro-batches of lp_micro rows (each cut to its own bucketed length with
        rl.length_aware, else padded to `length`)."""
        c = self.config
        g = c.rollout.group_size
        if c.rl.length_aware:
            batches = update_lib.pack_micro_batches(
                self.model.config, prompts, tokens, mask, group_size=g,
                micro_batch_rows=lp_micro, length_buckets=tuple(c.rl.length_buckets),
                prompt_buckets=tuple(c.data.prompt_buckets))
            return update_lib.micro_batch_logprobs(self.logprob_fn, params, batches)
        inputs = update_lib.pack_policy_inputs(self.model.config, prompts, tokens, mask,
                                               group_size=g, micro_batch_rows=lp_micro)
        return np.asarray(update_lib.merge_micro_batches(self.logprob_fn(params, inputs,
                                                                         length)))

    def _update_mini_batch(self, state, prompts, tokens, mask, advantages, old, ref,
                           micro: int):
        """One optimizer step on one mini-batch. rl.length_aware: micro-batches cut to their
        own bucketed lengths, rows sorted by length for the token-mean loss only (the released
        per-micro-batch mean keeps its micro-batches); else padded to the mini-batch's longest
        and scanned in one program."""
        c = self.config
        g = c.rollout.group_size
        if c.rl.length_aware:
            batches = update_lib.pack_micro_batches(
                self.model.config, prompts, tokens, mask, advantages, old, ref, group_size=g,
                micro_batch_rows=micro, sort=c.rl.loss_agg == "token_mean",
                length_buckets=tuple(c.rl.length_buckets),
                prompt_buckets=tuple(c.data.prompt_buckets))
        else:
            batches = update_lib.pack_update_batch(self.model.config, prompts, tokens, mask,
                                                   advantages, old, ref, group_size=g,
                                                   micro_batch_rows=micro)
        return self.update_fn(state, batches)

    # ------------------------------------------------------------------------ checkpoints --
    def track_best(self, step: int, results: dict[str, dict], params) -> bool:
        """Keep `params` in checkpoints_best/ if this RL evaluation has the best validation
        score so far (mean accuracy on `self.val_sets`, evaluation.validation_score says why
        accuracy), with its step, score and every eval set's accuracy; True if it did."""
        acc = {k: float(v["accuracy"]) for k, v in results.items()}
        score = evaluation.validation_score(acc, self.val_sets)
        return self.best.offer(step, score, params,
                               {"score_sets": list(self.val_sets), "accuracy": acc})

    def save(self, step: int, phase: str, state, ref_params, it, *, force: bool = True):
        # numpy, not a host-local jax.Array: orbax refuses those with several processes
        tree = {"train": state, "rng": np.asarray(jax.random.key_data(self.base_key))}
        if ref_params is not None and self.ref_in_checkpoint:
            tree["ref"] = ref_params
        extra = {"phase": phase, "step": int(step), "data": it.get_state() if it else None,
                 "history": self.history}
        self.ckpt.save(self._ckpt_index(phase, step), tree, extra, force=force)

    def _ckpt_index(self, phase: str, step: int) -> int:
        """One increasing index over both phases (SFT steps first, then RL steps)."""
        return step if phase == "sft" else self.config.sft.steps + step

    # ------------------------------------------------------------------------------ run --
    def train(self):
        c = self.config
        rl = c.rl
        total_rl = self.total_rl_steps()
        writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_main,
                                          total_steps=c.sft.steps + total_rl)
        writer.hparams(provenance.flat_config(c))
        rl_optimizer = update_lib.make_optimizer(c.optim)
        make_step = (update_lib.make_micro_batch_update if rl.length_aware else
                     update_lib.make_update_step)
        self.update_fn = make_step(self.model, rl_optimizer, self.mesh, rl,
                                   chunk=rl.logprob_chunk, optim_config=c.optim)
        self.logprob_fn = update_lib.make_logprob_fn(self.model, self.mesh, chunk=rl.logprob_chunk)
        self.ref_in_checkpoint = bool(rl.kl_coef) and c.sft.steps > 0
        state = update_lib.init_train_state(self.model, self.policy.params, rl_optimizer,
                                            self.mesh)
        phase, start, data_state, ref_params = "sft" if c.sft.steps else "rl", 0, None, None
        restored = self.restore(state)
        if restored is not None:
            state, ref_params, phase, start, data_state = restored
            log.info("resumed: phase %s step %d", phase, start)
            _drop_rows_after(writer, phase, start)
            self.history = list(self._restored_history)
        else:       # a run killed before its first checkpoint left rows that start again
            _drop_rows_after(writer, "sft", 0)
        if phase == "sft":
            state, stopped = self.run_sft(state, writer, start, data_state)
            if stopped:
                return writer.close()
            # RL starts from the SFT weights with a fresh optimizer; they are the reference.
            state = update_lib.init_train_state(self.model, state.params, rl_optimizer, self.mesh)
            phase, start, data_state = "rl", 0, None
        if ref_params is None and rl.kl_coef:
            # The policy RL started from: this state at RL step 0; in a resumed run without SFT
            # (reference not checkpointed) the loaded weights, not the resumed params.
            ref_params = policy_lib.reference_params(
                state.params if start == 0 else self.policy.params, c.model.dtype)
        judge = self._judge()
        it = self._pipeline(c.data.train, TRAIN_SPLIT, eval_mode=False).global_iter()
        if data_state is not None:
            it.set_state(data_state)
        if start == 0 and c.train.eval_every:
            # the starting point; not a best candidate (the best is a trained RL checkpoint)
            self.history.append({"step": 0, **self.evaluate(state.params, 0, writer)})
        bad_in_a_row = 0
        for step in range(start, total_rl):
            t0 = time.time()
            with self._profile(step):
                batch = self._next_batch(it, state, step)
                key = jax.random.fold_in(jax.random.fold_in(self.base_key, 1), step)
                state, m = self.grpo_step_with_resampling(state, ref_params, batch, key, judge, it)
            m["time_step"] = time.time() - t0
            skips = it.skip_counts()
            m["data/skipped"] = float(sum(skips.values()))
            writer.write(step + 1, m)
            writer.progress(step + 1 + c.sft.steps, {"reward": m.get("reward/mean", 0.0),
                                                     "acc": m.get("reward/accuracy", 0.0)})
            bad_in_a_row = _count_nonfinite(bad_in_a_row, m.get("update/skipped", 0), step + 1,
                                            c, "optim.lr")
            done = step + 1 == total_rl
            if c.train.eval_every and ((step + 1) % c.train.eval_every == 0 or done):
                results = self.evaluate(state.params, step + 1, writer)
                self.history.append({"step": step + 1, **results})
                self.track_best(step + 1, results, state.params)
            stop = _stop_requested()     # read once: a signal between two reads loses the save
            if stop or done or (step + 1) % c.train.checkpoint_every == 0:
                self.save(step + 1, "rl", state, ref_params, it)
            if stop:
                log.warning("SIGTERM: stopped after RL step %d (checkpoint saved)", step + 1)
                self.ckpt.wait()
                self.best.wait()
                writer.close()
                return None
        writer.close()
        self.final_step = total_rl
        return state

    def grpo_step_with_resampling(self, state, ref_params, batch, key, judge, it):
        """A GRPO step; with DAPO dynamic sampling (EasyR1's online filtering), groups whose
        mean reward is not strictly inside (rollout.filter_low, filter_high) are dropped and
        mini rollout batches (`batch` is one) are drawn until rollout.batch_size prompts are
        kept, each draw one try of at most rollout.max_resample_tries."""
        c = self.config
        if not c.rollout.dynamic_sampling:
            return self.grpo_step(state, ref_params, batch, key, judge)
        r, g = c.rollout, c.rollout.group_size
        kept: list[rollout_lib.Rollout] = []
        need = int(r.batch_size)
        have, tries, dropped, t0 = 0, 0, 0, time.time()
        while have < need:
            tries += 1
            if tries > r.max_resample_tries:
                raise RuntimeError(
                    f"DAPO dynamic sampling failed: after {r.max_resample_tries} tries only "
                    f"{have} of {need} prompts had a mean reward strictly inside "
                    f"({r.filter_low}, {r.filter_high}) (the rest were all right or all wrong). "
                    "This is the failure EMO-R3 reports for DAPO; raise "
                    "rollout.max_resample_tries, widen the filter band or use another method.")
            ro, _, _ = self._rollout(state.params, batch, jax.random.fold_in(key, tries), judge)
            valid = np.asarray(batch["valid"], bool)
            band = rollout_lib.groups_in_band(ro.rewards, g, r.filter_low, r.filter_high)
            dropped += int((valid & ~band).sum())
            keep = np.nonzero(band & valid)[0][:need - have]
            if len(keep):
                kept.append(_take_rollout(ro, keep))
                have += len(keep)
            if have < need:
                batch = next(it)
        ro = _concat_rollouts(kept)
        out = rollout_lib.metrics(ro)
        out.update({"dapo/tries": float(tries), "dapo/dropped_groups": float(dropped),
                    "time_sample": time.time() - t0})
        return self.update(state, ref_params, ro, out)

    def _next_batch(self, it, state, step):
        return next(it)

    @contextlib.contextmanager
    def _profile(self, step: int):
        if step not in tuple(self.config.profile.steps):
            yield
            return
        path = fileio.join(self.workdir, "profile")
        jax.profiler.start_trace(path)
        try:
            yield
        finally:
            # A trace lands in plugins/profile/<the second stop_trace ran>: a second trace
            # stopped within the same second would overwrite the previous one.
            while int(time.time()) <= _LAST_TRACE_STOP.get(path, -1):
                time.sleep(0.05)
            jax.profiler.stop_trace()
            _LAST_TRACE_STOP[path] = int(time.time())
            log.info("profile: step %d traced into %s", step, path)

    def _judge(self):
        c = self.config
        preset = emotion.get_preset(c.reward.preset)
        if not (preset.needs_coherence or preset.needs_consistency):
            return None
        from emor3_jax.rewards.judge import Judge
        buckets = SamplerBuckets(prompt_len=tuple(c.reward.judge_prompt_buckets),
                                 new_tokens=(c.reward.judge_max_new_tokens,))
        return Judge.from_config(c.reward, self.model, self.policy.tokenizer,
                                 mesh=self.sample_mesh,
                                 chunk_size=c.reward.judge_chunk_size or None, buckets=buckets,
                                 min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels)

    def total_rl_steps(self) -> int:
        """`train.max_steps`, else `rl_steps_from_epochs` of the training split's size."""
        c = self.config
        if c.train.max_steps:
            return int(c.train.max_steps)
        builder, _ = data_lib.open_source(c.data.train, TRAIN_SPLIT,
                                          **self._source_kwargs(c.data.train))
        n = builder.info.splits[TRAIN_SPLIT].num_examples
        mini = data_lib.generation_batch_size(c)   # DAPO draws whole mini batches (EasyR1)
        n = (n // mini) * mini
        return rl_steps_from_epochs(n, c.rollout.batch_size, c.train.epochs, c.data.train)

    def _source_kwargs(self, name: str) -> dict:
        """data_dir / manual_dir, and the data set's label-list override if the config has one."""
        config = data_lib.source_config(self.config, name)
        return self.pipe_kwargs if config is None else {**self.pipe_kwargs, "config": config}

    def restore(self, state):
        if self.ckpt.latest_step() is None:
            return None
        tree = {"train": state, "rng": np.asarray(jax.random.key_data(self.base_key))}
        if self.ref_in_checkpoint and self.ckpt.read_extra()["phase"] == "rl":
            # SFT-phase checkpoints hold no reference
            tree["ref"] = policy_lib.reference_params(ckpt_lib.abstract_like(state.params),
                                                      self.config.model.dtype)
        restored, extra = self.ckpt.restore(ckpt_lib.abstract_like(tree))
        self._restored_history = extra.get("history") or []
        if not np.array_equal(np.asarray(restored["rng"]), tree["rng"]):
            # the data order and every sample follow the seed: no exact resume with another
            raise ValueError(f"{self.ckpt.directory} was written by a run with another "
                             f"config.seed than {self.config.seed}; resume with that run's seed "
                             "or start afresh with a new --workdir")
        return (restored["train"], restored.get("ref"), extra["phase"], int(extra["step"]),
                extra.get("data"))

    # -------------------------------------------------------------------------- finish --
    def finish(self, params, *, method: str, step: int | None = None):
        """Final evaluation of `params` (the final checkpoint, at `step`; None: the loaded
        weights), report (results + curves) and Hugging Face export of them. After training the
        report also holds the best checkpoint (checkpoints_best/) with its step, score and
        accuracies, from the evaluation that made it the best."""
        c = self.config
        last = self.history[-1] if self.history else {}
        if step is not None and last.get("step") == step and c.mode == "train":
            # the loop has just evaluated these very params: not run twice
            results = {k: v for k, v in last.items() if k != "step"}
        else:
            results = self.evaluate(params, -1)
        acc = {k: v["accuracy"] for k, v in results.items()}
        best = self.best.record if c.mode == "train" else None
        if self.is_main:
            report_dir = fileio.join(self.workdir, "report")
            out = report.write_report(report_dir, acc, train_set=c.data.train, method=method,
                                      step=step, best=best,
                                      extra={"eval": results, "history": self.history})
            rows = metrics_lib.read_jsonl(fileio.join(self.workdir, "metrics.jsonl"))
            report.plot_curves(rows, fileio.join(report_dir, "curves.png"))
            print(fileio.read_text(fileio.join(report_dir, "results.md")))
        else:
            out = None
        self.export(params)
        return out

    def export(self, params):
        from emor3_jax.models import qwen2_5_vl
        out_dir = fileio.join(self.workdir, "export")
        qwen2_5_vl.save_hf(params, self.model.config, out_dir,   # every process (gathers)
                           tokenizer=self.policy.tokenizer, min_pixels=self.config.data.min_pixels,
                           max_pixels=self.config.data.max_pixels)
        if self.is_main:
            log.info("export: Hugging Face checkpoint written to %s", out_dir)
            best = self.best.record
            if best is not None:
                log.info("export: these are the final params; the best validation checkpoint "
                         "(RL step %d, score %.4f on %s) is kept in %s", best["step"],
                         best["score"], "+".join(best.get("score_sets", [])),
                         self.best.directory)
        return out_dir


def rl_steps_from_epochs(num_examples: int, batch_size: int, epochs, data_set: str = "") -> int:
    """RL steps of `epochs` passes, as released: full batches per epoch (the last partial batch
    of an epoch is dropped) times epochs; EmoSet-2k: 2,100 // 512 = 4 per epoch, 80 in 20."""
    per_epoch = int(num_examples) // int(batch_size)
    if per_epoch < 1:
        raise ValueError(
            f"the training set {data_set!r} has {num_examples} examples, fewer than one batch of "
            f"config.rollout.batch_size={batch_size} (an epoch's last partial batch is dropped, "
            "as released, so an epoch would have no step): lower config.rollout.batch_size (and "
            "config.rl.mini_batch_size with it), or set config.train.max_steps")
    steps = int(per_epoch * epochs)
    if steps < 1:
        raise ValueError(f"config.train.epochs={epochs} x {per_epoch} batches per epoch of "
                         f"{data_set!r} is less than one RL step; raise config.train.epochs or "
                         "set config.train.max_steps")
    return steps


def _take_rollout(ro: rollout_lib.Rollout, prompts: np.ndarray) -> rollout_lib.Rollout:
    g = ro.group_size
    rows = (prompts[:, None] * g + np.arange(g)[None]).reshape(-1)
    return rollout_lib.Rollout(
        prompts=rollout_lib.take_prompts(ro.prompts, prompts), tokens=ro.tokens[rows],
        logprobs=ro.logprobs[rows], lengths=ro.lengths[rows], texts=[ro.texts[i] for i in rows],
        group_size=g, rewards=ro.rewards[rows],
        components={k: v[rows] for k, v in ro.components.items()},
        advantages=ro.advantages[rows], judge=ro.judge)


def _concat_rollouts(parts: list[rollout_lib.Rollout]) -> rollout_lib.Rollout:
    width = max(p.prompts["input_ids"].shape[1] for p in parts)
    prompts = rollout_lib.concat_prompts([_left_pad(p.prompts, width) for p in parts])
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return rollout_lib.Rollout(
        prompts=prompts, tokens=cat("tokens"), logprobs=cat("logprobs"), lengths=cat("lengths"),
        texts=sum((p.texts for p in parts), []), group_size=parts[0].group_size,
        rewards=cat("rewards"), advantages=cat("advantages"),
        components={k: np.concatenate([p.components[k] for p in parts])
                    for k in parts[0].components}, judge=parts[-1].judge)


def _left_pad(batch: dict, width: int) -> dict:
    """Left-pad a prompt batch to `width` columns (positions of pads are 0, as the pipeline's)."""
    cur = batch["input_ids"].shape[1]
    if cur == width:
        return batch
    pad = width - cur
    out = dict(batch)
    pad_id = int(batch["input_ids"][batch["attention_mask"] == 0][0]) if (
        batch["attention_mask"] == 0).any() else 0
    out["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (pad, 0)), constant_values=pad_id)
    out["attention_mask"] = np.pad(batch["attention_mask"], ((0, 0), (pad, 0)))
    out["position_ids"] = np.pad(batch["position_ids"], ((0, 0), (0, 0), (pad, 0)))
    return out


# --------------------------------------------------------------------------------------------
def run(config, workdir: str):
    """Everything `python -m emor3_jax.main` does for `config.mode`."""
    fileio.check_writable(workdir)
    use_compile_cache(config, workdir)
    with _sigterm_saves():
        trainer = Trainer(config, workdir)
        try:
            return _run_mode(trainer, config)
        finally:
            trainer.ckpt.close()     # waits for the last asynchronous save
            trainer.best.close()


def _run_mode(trainer: Trainer, config):
    mode = config.mode
    if mode == "export":
        params = trainer.policy.params
        if trainer.ckpt.latest_step() is not None:
            optimizer = update_lib.make_optimizer(config.optim)
            state = update_lib.init_train_state(trainer.model, params, optimizer, trainer.mesh)
            trainer.ref_in_checkpoint = bool(config.rl.kl_coef) and config.sft.steps > 0
            params = trainer.restore(state)[0].params
        return trainer.export(params)
    if mode == "eval":
        return trainer.finish(trainer.policy.params, method=f"{config.method} (eval only)")
    if mode == "sft":
        state = _sft_only(trainer)
        return None if state is None else trainer.finish(state.params, method="SFT",
                                                         step=config.sft.steps)
    state = trainer.train()
    if state is None:       # stopped by SIGTERM after saving
        return None
    return trainer.finish(state.params, method=config.method, step=trainer.final_step)


def compile_cache_dir(config, workdir: str) -> str | None:
    """Where XLA executables persist across runs: config.compile_cache_dir, "" = the
    JAX_COMPILATION_CACHE_DIR environment variable if set, else `jax_cache` beside the
    workdir (a resumed spot run then loads its programs instead of compiling them for
    minutes); "none" = off."""
    choice = config.get("compile_cache_dir", "")
    if choice == "none":
        return None
    if choice:
        return choice
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or fileio.join(
        os.fspath(fileio.path(workdir).parent), "jax_cache")


def use_compile_cache(config, workdir: str) -> None:
    """Turn on the persistent compilation cache, except for several CPU processes: jax's CPU
    cache key does not record which process owns a device, and executables loaded from it
    hang in their first cross-process collective (seen with jax 0.10)."""
    path = compile_cache_dir(config, workdir)
    if path is None:
        return
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        log.info("compilation cache off: %d CPU processes (loaded executables hang in "
                 "cross-process collectives)", jax.process_count())
        jax.config.update("jax_compilation_cache_dir", None)
        return
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    log.info("compilation cache: %s", path)


def _drop_rows_after(writer, phase: str, step: int) -> None:
    dropped = writer.resume(phase, step)
    if dropped:
        log.info("metrics: dropped %d row(s) logged after the checkpoint (%s step %d); the "
                 "resumed run writes those steps again", dropped, phase, step)


def _sft_only(trainer: Trainer):
    c = trainer.config
    writer = metrics_lib.MetricWriter(trainer.workdir, enabled=trainer.is_main,
                                      total_steps=c.sft.steps)
    writer.hparams(provenance.flat_config(c))
    optimizer = sft.make_sft_optimizer(c.sft, c.optim)
    state = update_lib.init_train_state(trainer.model, trainer.policy.params, optimizer,
                                        trainer.mesh)
    trainer.ref_in_checkpoint = False
    start, data_state = 0, None
    restored = trainer.restore(state)
    if restored is not None:
        state, _, _, start, data_state = restored
    _drop_rows_after(writer, "sft", start)
    state, stopped = trainer.run_sft(state, writer, start, data_state)
    writer.close()
    return None if stopped else state
