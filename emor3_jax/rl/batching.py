"""Host packing of a mini-batch of responses into micro-batches (numpy): the update's and the
log-prob passes' inputs.

Update batch format (`UpdateBatch`, built on the host by `pack_update_batch` from a rollout):
N = B * G responses, prompt-major (row b*G + g answers prompt b), split into M micro-batches of
n = N / M contiguous rows; each micro-batch carries its p distinct prompts once (p = n / G when
n is a multiple of G, 1 when n divides G). Every array has a leading [M] axis:

    inputs.prompt_ids             [M, p, Lp] int32  left-padded prompts (pad rows: mask 0)
    inputs.prompt_mask            [M, p, Lp] int32
    inputs.prompt_position_ids    [M, 3, p, Lp] int32  mRoPE (processing.rope_index)
    inputs.pixel_values           [M, P, patch_dim] the images of those prompts, in prompt
                                  order, zero-padded to P rows (None: no images at all)
    inputs.vision_inputs          VisionInputs, each leaf [M, ...], for those images
    inputs.response_ids           [M, n, T] int32  responses, right-padded with the pad id
    inputs.response_mask          [M, n, T] int32  1 on response tokens (EOS included)
    inputs.response_position_ids  [M, 3, n, T] int32  last prompt position + 1, + 2, ... on all
                                  three rows (`response_position_ids`)
    inputs.prompt_index           [M, n] int32  which of the p prompts each response continues
    advantages                    [M, n] float32
    old_logp, ref_logp            [M, n, T] float32 (ref_logp None when kl_coef == 0)

Why prompts are not repeated per response: the G responses of a prompt share its tokens and
image, so the prompt (vision tower included) runs once per micro-batch and its keys/values
serve all its responses (emor3_jax/rl/logprobs.py); EasyR1 runs prompt and image per response.
The sequence seen by response row r is prompt[prompt_index[r]] + response[r], exactly as in a
[N, Lp + T] batch, and the loss and gradients are the same.
Micro-batch rows are global: n = per-device micro-batch x data-parallel size
(`micro_batch_rows`); response rows are sharded over the (data, fsdp) mesh axes, prompt rows
too when p divides evenly (else the prompt part is computed on every data-parallel device:
choose per-device micro-batches that are multiples of G on large meshes).

Length-aware micro-batches (`pack_micro_batches`, `make_micro_batch_update`,
`micro_batch_logprobs`; what the trainer runs): above, every micro-batch is
padded to the mini-batch's longest response and prompt. Instead, prompts are sorted by their
longest response (each prompt's G responses stay contiguous, longest first, so the prompt
prefill is still shared), micro-batches of n rows are cut as above, and each is cut to its
own longest response (and prompt), rounded up to a length bucket (powers of two by default:
one compiled program per bucket used). Micro-batches of different shapes cannot share a
scan, so the update is one jitted call per micro-batch accumulating fp32 gradients into a
donated accumulator, then one optimizer call; each call's loss is its share of the whole
mini-batch's token-mean (the mini-batch token count is passed in), so loss, gradients and
the step equal the padded ones up to float rounding, in any micro-batch order. Micro-batches
without response tokens are not run (their share is exactly 0). The released per-micro-batch
mean depends on which rows form a micro-batch, so it is packed without sorting (sort=False).
With a token budget (token_mean) the rows of a micro-batch vary with its lengths
(`pack_micro_batches(token_budget=...)`), a bounded set of shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import numpy as np

from emor3_jax import patches as patch_lib
from emor3_jax import sharding
from emor3_jax.batches import PromptBatch
from emor3_jax.processing import vision as vision_lib
from emor3_jax.processing.vision import VisionPadding
from emor3_jax.rl.logprobs import PolicyInputs

# Padding of each micro-batch's vision inputs: patch rows to a multiple of 256, windows to a
# multiple of 8, the full-attention frame length to a multiple of 256 (few compiled programs).
DEFAULT_VISION_PADDING = VisionPadding(num_patches=256, num_windows=8, num_frames=None,
                                       frame_len=256)


@flax.struct.dataclass
class UpdateBatch:
    """One mini-batch for the update step; see the module docstring for shapes."""
    inputs: PolicyInputs
    advantages: Any
    old_logp: Any
    ref_logp: Any = None

    @property
    def num_micro_batches(self) -> int:
        return self.advantages.shape[0]

    @property
    def response_mask(self):
        return self.inputs.response_mask


# ------------------------------------------------------------------------------------------
# Host-side packing (numpy).

def response_position_ids(prompt_position_ids, response_len: int) -> np.ndarray:
    """[3, B, Lp + T] mRoPE positions: the prompt's, then last prompt position + 1, + 2, ...

    The same on all three rows (text), as the sampler's decode positions (HF's rope delta):
    the first response token sits at max(prompt positions) + 1.
    """
    pos = np.asarray(prompt_position_ids)
    if pos.ndim != 3 or pos.shape[0] != 3:
        raise ValueError(f"prompt position_ids must be [3, B, Lp], got shape {pos.shape}")
    start = pos.max(axis=(0, 2)) + 1                                          # [B]
    resp = start[:, None] + np.arange(response_len)[None, :]                  # [B, T]
    return np.concatenate([pos, np.broadcast_to(resp[None], (3,) + resp.shape)],
                          axis=2).astype(np.int32)


def micro_batch_rows(per_device: int, mesh) -> int:
    """Global rows of one micro-batch: per-device rows x data-parallel size (data * fsdp)."""
    return int(per_device) * sharding.data_parallel_size(mesh)


def split_micro_batches(x, num_micro_batches: int, axis: int = 0):
    """[..., N, ...] -> [M, ..., N / M, ...]: contiguous rows per micro-batch (numpy)."""
    if x is None:
        return None
    x = np.asarray(x)
    n = x.shape[axis]
    if n % num_micro_batches:
        raise ValueError(f"{n} rows do not split into {num_micro_batches} equal micro-batches")
    shape = x.shape[:axis] + (num_micro_batches, n // num_micro_batches) + x.shape[axis + 1:]
    return np.moveaxis(x.reshape(shape), axis, 0)


def merge_micro_batches(x, axis: int = 0):
    """Inverse of split_micro_batches: [M, ..., n, ...] -> [..., M * n, ...]."""
    x = np.moveaxis(sharding.to_host(x), 0, axis)     # device output: gathered over hosts
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _check_image_tokens(config, prompts: PromptBatch) -> None:
    """Every prompt row's image-pad tokens must be exactly its images' merged tokens (a
    truncated prompt or a wrong grid would misplace every image embedding)."""
    merged = prompts.num_patches // config.vision.merge_unit
    tokens = ((prompts.input_ids == config.image_token_id) & (prompts.attention_mask != 0)).sum(1)
    bad = np.flatnonzero(tokens != merged)
    if len(bad):
        b = int(bad[0])
        raise ValueError(f"prompt row {b}: {int(tokens[b])} image-pad tokens do not match its "
                         f"images' {int(merged[b])} merged tokens (image_grid_thw "
                         f"{prompts.image_grid_thw[b].tolist()}); prompts must not be truncated")


def _padded_vision(config, grids: list[np.ndarray], padding: VisionPadding):
    """VisionInputs per micro-batch, all padded to the same (bucketed) sizes."""
    exact = [vision_lib.build_vision_inputs_for(config, g) for g in grids]
    size = lambda f, field: vision_lib.round_up(max(f(v) for v in exact), getattr(padding, field))
    unit = config.vision.merge_unit
    num_patches = size(lambda v: v.num_patches, "num_patches")
    num_patches = -(-num_patches // unit) * unit
    common = VisionPadding(num_patches=[num_patches],
                           num_windows=[size(lambda v: v.window_index.shape[0], "num_windows")],
                           num_frames=[size(lambda v: v.frame_index.shape[0], "num_frames")],
                           frame_len=[size(lambda v: v.frame_index.shape[1], "frame_len")])
    return [vision_lib.build_vision_inputs_for(config, g, common) for g in grids], num_patches


def _gather_rows(x, rows, axis: int) -> np.ndarray:
    """x's rows (along `axis`) picked by rows [M, p] -> [M, ...] int32; rows -1 give zeros."""
    out = np.take(np.asarray(x), np.maximum(rows, 0), axis=axis)      # axis -> (M, p)
    valid = np.expand_dims(rows >= 0, tuple(range(axis))
                           + tuple(range(axis + 2, out.ndim)))
    return np.moveaxis(np.where(valid, out, 0), axis, 0).astype(np.int32)


def pack_policy_inputs(config, prompts: PromptBatch, responses, response_mask, *,
                       group_size: int, micro_batch_rows: int,
                       vision_padding: VisionPadding = DEFAULT_VISION_PADDING) -> PolicyInputs:
    """Stack a rollout into micro-batches of n responses + their distinct prompts (module
    docstring); numpy arrays, every leaf with a leading [M] axis.

    config: the model's Qwen2_5_VLConfig (image token id, vision geometry).
    prompts: the B prompts (`PromptBatch`, left-padded, each row with its images).
    responses, response_mask: [N, T] with N = B * group_size, prompt-major rows.
    micro_batch_rows: rows per micro-batch over all devices (`micro_batch_rows(per_device, mesh)`).
    """
    prompt_ids, prompt_mask = prompts.input_ids, prompts.attention_mask
    prompt_pos = prompts.mrope_positions
    responses = np.asarray(responses)
    response_mask = (np.asarray(response_mask) != 0).astype(np.int32)
    b, lp = prompt_ids.shape
    n_rows, t = responses.shape
    if n_rows != b * group_size:
        raise ValueError(f"responses: {n_rows} rows but {b} prompts x group_size {group_size} = "
                         f"{b * group_size}; rows must be prompt-major (b*G + g)")
    if response_mask.shape != responses.shape:
        raise ValueError(f"response_mask {response_mask.shape} != responses {responses.shape}")
    if micro_batch_rows <= 0 or n_rows % micro_batch_rows:
        raise ValueError(f"{n_rows} responses do not split into micro-batches of "
                         f"{micro_batch_rows} rows (rl.micro_batch_size x data-parallel devices)")
    if lp == 0 or (prompt_mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded with a real last token in every row "
                         "(attention_mask[:, -1] == 1)")
    m, n = n_rows // micro_batch_rows, micro_batch_rows
    prompt_of_row = np.arange(n_rows) // group_size
    members = [np.unique(prompt_of_row[i * n:(i + 1) * n]) for i in range(m)]
    p = max(len(x) for x in members)
    # Prompt rows of each micro-batch; -1 = a padding row (mask 0, never referenced).
    rows = np.full((m, p), -1)
    for i, x in enumerate(members):
        rows[i, :len(x)] = x
    local = np.stack([np.searchsorted(members[i], prompt_of_row[i * n:(i + 1) * n])
                      for i in range(m)]).astype(np.int32)
    pixel_values = vision_inputs = None
    if prompts.has_images:
        _check_image_tokens(config, prompts)
        grids, pixel_lists = [], []
        for x in members:
            images = [im for prompt in x for im in prompts.row_images(int(prompt))]
            # a micro-batch without images still needs a (dummy, unread) one: static shapes
            grids.append(np.asarray([g for _, g in images]) if images else np.array([[1, 2, 2]]))
            pixel_lists.append(patch_lib.concatenate([p for p, _ in images]).astype(np.float32)
                               if images else patch_lib.zero_rows(prompts.pixel_values, 4))
        vins, num_patches = _padded_vision(config, grids, vision_padding)
        pixel_values = patch_lib.stack([vision_lib.pad_pixel_values(x, num_patches)
                                        for x in pixel_lists])
        vision_inputs = jax.tree.map(lambda *xs: np.stack(xs), *vins)
    split = lambda x, axis=0: split_micro_batches(x, m, axis)
    resp_pos = response_position_ids(prompt_pos, t)[:, :, lp:]                # [3, B, T]
    return PolicyInputs(
        prompt_ids=_gather_rows(prompt_ids, rows, 0), prompt_mask=_gather_rows(prompt_mask, rows, 0),
        prompt_position_ids=_gather_rows(prompt_pos, rows, 1),
        pixel_values=pixel_values, vision_inputs=vision_inputs,
        response_ids=split(responses).astype(np.int32), response_mask=split(response_mask),
        response_position_ids=split(np.repeat(resp_pos, group_size, axis=1), 1),
        prompt_index=local)


def pack_update_batch(config, prompts: PromptBatch, responses, response_mask, advantages,
                      old_logp, ref_logp=None, *, group_size: int, micro_batch_rows: int,
                      vision_padding: VisionPadding = DEFAULT_VISION_PADDING,
                      inputs: PolicyInputs | None = None) -> UpdateBatch:
    """`UpdateBatch` of a rollout (module docstring); advantages [N], old/ref_logp [N, T].

    `inputs` may pass an already packed PolicyInputs with the same micro-batch split.
    """
    responses = np.asarray(responses)
    n_rows, t = responses.shape
    advantages = np.asarray(advantages, np.float32)
    old_logp = np.asarray(old_logp, np.float32)
    if advantages.shape != (n_rows,):
        raise ValueError(f"advantages shape {advantages.shape} must be [N] = ({n_rows},) "
                         "(one per response; losses.group_advantages)")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if x is not None and np.shape(x) != (n_rows, t):
            raise ValueError(f"{name} shape {np.shape(x)} must be [N, T] = {(n_rows, t)}")
    if inputs is None:
        inputs = pack_policy_inputs(config, prompts, responses, response_mask,
                                    group_size=group_size, micro_batch_rows=micro_batch_rows,
                                    vision_padding=vision_padding)
    m = inputs.response_ids.shape[0]
    split = lambda x: None if x is None else split_micro_batches(np.asarray(x, np.float32), m)
    return UpdateBatch(inputs=inputs, advantages=split(advantages), old_logp=split(old_logp),
                       ref_logp=split(ref_logp))


# ------------------------------------------------------------------------------------------
# Length-aware micro-batches (host): each micro-batch padded to its own bucketed length.

MIN_LENGTH_BUCKET = 64


def bucket_lengths(max_len: int, buckets=(), smallest: int = MIN_LENGTH_BUCKET
                   ) -> tuple[int, ...]:
    """The lengths a micro-batch of a mini-batch padded to `max_len` may be cut to: `buckets`
    below max_len (() = powers of two from `smallest`), then max_len itself. One compiled
    program per length used, so keep the list short."""
    max_len = int(max_len)
    if not buckets:
        buckets = [2 ** k for k in range(max(int(smallest), 1).bit_length() - 1,
                                         max(max_len, 1).bit_length())]
    if any(int(b) <= 0 for b in buckets):
        raise ValueError(f"length buckets {tuple(buckets)} must be positive")
    return tuple(sorted({int(b) for b in buckets if int(b) < max_len} | {max_len}))


def _fit(need: int, choices: tuple[int, ...]) -> int:
    return next((c for c in choices if need <= c), choices[-1])


def response_lengths(response_mask) -> np.ndarray:
    """[N] index of the last response token + 1 per row (0: no response token)."""
    mask = np.asarray(response_mask) != 0
    return np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)


@dataclasses.dataclass
class MicroBatches:
    """A mini-batch as micro-batches each padded to its own bucketed response (and prompt)
    length (`pack_micro_batches`; host numpy, not a pytree).

    items: UpdateBatch (or PolicyInputs, for the log-prob passes) per micro-batch that has
      response tokens, each with a leading [1] axis and its own Lp_i <= Lp, T_i <= T.
      Micro-batches without any response token (e.g. the zero-mask rows of a batch's padding
      prompts) are left out: their loss, metrics and gradients are exactly zero.
    rows: per item, the mini-batch rows (original order) of its n response rows.
    """
    items: list
    rows: list
    num_rows: int              # N responses of the mini-batch
    response_len: int          # T, its padded response length
    num_micro_batches: int     # spans cut (N / n with fixed rows), empty ones included
    token_count: int           # response tokens of the mini-batch
    slots: int                 # response slots the items compute: sum of n x T_i
    sorted: bool               # rows reordered by length (group-preserving)

    @property
    def padded_fraction(self) -> float:
        """Padded response slots / all response slots of the computed micro-batches."""
        return 1.0 - self.token_count / self.slots if self.slots else 0.0

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(Lp_i, T_i) per item."""
        return [(x.prompt_ids.shape[-1], x.response_ids.shape[-1]) for x in
                (getattr(item, "inputs", item) for item in self.items)]


def micro_batch_slots(rows: int, prompts: int, prompt_len: int, response_len: int,
                      data_parallel: int) -> int:
    """Token slots one device computes for a micro-batch of `rows` responses (sharded over the
    data-parallel devices) continuing `prompts` distinct prompts (sharded too when they divide
    evenly, else every device runs them all): what a token budget counts."""
    dp = int(data_parallel)
    prompt = prompts * prompt_len // dp if prompts % dp == 0 else prompts * prompt_len
    return int(prompt + -(-rows * response_len // dp))


def budget_rows(token_budget: int, base_rows: int, max_rows: int, group_size: int,
                prompt_len: int, response_len: int, data_parallel: int) -> int:
    """The most rows (base_rows x a power of two, at most max_rows) a micro-batch of whole
    aligned groups at these lengths may take within `token_budget` slots per device; 0 when
    not even base_rows fit."""
    rows, best = int(base_rows), 0
    while rows <= max_rows and micro_batch_slots(rows, -(-rows // group_size), prompt_len,
                                                 response_len, data_parallel) <= token_budget:
        best, rows = rows, rows * 2
    return best


def pack_micro_batches(config, prompts: PromptBatch, responses, response_mask,
                       advantages=None, old_logp=None, ref_logp=None, *, group_size: int,
                       micro_batch_rows: int, sort: bool = True, length_buckets=(),
                       prompt_buckets=None, token_budget: int = 0, data_parallel: int = 1,
                       max_rows: int = 0,
                       vision_padding: VisionPadding = DEFAULT_VISION_PADDING) -> MicroBatches:
    """Length-aware micro-batches of a mini-batch (`MicroBatches`): same arguments and the same
    rows per micro-batch as `pack_update_batch` (without advantages: `pack_policy_inputs`,
    for the log-prob passes), but each micro-batch is cut to its own longest response, rounded
    up to `bucket_lengths(T, length_buckets)`, and (prompt_buckets not None) its prompts to
    their longest, rounded up to `bucket_lengths(Lp, prompt_buckets)` (left padding dropped).

    sort: order prompts by their longest response (longest first) and each prompt's responses
    by length before cutting micro-batches, so long responses share micro-batches. Prompts stay
    whole (their G responses contiguous: the prompt prefill is still shared). The token-mean
    loss and its gradients do not depend on the order (`make_micro_batch_update`); the
    released per-micro-batch mean does (it changes which rows form a micro-batch): use
    sort=False for loss_agg="microbatch_token_mean".
    token_budget (> 0; sort only): token slots per device a micro-batch may compute
    (`micro_batch_slots`, over `data_parallel` devices). micro_batch_rows is then the fewest
    rows: each micro-batch takes micro_batch_rows x 2^k rows, the most whose slots at its own
    bucketed lengths fit the budget, starting at a multiple of its row count (a micro-batch of
    G or more rows holds whole prompts). Short responses travel many to a micro-batch, long
    ones few: fewer passes over the weights for the same tokens. (verl's use_dynamic_bsz.)
    max_rows (> 0): no micro-batch takes more rows (token slots undercount what a row holds
    besides its tokens: an LM-head logit chunk, attention rows over the prompt).
    Images stay padded to one size over the micro-batches of one row count.
    """
    responses = np.asarray(responses)
    mask = (np.asarray(response_mask) != 0).astype(np.int32)
    n_rows, t = responses.shape
    b = prompts.num_rows
    if mask.shape != responses.shape:
        raise ValueError(f"response_mask {mask.shape} != responses {responses.shape}")
    if n_rows != b * group_size:
        raise ValueError(f"responses: {n_rows} rows but {b} prompts x group_size {group_size} = "
                         f"{b * group_size}; rows must be prompt-major (b*G + g)")
    if advantages is not None and old_logp is None:
        raise ValueError("pack_micro_batches: advantages given without old_logp")
    for name, x, shape in (("advantages", advantages, (n_rows,)), ("old_logp", old_logp,
                           (n_rows, t)), ("ref_logp", ref_logp, (n_rows, t))):
        if x is not None and np.shape(x) != shape:
            raise ValueError(f"{name} shape {np.shape(x)} must be {shape} (N = {n_rows} "
                             f"responses of T = {t} tokens)")
    lengths = response_lengths(mask)
    if token_budget and not sort:
        raise ValueError("pack_micro_batches: a token budget picks rows by length, so it "
                         "needs sort=True (token_mean loss)")
    if sort:
        per_prompt = lengths.reshape(b, group_size)
        prompt_order = np.argsort(-per_prompt.max(axis=1), kind="stable")
        within = np.argsort(-per_prompt, axis=1, kind="stable")[prompt_order]
        order = (prompt_order[:, None] * group_size + within).reshape(-1)
        prompts = prompts.take(prompt_order)
    else:
        order = np.arange(n_rows)
    if micro_batch_rows <= 0 or n_rows % micro_batch_rows:
        raise ValueError(f"{n_rows} responses do not split into micro-batches of "
                         f"{micro_batch_rows} rows (rl.micro_batch_size x data-parallel devices)")
    lp = prompts.input_ids.shape[1]
    t_choices = bucket_lengths(t, length_buckets)
    p_choices = None if prompt_buckets is None else bucket_lengths(lp, prompt_buckets)
    used = prompts.attention_mask != 0
    prompt_need = np.where(used.any(1), lp - np.argmax(used, axis=1), 0)     # [B], sorted
    sorted_lengths = lengths[order]

    def cut(start: int, n: int) -> tuple[int, int, int]:
        """(prompts, Lp_i, T_i) of rows start..start+n of the ordered mini-batch (T_i 0: no
        response token)."""
        need = int(sorted_lengths[start:start + n].max())
        members = np.unique(np.arange(start, start + n) // group_size)
        lpi = lp if p_choices is None else _fit(int(prompt_need[members].max()), p_choices)
        return len(members), lpi, (_fit(need, t_choices) if need else 0)

    def slots(start: int, n: int) -> int:
        p, lpi, ti = cut(start, n)
        return micro_batch_slots(n, p, lpi, ti, data_parallel) if ti else 0

    spans, start = [], 0
    while start < n_rows:
        n = micro_batch_rows
        if token_budget:
            if slots(start, n) > token_budget:
                raise ValueError(
                    f"a micro-batch of {n} responses at its lengths needs {slots(start, n)} "
                    f"token slots per device, more than the token budget {token_budget}: raise "
                    "the budget or lower the micro-batch rows")
            while (start % (2 * n) == 0 and start + 2 * n <= n_rows
                   and (not max_rows or 2 * n <= max_rows)
                   and slots(start, 2 * n) <= token_budget):
                n *= 2
        spans.append((start, n))
        start += n
    packed = {}        # rows per micro-batch -> the mini-batch packed in micro-batches of them
    rows_of = lambda x: None if x is None else np.asarray(x, np.float32)[order]
    adv, old, ref = rows_of(advantages), rows_of(old_logp), rows_of(ref_logp)
    items, rows, n_slots = [], [], 0
    for start, n in spans:
        _, lpi, ti = cut(start, n)
        if ti == 0:
            continue
        if n not in packed:
            packed[n] = pack_policy_inputs(config, prompts, responses[order], mask[order],
                                           group_size=group_size, micro_batch_rows=n,
                                           vision_padding=vision_padding)
        inputs, i, span = packed[n], start // n, slice(start, start + n)
        one = lambda x: None if x is None else x[i:i + 1]
        item = PolicyInputs(
            prompt_ids=inputs.prompt_ids[i:i + 1, :, lp - lpi:],
            prompt_mask=inputs.prompt_mask[i:i + 1, :, lp - lpi:],
            prompt_position_ids=inputs.prompt_position_ids[i:i + 1, :, :, lp - lpi:],
            pixel_values=one(inputs.pixel_values),
            vision_inputs=jax.tree.map(one, inputs.vision_inputs),
            response_ids=inputs.response_ids[i:i + 1, :, :ti],
            response_mask=inputs.response_mask[i:i + 1, :, :ti],
            response_position_ids=inputs.response_position_ids[i:i + 1, :, :, :ti],
            prompt_index=inputs.prompt_index[i:i + 1])
        if adv is not None:
            item = UpdateBatch(inputs=item, advantages=adv[None, span],
                               old_logp=old[None, span, :ti],
                               ref_logp=None if ref is None else ref[None, span, :ti])
        items.append(item)
        rows.append(order[span])
        n_slots += n * ti
    return MicroBatches(items=items, rows=rows, num_rows=n_rows, response_len=t,
                        num_micro_batches=len(spans), token_count=int(mask.sum()),
                        slots=n_slots, sorted=bool(sort))
