"""Host-side (numpy) index arrays for the Qwen2.5-VL vision tower, with static padded shapes.

HF's vision tower (transformers `vision_utils.get_vision_window_index` and friends) reorders
the patches of all images so every attention window is a contiguous run ("window order"),
runs window attention in most blocks and per-frame full attention in `fullatt_block_indexes`,
merges 2x2 patches, and finally un-permutes the merged tokens. Those lengths are data
dependent, so the device code gets them as gather indices built here:

- `patch_order` [P]: pixel row (HF patch order) feeding each window-order slot.
- `rotary_pos` [P, 2]: (h, w) patch coordinates of each window-order slot (HF position ids,
  permuted the same way, i.e. the rotary tables follow the hidden states).
- `window_index`/`window_valid` [n_windows, window_len]: the window-order slots of each window;
  `window_slot` [P]: where slot p sits in the flattened [n_windows * window_len] layout.
- `frame_index`/`frame_valid`/`frame_slot`: the same for full attention (one group per frame).
- `merged_order` [P / merge_unit]: window-order merged token feeding each HF-order merged token.
- `patch_valid` [P]: real (not padding) patches; lets the backward pass of the group gathers be
  a gather too (each real patch sits in exactly one slot), instead of a scatter-add.

Attention then gathers [groups, group_len, heads, head_dim], so memory scales with the window
and image sizes rather than with (all patches)^2. Padding: P, the number of windows/frames and
the frame length can be rounded up to caller-chosen buckets, so a training run compiles a few
programs; padded slots are masked out and padded patches never reach the text model.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import numpy as np

from emor3_jax import patches as patch_lib


@flax.struct.dataclass
class VisionInputs:
    """Device inputs of the vision tower besides `pixel_values` (all int32/bool numpy or jax)."""
    patch_order: np.ndarray     # [P] int32
    rotary_pos: np.ndarray      # [P, 2] int32
    window_index: np.ndarray    # [n_windows, window_len] int32
    window_valid: np.ndarray    # [n_windows, window_len] bool
    window_slot: np.ndarray     # [P] int32
    frame_index: np.ndarray     # [n_frames, frame_len] int32
    frame_valid: np.ndarray     # [n_frames, frame_len] bool
    frame_slot: np.ndarray      # [P] int32
    merged_order: np.ndarray    # [P // merge_unit] int32
    patch_valid: np.ndarray     # [P] bool (False for padding)

    @property
    def num_patches(self) -> int:
        """Padded patch count P (pixel_values must have this many rows)."""
        return self.patch_order.shape[0]


def round_up(n: int, buckets: Sequence[int] | int | None) -> int:
    """Smallest bucket >= n (a list of sizes), or n rounded up to a multiple (an int)."""
    if buckets is None:
        return n
    if isinstance(buckets, (int, np.integer)):
        return -(-n // int(buckets)) * int(buckets) if buckets > 0 else n
    fits = [b for b in sorted(buckets) if b >= n]
    if not fits:
        raise ValueError(f"size {n} exceeds the largest bucket {max(buckets)}; add a larger "
                         "bucket or drop the example")
    return fits[0]


def _check_grid(grid_thw, spatial_merge_size: int) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (grid <= 0).any():
        raise ValueError(f"image_grid_thw has non-positive entries: {grid.tolist()}")
    if (grid[:, 1:] % spatial_merge_size).any():
        raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of "
                         f"spatial_merge_size={spatial_merge_size}")
    return grid


def vision_position_ids(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """[N, 2] (h, w) patch coordinates in HF patch order (merge-block-major), as HF."""
    grid = _check_grid(grid_thw, spatial_merge_size)
    m = spatial_merge_size
    out = []
    for t, h, w in grid:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], -1), (t, 1)))
    return np.concatenate(out, 0).astype(np.int32)


def window_index(grid_thw, *, spatial_merge_size: int = 2, window_size: int = 112,
                 patch_size: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """HF `get_vision_window_index`: (merged-token permutation [M], cu_window_seqlens in patches)."""
    grid = _check_grid(grid_thw, spatial_merge_size)
    ws = window_size // spatial_merge_size // patch_size
    unit = spatial_merge_size ** 2
    perm, cu, offset = [], [0], 0
    for t, h, w in grid:
        lh, lw = h // spatial_merge_size, w // spatial_merge_size
        nwh, nww = -(-lh // ws), -(-lw // ws)
        idx = np.full((t, nwh * ws, nww * ws), -1, np.int64)
        idx[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        idx = idx.reshape(t, nwh, ws, nww, ws).transpose(0, 1, 3, 2, 4).reshape(t * nwh * nww, -1)
        for win in idx:
            win = win[win >= 0]
            if len(win):
                perm.append(win + offset)
                cu.append(cu[-1] + len(win) * unit)
        offset += t * lh * lw
    return np.concatenate(perm).astype(np.int32), np.asarray(cu, np.int32)


def frame_seqlens(grid_thw) -> np.ndarray:
    """Patches per full-attention segment: one segment per frame, h*w patches (HF cu_seqlens)."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])


def _groups(lengths: np.ndarray, n_groups: int, group_len: int, num_patches: int, what: str):
    """Gather layout for contiguous runs of the given lengths (in window order)."""
    if len(lengths) > n_groups:
        raise ValueError(f"{len(lengths)} {what}s do not fit the padded count {n_groups}")
    if len(lengths) and lengths.max() > group_len:
        raise ValueError(f"a {what} of {lengths.max()} patches does not fit {what}_len={group_len}")
    index = np.zeros((n_groups, group_len), np.int32)
    valid = np.zeros((n_groups, group_len), bool)
    slot = np.zeros((num_patches,), np.int32)
    start = 0
    for g, n in enumerate(lengths):
        index[g, :n] = np.arange(start, start + n)
        valid[g, :n] = True
        slot[start:start + n] = g * group_len + np.arange(n)
        start += n
    return index, valid, slot


@dataclasses.dataclass(frozen=True)
class VisionPadding:
    """Padded sizes for `build_vision_inputs`: None = exact; an int = round up to a multiple;
    a list = smallest bucket that fits. Choose buckets so a run compiles few programs."""
    num_patches: Sequence[int] | int | None = None
    num_windows: Sequence[int] | int | None = None
    num_frames: Sequence[int] | int | None = None
    frame_len: Sequence[int] | int | None = None


def _padded(n: int, buckets, field: str) -> int:
    try:
        return round_up(n, buckets)
    except ValueError as e:
        raise ValueError(f"VisionPadding.{field}: {e}") from None


def build_vision_inputs(grid_thw, *, patch_size: int = 14, spatial_merge_size: int = 2,
                        window_size: int = 112, padding: VisionPadding = VisionPadding()
                        ) -> VisionInputs:
    """All index arrays the vision tower needs for the images in `grid_thw` ([n_images, 3])."""
    grid = _check_grid(grid_thw, spatial_merge_size)
    if not len(grid):
        raise ValueError("image_grid_thw is empty: for a batch without images pass "
                         "pixel_values=None and no VisionInputs")
    unit = spatial_merge_size ** 2
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    p = _padded(n, padding.num_patches, "num_patches")
    if p % unit:
        raise ValueError(f"padded patch count {p} must be a multiple of {unit} (merge unit)")
    merged_perm, cu_win = window_index(grid, spatial_merge_size=spatial_merge_size,
                                       window_size=window_size, patch_size=patch_size)
    patch_order = np.arange(p, dtype=np.int32)  # padded slots read (zero) padded pixel rows
    patch_order[:n] = (merged_perm[:, None] * unit + np.arange(unit)).reshape(-1)
    pos = np.zeros((p, 2), np.int32)
    pos[:n] = vision_position_ids(grid, spatial_merge_size)[patch_order[:n]]

    win_lens = np.diff(cu_win)
    window_len = (window_size // patch_size) ** 2
    w_index, w_valid, w_slot = _groups(win_lens, _padded(len(win_lens), padding.num_windows,
                                                         "num_windows"),
                                       window_len, p, "window")
    f_lens = frame_seqlens(grid)
    f_len = _padded(int(f_lens.max()), padding.frame_len, "frame_len")
    f_index, f_valid, f_slot = _groups(f_lens, _padded(len(f_lens), padding.num_frames,
                                                       "num_frames"),
                                       f_len, p, "frame")
    merged_order = np.arange(p // unit, dtype=np.int32)
    merged_order[:n // unit] = np.argsort(merged_perm, kind="stable")
    return VisionInputs(patch_order=patch_order, rotary_pos=pos, window_index=w_index,
                        window_valid=w_valid, window_slot=w_slot, frame_index=f_index,
                        frame_valid=f_valid, frame_slot=f_slot, merged_order=merged_order,
                        patch_valid=np.arange(p) < n)


def build_vision_inputs_for(config, grid_thw, padding: VisionPadding = VisionPadding()
                            ) -> VisionInputs:
    """`build_vision_inputs` with the geometry of a model config (`Qwen2_5_VLConfig`)."""
    v = config.vision
    return build_vision_inputs(grid_thw, patch_size=v.patch_size,
                               spatial_merge_size=v.spatial_merge_size,
                               window_size=v.window_size, padding=padding)


def pad_pixel_values(pixel_values, num_patches: int):
    """Zero rows up to the padded patch count of `VisionInputs.num_patches` (numpy, or a
    `patches.DevicePatches` view)."""
    n = pixel_values.shape[0]
    if n > num_patches:
        raise ValueError(f"pixel_values has {n} patch rows, more than the padded {num_patches}")
    if n == num_patches:
        return pixel_values
    return patch_lib.pad_rows(pixel_values, [(0, num_patches - n)])


def num_image_tokens(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """LLM tokens per image: t*h*w / merge^2."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return grid.prod(-1) // spatial_merge_size ** 2
