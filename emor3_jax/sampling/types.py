"""The sampler's typed boundary: what goes in (`Prompts`, `SamplingSettings`) and what comes out
(`Samples`).

    settings = SamplingSettings.for_ids(ids, max_new_tokens=256, num_samples=8, temperature=1.0)
    samples = sampler.generate(params, batch, settings, rng=key)  # batch: PromptBatch or Prompts

One settings value per call site (the rollout's, the evaluation's, the judge's), built once from
the config and the tokenizer's ids, instead of a dozen keyword arguments spelled out at every call.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Prompts as the sampler reads them (host numpy, Hugging Face's names and layouts).

    input_ids/attention_mask [B, L] left-padded; pixel_values [P, patch_dim] (every prompt's
    patches in row order, extra zero rows allowed) with image_grid_thw [n_images, 3];
    position_ids [3, B, L] / rope_deltas [B] from the data pipeline, else computed by the
    sampler. row_images: prompts sharing images (image_grid_thw then lists the distinct images
    and row_images[b] the ones prompt b shows, see `packing.images_per_row`). row_ids: the
    random stream of each prompt (default its row; sample g of prompt b draws from stream
    row_ids[b] * num_samples + g), so a prompt's samples do not depend on the chunk or the
    order it runs in.
    """
    input_ids: np.ndarray
    attention_mask: np.ndarray | None = None
    pixel_values: object | None = None          # np.ndarray or patches.DevicePatches
    image_grid_thw: np.ndarray | None = None
    position_ids: np.ndarray | None = None
    rope_deltas: np.ndarray | None = None
    row_images: Sequence[Sequence[int]] | None = None
    row_ids: Sequence[int] | None = None

    @property
    def num_rows(self) -> int:
        return int(np.shape(self.input_ids)[0])


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How to sample: each call site builds one (`for_ids` fills in the tokenizer's ids).

    eos_token_ids: any of them ends a row (None: the model config's eos);
    forbidden_token_ids: never sampled (nor are the vision special tokens, listed or not);
    valid_vocab_size: ids >= it are never sampled (a tokenizer smaller than the LM head).
    share_prefix: prefill each group's common prefix once (sampler.py's docstring), except for
    groups whose suffix needs more than shared_suffix_max tokens (0: no limit), which run whole.
    """
    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] | None = None
    forbidden_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    valid_vocab_size: int | None = None
    share_prefix: bool = False
    shared_suffix_max: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"temperature={self.temperature}, top_p={self.top_p}, "
                             f"top_k={self.top_k}")
        if self.shared_suffix_max < 0:
            raise ValueError(f"shared_suffix_max must be >= 0 (0 = no limit), got "
                             f"{self.shared_suffix_max}")
        for name in ("eos_token_ids", "forbidden_token_ids"):
            ids = getattr(self, name)
            if ids is not None:
                object.__setattr__(self, name, tuple(int(i) for i in ids))

    @classmethod
    def for_ids(cls, ids, **settings) -> "SamplingSettings":
        """Settings that end, forbid, pad and bound the vocabulary as the tokenizer's `ids`
        (processing.tokenizer.TokenIds) say."""
        return cls(eos_token_ids=ids.eos, forbidden_token_ids=ids.forbidden,
                   pad_token_id=ids.pad, valid_vocab_size=ids.vocab_size, **settings)


@dataclasses.dataclass(frozen=True)
class Samples:
    """Host (numpy) results, rows prompt-major (b*G + g)."""
    tokens: np.ndarray      # [B*G, T] int32, pad id after the end
    logprobs: np.ndarray    # [B*G, T] float32 policy log-probs of the sampled tokens, 0 after
    lengths: np.ndarray     # [B*G] int32 generated tokens incl. the EOS that ended the row

    def response(self, row: int) -> np.ndarray:
        return self.tokens[row, :self.lengths[row]]
