"""Shared helpers for the Qwen2.5-VL tests: HF reference models and HF-processor inputs."""
from __future__ import annotations

import functools

import numpy as np
import skimage.data
import torch
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from emor3_jax.models.config import Qwen2_5_VLConfig

# Small pixel budget: images of a few hundred patches, still several 8x8-patch windows each.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 40


def hf_model(cfg: Qwen2_5_VLConfig, seed: int = 0, gain: float = 1.0, embed_std: float = 1.0
             ) -> Qwen2_5_VLForConditionalGeneration:
    """A transformers model with our config and unit-gain random weights (std gain/sqrt(fan_in);
    HF's std-0.02 init gives near-zero logits that would hide mistakes), norms around 1, tied
    embeddings scaled so logits are ~N(0, embed_std^2). Larger gains make the random network
    chaotic (fp32 rounding gets amplified layer by layer)."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(HFConfig(**cfg.to_hf_dict())).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:  # tied head: logits ~ N(0, embed_std^2) at any width
                p.copy_(noise * embed_std / p.shape[1] ** 0.5)
            else:
                p.copy_(noise * gain / p[0].numel() ** 0.5)
    return model


@functools.lru_cache(maxsize=None)
def _photos():
    return {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea(),
            "coffee": skimage.data.coffee()}


def images(specs) -> tuple[np.ndarray, np.ndarray]:
    """specs: list of (photo name, (height, width) crop) -> (pixel_values, image_grid_thw)."""
    proc = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ims = [_photos()[name][:h, :w] for name, (h, w) in specs]
    out = proc(images=ims, return_tensors="np")
    return out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)


def chat_row(cfg: Qwen2_5_VLConfig, rng, pieces, grids) -> list[int]:
    """Qwen2.5-VL chat layout: ints = that many random text tokens, "img" = the next image as
    <|vision_start|> + n x <|image_pad|> + <|vision_end|>, n = t*h*w/4."""
    row, grids = [], list(grids)
    for piece in pieces:
        if piece == "img":
            t, h, w = grids.pop(0)
            n = int(t * h * w) // cfg.vision.merge_unit
            row += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
        else:
            row += rng.integers(0, cfg.text.vocab_size - 8, piece).tolist()
    return row


def left_pad(rows, pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    length = length or max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def hf_logits(model, cfg: Qwen2_5_VLConfig, ids, mask, pixel_values=None, grid=None) -> np.ndarray:
    kw = {}
    if pixel_values is not None:
        kw = dict(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long), **kw)
    return out.logits.float().numpy()


def max_diff_valid(a, b, mask) -> float:
    m = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(a)[m] - np.asarray(b)[m]).max())
