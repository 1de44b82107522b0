"""The step's shapes from the config: model, image per prompt, lengths and batch sizes, padded
and chunked as the trainer does (the update's micro-batch rows: update_lib's own rule)."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

from emor3_jax import model_source, policy as policy_lib
from emor3_jax import sharding
from emor3_jax import recipe
from emor3_jax.models.config import Qwen2_5_VLConfig
from emor3_jax.processing import image as image_lib
from emor3_jax.rewards import emotion
from emor3_jax.rl import batching as batching_lib

# Tokens of a prompt besides its image (chat template, system prompt, question, SET text).
PROMPT_TEXT_TOKENS = 256
# Tokens of a judge prompt besides the response span and image (chat template + question).
JUDGE_TEMPLATE_TOKENS = 96
# Tokens of a score-mode candidate answer when no tokenizer is at hand (word + <|im_end|>).
JUDGE_CANDIDATE_TOKENS = 4
TYPICAL_IMAGE = (512, 512)
# --lengths=typical: an EmoSet prompt's text (chat template, system prompt, question, SET
# instructions) besides its image, a SET response, a judge answer (a word or yes/no + EOS).
TYPICAL_PROMPT_TEXT_TOKENS = 200
TYPICAL_RESPONSE_TOKENS = 300
TYPICAL_JUDGE_ANSWER_TOKENS = 8


def model_config(config) -> Qwen2_5_VLConfig:
    """Model shapes: model.hf_dir's config.json (never its weights), else model.arch, else
    model.tiny (with the demo tokenizer's ids, as the trainer builds it)."""
    m = config.model
    if m.hf_dir:
        hf_dir = model_source.resolve(m.hf_dir, "config.model.hf_dir", patterns=("config.json",))
        return Qwen2_5_VLConfig.from_json_file(os.path.join(hf_dir, "config.json"),
                                               **policy_lib.runtime_fields(m))
    if m.arch:
        return policy_lib.arch_config(m)
    if m.tiny:
        from emor3_jax.processing import tokenizer as tok_lib
        ids = tok_lib.token_ids(policy_lib.load_tokenizer(m))
        return policy_lib.tiny_model_config(m, ids)
    raise ValueError("config.model: set arch (one of " + ", ".join(policy_lib.ARCHS) + "), "
                     "hf_dir (a directory with config.json) or tiny for AOT compilation")


@dataclasses.dataclass(frozen=True)
class Image:
    grid_thw: tuple[int, int, int]
    height: int
    width: int
    what: str

    @property
    def patches(self) -> int:
        return math.prod(self.grid_thw)

    @property
    def tokens(self) -> int:
        return self.patches // (recipe.MERGE_SIZE ** 2)

    def describe(self) -> str:
        return (f"{self.what} -> {self.height}x{self.width} px = {self.grid_thw[1]}x"
                f"{self.grid_thw[2]} patches ({self.patches:,}), {self.tokens:,} tokens")


def image_for(data_config, image: str, model: Qwen2_5_VLConfig) -> Image:
    """The image each prompt carries (see the module docstring)."""
    v = model.vision
    factor = v.patch_size * v.spatial_merge_size
    resize = lambda h, w: image_lib.target_size(h, w, factor=factor,
                                                min_pixels=data_config.min_pixels,
                                                max_pixels=data_config.max_pixels)
    if image == "typical":
        h, w = resize(*TYPICAL_IMAGE)
        what = f"typical {TYPICAL_IMAGE[0]}x{TYPICAL_IMAGE[1]} photo"
    elif image == "max":
        side = math.isqrt(int(data_config.max_pixels))
        h, w = resize(side, side)
        budget = data_config.max_prompt_len - PROMPT_TEXT_TOKENS
        while h > factor and (h // factor) * (w // factor) > budget:
            h, w = h - factor, w - factor      # the pipeline drops prompts longer than that
        what = f"largest image a {data_config.max_prompt_len}-token prompt holds"
    else:
        try:
            hh, ww = (int(x) for x in image.lower().split("x"))
        except ValueError:
            raise ValueError(f"--image={image!r}: use typical, max or HxW "
                             "(e.g. 768x1024)") from None
        h, w = resize(hh, ww)
        what = f"{hh}x{ww} image"
    return Image((1, h // v.patch_size, w // v.patch_size), h, w, what)


def _round_up(n: int, buckets: Sequence[int]) -> int:
    fits = [int(b) for b in buckets if b >= n]
    return min(fits) if fits else int(n)


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Expected (not worst-case) lengths for a step-time estimate (`--lengths`)."""
    name: str
    prompt: int            # tokens of a prompt, image included
    response: int          # tokens of a response
    judge_answer: int      # tokens the judge generates

    def describe(self, s: "Shapes") -> str:
        return (f"prompts of {self.prompt} tokens (bucket {s.prompt_len}), responses of "
                f"{self.response} (bucket {s.response_len}; the rollout decodes "
                f"{s.rollout_decode_steps} steps), judge prompts in bucket "
                f"{s.judge_prompt_len}, judge answers of {s.judge_decode_steps} tokens")


def lengths_for(spec: str, config, image: Image) -> Lengths | None:
    """--lengths: max (None: the config's maxima, the worst case), typical
    (TYPICAL_PROMPT_TEXT_TOKENS + the image, TYPICAL_RESPONSE_TOKENS,
    TYPICAL_JUDGE_ANSWER_TOKENS) or P,R (prompt and response tokens; typical judge answers)."""
    key = spec.strip().lower()
    if key == "max":
        return None
    if key == "typical":
        return Lengths("typical", TYPICAL_PROMPT_TEXT_TOKENS + image.tokens,
                       TYPICAL_RESPONSE_TOKENS, TYPICAL_JUDGE_ANSWER_TOKENS)
    try:
        prompt, response = (int(x) for x in key.split(","))
    except ValueError:
        raise ValueError(f"--lengths={spec!r}: use max, typical or P,R (prompt and response "
                         "tokens, e.g. 600,300)") from None
    d, r = config.data, config.rollout
    if not image.tokens < prompt <= d.max_prompt_len or not 0 < response <= r.max_new_tokens:
        raise ValueError(f"--lengths={spec}: prompts need more than the image's {image.tokens} "
                         f"tokens and at most data.max_prompt_len={d.max_prompt_len}; "
                         f"responses 1 to rollout.max_new_tokens={r.max_new_tokens}")
    return Lengths(f"{prompt},{response}", prompt, response, TYPICAL_JUDGE_ANSWER_TOKENS)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Global batch sizes and lengths of the step's programs."""
    group: int
    prompt_len: int
    response_len: int
    rollout_prompts: int
    rollout_chunk: int
    judge_prompts: int           # per judge call
    judge_calls: int             # answer() calls per step (score mode: 2)
    judge_chunk: int
    judge_prompt_len: int
    judge_prompt_need: int       # tokens the longest judge prompt needs
    judge_new_tokens: int
    mini_batch_rows: int
    mini_batches: int
    micro_rows: int
    logprob_micro_rows: int
    dp: int
    hosts: int
    rollout_decode_steps: int = 0  # decode loop iterations counted (FLOPs, time)
    judge_decode_steps: int = 0

    def describe(self, config) -> list[str]:
        r, rw, rl = config.rollout, config.reward, config.rl
        out = [f"lengths: prompt {self.prompt_len}, response {self.response_len}; "
               f"G = {self.group}",
               f"rollout: {self.rollout_prompts} prompts in chunks of {self.rollout_chunk} "
               f"(rollout.chunk_size={r.chunk_size}) = {self.rollout_chunk * self.group} rows "
               "per sampler call"]
        if self.judge_prompts:
            out.append(
                f"judge ({rw.judge_mode}, {rw.judge_source}): {self.judge_calls} x "
                f"{self.judge_prompts} prompts in chunks of {self.judge_chunk} "
                f"(reward.judge_chunk_size={rw.judge_chunk_size}), prompt bucket "
                f"{self.judge_prompt_len}" + (f", {self.judge_new_tokens} new tokens"
                                              if rw.judge_mode == "generate" else "") +
                (", whole prompts (reward.judge_share_prefix=False)"
                 if not rw.judge_share_prefix else ", shared prefixes" +
                 (f" where the suffix needs <= {rw.judge_shared_suffix_max} tokens, else whole "
                  "prompts (reward.judge_shared_suffix_max)"
                  if rw.judge_shared_suffix_max else "")))
        es = "es" if self.mini_batches > 1 else ""
        out.append(f"update: {self.mini_batches} mini-batch{es} of {self.mini_batch_rows} "
                   f"responses, micro-batches of {rl.micro_batch_size}/device = "
                   f"{self.micro_rows} rows; reference log-probs "
                   f"{rl.logprob_micro_batch_size}/device = {self.logprob_micro_rows} rows")
        return out


def step_shapes(config, mesh, image: Image, hosts: int, lengths: Lengths | None = None
                ) -> Shapes:
    """The step's shapes at the config's maximum lengths, or at `lengths` (programs padded to
    the buckets those lengths fall in; the sampler's decode programs keep their maximum
    new-token buffers, their loops counted at the expected number of steps)."""
    d, r, rw, rl = config.data, config.rollout, config.reward, config.rl
    g = int(r.group_size)
    dp = sharding.data_parallel_size(mesh)
    response_len = _round_up(r.max_new_tokens if lengths is None else lengths.response,
                             r.response_buckets)
    n_responses = r.batch_size * g
    judge_prompts = judge_calls = 0
    preset = emotion.get_preset(rw.preset)
    if preset.needs_coherence or preset.needs_consistency:
        both = preset.needs_coherence and preset.needs_consistency
        if rw.judge_mode == "generate":      # coherence + consistency prompts in one call
            judge_prompts, judge_calls = n_responses * (2 if both else 1), 1
        else:
            judge_prompts, judge_calls = n_responses, 2 if both else 1
    need = response_len + JUDGE_TEMPLATE_TOKENS + (image.tokens if preset.needs_consistency
                                                   else 0)
    mini_rows = rl.mini_batch_size * g
    return Shapes(
        group=g, prompt_len=_round_up(d.max_prompt_len if lengths is None else lengths.prompt,
                                      d.prompt_buckets),
        response_len=response_len, rollout_prompts=r.batch_size,
        rollout_chunk=min(r.chunk_size or r.batch_size, r.batch_size),
        judge_prompts=judge_prompts, judge_calls=judge_calls,
        judge_chunk=min(rw.judge_chunk_size or judge_prompts, judge_prompts),
        judge_prompt_len=min(_round_up(need, rw.judge_prompt_buckets),
                             max(rw.judge_prompt_buckets)),
        judge_prompt_need=need, judge_new_tokens=int(rw.judge_max_new_tokens),
        mini_batch_rows=mini_rows, mini_batches=max(1, r.batch_size // rl.mini_batch_size),
        micro_rows=batching_lib.micro_batch_rows(rl.micro_batch_size, mesh),
        logprob_micro_rows=batching_lib.micro_batch_rows(rl.logprob_micro_batch_size, mesh),
        dp=dp, hosts=hosts,
        rollout_decode_steps=int(r.max_new_tokens if lengths is None else lengths.response),
        judge_decode_steps=int(rw.judge_max_new_tokens if lengths is None else
                               min(lengths.judge_answer, rw.judge_max_new_tokens)))
