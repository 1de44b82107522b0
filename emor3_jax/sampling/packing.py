"""Host-side packing for the sampler: numpy in, bucketed device-shaped numpy out.

Kept apart from the compiled programs so the chunking, bucketing and prefix-sharing rules can
be read (and tested) without jax tracing; sampler.py's docstring describes the flow.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Sequence

import flax.struct
import jax
import numpy as np

from emor3_jax import patches as patch_lib
from emor3_jax.processing import rope_index
from emor3_jax.processing import vision as vision_lib

Buckets = Sequence[int] | int | None


@dataclasses.dataclass
class Chunk:
    """One chunk's device inputs (host numpy, static bucketed shapes)."""
    input_ids: np.ndarray       # [Bc, Lb] int32
    attention_mask: np.ndarray  # [Bc, Lb] int32
    position_ids: np.ndarray    # [3, Bc, Lb] int32
    next_pos: np.ndarray        # [Bc] int32
    row_valid: np.ndarray       # [Bc] bool
    pixel_values: np.ndarray | None       # [P, patch_dim]: each distinct image once, padded
    vision_inputs: vision_lib.VisionInputs | None
    image_slot: np.ndarray | None          # [Bc, Lb] int32: merged image token per position, -1
    num_real: int               # real prompts in this chunk


@dataclasses.dataclass
class SuffixChunk:
    """A share_prefix chunk: its prefixes (a Chunk) and the M suffix rows per prefix."""
    prefix: Chunk
    input_ids: np.ndarray       # [Bc*M, Ls] int32, left-padded
    attention_mask: np.ndarray  # [Bc*M, Ls] int32
    positions: np.ndarray       # [Bc*M, Ls] int32 (text tokens: one mRoPE row)
    next_pos: np.ndarray        # [Bc*M] int32
    row_valid: np.ndarray       # [Bc*M] bool
    rows: np.ndarray            # [Bc*M] int: the caller's row of each suffix row, -1 = filler


@flax.struct.dataclass
class ContinuationTrie:
    """The score program's continuations as a token tree (`continuation_trie`): node i is a
    distinct proper prefix of some continuation, fed as its last token at depth[i]."""
    first: jax.Array      # [C] int32 first token of each continuation (scored from the prompt)
    nodes: jax.Array      # [S] int32 last token of each node's prefix (pad on filler nodes)
    depth: jax.Array      # [S] int32 its position after the prompt (0-based)
    visible: jax.Array    # [S, S] bool: node i sees node j (j's prefix is a prefix of i's)
    node_of: jax.Array    # [C, W] int32: the node whose output predicts token k+1 of c
    target: jax.Array     # [C, W] int32: token k+1 of c
    used: jax.Array       # [C, W] bool: k+1 < len(c)


def round_to(n: int, buckets: Buckets, what: str) -> int:
    """n rounded up to `buckets` (SamplerBuckets.<what>, named in the error)."""
    try:
        return vision_lib.round_up(n, buckets)
    except ValueError as e:
        raise ValueError(f"SamplerBuckets.{what}: {e}") from None


def continuation_trie(continuations: Sequence[Sequence[int]], pad: int,
                      buckets: Buckets = None) -> ContinuationTrie:
    """Host (numpy) trie of continuations; nodes padded to `buckets` with filler nodes that
    see only themselves."""
    index: dict[tuple[int, ...], int] = {}
    for cont in continuations:
        for k in range(1, len(cont)):
            index.setdefault(tuple(cont[:k]), len(index))
    n = round_to(len(index), buckets, "new_tokens_score") if index else 0
    nodes, depth = np.full((n,), pad, np.int32), np.zeros((n,), np.int32)
    visible = np.eye(n, dtype=bool)
    for prefix, i in index.items():
        nodes[i], depth[i] = prefix[-1], len(prefix) - 1
        for k in range(1, len(prefix)):
            visible[i, index[prefix[:k]]] = True
    c, w = len(continuations), max(1, max(map(len, continuations)) - 1)
    node_of, target = np.zeros((c, w), np.int32), np.zeros((c, w), np.int32)
    used = np.zeros((c, w), bool)
    for j, cont in enumerate(continuations):
        for k in range(1, len(cont)):
            node_of[j, k - 1], target[j, k - 1], used[j, k - 1] = index[tuple(cont[:k])], \
                cont[k], True
    return ContinuationTrie(np.asarray([cont[0] for cont in continuations], np.int32), nodes,
                            depth, visible, node_of, target, used)


def grid_of(image_grid_thw) -> np.ndarray:
    return (np.zeros((0, 3), np.int64) if image_grid_thw is None
            else np.asarray(image_grid_thw, np.int64).reshape(-1, 3))


def padded_ids(ids: Sequence[int], multiple: int = 4) -> np.ndarray:
    """ids padded with -1 (matches no token) to a multiple of 4: no recompile per EOS count."""
    n = max(multiple, -(-len(ids) // multiple) * multiple)
    out = np.full((n,), -1, np.int32)
    out[:len(ids)] = ids
    return out


def config_eos(config) -> tuple[int, ...]:
    eos = config.text.eos_token_id
    if eos is None:
        return ()
    return tuple(int(i) for i in eos) if isinstance(eos, (tuple, list)) else (int(eos),)


def pad_of(config) -> int:
    if config.text.pad_token_id is not None:
        return int(config.text.pad_token_id)
    eos = config_eos(config)
    return eos[0] if eos else 0


def chunk_rows(chunk: int, buckets, data_parallel: int) -> int:
    """Prompt rows of a chunk program: `chunk` prompts bucketed (buckets.num_prompts), then a
    multiple of the data-parallel size (filler rows pad it)."""
    rows = round_to(chunk, buckets.num_prompts, "num_prompts")
    return -(-rows // data_parallel) * data_parallel


def images_per_row(config, input_ids, attention_mask, image_grid_thw, row_images=None
                   ) -> list[list[int]]:
    """Per prompt: indices (into image_grid_thw) of its images in token order.

    Default (HF layout): image_grid_thw lists every prompt's images in row order, each used
    once. With `row_images`, image_grid_thw lists distinct images and row_images[r] says
    which ones prompt r shows (the same image may serve many prompts, e.g. the judge's
    G consistency prompts of one rollout image: its vision tower then runs once per chunk).
    """
    c = config
    n_rows = input_ids.shape[0]
    counts = ((input_ids == c.image_token_id) & (attention_mask != 0)).sum(1)
    if image_grid_thw is None:
        if counts.any():
            raise ValueError(f"input_ids hold {int(counts.sum())} image tokens but no "
                             "image_grid_thw/pixel_values were given")
        return [[] for _ in range(n_rows)]
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    tokens = vision_lib.num_image_tokens(grid, c.vision.spatial_merge_size)
    if row_images is not None:
        if len(row_images) != n_rows:
            raise ValueError(f"row_images has {len(row_images)} entries for {n_rows} prompts")
        out = [[int(i) for i in imgs] for imgs in row_images]
        for r, imgs in enumerate(out):
            if any(not 0 <= i < len(grid) for i in imgs):
                raise ValueError(f"row_images[{r}] = {imgs} refers to images outside "
                                 f"image_grid_thw ({len(grid)} images)")
            if int(tokens[imgs].sum()) != int(counts[r]):
                raise ValueError(f"prompt {r} holds {int(counts[r])} image tokens but its "
                                 f"images {imgs} need {int(tokens[imgs].sum())}")
        return out
    out, img = [], 0
    for r in range(n_rows):
        first, need = img, int(counts[r])
        while need > 0 and img < len(grid):
            need -= int(tokens[img])
            img += 1
        if need != 0:
            raise ValueError(f"prompt {r}: {int(counts[r])} image tokens do not match the "
                             f"images left in image_grid_thw (rows {first}..{img}); "
                             "image_grid_thw must list every prompt's images in row order")
        out.append(list(range(first, img)))
    if img != len(grid):
        raise ValueError(f"image_grid_thw lists {len(grid)} images but the prompts hold "
                         f"image tokens for {img}")
    return out


def positions(config, rows, input_ids, attention_mask, position_ids, rope_deltas, all_grid,
              images) -> tuple[np.ndarray, np.ndarray]:
    """mRoPE positions [3, n, L] of `rows` and the position of their first new token [n]:
    the caller's, or processing.rope_index's."""
    c = config
    ids, mask = input_ids[rows], attention_mask[rows]
    n_valid = (mask != 0).sum(1)
    if position_ids is None:
        grid = all_grid[[i for r in rows for i in images[r]]]   # occurrences, row-major
        pos, deltas = rope_index.get_rope_index(
            ids, grid if len(grid) else None, mask, image_token_id=c.image_token_id,
            spatial_merge_size=c.vision.spatial_merge_size)
        return pos, n_valid + deltas
    pos = np.asarray(position_ids)[:, rows]
    if rope_deltas is not None:
        return pos, n_valid + np.asarray(rope_deltas).reshape(-1)[rows]
    return pos, np.where(mask[None] != 0, pos, -1).max(axis=(0, 2)) + 1


def pack_chunk(config, buckets, rows: np.ndarray, n_chunk_rows: int, input_ids, attention_mask,
               position_ids, rope_deltas, pixel_values, image_grid_thw, images) -> Chunk:
    """The prompts `rows` left-padded to their length bucket, with filler rows up to
    n_chunk_rows, and each distinct image of theirs once."""
    c = config
    ids, mask = input_ids[rows], attention_mask[rows]
    n_valid = (mask != 0).sum(1)
    if (n_valid == 0).any():
        raise ValueError(f"prompts {rows[n_valid == 0].tolist()} have an all-zero "
                         "attention_mask")
    length = round_to(int(n_valid.max()), buckets.prompt_len, "prompt_len")
    all_grid = grid_of(image_grid_thw)
    used = [i for r in rows for i in images[r]]
    pos, next_pos = positions(c, rows, input_ids, attention_mask, position_ids, rope_deltas,
                              all_grid, images)
    b = n_chunk_rows
    out_ids = np.full((b, length), pad_of(c), np.int32)
    out_mask = np.zeros((b, length), np.int32)
    out_pos = np.zeros((3, b, length), np.int32)
    keep = min(length, ids.shape[1])              # trailing columns hold every valid token
    out_ids[:len(rows), length - keep:] = ids[:, ids.shape[1] - keep:]
    out_mask[:len(rows), length - keep:] = mask[:, ids.shape[1] - keep:]
    out_pos[:, :len(rows), length - keep:] = pos[:, :, ids.shape[1] - keep:]
    out_mask[len(rows):, -1] = 1                  # filler rows: one valid pad token
    nxt = np.ones((b,), np.int32)
    nxt[:len(rows)] = next_pos
    valid = np.zeros((b,), bool)
    valid[:len(rows)] = True

    pv = vin = slot = None
    if used:
        distinct = list(dict.fromkeys(used))      # each image once, in order of first use
        patches = all_grid.prod(-1)
        starts = np.concatenate([[0], np.cumsum(patches)])
        pv = patch_lib.concatenate([pixel_values[starts[i]:starts[i + 1]] for i in distinct])
        vin = vision_lib.build_vision_inputs_for(c, all_grid[distinct], buckets.vision)
        pv = vision_lib.pad_pixel_values(pv, vin.num_patches)
        merged = patches // c.vision.merge_unit
        offset = dict(zip(distinct, np.concatenate([[0], np.cumsum(merged[distinct])])))
        slot = np.full((b, length), -1, np.int32)
        for j, r in enumerate(rows):
            where = np.flatnonzero((out_ids[j] == c.image_token_id) & (out_mask[j] != 0))
            slot[j, where] = np.concatenate(
                [offset[i] + np.arange(merged[i]) for i in images[r]] or [[]])
    return Chunk(out_ids, out_mask, out_pos, nxt, valid, pv, vin, slot, len(rows))


# -- shared prefixes (share_prefix=True) ---------------------------------------------------------
def shared_units(tokens: list[np.ndarray], images, cap: int, image_token_id: int
                 ) -> list[tuple[np.ndarray, int]]:
    """(rows, prefix length) per unit: rows with the same images, at most `cap` of them,
    and the length of their longest common token prefix that holds every image token and
    leaves each row >= 1 token (rows where no such prefix exists become units of one)."""
    groups: dict[tuple, list[int]] = {}
    for r, imgs in enumerate(images):
        groups.setdefault(tuple(imgs), []).append(r)

    def prefix_of(rows) -> int:
        first = tokens[rows[0]]
        p = min(len(tokens[r]) for r in rows) - 1
        for r in rows[1:]:
            diff = np.flatnonzero(first[:p] != tokens[r][:p])
            p = int(diff[0]) if diff.size else p
        return p

    def fits(rows, p) -> bool:
        return p >= 1 and not any((tokens[r][p:] == image_token_id).any() for r in rows)

    units = []
    for members in groups.values():
        members.sort(key=lambda r: len(tokens[r]))         # a unit pads to its longest row
        for part in np.array_split(np.asarray(members), -(-len(members) // cap)):
            p = prefix_of(part)
            if fits(part, p):
                units.append((part, p))
                continue
            for r in part:
                p = len(tokens[r]) - 1
                if not fits([r], p):
                    raise ValueError(f"share_prefix: prompt {r} cannot be split into a prefix "
                                     "and a suffix without image tokens (a prompt of one "
                                     "token, or one that ends in image tokens)")
                units.append((np.asarray([r]), p))
    return units


def shared_chunks(config, buckets, chunk_size: int | None, data_parallel: int, input_ids,
                  attention_mask, pixel_values, image_grid_thw, position_ids, rope_deltas,
                  images, max_suffix: int = 0) -> tuple[Iterator[SuffixChunk], np.ndarray]:
    """share_prefix: (the chunks of units (see sampler.py's docstring), host side; the rows
    of the units whose suffix needs more than `max_suffix` tokens (0: no limit), which run
    whole instead)."""
    c = config
    n = input_ids.shape[0]
    valid = attention_mask != 0
    if (valid.sum(1) == 0).any():
        raise ValueError(f"prompts {np.flatnonzero(valid.sum(1) == 0).tolist()} have an "
                         "all-zero attention_mask")
    pos, next_pos = positions(c, np.arange(n), input_ids, attention_mask, position_ids,
                              rope_deltas, grid_of(image_grid_thw), images)
    tokens = [input_ids[r][valid[r]] for r in range(n)]
    row_pos = [pos[:, r][:, valid[r]] for r in range(n)]
    # unit size: at most a chunk's share per data-parallel shard, and no larger than the
    # largest image group, so text units (the coherence prompts of a merged call) pad to
    # the image groups' M and run in the same programs
    cap = max(1, min(chunk_size or n, n) // data_parallel)
    image_groups = collections.Counter(tuple(i) for i in images if i)
    if image_groups:
        cap = min(cap, max(image_groups.values()))
    suffix_need = lambda u: max(len(tokens[r]) for r in u[0]) - u[1]
    by_m: dict[int, list] = {}
    whole = []
    for unit in shared_units(tokens, images, cap, c.image_token_id):
        if max_suffix and suffix_need(unit) > max_suffix:
            whole.extend(unit[0])
            continue
        by_m.setdefault(round_to(len(unit[0]), buckets.num_prompts, "num_prompts"),
                        []).append(unit)
    chunks = _shared_chunks(c, buckets, chunk_size, data_parallel, n, by_m, tokens, row_pos,
                            next_pos, pixel_values, image_grid_thw, images, suffix_need)
    return chunks, np.asarray(sorted(whole), np.int64)


def _shared_chunks(c, buckets, chunk_size, data_parallel, n, by_m, tokens, row_pos, next_pos,
                   pixel_values, image_grid_thw, images, suffix_need) -> Iterator[SuffixChunk]:
    pad = pad_of(c)
    for m, units in sorted(by_m.items()):
        units.sort(key=lambda u: (round_to(u[1], buckets.prompt_len, "prompt_len"),
                                  suffix_need(u)))
        per = max(1, min(chunk_size or n, n) // m)
        n_prefix = chunk_rows(min(per, len(units)), buckets, data_parallel)
        for start in range(0, len(units), per):
            part = units[start:start + per]
            lp = max(p for _, p in part)
            pre_ids = np.full((len(part), lp), pad, np.int32)
            pre_mask = np.zeros((len(part), lp), np.int32)
            pre_pos = np.zeros((3, len(part), lp), np.int32)
            for j, (rows, p) in enumerate(part):
                pre_ids[j, lp - p:] = tokens[rows[0]][:p]
                pre_mask[j, lp - p:] = 1
                pre_pos[:, j, lp - p:] = row_pos[rows[0]][:, :p]
            prefix = pack_chunk(c, buckets, np.arange(len(part)), n_prefix, pre_ids, pre_mask,
                                pre_pos, None, pixel_values, image_grid_thw,
                                [images[rows[0]] for rows, _ in part])
            yield suffix_chunk(c, buckets, prefix, part, m, tokens, row_pos, next_pos)


def suffix_chunk(config, buckets, prefix: Chunk, part, m: int, tokens, row_pos, next_pos
                 ) -> SuffixChunk:
    """The M suffix rows of each of `part`'s units under the prefixes of `prefix`."""
    n_rows = prefix.input_ids.shape[0] * m
    need = max(len(tokens[r]) - p for rows, p in part for r in rows)
    length = round_to(need, buckets.suffix_len, "suffix_len")
    ids = np.full((n_rows, length), pad_of(config), np.int32)
    mask = np.zeros((n_rows, length), np.int32)
    positions_ = np.zeros((n_rows, length), np.int32)
    nxt = np.ones((n_rows,), np.int32)
    rows_out = np.full((n_rows,), -1, np.int64)
    for j, (rows, p) in enumerate(part):
        for i, r in enumerate(rows):
            k, suffix = j * m + i, tokens[r][p:]
            ids[k, length - len(suffix):] = suffix
            mask[k, length - len(suffix):] = 1
            positions_[k, length - len(suffix):] = row_pos[r][0, p:]  # text: rows equal
            nxt[k], rows_out[k] = next_pos[r], r
    valid = rows_out >= 0
    mask[~valid, -1] = 1                          # filler rows: one valid pad token
    return SuffixChunk(prefix, ids, mask, positions_, nxt, valid, rows_out)
