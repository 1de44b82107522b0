"""Typed prompt batches: every array field has one entry per prompt row.

Taking rows, joining batches and sharding them are tree operations (`jax.tree.map` over the
fields), and a row's images are found in one place (`PromptBatch.row_images`), so no consumer
re-derives patch offsets from a cumulative sum of grids. Host numpy throughout; the jitted
programs see the arrays the sampler and the update pack from it.

Fields (B rows, shapes static per bucket):
    input_ids        [B, L] int32     left-padded prompt tokens
    attention_mask   [B, L] int32     1 on prompt tokens
    position_ids     [B, 3, L] int32  mRoPE positions, row-leading (`mrope_positions` gives
                                      HF's [3, B, L]); 0 on pads
    rope_deltas      [B] int32        per-row decode delta (processing.rope_index)
    pixel_values     [B, P, D] f32    the row's image patches in token order, then zero rows
    image_grid_thw   [B, I, 3] int32  (t, h, w) of the row's images in token order, then zero
                                      rows (a text-only row has none)
    label, epoch     [B] int32        class index / epoch drawn (-1 on filler rows)
    label_text, problem, example_id, caption  [B] object  ("" on filler rows)
    valid            [B] bool         False on filler rows (they reach no loss or metric)
    labels_of_dataset tuple[str]      (static) the data set's label names
    num_skipped      int              (static) examples the pipeline skipped for this batch
Metadata fields are None when a batch has none (a batch built by hand for the sampler or the
update); `None` leaves drop out of every tree operation.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import struct

from emor3_jax import patches as patch_lib


@struct.dataclass
class PromptBatch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    rope_deltas: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    valid: np.ndarray | None = None
    label: np.ndarray | None = None
    label_text: np.ndarray | None = None
    problem: np.ndarray | None = None
    example_id: np.ndarray | None = None
    caption: np.ndarray | None = None
    epoch: np.ndarray | None = None
    labels_of_dataset: tuple = struct.field(pytree_node=False, default=())
    num_skipped: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(cls, input_ids, attention_mask, position_ids, rope_deltas=None,
               images: Sequence[Sequence[tuple[np.ndarray, Sequence[int]]]] | None = None,
               **fields) -> "PromptBatch":
        """A batch from HF-layout arrays (position_ids [3, B, L]) and each row's images as
        (pixel rows [n, D], (t, h, w)) pairs in token order; `valid` defaults to all rows.
        rope_deltas None: positions continue after the row's last position."""
        input_ids = np.asarray(input_ids, np.int32)
        attention_mask = np.asarray(attention_mask, np.int32)
        positions = np.moveaxis(np.asarray(position_ids, np.int32), 0, 1)
        b = input_ids.shape[0]
        if positions.shape != (b, 3, input_ids.shape[1]) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"PromptBatch: attention_mask {attention_mask.shape} and "
                             f"position_ids {np.shape(position_ids)} must be [B, L] and "
                             f"[3, B, L] for input_ids {input_ids.shape}")
        if rope_deltas is None:
            rope_deltas = positions.max(axis=(1, 2)) + 1 - attention_mask.sum(1)
        pixels, grids = pack_row_images(images if images is not None else [[]] * b)
        fields.setdefault("valid", np.ones(b, bool))
        return cls(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   rope_deltas=np.asarray(rope_deltas, np.int32), pixel_values=pixels,
                   image_grid_thw=grids, **fields)

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def mrope_positions(self) -> np.ndarray:
        """[3, B, L] position ids, HF's layout (what the model and the sampler take)."""
        return np.moveaxis(self.position_ids, 1, 0)

    @property
    def has_images(self) -> bool:
        return self.image_grid_thw is not None and bool(self.image_grid_thw.any())

    @property
    def num_patches(self) -> np.ndarray:
        """[B] real patch rows of each row's images."""
        if self.image_grid_thw is None:
            return np.zeros(self.num_rows, np.int64)
        return np.prod(self.image_grid_thw.astype(np.int64), -1).sum(-1)

    @property
    def row_valid(self) -> np.ndarray:
        return np.ones(self.num_rows, bool) if self.valid is None else np.asarray(self.valid, bool)

    # -- images: the one place patch offsets are computed --------------------------------------
    def row_images(self, row: int) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """Row `row`'s images in token order: (pixel rows [t*h*w, D], (t, h, w)) each."""
        if self.image_grid_thw is None:
            return []
        out, start = [], 0
        for g in self.image_grid_thw[row]:
            n = int(np.prod(g))
            if n == 0:
                break
            out.append((self.pixel_values[row, start:start + n], tuple(int(x) for x in g)))
            start += n
        return out

    def flat_images(self, rows: Sequence[int] | None = None
                    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """HF's layout of the images of `rows` (default all): pixel rows concatenated in row and
        token order [sum t*h*w, D] and their grids [n_images, 3]; (None, None) without images."""
        rows = range(self.num_rows) if rows is None else rows
        images = [im for r in rows for im in self.row_images(int(r))]
        if not images:
            return None, None
        return (patch_lib.concatenate([p for p, _ in images]),
                np.asarray([g for _, g in images], np.int64))

    # -- tree operations -----------------------------------------------------------------------
    def take(self, index: Sequence[int]) -> "PromptBatch":
        """The rows `index` (every row-aligned field follows)."""
        index = np.asarray(index, np.int64)
        return jax.tree.map(lambda x: x[index] if isinstance(x, patch_lib.DevicePatches)
                            else np.asarray(x)[index], self)

    def padded(self, width: int | None = None, patches: int | None = None,
               images: int | None = None) -> "PromptBatch":
        """Left-padded to `width` tokens (pads: id of this batch's pads, mask 0, position 0),
        image rows zero-padded to `patches` pixel rows and `images` grids (None: unchanged;
        never narrower than now)."""
        out = {}
        pad = (width or self.width) - self.width
        if pad < 0:
            raise ValueError(f"cannot pad a batch of width {self.width} to {width}")
        if pad:
            pads = self.attention_mask == 0
            pad_id = int(self.input_ids[pads][0]) if pads.any() else 0
            out["input_ids"] = np.pad(self.input_ids, ((0, 0), (pad, 0)), constant_values=pad_id)
            out["attention_mask"] = np.pad(self.attention_mask, ((0, 0), (pad, 0)))
            out["position_ids"] = np.pad(self.position_ids, ((0, 0), (0, 0), (pad, 0)))
        if self.pixel_values is not None:
            extra = (patches or 0) - self.pixel_values.shape[1]
            if extra > 0:
                out["pixel_values"] = patch_lib.pad_rows(self.pixel_values, ((0, 0), (0, extra)))
        if self.image_grid_thw is not None:
            extra = (images or 0) - self.image_grid_thw.shape[1]
            if extra > 0:
                out["image_grid_thw"] = np.pad(self.image_grid_thw, ((0, 0), (0, extra), (0, 0)))
        return self.replace(**out) if out else self

    def trimmed(self) -> "PromptBatch":
        """Pixel rows cut to the widest row's real patches (what crosses hosts)."""
        if self.pixel_values is None:
            return self
        return self.replace(pixel_values=self.pixel_values[:, :int(self.num_patches.max(
            initial=0))])


def concat_prompt_batches(batches: Sequence[PromptBatch]) -> PromptBatch:
    """One batch of `batches`' rows in order: each left-padded to the widest and its image rows
    to the largest; skip counts add up."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.width for b in batches)
    patches = max((b.pixel_values.shape[1] for b in batches if b.pixel_values is not None),
                  default=None)
    images = max((b.image_grid_thw.shape[1] for b in batches if b.image_grid_thw is not None),
                 default=None)
    parts = [b.padded(width, patches, images) for b in batches]
    return jax.tree.map(lambda *xs: patch_lib.concatenate(xs), *parts).replace(
        num_skipped=sum(b.num_skipped for b in batches))


def pack_row_images(images: Sequence[Sequence[tuple[np.ndarray, Sequence[int]]]],
                    patches: int | None = None, dim: int | None = None
                    ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-row image lists -> (pixel_values [B, P, D], image_grid_thw [B, I, 3]), P at least
    `patches`; (None, None) when no row has an image and `dim` is None."""
    b = len(images)
    n_images = max((len(x) for x in images), default=0)
    dims = {np.shape(p)[1] for row in images for p, _ in row}
    if len(dims) > 1:
        raise ValueError(f"row images have different patch widths {sorted(dims)}")
    dim = dims.pop() if dims else dim
    if dim is None:
        return None, None
    per_row = [sum(int(np.prod(g)) for _, g in row) for row in images]
    pixels = np.zeros((b, max([patches or 0, *per_row, 0]), dim), np.float32)
    grids = np.zeros((b, n_images, 3), np.int32)
    for r, row in enumerate(images):
        start = 0
        for i, (p, g) in enumerate(row):
            n = int(np.prod(g))
            if np.shape(p)[0] != n:
                raise ValueError(f"row {r} image {i}: {np.shape(p)[0]} pixel rows for grid "
                                 f"{tuple(g)} (t*h*w = {n})")
            pixels[r, start:start + n] = p
            grids[r, i] = g
            start += n
    return pixels, grids


def split_flat_images(pixel_values, image_grid_thw, images_per_row: Sequence[int]
                      ) -> list[list[tuple[np.ndarray, tuple[int, int, int]]]]:
    """HF's flat layout (patches concatenated, grids [n, 3]) -> per-row image lists, row r
    taking the next `images_per_row[r]` images (the inverse of `PromptBatch.flat_images`)."""
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    if sum(images_per_row) != len(grid):
        raise ValueError(f"{len(grid)} images for rows that take {sum(images_per_row)}")
    pixels = np.asarray(pixel_values)
    out, image, start = [], 0, 0
    for count in images_per_row:
        row = []
        for g in grid[image:image + count]:
            n = int(np.prod(g))
            if start + n > pixels.shape[0]:
                raise ValueError(f"pixel_values has {pixels.shape[0]} rows; the grids need more")
            row.append((pixels[start:start + n], tuple(int(x) for x in g)))
            start += n
        image += count
        out.append(row)
    return out
