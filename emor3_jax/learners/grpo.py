"""GRPO, and EMO-R3 (GRPO with the reflective judge reward: `reward.preset`), as one learner.

One step:

    prompts -> sampler: G responses per prompt (prefill once) -> rule rewards + reflective
    judge -> group advantages                                        (`rollout`, overridable)
    -> old and reference log-probs of every response (the params that sampled them)
    -> rl.ppo_epochs passes over the mini-batches, one optimizer step each       (`update`)

`rollout` is the seam for algorithms that change how a batch of scored responses is obtained
(dapo.py); the loss and its options (clipping, KL, aggregation) are config (rl/losses.py).
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np

from emor3_jax import model_source, policy as policy_lib, sharding
from emor3_jax import checkpoint as ckpt_lib
from emor3_jax import metric_names as names
from emor3_jax.learners.base import Context, Learner
from emor3_jax.rewards import emotion
from emor3_jax.rl import balance as balance_lib
from emor3_jax.rl import batching as batching_lib
from emor3_jax.rl import rollout as rollout_lib
from emor3_jax.rl import train_state as train_state_lib
from emor3_jax.rl import update as update_lib
from emor3_jax.sampling import SamplerBuckets, SamplingSettings


def logprob_micro_rows(rows_per_call: int, mini_batch_rows: int) -> int:
    """Rows per forward-only log-prob call: rl.logprob_micro_batch_size x data-parallel devices,
    at most one whole mini-batch."""
    return min(rows_per_call, mini_batch_rows)


# a token budget field -> (its fewest rows per device, its most rows per device)
_ROWS_OF_BUDGET = {"micro_batch_tokens": ("micro_batch_size", "micro_batch_max_size"),
                   "logprob_micro_batch_tokens": ("logprob_micro_batch_size",
                                                  "logprob_micro_batch_max_size")}


def rows_budget(config, data_parallel: int, field: str) -> int:
    """Token slots per device that the fewest rows of a micro-batch (rl.micro_batch_size or
    rl.logprob_micro_batch_size per device, for rl.<field>) compute at the longest lengths."""
    rl, r = config.rl, config.rollout
    rows_per_device = rl[_ROWS_OF_BUDGET[field][0]]
    rows = min(rows_per_device * data_parallel, rl.mini_batch_size * r.group_size)
    return batching_lib.micro_batch_slots(
        rows, -(-rows // r.group_size), _round_up(config.data.max_prompt_len,
                                                  config.data.prompt_buckets),
        _round_up(r.max_new_tokens, r.response_buckets), data_parallel)


def token_budget(config, data_parallel: int, field: str) -> int:
    """rl.micro_batch_tokens / rl.logprob_micro_batch_tokens as slots per device: 0 off (fixed
    rows), -1 what the fewest rows compute at the longest lengths (`rows_budget`: shorter
    responses then go more to a micro-batch at the same peak)."""
    budget = int(config.rl.get(field, 0))
    return rows_budget(config, data_parallel, field) if budget == -1 else budget


def row_cap(config, data_parallel: int, field: str) -> int:
    """The most rows a micro-batch packed by the token budget rl.<field> may take (global):
    rl.micro_batch_max_size / rl.logprob_micro_batch_max_size per device; 0: no cap."""
    return int(config.rl.get(_ROWS_OF_BUDGET[field][1], 0)) * data_parallel


def rollout_buckets(config) -> SamplerBuckets:
    """The rollout and evaluation sampler's shape buckets (the trainer's and the AOT's)."""
    r = config.rollout
    return SamplerBuckets(prompt_len=tuple(config.data.prompt_buckets),
                          new_tokens=tuple(sorted(set(r.response_buckets) | {
                              config.eval.max_new_tokens, r.max_new_tokens})),
                          decode_window=int(r.decode_window))


def judge_buckets(config) -> SamplerBuckets:
    """The judge sampler's shape buckets (the learner's and the AOT's)."""
    rw = config.reward
    return SamplerBuckets(prompt_len=tuple(rw.judge_prompt_buckets),
                          new_tokens=(rw.judge_max_new_tokens,),
                          decode_window=int(config.rollout.decode_window))


def _round_up(n: int, buckets) -> int:
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    return int(n)


class GRPOLearner(Learner):
    """GRPO / EMO-R3: one rollout of the batch, then its mini-batch updates."""

    @classmethod
    def check_config(cls, config, *, data_parallel: int, process_count: int) -> None:
        r, rl = config.rollout, config.rl
        g, dp = r.group_size, data_parallel
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
        lp_rows = logprob_micro_rows(rl.logprob_micro_batch_size * dp, rows)
        if rows % lp_rows:
            raise ValueError(
                f"a mini-batch of {rows} responses does not split into log-prob micro-batches "
                f"of rl.logprob_micro_batch_size={rl.logprob_micro_batch_size} x {dp} "
                "data-parallel devices; change rl.logprob_micro_batch_size")
        if not (isinstance(rl.ppo_epochs, int) and rl.ppo_epochs >= 1):
            raise ValueError(f"config.rl.ppo_epochs={rl.ppo_epochs!r}: passes over a rollout's "
                             "mini-batches must be a positive integer (released: 1)")
        cls._check_token_budgets(config, data_parallel)
        cls._check_balance(config)
        buckets = rl.length_buckets
        if not all(isinstance(b, int) and b > 0 for b in buckets):
            raise ValueError(f"config.rl.length_buckets={tuple(buckets)}: response lengths to "
                             "cut micro-batches to must be positive integers (() = powers of "
                             "two from 64)")
        for field, value in (("rollout.decode_window", r.decode_window),
                             ("reward.judge_shared_suffix_max",
                              config.reward.judge_shared_suffix_max)):
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"config.{field}={value!r}: tokens, a non-negative integer "
                                 "(0 = no limit)")
        emotion.get_preset(config.reward.preset)
        if config.reward.judge_source == "checkpoint":
            from emor3_jax.rewards.judge import checkpoint_dir
            model_source.check(checkpoint_dir(config.reward), "config.reward.judge_dir")
        train_state_lib.learning_rate_schedule(config.optim)     # names a bad schedule field
        if r.max_new_tokens > max(r.response_buckets):
            raise ValueError(f"config.rollout.max_new_tokens={r.max_new_tokens} exceeds the "
                             f"largest response bucket {max(r.response_buckets)}")

    @staticmethod
    def _check_balance(config) -> None:
        """rl.balance_batch parts must split the rollout's responses evenly and each part into
        the mini-batches; the per-micro-batch mean needs whole prompts in rollout order."""
        rl, r = config.rl, config.rollout
        k = rl.balance_batch
        if not (isinstance(k, int) and k >= 0):
            raise ValueError(f"config.rl.balance_batch={k!r}: parts (EasyR1's data-parallel "
                             "ranks, 8 as released), a non-negative integer (0 = rollout order)")
        if not k:
            return
        if rl.loss_agg != "token_mean":
            raise ValueError(f"config.rl.balance_batch={k} needs rl.loss_agg='token_mean' (the "
                             "released per-micro-batch mean depends on which responses share a "
                             "micro-batch, which the balanced order changes); set it to 0")
        n, mini = r.batch_size * r.group_size, r.batch_size // rl.mini_batch_size
        if n % (k * mini):
            fits = [d for d in range(1, 9) if n % (d * mini) == 0]
            raise ValueError(
                f"config.rl.balance_batch={k}: the {n} responses of a rollout do not split into "
                f"{k} equal parts of {mini} mini-batch slices each; use one of {fits} or 0")

    @staticmethod
    def _check_token_budgets(config, dp: int) -> None:
        """A token budget must hold the fewest rows at the longest lengths (else the packer
        fails mid-run), and needs the token-mean loss."""
        rl = config.rl
        for field, (rows_field, cap_field) in _ROWS_OF_BUDGET.items():
            cap = rl.get(cap_field, 0)
            if not (isinstance(cap, int) and (cap == 0 or cap >= rl[rows_field])):
                raise ValueError(f"config.rl.{cap_field}={cap!r}: the most responses per "
                                 f"device in a micro-batch, at least rl.{rows_field}="
                                 f"{rl[rows_field]} (0 = no cap)")
            budget = rl.get(field, 0)
            if budget == 0:
                continue
            if rl.loss_agg != "token_mean":
                raise ValueError(f"config.rl.{field}={budget} needs rl.loss_agg='token_mean' "
                                 "(the released per-micro-batch mean depends on fixed "
                                 "micro-batch rows); set it to 0")
            need = rows_budget(config, dp, field)
            if budget != -1 and budget < need:
                raise ValueError(
                    f"config.rl.{field}={budget} is smaller than one micro-batch of "
                    f"rl.{rows_field}={rl[rows_field]} responses per device at the longest "
                    f"lengths: {need} token slots per device; use at least {need}, -1 (that "
                    "much), or fewer rows")

    @classmethod
    def _saves_reference(cls, config) -> bool:
        """The KL reference is the policy RL starts from: the loaded weights (rebuilt on resume)
        or, after a Cold-Start SFT, the SFT result (only a checkpoint still has it)."""
        return bool(config.rl.kl_coef) and config.sft.steps > 0

    @classmethod
    def saved_like(cls, config, params) -> dict:
        if not cls._saves_reference(config):
            return {}
        return {"ref": policy_lib.reference_params(ckpt_lib.abstract_like(params),
                                                   config.model.dtype)}

    def __init__(self, ctx: Context, *, start_params=None, saved: dict | None = None):
        super().__init__(ctx, start_params=start_params, saved=saved)
        c = self.config
        rl = c.rl
        self.update_fn = update_lib.make_micro_batch_update(
            self.model, self.make_optimizer(c), self.mesh, rl, chunk=rl.logprob_chunk,
            optim_config=c.optim)
        self.logprob_fn = update_lib.make_logprob_fn(self.model, self.mesh,
                                                     chunk=rl.logprob_chunk)
        self.ref_params = (saved or {}).get("ref")
        if self.ref_params is None and rl.kl_coef:
            self.ref_params = policy_lib.reference_params(start_params, c.model.dtype)
        r = c.rollout
        self.sampling = SamplingSettings.for_ids(
            self.ctx.policy.ids, max_new_tokens=r.max_new_tokens, num_samples=r.group_size,
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        self.judge = self._build_judge()

    def _build_judge(self):
        c = self.config
        preset = emotion.get_preset(c.reward.preset)
        if not (preset.needs_coherence or preset.needs_consistency):
            return None
        from emor3_jax.rewards.judge import Judge
        return Judge.from_config(c.reward, self.model, self.ctx.policy.tokenizer,
                                 mesh=self.ctx.sample_mesh,
                                 chunk_size=c.reward.judge_chunk_size or None,
                                 buckets=judge_buckets(c),
                                 min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels)

    def saved(self) -> dict:
        if self.ref_params is not None and self._saves_reference(self.config):
            return {"ref": self.ref_params}
        return {}

    def progress(self, metrics: dict) -> dict[str, float]:
        return {"reward": metrics.get(names.REWARD_MEAN, 0.0),
                "acc": metrics.get(names.ACCURACY, 0.0)}

    # --------------------------------------------------------------------------- the step --
    def step(self, state, batch, step, batches):
        key = jax.random.fold_in(jax.random.fold_in(self.ctx.base_key, 1), step)
        ro, metrics = self.rollout(state, batch, key, batches)
        return self.update(state, ro, metrics)

    def sample(self, params, batch, key) -> rollout_lib.Rollout:
        """G responses per prompt of `batch` under `params` (rollout.* sampling settings)."""
        return rollout_lib.sample(self.ctx.sampler, params, batch, key, self.sampling,
                                  self.ctx.policy.tokenizer)

    def score(self, ro, params, key) -> rollout_lib.Rollout:
        """Rewards (rules + the judge the preset needs) and group advantages of `ro`."""
        c = self.config
        return rollout_lib.score(ro, c.reward.preset, self.judge, judge_params=params, rng=key,
                                 adv_eps=c.rl.adv_eps)

    def rollout(self, state, batch, key, batches) -> tuple[rollout_lib.Rollout, dict]:
        """The scored rollout this step learns from, and its metrics: here one rollout of
        `batch` (the judge is the policy itself unless reward.judge_source says otherwise)."""
        del batches
        t0 = time.time()
        params = self.ctx.sampling_params(state.params)   # freed on return, before the update
        k_sample, k_judge = jax.random.split(key)
        ro = self.sample(params, batch, k_sample)
        t_sample = time.time() - t0
        ro = self.score(ro, params, k_judge)
        t_reward = time.time() - t0 - t_sample
        out = rollout_lib.metrics(ro)
        out.update({names.TIME_SAMPLE: t_sample, names.TIME_REWARD: t_reward,
                    names.ROLLOUT_TOKENS_PER_S: float(ro.lengths.sum()) / max(t_sample, 1e-9)})
        return ro, out

    def update(self, state, ro: rollout_lib.Rollout, out: dict):
        """The rollout's updates, as the release (EasyR1's `compute_log_prob` /
        `compute_ref_log_prob`, then `update_actor`): first the old (and reference) log-probs of
        every response, all from the params that sampled the rollout, then rl.ppo_epochs passes
        over its mini-batches (whole prompts in rollout order, or EasyR1's balanced order:
        rl.balance_batch, rl/balance.py), one optimizer step each. (Old log-probs recomputed
        just before each mini-batch would come from params the earlier mini-batches had
        already moved.)"""
        c = self.config
        rl, g = c.rl, c.rollout.group_size
        t0 = time.time()
        length = _round_up(max(int(ro.lengths.max()), 1), c.rollout.response_buckets)
        length = min(length, ro.tokens.shape[1])
        tokens, old = ro.tokens[:, :length], ro.logprobs[:, :length]
        mask = ro.response_mask()[:, :length]
        micro = batching_lib.micro_batch_rows(rl.micro_batch_size, self.mesh)
        per_update = rl.mini_batch_size   # prompts; the rollout is global on every host
        lp_micro = logprob_micro_rows(
            batching_lib.micro_batch_rows(rl.logprob_micro_batch_size, self.mesh), per_update * g)
        n_prompts = ro.prompts.num_rows
        # log-probs do not depend on how rows are grouped: whole prompts in rollout order
        mini_batches = [self._mini_batch(ro.prompts, rows, g, lp_micro)[:2] for rows in
                        balance_lib.mini_batch_rows(n_prompts, g, per_update)]
        seq_tokens = (np.repeat(ro.prompts.attention_mask.sum(1), g) + mask.sum(1)
                      if rl.balance_batch else None)
        updates = [self._mini_batch(ro.prompts, rows, g, micro) for rows in
                   balance_lib.mini_batch_rows(n_prompts, g, per_update, seq_tokens,
                                               rl.balance_batch)]
        ref = np.zeros_like(old) if rl.kl_coef else None
        if rl.recompute_old_logp:
            old = np.zeros_like(old)
        for prompts, rows in mini_batches:
            logprobs = functools.partial(self._logprobs, prompts=prompts, tokens=tokens[rows],
                                         mask=mask[rows], lp_micro=lp_micro)
            if ref is not None:
                ref[rows] = logprobs(self.ref_params)
            if rl.recompute_old_logp:
                old[rows] = logprobs(state.params)
        agg: dict[str, float] = {}
        for _ in range(rl.ppo_epochs):
            for prompts, rows, in_mini_batch in updates:
                state, m = self._update_mini_batch(
                    state, prompts, tokens[rows], mask[rows] * in_mini_batch[:, None],
                    ro.advantages[rows], old[rows], None if ref is None else ref[rows], micro)
                for k, v in m.items():
                    agg[k] = agg.get(k, 0.0) + float(v)
        out.update(names.update(agg, rl.ppo_epochs * len(updates)))
        dt = time.time() - t0
        out[names.TIME_UPDATE] = dt
        out[names.TOKENS_PER_S] = agg.get("tokens", 0.0) / max(dt, 1e-9)
        return state, out

    @staticmethod
    def _mini_batch(prompts, rows: np.ndarray, g: int, micro: int):
        """A mini-batch of the response `rows` as whole prompts: (their prompts, the rows of
        all G responses of each, which of those rows are in the mini-batch). Prompts are
        repeated as fillers (rows out of the mini-batch) until the rows split into
        micro-batches of `micro`; rows out of it are masked in the update (no loss, no token
        of the mean)."""
        index = np.unique(rows // g)
        while (len(index) * g) % micro:
            index = np.append(index, index[-1])
        all_rows = (index[:, None] * g + np.arange(g)[None]).reshape(-1)
        in_mini_batch = np.zeros(len(all_rows), np.int32)
        first = np.concatenate([[True], index[1:] != index[:-1]])      # fillers stay out
        in_mini_batch[np.isin(all_rows, rows) & np.repeat(first, g)] = 1
        return prompts.take(index), all_rows, in_mini_batch

    def _logprobs(self, params, prompts, tokens, mask, lp_micro: int):
        """[rows, T] fp32 log-probs of one mini-batch's responses under `params`, in
        micro-batches of lp_micro rows (rl.logprob_micro_batch_tokens: more for short
        responses), each cut to its own bucketed length."""
        c = self.config
        dp = sharding.data_parallel_size(self.mesh)
        batches = batching_lib.pack_micro_batches(
            self.model.config, prompts, tokens, mask, group_size=c.rollout.group_size,
            micro_batch_rows=lp_micro, length_buckets=tuple(c.rl.length_buckets),
            prompt_buckets=tuple(c.data.prompt_buckets),
            token_budget=token_budget(c, dp, "logprob_micro_batch_tokens"), data_parallel=dp,
            max_rows=row_cap(c, dp, "logprob_micro_batch_tokens"))
        return update_lib.micro_batch_logprobs(self.logprob_fn, params, batches)

    def _update_mini_batch(self, state, prompts, tokens, mask, advantages, old, ref,
                           micro: int):
        """One optimizer step on one mini-batch: micro-batches cut to their own bucketed
        lengths (rl.micro_batch_tokens: more rows for short responses), rows sorted by length
        for the token-mean loss only (the released per-micro-batch mean keeps its
        micro-batches)."""
        c = self.config
        dp = sharding.data_parallel_size(self.mesh)
        batches = batching_lib.pack_micro_batches(
            self.model.config, prompts, tokens, mask, advantages, old, ref,
            group_size=c.rollout.group_size, micro_batch_rows=micro,
            sort=c.rl.loss_agg == "token_mean", length_buckets=tuple(c.rl.length_buckets),
            prompt_buckets=tuple(c.data.prompt_buckets),
            token_budget=token_budget(c, dp, "micro_batch_tokens"), data_parallel=dp,
            max_rows=row_cap(c, dp, "micro_batch_tokens"))
        return self.update_fn(state, batches)
