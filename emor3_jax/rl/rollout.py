"""One GRPO rollout on the host side: sample G responses per prompt, score them, advantages.

Rows are prompt-major (row b*G + g answers prompt b) everywhere. Filler rows of a padded
batch (`valid` False) are sampled like the others (static shapes) but get a zero response mask,
so they never reach the loss or the metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from emor3_jax import metric_names as names
from emor3_jax.batches import PromptBatch, concat_prompt_batches
from emor3_jax.processing import chat
from emor3_jax.rewards import emotion
from emor3_jax.rl import losses

# A field of Rollout with one entry per response row (prompt-major, row b * G + g): `take` and
# `concat` slice and join every such field (arrays, lists, dicts of them) by tree operations.
_RESPONSE_ROWS = {"rows": True}


def _rows(**kw):
    return dataclasses.field(metadata=_RESPONSE_ROWS, **kw)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """A sampled rollout; `score` returns it scored (rewards, components, advantages, judge
    metrics), a new value."""
    prompts: PromptBatch            # the prompts the responses answer (B rows)
    tokens: np.ndarray = _rows()    # [N, T] int32, pad after the end
    logprobs: np.ndarray = _rows()  # [N, T] fp32 sampler log-probs (the rollout policy's)
    lengths: np.ndarray = _rows()   # [N] generated tokens, EOS included
    texts: list[str] = _rows()      # decoded responses (special tokens skipped)
    group_size: int
    rewards: np.ndarray | None = _rows(default=None)       # [N]
    components: dict | None = _rows(default=None)          # name -> [N]
    advantages: np.ndarray | None = _rows(default=None)    # [N]
    judge: dict | None = None               # judge answers / metrics (of the whole rollout)

    @property
    def valid(self) -> np.ndarray:
        return np.repeat(self.prompts.row_valid, self.group_size)

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in np.repeat(np.asarray(self.prompts.label_text, object),
                                          self.group_size)]

    def response_mask(self) -> np.ndarray:
        t = self.tokens.shape[1]
        mask = (np.arange(t)[None, :] < self.lengths[:, None]).astype(np.int32)
        return mask * self.valid[:, None].astype(np.int32)

    def _response_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("rows")}

    def take(self, prompts: Sequence[int]) -> "Rollout":
        """The rollout of the prompts `prompts` (indices into this rollout's prompt batch), each
        with its G responses; the judge metrics stay those of the whole rollout."""
        prompts = np.asarray(prompts, np.int64)
        g = self.group_size
        rows = (prompts[:, None] * g + np.arange(g)[None]).reshape(-1)
        fields = jax.tree.map(lambda x: [x[i] for i in rows] if isinstance(x, list)
                              else np.asarray(x)[rows], self._response_fields(), is_leaf=_is_list)
        return dataclasses.replace(self, prompts=self.prompts.take(prompts), **fields)


def _is_list(x) -> bool:
    return isinstance(x, list)


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """One rollout of `parts` in order (prompt batches left-padded to the widest); the judge
    metrics are the last part's."""
    fields = jax.tree.map(lambda *xs: sum(xs, []) if isinstance(xs[0], list)
                          else np.concatenate(xs), *[p._response_fields() for p in parts],
                          is_leaf=_is_list)
    return dataclasses.replace(
        parts[-1], prompts=concat_prompt_batches([p.prompts for p in parts]), **fields)


def sample(sampler, params, batch: PromptBatch, rng, settings, tokenizer) -> Rollout:
    """settings.num_samples (G) responses to every prompt of `batch` (sampling.SamplingSettings),
    decoded with `tokenizer`."""
    out = sampler.generate(params, batch, settings, rng)
    texts = [chat.decode_response(tokenizer, out.tokens[r], int(out.lengths[r]))
             for r in range(out.tokens.shape[0])]
    return Rollout(prompts=batch, tokens=np.asarray(out.tokens),
                   logprobs=np.asarray(out.logprobs, np.float32),
                   lengths=np.asarray(out.lengths), texts=texts,
                   group_size=settings.num_samples)


def score(rollout: Rollout, preset, judge=None, *, judge_params=None, rng=None,
          adv_eps: float = 1e-6) -> Rollout:
    """The rollout scored: rule rewards + (if the preset needs them) the reflective judge, then
    group advantages ((r - mean) / (std + adv_eps), config.rl.adv_eps)."""
    preset = emotion.get_preset(preset)
    labels = rollout.labels
    answers, judged = {}, {}
    if preset.needs_coherence or preset.needs_consistency:
        if judge is None:
            raise ValueError(f"reward preset {preset.name!r} needs the judge, but none was built")
        verdict = judge.rewards(rollout.texts, labels, tuple(rollout.prompts.labels_of_dataset),
                                preset, image_rows(rollout), rng, policy_params=judge_params)
        answers = verdict.score_kwargs()
        judged = judge_metrics(verdict, rollout)
    scores = emotion.score_responses(rollout.texts, labels, preset, **answers)
    rewards = np.asarray(scores.overall, np.float32)
    return dataclasses.replace(
        rollout, judge=judged, rewards=rewards,
        components={k: np.asarray(v) for k, v in scores.components.items()},
        advantages=np.asarray(losses.group_advantages(rewards, rollout.group_size, eps=adv_eps)))


def judge_metrics(verdict, rollout: Rollout) -> dict[str, float]:
    """Shares of yes / no / none answers, and how often coherence agrees with the policy."""
    valid = rollout.valid
    out = {}
    if verdict.consistency_answers is not None:
        answers = [a.strip().lower() for a, v in zip(verdict.consistency_answers, valid) if v]
        n = max(1, len(answers))
        out["consistency_yes"] = sum("yes" in a for a in answers) / n
        out["consistency_no"] = sum("yes" not in a and "no" in a for a in answers) / n
        out["consistency_none"] = 1.0 - out["consistency_yes"] - out["consistency_no"]
    if verdict.coherence_answers is not None:
        pairs = [(a.strip().lower(), emotion.extract_boxed(emotion.normalize_tags(t)))
                 for a, t, v in zip(verdict.coherence_answers, rollout.texts, valid) if v]
        n = max(1, len(pairs))
        out["coherence_none"] = sum(a in ("", "none") for a, _ in pairs) / n
        out["coherence_agrees_with_policy"] = sum(
            b is not None and a == b.strip().lower() for a, b in pairs) / n
    return out


def image_rows(rollout: Rollout):
    """Per response row: its prompt's (first) image as a ProcessedImage (one object per
    prompt), None for a prompt without one."""
    from emor3_jax.rewards.judge import ProcessedImage
    per_prompt = [next((ProcessedImage(p, g) for p, g in rollout.prompts.row_images(b)), None)
                  for b in range(rollout.prompts.num_rows)]
    return [per_prompt[r // rollout.group_size] for r in range(len(rollout.texts))]


def zero_spread_groups(rewards: np.ndarray, group_size: int, valid: np.ndarray) -> np.ndarray:
    """[B] bool: groups whose rewards are all equal (no learning signal) among valid prompts."""
    r = np.asarray(rewards).reshape(-1, group_size)
    return (r.max(1) == r.min(1)) & np.asarray(valid, bool).reshape(-1, group_size)[:, 0]


def groups_in_band(rewards: np.ndarray, group_size: int, low: float, high: float) -> np.ndarray:
    """[B] bool: groups whose mean reward lies strictly inside (low, high): EasyR1's online
    filter (DAPO dynamic sampling). All-right groups fall out at the top; all-wrong groups
    fall out only if their mean is <= low (a well-formed all-wrong group, 0.1, stays)."""
    mean = np.asarray(rewards, np.float64).reshape(-1, group_size).mean(1)
    return (mean > low) & (mean < high)


def metrics(rollout: Rollout) -> dict[str, float]:
    """Reward mean and components, format/accuracy, lengths, share of zero-spread groups."""
    valid = rollout.valid
    out = {}
    if valid.any():
        out[names.REWARD_MEAN] = float(rollout.rewards[valid].mean())
        out.update(names.grouped("reward", {k: np.asarray(v)[valid].mean()
                                            for k, v in rollout.components.items()}))
        lengths = rollout.lengths[valid]
        zero = zero_spread_groups(rollout.rewards, rollout.group_size, valid)
        out.update(names.grouped("response", {
            "length_mean": lengths.mean(), "length_max": lengths.max(),
            "clipped": (lengths >= rollout.tokens.shape[1]).mean()}))
        out.update(names.grouped("groups", {"zero_spread": zero.sum() / max(1, valid.reshape(
            -1, rollout.group_size)[:, 0].sum())}))
    out.update(names.grouped("judge", rollout.judge or {}))
    return out
