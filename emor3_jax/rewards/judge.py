"""The reflective judge of EMO-R3 (RER): answers the coherence and consistency prompts.

    judge = Judge(model, tokenizer, mode="generate", source="policy")
    out = judge.rewards(responses, labels, dataset_labels, "emor3", images, rng,
                        policy_params=params)
    scores = emotion.score_responses(responses, labels, "emor3", **out.score_kwargs())
    # out.coherence / out.consistency: R_coh, R_cons per response; out.*_answers: what it said

Prompts (rewards/emotion.py, docs/method.md "Rewards") go through the Qwen2.5-VL chat
template with the default system prompt and WITHOUT the SET instruction
(`chat.encode_prompt`); coherence prompts are text only, consistency prompts carry the rollout's image at their `<image>` marker.

Sources: "policy" (released: the weights that produced the rollout; the caller passes them per
call) or "checkpoint" (a frozen separate model, e.g. `qwen2_5_vl.load_hf(dir, mesh=mesh)`,
sharded with its own shardings, possibly larger; it must use the same tokenizer ids).

Modes:
  * "generate" (released): one sample per prompt at temperature 0.6 / top-p 0.95, up to
    `max_new_tokens`; the decoded answer goes to emotion.coherence_score / consistency_score.
  * "score": one prefill per prompt, then the judge's log-likelihood of every candidate answer
    (coherence: the data set's labels and "None"; consistency: "yes", "no", "None"), each
    in its lower-case and capitalised spelling followed by the end-of-turn token, in one
    multi-token call over their token trie (`Sampler.score`) at the judge temperature;
    spellings are pooled and the reward is its expectation under that distribution over the
    candidates (`Judge.rewards`), with no sampling noise. Answers off the candidate list,
    which the generate mode can give, are not modelled.
Shared prefixes (`share_prefix=True`, the default): the G consistency prompts of one rollout
image are the same tokens (chat template, image, question) up to the response's step-1 text,
and all coherence prompts share the chat template's head. The sampler prefills each such
longest common token prefix once (vision tower included) and then only the prompts' suffixes
against its KV cache (`Sampler.generate/score(share_prefix=True)`, sampling/sampler.py), with
the same answers as `share_prefix=False` (every prompt whole): same random stream per prompt
(its index in the call), token-identical greedy generations, score-mode rewards equal up to
float rounding.

No gradient reaches the judge: its programs are separate jits that stop gradients at the params,
and its answers are host strings.

Decoded responses may contain special-token strings (`<|im_end|>`, `<|image_pad|>`...) or extra
`<image>` markers, which would re-tokenize as real special tokens and break the prompt (or its
image count). They are removed before encoding and counted in `judge.stats`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Sequence

import jax
import numpy as np

from emor3_jax import patches as patch_lib
from emor3_jax import recipe, sharding
from emor3_jax.processing import chat
from emor3_jax.processing import image as image_lib
from emor3_jax.processing import tokenizer as tokenizer_lib
from emor3_jax.rewards import emotion
from emor3_jax.sampling import Prompts, Sampler, SamplerBuckets, SamplingSettings

log = logging.getLogger(__name__)

MODES = ("generate", "score")
SOURCES = ("policy", "checkpoint")
NONE_ANSWER = "None"
CONSISTENCY_CANDIDATES = ("yes", "no", NONE_ANSWER)


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """An image already through the Qwen2-VL processor (e.g. rows of a data-pipeline batch)."""
    pixel_values: np.ndarray    # [t*h*w, patch_dim] float32
    grid_thw: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class JudgeRewards:
    """Judge prompts, answers and scores per response (None where the preset needs no judge)."""
    coherence_prompts: list[str] | None
    consistency_prompts: list[str] | None
    coherence_answers: list[str] | None
    consistency_answers: list[str] | None
    coherence: np.ndarray | None
    consistency: np.ndarray | None

    def score_kwargs(self) -> dict[str, np.ndarray | None]:
        """The judge scores as `emotion.score_responses(...)` keyword arguments."""
        return {"coherence_scores": self.coherence, "consistency_scores": self.consistency}


def coherence_candidates(dataset_labels: Sequence[str]) -> tuple[str, ...]:
    return tuple(dataset_labels) + (NONE_ANSWER,)


def candidate_tokens(tokenizer, im_end_id: int, candidates: Sequence[str]
                     ) -> tuple[list[list[int]], list[int]]:
    """Score-mode continuations: every spelling (lower-case, capitalised) of every candidate
    + the end-of-turn id, and the candidate each belongs to (also sizes the AOT score program)."""
    conts, owner = [], []
    for j, cand in enumerate(candidates):
        for form in dict.fromkeys((cand.lower(), cand.capitalize())):
            conts.append(list(tokenizer.encode(form, add_special_tokens=False)) + [im_end_id])
            owner.append(j)
    return conts, owner


def checkpoint_dir(reward_config) -> str:
    """config.reward.judge_dir, which judge_source='checkpoint' needs (the trainer's config check,
    the judge and the AOT tool all ask here)."""
    if not reward_config.judge_dir:
        raise ValueError("config.reward.judge_source='checkpoint' needs config.reward.judge_dir "
                         "(a Hugging Face Qwen2.5-VL model: a local or gs:// directory or a hub "
                         "repo id)")
    return reward_config.judge_dir


class Judge:
    """Answers judge prompts in batches with the grouped sampler (see the module docstring).

    model: the judge's Linen model (the policy's own for source="policy"); params: the frozen
    checkpoint's parameters (source="checkpoint" only). temperature/top_p/max_new_tokens: the
    generate mode's sampling (released 0.6 / 0.95 / 2048). sampler: the `sampling.Sampler`
    of `model` it runs on (judges of one model may share one, and its compiled programs); None
    builds its own from mesh, chunk_size, buckets, memory_limit_bytes (as for the Sampler;
    prompts are sorted by length before chunking, so a chunk pads only to its own length
    bucket). min_pixels/max_pixels: processing of raw
    images (release pre-resize + smart_resize, `image.process_image`; ProcessedImage inputs are
    used as they are). share_prefix: prefill the prompts' shared prefixes once (module
    docstring); False runs every prompt whole. shared_suffix_max: prompts whose suffix (the
    response and the template's end) needs more tokens run whole (0: no limit).
    """

    def __init__(self, model, tokenizer, *, mode: str = "generate", source: str = "policy",
                 params=None, temperature: float = 0.6, top_p: float = 0.95,
                 max_new_tokens: int = 2048, sampler: Sampler | None = None, mesh=None,
                 chunk_size: int | None = 64, buckets: SamplerBuckets | None = None,
                 memory_limit_bytes: int | None = None,
                 min_pixels: int = recipe.MIN_PIXELS, max_pixels: int = recipe.MAX_PIXELS,
                 share_prefix: bool = True, shared_suffix_max: int = 0):
        if mode not in MODES:
            raise ValueError(f"judge mode {mode!r} (config.reward.judge_mode) must be one of "
                             f"{MODES}")
        if source not in SOURCES:
            raise ValueError(f"judge source {source!r} (config.reward.judge_source) must be one "
                             f"of {SOURCES}")
        if source == "checkpoint" and params is None:
            raise ValueError("judge source 'checkpoint' needs params: load them with "
                             "qwen2_5_vl.load_hf(config.reward.judge_dir, mesh=mesh)")
        if source == "policy" and params is not None:
            raise ValueError("judge source 'policy' takes the policy params per call "
                             "(policy_params=...), not params= at construction")
        if max_new_tokens < 1:
            raise ValueError(f"judge max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.mode, self.source, self.params = mode, source, params
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.ids = tokenizer_lib.token_ids(tokenizer)
        _check_same_ids(model.config, self.ids)
        self._special_strings = _special_strings(tokenizer)
        self.sampling = SamplingSettings.for_ids(
            self.ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            share_prefix=share_prefix, shared_suffix_max=int(shared_suffix_max))
        if sampler is None:     # else handed one (judges of one model can share its programs)
            opts = {} if buckets is None else {"buckets": buckets}
            sampler = Sampler(model, mesh=mesh, chunk_size=chunk_size,
                              memory_limit_bytes=memory_limit_bytes, **opts)
        elif sampler.config != model.config:
            raise ValueError("judge: the sampler handed to it runs another model config than "
                             "the judge's model; build the sampler from the judge's model")
        self.sampler = sampler
        self.stats = collections.Counter()

    @property
    def temperature(self) -> float:
        return self.sampling.temperature

    @property
    def share_prefix(self) -> bool:
        return self.sampling.share_prefix

    @property
    def shared_suffix_max(self) -> int:
        return self.sampling.shared_suffix_max

    @classmethod
    def from_config(cls, reward_config, policy_model, tokenizer, *, mesh=None, dtype=None,
                    **kwargs) -> "Judge":
        """A judge from `config.reward` (judge_source/dir/mode/temperature/top_p/max tokens)."""
        from emor3_jax.models import qwen2_5_vl
        model, params = policy_model, None
        if reward_config.judge_source == "checkpoint":
            from emor3_jax import model_source
            judge_dir = model_source.resolve(checkpoint_dir(reward_config),
                                             "config.reward.judge_dir")
            model, params = qwen2_5_vl.load_hf(           # laid out as the sampler reads it
                judge_dir, dtype=dtype or policy_model.config.compute_dtype,
                mesh=mesh, rules=sharding.SAMPLING_RULES)
        return cls(model, tokenizer, mode=reward_config.judge_mode,
                   source=reward_config.judge_source, params=params,
                   temperature=reward_config.judge_temperature,
                   top_p=reward_config.judge_top_p,
                   max_new_tokens=reward_config.judge_max_new_tokens, mesh=mesh,
                   share_prefix=reward_config.judge_share_prefix,
                   shared_suffix_max=reward_config.judge_shared_suffix_max, **kwargs)

    # -- encoding ------------------------------------------------------------------------------
    def sanitize(self, prompt: str, num_images: int) -> str:
        """Remove special-token strings, and `<image>` markers beyond the first `num_images`."""
        clean = prompt
        removed = 0
        for token in self._special_strings:
            removed += clean.count(token)
            clean = clean.replace(token, "")
        head, marker, rest = "", recipe.IMAGE_MARKER, clean
        for _ in range(num_images):
            before, found, rest = rest.partition(marker)
            if not found:
                raise ValueError(f"judge prompt has fewer {marker} markers than its "
                                 f"{num_images} image(s): {prompt[:80]!r}")
            head += before + marker
        removed += rest.count(marker)
        clean = head + rest.replace(marker, "")
        if removed:
            self.stats["sanitized_prompts"] += 1
            self.stats["removed_special_strings"] += removed
            log.debug("judge: removed %d special strings from a prompt", removed)
        return clean

    def _process(self, img) -> ProcessedImage:
        if isinstance(img, ProcessedImage):
            return img
        pv, grid = image_lib.process_image(img, min_pixels=self.min_pixels,
                                           max_pixels=self.max_pixels)
        return ProcessedImage(pv, tuple(grid))

    def encode(self, prompts: Sequence[str], images: Sequence[Any] | None = None):
        """Prompts (+ one image or None each) -> (ids [N, L] and mask, left-padded; the
        distinct images' pixel_values and grid_thw; row_images: each prompt's image index).

        The G responses of a rollout share one image object: it is processed, copied and run
        through the vision tower once, not once per prompt.
        """
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"judge: {len(images)} images for {len(prompts)} prompts; give one "
                             "image (or None) per prompt")
        rows, row_images, distinct = [], [], {}
        for i, (prompt, img) in enumerate(zip(prompts, images)):
            if img is not None and recipe.IMAGE_MARKER not in prompt:
                raise ValueError(f"judge prompt {i} has an image but no {recipe.IMAGE_MARKER} "
                                 f"marker: {prompt[:80]!r}")
            if img is None:
                rows.append(chat.encode_prompt(self.tokenizer, self.sanitize(prompt, 0)))
                row_images.append([])
                continue
            if id(img) not in distinct:
                distinct[id(img)] = (len(distinct), self._process(img))
            index, processed = distinct[id(img)]
            rows.append(chat.encode_prompt(self.tokenizer, self.sanitize(prompt, 1),
                                           [processed.grid_thw]))
            row_images.append([index])
        length = max(map(len, rows))
        ids = np.full((len(rows), length), self.ids.pad, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            ids[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
        if not distinct:
            return ids, mask, None, None, row_images
        processed = [p for _, p in sorted(distinct.values(), key=lambda x: x[0])]
        return (ids, mask, patch_lib.concatenate([p.pixel_values for p in processed]),
                np.asarray([p.grid_thw for p in processed], np.int64), row_images)

    # -- answering -----------------------------------------------------------------------------
    def _judge_params(self, policy_params):
        if self.source == "checkpoint":
            return self.params
        if policy_params is None:
            raise ValueError("judge source 'policy' needs policy_params (the weights that "
                             "produced the rollout)")
        return policy_params

    def candidate_tokens(self, candidates: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of every spelling of every candidate + end-of-turn, and its candidate."""
        return candidate_tokens(self.tokenizer, self.ids.im_end, candidates)

    def answer(self, prompts: Sequence[str], images: Sequence[Any] | None = None, rng=None,
               policy_params=None, candidates: Sequence[str] | None = None) -> list[str]:
        """The judge's answer to every prompt (generate: decoded text; score: the most likely
        candidate, `candidates` required)."""
        if self.mode == "score":
            probs = self.candidate_probs(prompts, images, policy_params, candidates)
            return [candidates[j] for j in probs.argmax(1)] if len(probs) else []
        if not prompts:
            return []
        if self.temperature > 0 and rng is None:
            raise ValueError("judge mode 'generate' with temperature > 0 needs rng")
        params = self._judge_params(policy_params)
        order, encoded = self._encode_sorted(prompts, images)
        res = self.sampler.generate(params, dataclasses.replace(encoded, row_ids=order),
                                    self.sampling, rng)
        self.stats["generated_tokens"] += int(res.lengths.sum())
        texts = [chat.decode_response(self.tokenizer, res.tokens[i], res.lengths[i])
                 for i in range(len(prompts))]
        out = [""] * len(prompts)
        for pos, i in enumerate(order):
            out[i] = texts[pos]
        return out

    def candidate_probs(self, prompts: Sequence[str], images: Sequence[Any] | None,
                        policy_params, candidates: Sequence[str] | None) -> np.ndarray:
        """[N, C]: the judge's distribution over `candidates` at its temperature, each
        candidate's spellings pooled, renormalized over the list (answers off the list, which
        a sampled judge could give, are ignored: the score mode's stated approximation).
        Temperature 0 puts all the mass on the likeliest candidate (the greedy judge)."""
        if not candidates:
            raise ValueError("judge mode 'score' needs candidates (the answers to compare)")
        if not prompts:
            return np.zeros((0, len(candidates)))
        params = self._judge_params(policy_params)
        order, encoded = self._encode_sorted(prompts, images)
        conts, owner = self.candidate_tokens(candidates)
        logp = self.sampler.score(params, encoded, conts, pad_token_id=self.ids.pad,
                                  temperature=self.temperature or 1.0,
                                  share_prefix=self.share_prefix,
                                  shared_suffix_max=self.shared_suffix_max)
        pooled = np.full((len(prompts), len(candidates)), -np.inf)
        for k, j in enumerate(owner):
            pooled[:, j] = np.logaddexp(pooled[:, j], logp[:, k])
        if self.temperature > 0:
            probs = np.exp(pooled - pooled.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
        else:                                   # greedy judge: all mass on the likeliest
            probs = np.eye(len(candidates))[pooled.argmax(1)]
        out = np.empty_like(probs)
        out[order] = probs
        return out

    def _encode_sorted(self, prompts, images):
        """Their order and the encoded prompts in it: sorted by length (similar lengths share
        a chunk), or as given with share_prefix (the sampler orders them itself: prefix
        groups)."""
        ids, mask, pv, grid, row_images = self.encode(prompts, images)
        order = (np.arange(len(prompts)) if self.share_prefix
                 else np.argsort(mask.sum(1), kind="stable"))
        self.stats["prompts"] += len(prompts)
        return order, Prompts(ids[order], mask[order], pv, grid,
                              row_images=[row_images[i] for i in order])

    def rewards(self, responses: Sequence[str], labels: Sequence[str],
                dataset_labels: Sequence[str], preset, images: Sequence[Any], rng=None,
                policy_params=None) -> JudgeRewards:
        """Judge prompts for the preset, the judge's answers, and R_coh / R_cons per response.

        labels: ground truth per response; images: the rollout image of each response (a raw
        image or a ProcessedImage; the same object for the G responses of a prompt is
        processed once). Scores use the preset's coherence rule (`preset.coherence_fn`); in
        score mode they are the expected released reward under the judge's distribution over
        the candidates (R_coh = P(label) + 0.5 P(None); R_cons = P(yes), since the released
        rule scores "None" 0: it contains "no") and the answers are the likeliest candidates.
        """
        if not (len(responses) == len(labels) == len(images)):
            raise ValueError(f"judge.rewards: {len(responses)} responses, {len(labels)} labels, "
                             f"{len(images)} images; give one label and image per response")
        preset = emotion.get_preset(preset)
        coh_prompts, cons_prompts = emotion.judge_prompts(responses, dataset_labels, preset)
        coh_answers = cons_answers = coherence = consistency = None
        if self.mode == "score":
            if coh_prompts is not None:
                cands = coherence_candidates(dataset_labels)
                probs = self.candidate_probs(coh_prompts, None, policy_params, cands)
                coh_answers = [cands[j] for j in probs.argmax(1)]
                coherence = np.array([probs[i] @ [preset.coherence_fn(c, label) for c in cands]
                                      for i, label in enumerate(labels)])
            if cons_prompts is not None:
                cands = CONSISTENCY_CANDIDATES
                probs = self.candidate_probs(cons_prompts, images, policy_params, cands)
                cons_answers = [cands[j] for j in probs.argmax(1)]
                consistency = probs @ np.array([emotion.consistency_score(c) for c in cands])
        else:
            rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
            if coh_prompts and cons_prompts:
                # one batch: text-only and image prompts together (fewer compiled programs)
                both = self.answer(coh_prompts + cons_prompts,
                                   [None] * len(coh_prompts) + list(images), rng, policy_params)
                coh_answers, cons_answers = both[:len(coh_prompts)], both[len(coh_prompts):]
            else:
                if coh_prompts is not None:
                    coh_answers = self.answer(coh_prompts, None, rngs[0], policy_params)
                if cons_prompts is not None:
                    cons_answers = self.answer(cons_prompts, images, rngs[1], policy_params)
            if coh_answers is not None:
                coherence = np.array([preset.coherence_fn(a, label)
                                      for a, label in zip(coh_answers, labels)])
            if cons_answers is not None:
                consistency = np.array([emotion.consistency_score(a) for a in cons_answers])
        return JudgeRewards(coh_prompts, cons_prompts, coh_answers, cons_answers, coherence,
                            consistency)


# ----------------------------------------------------------------------------------------------
def _special_strings(tokenizer) -> list[str]:
    """Every special-token string of the tokenizer, longest first (so none hides another)."""
    strings = set(getattr(tokenizer, "all_special_tokens", []))
    strings.update(tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special)
    strings.update(recipe.SPECIAL_TOKENS)
    return sorted((s for s in strings if s), key=len, reverse=True)


def _check_same_ids(config, ids: tokenizer_lib.TokenIds) -> None:
    pairs = [("image_token_id", config.image_token_id, ids.image_pad),
             ("video_token_id", config.video_token_id, ids.video_pad),
             ("vision_start_token_id", config.vision_start_token_id, ids.vision_start),
             ("vision_end_token_id", config.vision_end_token_id, ids.vision_end)]
    bad = [f"{name}: model {model_id} vs tokenizer {tok_id}" for name, model_id, tok_id in pairs
           if model_id != tok_id]
    if ids.vocab_size > config.text.vocab_size:
        bad.append(f"tokenizer has {ids.vocab_size} ids but the model vocabulary is "
                   f"{config.text.vocab_size}")
    if bad:
        raise ValueError("the judge model and the tokenizer disagree (" + "; ".join(bad) + "); "
                         "a checkpoint judge must use the policy's tokenizer and special ids")
