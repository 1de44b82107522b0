"""Host-side (numpy) 3-row mRoPE position ids for Qwen2.5-VL, with HF `get_rope_index` semantics.

Text tokens get the same position on all three rows (temporal, height, width) and advance by
one; the tokens of an image (t, h, w patches -> t x h/2 x w/2 LLM tokens) get
(start + t_idx, start + h_idx, start + w_idx), and the text after it resumes at
start + max(h, w)/2. Padding (attention_mask 0) is skipped: real tokens of a left-padded row
start at 0, and pad positions hold 0 as in HF.

Decoding continues from `deltas`: the token at valid index i (0-based over non-pad tokens,
prompt and response together) has position i + delta on all three rows; the first generated
token therefore sits at (last prompt position + 1).
"""
from __future__ import annotations

import numpy as np


def get_rope_index(input_ids, image_grid_thw=None, attention_mask=None, *, image_token_id: int,
                   vision_start_token_id: int | None = None, spatial_merge_size: int = 2
                   ) -> tuple[np.ndarray, np.ndarray]:
    """mRoPE position ids [3, B, L] (int32) and decode deltas [B] (int32).

    `image_grid_thw` [n_images, 3] lists the images of the whole batch in row-major token
    order (as the HF processor returns them). Image tokens are `input_ids == image_token_id`;
    each run of them is one image and must hold exactly t*h*w/merge^2 tokens (as in HF, where
    the chat layout puts <|vision_start|>/<|vision_end|> around every image). If `vision_start_token_id` is
    given, every image run must follow that token (a cheap check that the prompt is well formed).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    b, length = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    grids = (np.zeros((0, 3), np.int64) if image_grid_thw is None
             else np.asarray(image_grid_thw, np.int64).reshape(-1, 3))
    m = spatial_merge_size
    positions = np.zeros((3, b, length), np.int64)
    deltas = np.zeros((b,), np.int64)
    next_image = 0
    for row in range(b):
        row_ids = ids[row][mask[row]]
        is_image = row_ids == image_token_id
        n = len(row_ids)
        pos = np.zeros((3, n), np.int64)
        cur, i = 0, 0
        while i < n:
            if not is_image[i]:
                j = i
                while j < n and not is_image[j]:
                    j += 1
                pos[:, i:j] = np.arange(j - i) + cur
                cur += j - i
                i = j
                continue
            if next_image >= len(grids):
                raise ValueError(f"row {row}: more image-token runs than the {len(grids)} "
                                 "images in image_grid_thw")
            if vision_start_token_id is not None and (i == 0 or row_ids[i - 1] != vision_start_token_id):
                raise ValueError(f"row {row}: image tokens at valid index {i} do not follow "
                                 f"<|vision_start|> (id {vision_start_token_id})")
            t, h, w = (int(x) for x in grids[next_image])
            lt, lh, lw = t, h // m, w // m
            count = lt * lh * lw
            run = int(np.argmin(np.append(is_image[i:], False)))
            if run != count:
                raise ValueError(f"row {row}: image {next_image} with grid {(t, h, w)} needs "
                                 f"{count} image tokens but the run at valid index {i} has {run}")
            tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
            pos[:, i:i + count] = np.stack([tt, hh, ww]).reshape(3, -1) + cur
            cur += max(h, w) // m
            i += count
            next_image += 1
        positions[:, row, mask[row]] = pos
        deltas[row] = (pos.max() + 1 - n) if n else 0
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw lists {len(grids)} images but the prompts hold "
                         f"{next_image} image-token runs")
    return positions.astype(np.int32), deltas.astype(np.int32)


def text_position_ids(attention_mask) -> np.ndarray:
    """Positions of a batch without images: [3, B, L], counting only non-pad tokens (pads 0)."""
    mask = np.asarray(attention_mask) != 0
    pos = np.where(mask, np.cumsum(mask, -1) - 1, 0)
    return np.broadcast_to(pos[None], (3,) + pos.shape).astype(np.int32)


def decode_position_ids(deltas, valid_index) -> np.ndarray:
    """[3, B, 1] positions of the token at valid index `valid_index` ([B] or scalar): i + delta.

    Works with numpy or jax arrays (pure arithmetic), so a jitted decode loop can call it.
    """
    pos = (valid_index + deltas).reshape(1, -1, 1)
    return pos.repeat(3, axis=0)


def next_positions(position_ids) -> np.ndarray:
    """[B] position of the first generated token: last (max) prompt position + 1."""
    return np.asarray(position_ids).max(axis=(0, 2)) + 1
