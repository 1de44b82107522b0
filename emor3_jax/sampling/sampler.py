"""Grouped sampling for GRPO: prefill each prompt once, draw G continuations inside jit.

    sampler = Sampler(model, mesh=mesh)                       # keeps its compiled programs
    res = sampler.generate(params, input_ids, attention_mask, pixel_values, image_grid_thw,
                           max_new_tokens=256, num_samples=8, temperature=1.0, rng=key)
    res.tokens [B*G, T] int32 (pad after the end), res.logprobs [B*G, T] fp32 (0 after the end),
    res.lengths [B*G] int32 (EOS included); rows are prompt-major: row b*G + g.

Per chunk of prompts (host numpy, then compiled programs):
 1. host: split the batch's images per prompt, bucket the prompt length (left padding), the
    vision index arrays (processing.vision) and the batch; mRoPE positions from the caller's
    `position_ids`/`rope_deltas` or `processing.rope_index.get_rope_index`;
 2. `prefill` program: vision tower + prompt, once per prompt (never G times) -> a
    `PromptState`: the prompt's KV cache (grouped_decode layout) and next-token logits;
 3. `decode` program: a `GroupedCache` whose prompt part is shared by the G rows of a group
    (see grouped_decode.py: logically the repeated cache, physically one prompt copy) plus G
    empty generated-token rows; draws the first token of every row from the prompt's logits,
    then a `lax.while_loop` feeds one token per row until every row has ended or
    max_new_tokens is reached. The cache lives in the loop carry and is updated in place;
    the prompt state is donated and handed back. Decode positions are last prompt
    position + 1 + step on all three mRoPE rows.
 `score` (the judge's candidate answers) replaces step 3 by one multi-token call over the
 token trie of C fixed continuations per prompt (tree attention mask) and returns
 log p(continuation | prompt).

Shared prefixes (`share_prefix=True`, the judge): prompts showing the same images (text-only
prompts: all of them) form groups; a group's longest common token prefix (of the encoded rows,
chat template included; it must hold all of the group's image tokens and leave every prompt
at least one token) is prefilled once, vision tower included, and the prompts' suffixes then
run in one multi-token call against its KV cache (M suffix rows per prefix: grouped_decode's
suffix level), both in one `prefill_shared` program. Decode and score run as above, one row
per prompt (G per prompt) under the suffix level. Groups are cut into near-equal units of at
most chunk_size / data-parallel rows and no more than the largest image group (rows sorted by
length first); units are padded to M = the num_prompts bucket of their size, and a chunk holds
chunk_size // M units of one M, sorted by prefix bucket and suffix length so that a chunk
pads little. Results equal the unshared path's up to float rounding, with the same random
streams (a sample's stream is its prompt's `row_ids` entry, not its place in a chunk).

Compiled programs are keyed by shapes only: (prompts per chunk, prompt-length bucket, vision
buckets) for prefill; (prefixes per chunk, prefix bucket, vision buckets, M, suffix-length
bucket) for prefill_shared; plus (G, new-token bucket, top_k) for decode and (C, trie-node
bucket, longest continuation) for score. Temperature, top-p and max_new_tokens are traced.
`num_programs` counts the programs compiled so far (the bench and the tests read it).

Prompts may share images (`row_images`, e.g. the judge's G consistency prompts of one rollout
image): each chunk then runs the vision tower once per distinct image.

Sharding: with a mesh (of one or several processes), prompts (and their G rows) are split over
the data/fsdp axes, KV heads over `tensor` where they divide; params keep the shardings the caller placed them with
(`qwen2_5_vl.param_shardings`). Before compiling a new shape the sampler checks that params +
cache + the largest activations fit the device (`memory_limit_bytes`, else the device's
`memory_stats()["bytes_limit"]`, else the host's RAM) and fails with the number it needs.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from emor3_jax import sharding as shd
from emor3_jax.models import layers, qwen2_5_vl
from emor3_jax.processing import rope_index
from emor3_jax.processing import vision as vision_lib
from emor3_jax.sampling import grouped_decode, rules

log = logging.getLogger(__name__)

Buckets = Sequence[int] | int | None


class SamplerMemoryError(ValueError):
    """The sampling configuration cannot fit the device; the message says how much it needs."""


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Host (numpy) results, rows prompt-major (b*G + g)."""
    tokens: np.ndarray      # [B*G, T] int32, pad id after the end
    logprobs: np.ndarray    # [B*G, T] float32 policy log-probs of the sampled tokens, 0 after
    lengths: np.ndarray     # [B*G] int32 generated tokens incl. the EOS that ended the row

    def response(self, row: int) -> np.ndarray:
        return self.tokens[row, :self.lengths[row]]


def geometric_buckets(minimum: int = 16, maximum: int = 1 << 24) -> tuple[int, ...]:
    """2^k and 3 * 2^(k-1) from `minimum` up: every size wastes at most a third."""
    sizes = set()
    p = 1
    while p <= maximum:
        sizes.update((p, 3 * p // 2) if p >= 2 else (p,))
        p *= 2
    return tuple(s for s in sorted(sizes) if minimum <= s <= maximum)


@dataclasses.dataclass(frozen=True)
class SamplerBuckets:
    """Static-shape buckets (a list of sizes, an int = round up to a multiple, None = exact).

    Defaults are geometric (x1.5 / x1.33 steps), so a run with varied prompts compiles a
    handful of programs while padding wastes at most a third.
    """
    prompt_len: Buckets = geometric_buckets(16)
    new_tokens: Buckets = geometric_buckets(16)
    new_tokens_score: Buckets = geometric_buckets(1)     # score: nodes of the continuation trie
    suffix_len: Buckets = geometric_buckets(8)           # share_prefix: a chunk's longest suffix
    num_prompts: Buckets = geometric_buckets(1)
    vision: vision_lib.VisionPadding = vision_lib.VisionPadding(
        num_patches=geometric_buckets(16), num_windows=geometric_buckets(1),
        num_frames=geometric_buckets(1), frame_len=geometric_buckets(16))


@flax.struct.dataclass
class PromptState:
    """A prefilled chunk of prompts: what the decode and score programs start from. They take
    it donated and hand it back unchanged, so more continuations of the same prompts (e.g.
    resampling) need no second prefill. With shared prefixes, prompt_* hold the B prefixes and
    suffix_* the R = B*M prompts' own suffixes (grouped_decode's suffix level); the per-prompt
    fields then have R rows (else R = B)."""
    prompt_k: tuple[jax.Array, ...]   # per layer [B, K, D, Lp] (grouped_decode layout)
    prompt_v: tuple[jax.Array, ...]   # per layer [B, K, Lp, D]
    prompt_mask: jax.Array            # [B, Lp] bool
    logits: jax.Array                 # [R, V] fp32 next-token logits after each prompt
    next_pos: jax.Array               # [R] int32 mRoPE position of the first generated token
    row_valid: jax.Array              # [R] bool (False on rows that only pad the chunk)
    suffix_k: tuple[jax.Array, ...] = ()      # per layer [R, K, D, Ls]; () = no shared prefix
    suffix_v: tuple[jax.Array, ...] = ()      # per layer [R, K, Ls, D]
    suffix_mask: jax.Array | None = None      # [R, Ls] bool


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


def continuation_trie(continuations: Sequence[Sequence[int]], pad: int,
                      buckets: Buckets = None) -> ContinuationTrie:
    """Host (numpy) trie of continuations; nodes padded to `buckets` with filler nodes that
    see only themselves."""
    index: dict[tuple[int, ...], int] = {}
    for cont in continuations:
        for k in range(1, len(cont)):
            index.setdefault(tuple(cont[:k]), len(index))
    n = _round(len(index), buckets, "new_tokens_score") if index else 0
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


@dataclasses.dataclass
class _Chunk:
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
class _SuffixChunk:
    """A share_prefix chunk: its prefixes (a _Chunk) and the M suffix rows per prefix."""
    prefix: _Chunk
    input_ids: np.ndarray       # [Bc*M, Ls] int32, left-padded
    attention_mask: np.ndarray  # [Bc*M, Ls] int32
    positions: np.ndarray       # [Bc*M, Ls] int32 (text tokens: one mRoPE row)
    next_pos: np.ndarray        # [Bc*M] int32
    row_valid: np.ndarray       # [Bc*M] bool
    rows: np.ndarray            # [Bc*M] int: the caller's row of each suffix row, -1 = filler


def _round(n: int, buckets: Buckets, what: str) -> int:
    try:
        return vision_lib.round_up(n, buckets)
    except ValueError as e:
        raise ValueError(f"SamplerBuckets.{what}: {e}") from None


def _host_limit_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _fmt_gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Sampler:
    """Compiled grouped sampling for one model (and mesh); reuse it across calls.

    chunk_size: prompts per program call (a rollout of 512 prompts x 8 runs in pieces);
    None = the whole batch at once. memory_limit_bytes: per-device budget for the fit check
    (None: the device's bytes_limit, or the host RAM on CPU; 0 disables the check).
    On a TPU topology description (emor3_jax/aot.py) programs are only traced
    (`trace_prefill` / `trace_decode` / `trace_score`) and compiled, never run.
    A mesh over several processes (multi-host): every process calls with the same host inputs
    (emor3_jax/distributed.py), places its own devices' shards and gets the whole result.
    """

    def __init__(self, model, *, mesh=None, buckets: SamplerBuckets = SamplerBuckets(),
                 chunk_size: int | None = None, memory_limit_bytes: int | None = None):
        self.model = model
        self.config = model.config
        self.mesh = mesh
        self.buckets = buckets
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive (prompts per program call), got "
                             f"{chunk_size}")
        self.chunk_size = chunk_size
        self.memory_limit_bytes = memory_limit_bytes
        self.compiled = collections.Counter()     # program kind -> traces (= compilations)
        self._checked_shapes: set = set()
        self._prefill = jax.jit(self._prefill_impl)
        self._prefill_shared = jax.jit(self._prefill_shared_impl)
        self._decode = jax.jit(self._decode_impl, static_argnames=("group", "new_bucket", "top_k"),
                               donate_argnames=("state",))
        self._score = jax.jit(self._score_impl, donate_argnames=("state",))

    @property
    def num_programs(self) -> int:
        """Programs compiled so far (prefill + prefill_shared + decode + score)."""
        return sum(self.compiled.values())

    @property
    def data_parallel(self) -> int:
        return 1 if self.mesh is None else shd.data_parallel_size(self.mesh)

    # -- sharding helpers ----------------------------------------------------------------------
    def _spec(self, names, shape) -> P:
        return shd._fit_spec(shd.logical_to_spec(names), shape, self.mesh)

    def _constrain(self, x, names):
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, self._spec(names, x.shape)))

    def _put(self, x, names):
        if x is None:
            return None
        if self.mesh is None:
            return jnp.asarray(x)
        return shd.put_global(x, NamedSharding(self.mesh, self._spec(names, np.shape(x))))

    # -- programs ------------------------------------------------------------------------------
    def _prefill_impl(self, params, input_ids, attention_mask, position_ids, next_pos,
                      row_valid, pixel_values, vision_inputs, image_slot):
        """Vision tower once per distinct image, prompt forward once per prompt (B rows)."""
        self.compiled["prefill"] += 1
        return self._prefill_state(params, input_ids, attention_mask, position_ids, next_pos,
                                   row_valid, pixel_values, vision_inputs, image_slot)

    def _prefill_shared_impl(self, params, prefix, suffix_ids, suffix_mask, suffix_positions,
                             next_pos, row_valid):
        """share_prefix: the B prefixes (prefix: the prefill arguments, vision included), then
        their M suffixes each (suffix_ids [B*M, Ls], left-padded) in one multi-token call over
        the prefixes' cache -> the state of the B*M whole prompts. One program, so a shared
        chunk compiles as many programs as an unshared one."""
        self.compiled["prefill_shared"] += 1
        state = self._prefill_state(params, *prefix)
        return self._prefill_suffix(params, state, suffix_ids, suffix_mask, suffix_positions,
                                    next_pos, row_valid)

    def _prefill_state(self, params, input_ids, attention_mask, position_ids, next_pos,
                       row_valid, pixel_values, vision_inputs, image_slot) -> PromptState:
        model = self.model
        params = jax.lax.stop_gradient(params)
        b, length = input_ids.shape

        def forward(m, ids, mask, pos, pv, vin, slot):
            # = Qwen2_5_VLForConditionalGeneration.prefill, except that image-token positions
            # gather their merged vision token by index (`slot`), so prompts can share images
            embeds = m.model.language_model.embed(ids)
            if pv is not None:
                image = m.model.visual(pv, vin).astype(embeds.dtype)        # [P/4, D]
                picked = jnp.take(image, jnp.maximum(slot, 0), axis=0)
                embeds = jnp.where((slot >= 0)[..., None], picked, embeds)
            cache = qwen2_5_vl.init_cache(m.config, b, length)
            hidden, (k, v) = m.model.language_model(
                embeds, pos, qwen2_5_vl.causal_mask(mask), kv=(cache.k, cache.v),
                write_index=0, mode=qwen2_5_vl.PREFILL)
            return m.logits(hidden[:, -1]), qwen2_5_vl.KVCache(k=k, v=v, key_mask=mask != 0)

        with layers.kernel_mesh(self.mesh):
            logits, cache = model.apply({"params": params}, input_ids, attention_mask,
                                        position_ids, pixel_values, vision_inputs, image_slot,
                                        method=forward)
        prompt_k, prompt_v = grouped_decode.prompt_part(cache)
        kv = grouped_decode.logical_axes()
        return PromptState(prompt_k=tuple(self._constrain(x, kv) for x in prompt_k),
                           prompt_v=tuple(self._constrain(x, kv) for x in prompt_v),
                           prompt_mask=cache.key_mask, logits=logits.astype(jnp.float32),
                           next_pos=next_pos, row_valid=row_valid)

    def _prefill_suffix(self, params, state: PromptState, input_ids, attention_mask,
                        positions, next_pos, row_valid) -> PromptState:
        """The suffixes as S = Ls new tokens per row over the prefixes (grouped_decode),
        left padding masked per row; their k/v become the state's suffix level."""
        model = self.model
        params = jax.lax.stop_gradient(params)
        n, length = input_ids.shape
        cache = self._grouped_cache(state, n // state.prompt_k[0].shape[0], length)
        key_mask = attention_mask != 0
        hidden, cache = grouped_decode.decode_hidden(model, params, self._per_layer(params),
                                                     input_ids, positions, cache, 0,
                                                     gen_mask=key_mask)
        logits = model.apply({"params": params}, hidden[:, -1], method=lambda m, h: m.logits(h))
        return PromptState(prompt_k=state.prompt_k, prompt_v=state.prompt_v,
                           prompt_mask=state.prompt_mask, logits=logits.astype(jnp.float32),
                           next_pos=next_pos, row_valid=row_valid, suffix_k=cache.gen_k,
                           suffix_v=cache.gen_v, suffix_mask=key_mask)

    def _grouped_cache(self, state: PromptState, group: int, slots: int):
        cache = grouped_decode.with_empty_gen(state.prompt_k, state.prompt_v, state.prompt_mask,
                                              group, slots, state.suffix_k, state.suffix_v,
                                              state.suffix_mask)
        kv = grouped_decode.logical_axes()
        return cache.replace(gen_k=tuple(self._constrain(x, kv) for x in cache.gen_k),
                             gen_v=tuple(self._constrain(x, kv) for x in cache.gen_v))

    def _per_layer(self, params):
        return grouped_decode.split_layers(params["model"]["language_model"]["layers"],
                                           self.config.text.num_hidden_layers)

    def _decode_impl(self, params, state: PromptState, rng, temperature, top_p, max_new_tokens,
                     eos_ids, pad_id, allowed, row_ids, *, group: int, new_bucket: int,
                     top_k: int):
        """row_ids [rows * group] int32: each row's random stream (fold_in of the step key)."""
        self.compiled["decode"] += 1
        model = self.model
        params = jax.lax.stop_gradient(params)
        cache = self._grouped_cache(state, group, new_bucket)
        n_rows, t_max = cache.gen_k[0].shape[0], cache.max_new_tokens
        per_layer = self._per_layer(params)
        positions = jnp.repeat(state.next_pos, group)
        max_new_tokens = jnp.minimum(max_new_tokens, t_max)

        def choose(step, logits):
            step_key = jax.random.fold_in(rng, step)
            keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, row_ids)
            # Whole vocabulary rows per device: the draw's cumsum over a `tensor`-sharded
            # vocabulary is partitioned pathologically (151k ids on a 2 x 4 CPU mesh: 35 s per
            # step instead of 0.1 s); gathering the [rows, V] logits is cheap.
            logits = self._constrain(logits, ("batch", None))
            return rules.next_tokens(keys, logits, allowed, temperature, top_p, top_k)

        def record(step, tok, lp, tokens, logprobs, lengths, done):
            alive = ~done
            tok = jnp.where(alive, tok, pad_id)
            lp = jnp.where(alive, lp, 0.0)
            tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
            logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, step))
            lengths = lengths + alive.astype(jnp.int32)
            done = done | (tok[:, None] == eos_ids[None, :]).any(-1)
            return tok, tokens, logprobs, lengths, done

        tokens = jnp.full((n_rows, t_max), pad_id, jnp.int32)
        logprobs = jnp.zeros((n_rows, t_max), jnp.float32)
        lengths = jnp.zeros((n_rows,), jnp.int32)
        done = ~jnp.repeat(state.row_valid, group)
        tok, lp = choose(0, jnp.repeat(state.logits, group, axis=0))
        tok, tokens, logprobs, lengths, done = record(0, tok, lp, tokens, logprobs, lengths, done)

        def cond(carry):
            step, _, _, _, _, _, done = carry
            return (step < max_new_tokens) & ~done.all()

        def body(carry):
            step, cache, tok, tokens, logprobs, lengths, done = carry
            logits, cache = grouped_decode.decode_step(model, params, per_layer, tok,
                                                       positions + step - 1, cache, step - 1)
            new, lp = choose(step, logits)
            new, tokens, logprobs, lengths, done = record(step, new, lp, tokens, logprobs,
                                                          lengths, done)
            return step + 1, cache, new, tokens, logprobs, lengths, done

        carry = (jnp.int32(1), cache, tok, tokens, logprobs, lengths, done)
        _, _, _, tokens, logprobs, lengths, _ = jax.lax.while_loop(cond, body, carry)
        return state, tokens, logprobs, lengths

    def _score_impl(self, params, state: PromptState, trie: ContinuationTrie, temperature):
        """log p(continuation c | prompt r) [R, C]: token log-probs under the full softmax of
        logits / temperature (a traced scalar: one program for every temperature). The
        continuations' proper prefixes are the trie's S nodes, fed in ONE multi-token call per
        prompt, each node seeing its ancestors (a token tree: the C candidates share their
        common prefixes and the prompt)."""
        self.compiled["score"] += 1
        model = self.model
        params = jax.lax.stop_gradient(params)
        inv_t = 1.0 / temperature
        first = jax.nn.log_softmax(state.logits * inv_t, -1)[:, trie.first]          # [R, C]
        n_rows, n_nodes = state.logits.shape[0], trie.nodes.shape[0]
        if n_nodes == 0:                                 # every continuation is one token
            return state, first
        cache = self._grouped_cache(state, 1, n_nodes)
        tokens = jnp.broadcast_to(trie.nodes, (n_rows, n_nodes))
        positions = state.next_pos[:, None] + trie.depth[None, :]
        hidden, _ = grouped_decode.decode_hidden(model, params, self._per_layer(params),
                                                 tokens, positions, cache, 0,
                                                 gen_valid=trie.visible)
        logits = model.apply({"params": params}, hidden, method=lambda m, h: m.logits(h))
        logits = logits.astype(jnp.float32) * inv_t                                  # [R, S, V]
        lse = jax.nn.logsumexp(logits, -1)                                           # [R, S]
        rest = logits[:, trie.node_of, trie.target] - lse[:, trie.node_of]           # [R, C, W]
        return state, first + jnp.where(trie.used, rest, 0.0).sum(-1)

    # -- host preparation ----------------------------------------------------------------------
    def _images_per_row(self, input_ids, attention_mask, image_grid_thw, row_images=None
                        ) -> list[list[int]]:
        """Per prompt: indices (into image_grid_thw) of its images in token order.

        Default (HF layout): image_grid_thw lists every prompt's images in row order, each used
        once. With `row_images`, image_grid_thw lists distinct images and row_images[r] says
        which ones prompt r shows (the same image may serve many prompts, e.g. the judge's
        G consistency prompts of one rollout image: its vision tower then runs once per chunk).
        """
        c = self.config
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

    def _chunk_rows(self, chunk: int) -> int:
        """Prompt rows of a chunk program: `chunk` prompts bucketed, then a multiple of the
        data-parallel size (filler rows pad it)."""
        rows = _round(chunk, self.buckets.num_prompts, "num_prompts")
        return -(-rows // self.data_parallel) * self.data_parallel

    def _positions(self, rows, input_ids, attention_mask, position_ids, rope_deltas, all_grid,
                   images) -> tuple[np.ndarray, np.ndarray]:
        """mRoPE positions [3, n, L] of `rows` and the position of their first new token [n]:
        the caller's, or processing.rope_index's."""
        c = self.config
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

    def _chunk(self, rows: np.ndarray, n_chunk_rows: int, input_ids, attention_mask,
               position_ids, rope_deltas, pixel_values, image_grid_thw, images) -> _Chunk:
        c = self.config
        ids, mask = input_ids[rows], attention_mask[rows]
        n_valid = (mask != 0).sum(1)
        if (n_valid == 0).any():
            raise ValueError(f"prompts {rows[n_valid == 0].tolist()} have an all-zero "
                             "attention_mask")
        length = _round(int(n_valid.max()), self.buckets.prompt_len, "prompt_len")
        all_grid = _grid_of(image_grid_thw)
        used = [i for r in rows for i in images[r]]
        pos, next_pos = self._positions(rows, input_ids, attention_mask, position_ids,
                                        rope_deltas, all_grid, images)
        b = n_chunk_rows
        out_ids = np.full((b, length), _pad_of(c), np.int32)
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
            pv = np.concatenate([pixel_values[starts[i]:starts[i + 1]] for i in distinct], 0)
            vin = vision_lib.build_vision_inputs_for(c, all_grid[distinct], self.buckets.vision)
            pv = vision_lib.pad_pixel_values(pv, vin.num_patches)
            merged = patches // c.vision.merge_unit
            offset = dict(zip(distinct, np.concatenate([[0], np.cumsum(merged[distinct])])))
            slot = np.full((b, length), -1, np.int32)
            for j, r in enumerate(rows):
                where = np.flatnonzero((out_ids[j] == c.image_token_id) & (out_mask[j] != 0))
                slot[j, where] = np.concatenate(
                    [offset[i] + np.arange(merged[i]) for i in images[r]] or [[]])
        return _Chunk(out_ids, out_mask, out_pos, nxt, valid, pv, vin, slot, len(rows))

    # -- shared prefixes (share_prefix=True) -----------------------------------------------------
    def _shared_units(self, tokens: list[np.ndarray], images, cap: int
                      ) -> list[tuple[np.ndarray, int]]:
        """(rows, prefix length) per unit: rows with the same images, at most `cap` of them,
        and the length of their longest common token prefix that holds every image token and
        leaves each row >= 1 token (rows where no such prefix exists become units of one)."""
        image_id = self.config.image_token_id
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
            return p >= 1 and not any((tokens[r][p:] == image_id).any() for r in rows)

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

    def _shared_chunks(self, params, input_ids, attention_mask, pixel_values, image_grid_thw,
                       position_ids, rope_deltas, images, group, new_tokens, logit_positions):
        """share_prefix: yield (rows, PromptState) per chunk of units (see the module docstring)."""
        c = self.config
        n = input_ids.shape[0]
        valid = attention_mask != 0
        if (valid.sum(1) == 0).any():
            raise ValueError(f"prompts {np.flatnonzero(valid.sum(1) == 0).tolist()} have an "
                             "all-zero attention_mask")
        pos, next_pos = self._positions(np.arange(n), input_ids, attention_mask, position_ids,
                                        rope_deltas, _grid_of(image_grid_thw), images)
        tokens = [input_ids[r][valid[r]] for r in range(n)]
        row_pos = [pos[:, r][:, valid[r]] for r in range(n)]
        # unit size: at most a chunk's share per data-parallel shard, and no larger than the
        # largest image group, so text units (the coherence prompts of a merged call) pad to
        # the image groups' M and run in the same programs
        cap = max(1, min(self.chunk_size or n, n) // self.data_parallel)
        image_groups = collections.Counter(tuple(i) for i in images if i)
        if image_groups:
            cap = min(cap, max(image_groups.values()))
        by_m: dict[int, list] = {}
        for unit in self._shared_units(tokens, images, cap):
            by_m.setdefault(_round(len(unit[0]), self.buckets.num_prompts, "num_prompts"),
                            []).append(unit)
        pad = _pad_of(c)
        for m, units in sorted(by_m.items()):
            suffix_need = lambda u: max(len(tokens[r]) for r in u[0]) - u[1]
            units.sort(key=lambda u: (_round(u[1], self.buckets.prompt_len, "prompt_len"),
                                      suffix_need(u)))
            per = max(1, min(self.chunk_size or n, n) // m)
            n_prefix = self._chunk_rows(min(per, len(units)))
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
                prefix = self._chunk(np.arange(len(part)), n_prefix, pre_ids, pre_mask, pre_pos,
                                     None, pixel_values, image_grid_thw,
                                     [images[rows[0]] for rows, _ in part])
                ch = self._suffix_chunk(prefix, part, m, tokens, row_pos, next_pos)
                self.check_memory(params, len(ch.rows), prefix.input_ids.shape[1] +
                                  ch.input_ids.shape[1], group, new_tokens,
                                  0 if prefix.pixel_values is None else
                                  prefix.pixel_values.shape[0], logit_positions)
                state = self._prefill_shared(
                    params, self._prefill_args(prefix), self._put(ch.input_ids, ("batch", None)),
                    self._put(ch.attention_mask, ("batch", None)),
                    self._put(ch.positions, ("batch", None)), self._put(ch.next_pos, ("batch",)),
                    self._put(ch.row_valid, ("batch",)))
                yield ch.rows, state

    def _suffix_chunk(self, prefix: _Chunk, part, m: int, tokens, row_pos, next_pos
                      ) -> _SuffixChunk:
        n_rows = prefix.input_ids.shape[0] * m
        need = max(len(tokens[r]) - p for rows, p in part for r in rows)
        length = _round(need, self.buckets.suffix_len, "suffix_len")
        ids = np.full((n_rows, length), _pad_of(self.config), np.int32)
        mask = np.zeros((n_rows, length), np.int32)
        positions = np.zeros((n_rows, length), np.int32)
        nxt = np.ones((n_rows,), np.int32)
        rows_out = np.full((n_rows,), -1, np.int64)
        for j, (rows, p) in enumerate(part):
            for i, r in enumerate(rows):
                k, suffix = j * m + i, tokens[r][p:]
                ids[k, length - len(suffix):] = suffix
                mask[k, length - len(suffix):] = 1
                positions[k, length - len(suffix):] = row_pos[r][0, p:]  # text: rows equal
                nxt[k], rows_out[k] = next_pos[r], r
        valid = rows_out >= 0
        mask[~valid, -1] = 1                          # filler rows: one valid pad token
        return _SuffixChunk(prefix, ids, mask, positions, nxt, valid, rows_out)

    def _prefill_args(self, ch: _Chunk) -> tuple:
        """A chunk's prefill arguments, placed on the mesh."""
        vin = None if ch.vision_inputs is None else jax.tree.map(
            lambda x: self._put(x, (None,) * np.ndim(x)), ch.vision_inputs)
        return (self._put(ch.input_ids, _PREFILL_AXES["input_ids"]),
                self._put(ch.attention_mask, _PREFILL_AXES["attention_mask"]),
                self._put(ch.position_ids, _PREFILL_AXES["position_ids"]),
                self._put(ch.next_pos, _PREFILL_AXES["next_pos"]),
                self._put(ch.row_valid, _PREFILL_AXES["row_valid"]),
                self._put(ch.pixel_values, _PREFILL_AXES["pixel_values"]), vin,
                self._put(ch.image_slot, _PREFILL_AXES["image_slot"]))

    # -- memory --------------------------------------------------------------------------------
    def memory_estimate(self, params, num_prompts: int, prompt_len: int, group: int,
                        new_tokens: int, num_patches: int = 0, logit_positions: int = 1
                        ) -> dict[str, int]:
        """Per-device bytes: params (as placed), cache, largest activations (prefill/decode).

        logit_positions: new tokens per row whose full-vocabulary logits exist at once (1 when
        sampling; the continuation width when scoring)."""
        c, t = self.config, self.config.text
        dp = self.data_parallel
        tp = 1 if self.mesh is None else self.mesh.shape["tensor"]
        item = c.compute_dtype.itemsize
        param_bytes = 0
        for x in jax.tree.leaves(params):
            shards = getattr(x, "addressable_shards", None)
            param_bytes += shards[0].data.nbytes if shards else x.nbytes
        cache = grouped_decode.grouped_cache_bytes(c, num_prompts, prompt_len, group, new_tokens)
        cache //= dp * (tp if t.num_key_value_heads % tp == 0 else 1)
        rows = num_prompts * group
        tokens = num_prompts * prompt_len
        prefill = tokens * (4 * t.hidden_size + 3 * t.intermediate_size) * item
        prefill += num_prompts * t.num_attention_heads * 4 * layers.score_elements(  # fp32 scores
            c.attention_impl, prompt_len, prompt_len)
        prefill += 2 * num_prompts * t.vocab_size * 4
        v = c.vision
        prefill_vision = num_patches * (4 * v.hidden_size + 3 * v.intermediate_size) * item
        decode = (5 + 2 * logit_positions) * rows * t.vocab_size * 4 + \
            rows * logit_positions * t.num_attention_heads * (prompt_len + new_tokens) * 4 * 2
        act = max(prefill // dp + prefill_vision, decode // dp)
        return {"params": param_bytes, "cache": cache, "activations": act,
                "total": param_bytes + cache + act}

    def _limit(self) -> tuple[int, str]:
        if self.memory_limit_bytes is not None:
            return self.memory_limit_bytes, "memory_limit_bytes"
        dev = jax.local_devices()[0] if self.mesh is None else next(
            (d for d in self.mesh.devices.flat if d.process_index == jax.process_index()),
            self.mesh.devices.flat[0])
        try:
            stats = dev.memory_stats() or {}
        except Exception:  # noqa: BLE001 (backends without memory stats)
            stats = {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
        return _host_limit_bytes(), "host RAM"

    def check_memory(self, params, num_prompts, prompt_len, group, new_tokens, num_patches=0,
                     logit_positions=1):
        """Raise SamplerMemoryError (before any compilation) if the shapes cannot fit."""
        key = (num_prompts, prompt_len, group, new_tokens, num_patches, logit_positions)
        if key in self._checked_shapes:
            return
        limit, source = self._limit()
        if limit:
            need = self.memory_estimate(params, num_prompts, prompt_len, group, new_tokens,
                                        num_patches, logit_positions)
            log.info("sampler: %d prompts x G=%d, prompt bucket %d, %d new tokens: about %s per "
                     "device (limit %s, %s)", num_prompts, group, prompt_len, new_tokens,
                     _fmt_gib(need["total"]), _fmt_gib(limit), source)
            if need["total"] > limit:
                raise SamplerMemoryError(
                    f"sampling {num_prompts} prompts x G={group} (prompt bucket {prompt_len}, "
                    f"{new_tokens} new tokens) needs about {_fmt_gib(need['total'])} per device "
                    f"(params {_fmt_gib(need['params'])}, KV cache {_fmt_gib(need['cache'])}, "
                    f"activations {_fmt_gib(need['activations'])}) but the limit is "
                    f"{_fmt_gib(limit)} ({source}); lower chunk_size, max_new_tokens or the "
                    "prompt length, or shard over more devices")
        self._checked_shapes.add(key)

    # -- prefill of a batch, chunk by chunk ---------------------------------------------------
    def prefill_chunks(self, params, input_ids, attention_mask=None, pixel_values=None,
                       image_grid_thw=None, *, position_ids=None, rope_deltas=None,
                       row_images=None, share_prefix: bool = False, group: int = 1,
                       new_tokens: int = 16, logit_positions: int = 1):
        """Yield (rows, PromptState) per chunk, after the fit check for `group` continuations
        of `new_tokens` each (inputs as in `generate`); rows [R]: the caller's row of each of
        the state's prompt rows, -1 on filler rows."""
        c = self.config
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        attention_mask = (np.ones_like(input_ids) if attention_mask is None
                          else np.asarray(attention_mask))
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                             f"{input_ids.shape}")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("prompts must be left-padded (attention_mask[:, -1] == 1 for every "
                             "row) so that every prompt ends at the last column")
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together (or neither)")
        if position_ids is not None and np.shape(position_ids) != (3,) + input_ids.shape:
            raise ValueError(f"position_ids must be [3, B, L] = {(3,) + input_ids.shape}, got "
                             f"{np.shape(position_ids)}")
        if pixel_values is not None:
            pixel_values = np.asarray(pixel_values)
        images = self._images_per_row(input_ids, attention_mask, image_grid_thw, row_images)
        if share_prefix:
            yield from self._shared_chunks(params, input_ids, attention_mask, pixel_values,
                                           image_grid_thw, position_ids, rope_deltas, images,
                                           group, new_tokens, logit_positions)
            return
        n = input_ids.shape[0]
        chunk = min(self.chunk_size or n, n)
        n_chunk_rows = self._chunk_rows(chunk)
        for start in range(0, n, chunk):
            rows = np.arange(start, min(start + chunk, n))
            ch = self._chunk(rows, n_chunk_rows, input_ids, attention_mask, position_ids,
                             rope_deltas, pixel_values, image_grid_thw, images)
            self.check_memory(params, n_chunk_rows, ch.input_ids.shape[1], group, new_tokens,
                              0 if ch.pixel_values is None else ch.pixel_values.shape[0],
                              logit_positions)
            state = self._prefill(params, *self._prefill_args(ch))
            yield np.concatenate([rows, np.full(n_chunk_rows - len(rows), -1)]), state

    # -- ahead-of-time tracing (emor3_jax/aot.py) ------------------------------------------------
    # The programs `generate` / `score` run, traced from shapes alone: arguments are
    # ShapeDtypeStructs laid out as the real calls place their host arrays (params as given,
    # e.g. abstract with shardings on a TPU topology mesh). `.lower().compile()` the result.
    def _abstract(self, shape, dtype, names):
        sh = None if self.mesh is None else NamedSharding(self.mesh, self._spec(names, shape))
        return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), dtype, sharding=sh)

    def _abstract_prefill_args(self, b: int, length: int, image_grid_thw) -> tuple:
        """`_prefill_args` of a chunk of b rows of `length` tokens, shapes only."""
        c = self.config
        a = lambda name, shape, dtype: self._abstract(shape, dtype, _PREFILL_AXES[name])
        pv = vin = slot = None
        if image_grid_thw is not None and len(image_grid_thw):
            grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
            host = vision_lib.build_vision_inputs_for(c, grid, self.buckets.vision)
            vin = jax.tree.map(lambda x: self._abstract(x.shape, x.dtype, (None,) * x.ndim), host)
            pv = a("pixel_values", (host.num_patches, c.vision.patch_dim), np.float32)
            slot = a("image_slot", (b, length), np.int32)
        return (a("input_ids", (b, length), np.int32), a("attention_mask", (b, length), np.int32),
                a("position_ids", (3, b, length), np.int32), a("next_pos", (b,), np.int32),
                a("row_valid", (b,), np.bool_), pv, vin, slot)

    def trace_prefill(self, params, *, num_prompts: int, prompt_len: int, image_grid_thw=None):
        """The prefill program of a chunk of `num_prompts` prompts (before bucketing, i.e.
        min(chunk_size, batch)) of `prompt_len` tokens holding the distinct images
        `image_grid_thw` [n, 3] (None: text only), bucketed as `prefill_chunks` buckets."""
        b = self._chunk_rows(num_prompts)
        length = _round(prompt_len, self.buckets.prompt_len, "prompt_len")
        return self._prefill.trace(params, *self._abstract_prefill_args(b, length, image_grid_thw))

    def shared_chunk_rows(self, num_prompts: int, unit: int) -> tuple[int, int]:
        """share_prefix: (prefixes, suffix rows per prefix M) of a chunk of `num_prompts`
        prompts in units of `unit` prompts sharing a prefix (as `_shared_chunks` cuts it)."""
        m = _round(unit, self.buckets.num_prompts, "num_prompts")
        return self._chunk_rows(max(1, num_prompts // m)), m

    def trace_prefill_shared(self, params, *, num_prompts: int, unit: int, prefix_len: int,
                             suffix_len: int, image_grid_thw=None):
        """The share_prefix prefill of a chunk of `num_prompts` prompts in units of `unit`
        sharing a `prefix_len`-token prefix (one image each: `image_grid_thw` per prefix, None
        for text), each with its own `suffix_len`-token suffix, bucketed as the sampler does."""
        b, m = self.shared_chunk_rows(num_prompts, unit)
        lp = _round(prefix_len, self.buckets.prompt_len, "prompt_len")
        ls = _round(suffix_len, self.buckets.suffix_len, "suffix_len")
        grid = None if image_grid_thw is None else list(image_grid_thw)[:b]
        a = lambda shape, dtype: self._abstract(shape, dtype, ("batch",) + (None,) * (
            len(shape) - 1))
        return self._prefill_shared.trace(
            params, self._abstract_prefill_args(b, lp, grid), a((b * m, ls), np.int32),
            a((b * m, ls), np.int32), a((b * m, ls), np.int32), a((b * m,), np.int32),
            a((b * m,), np.bool_))

    def trace_decode(self, params, state, *, group: int, new_tokens: int, top_k: int = 0):
        """The decode program of `group` continuations of `new_tokens` (bucketed) per prompt of
        a prefilled chunk; `state` is the prefill's output (abstract, with its shardings)."""
        new_bucket = _round(new_tokens, self.buckets.new_tokens, "new_tokens")
        rep = lambda shape, dtype: self._abstract(shape, dtype, (None,) * len(shape))
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)     # uncommitted, as in generate
        eos = _padded_ids(_config_eos(self.config))
        n_rows = state.logits.shape[0] * group
        return self._decode.trace(
            params, state, scalar(jax.random.key(0).dtype), temperature=scalar(jnp.float32),
            top_p=scalar(jnp.float32), max_new_tokens=scalar(jnp.int32),
            eos_ids=rep(eos.shape, np.int32), pad_id=scalar(jnp.int32),
            allowed=rep((self.config.text.vocab_size,), np.bool_),
            row_ids=self._abstract((n_rows,), np.int32, ("batch",)),
            group=group, new_bucket=new_bucket, top_k=top_k)

    def trace_score(self, params, state, *, num_continuations: int, width: int):
        """The score program of `num_continuations` continuations of up to `width` tokens per
        prompt of a prefilled chunk (`state` as for trace_decode), at the largest trie they can
        make (no shared prefixes: num_continuations * (width - 1) nodes, bucketed)."""
        n = num_continuations * (width - 1)
        n = _round(n, self.buckets.new_tokens_score, "new_tokens_score") if n else 0
        c, w = num_continuations, max(1, width - 1)
        a = lambda shape, dtype: self._abstract(shape, dtype, (None,) * len(shape))
        trie = ContinuationTrie(a((c,), np.int32), a((n,), np.int32), a((n,), np.int32),
                                a((n, n), np.bool_), a((c, w), np.int32), a((c, w), np.int32),
                                a((c, w), np.bool_))
        return self._score.trace(params, state, trie, jax.ShapeDtypeStruct((), jnp.float32))

    # -- public --------------------------------------------------------------------------------
    def generate(self, params, input_ids, attention_mask=None, pixel_values=None,
                 image_grid_thw=None, *, max_new_tokens: int, num_samples: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_ids: Sequence[int] | None = None,
                 forbidden_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None, valid_vocab_size: int | None = None,
                 rng=None, position_ids=None, rope_deltas=None,
                 row_images: Sequence[Sequence[int]] | None = None,
                 share_prefix: bool = False,
                 row_ids: Sequence[int] | None = None) -> SampleOutput:
        """Sample `num_samples` continuations of every prompt; see the module docstring.

        input_ids/attention_mask [B, L] left-padded (numpy); pixel_values [P, patch_dim]
        (every prompt's patches in row order, extra zero rows allowed) with image_grid_thw
        [n_images, 3]; position_ids [3, B, L] / rope_deltas [B] from the data pipeline, else
        computed here. row_images: prompts sharing images (see `_images_per_row`).
        eos_token_ids: any of them ends a row (default: the config's eos);
        forbidden_token_ids: never sampled (the vision special tokens are always added);
        valid_vocab_size: ids >= it are never sampled (a tokenizer smaller than the head).
        share_prefix: prefill each group's common prefix once (module docstring).
        row_ids: the random stream of each prompt (default: its row; sample g of prompt b
        draws from stream row_ids[b] * num_samples + g), so a prompt's samples do not depend
        on the chunk or the order it is run in.
        """
        c = self.config
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
        eos = _config_eos(c) if eos_token_ids is None else tuple(int(i) for i in eos_token_ids)
        pad = _pad_of(c) if pad_token_id is None else int(pad_token_id)
        forbidden = set(forbidden_token_ids or ()) | {
            c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id}
        allowed = rules.allowed_mask(c.text.vocab_size, sorted(forbidden), valid_vocab_size)
        if temperature == 0.0 and rng is None:
            rng = jax.random.key(0)          # unused by greedy decoding
        if rng is None:
            raise ValueError("sampling with temperature > 0 needs rng (a jax PRNG key)")
        n = np.shape(input_ids)[0]
        stream = np.arange(n) if row_ids is None else np.asarray(row_ids, np.int64).reshape(-1)
        if len(stream) != n:
            raise ValueError(f"row_ids has {len(stream)} entries for {n} prompts")
        new_bucket = _round(max_new_tokens, self.buckets.new_tokens, "new_tokens")
        shared = dict(eos_ids=self._put(_padded_ids(eos), (None,)),
                      pad_id=jnp.int32(pad), allowed=self._put(allowed, (None,)),
                      temperature=jnp.float32(temperature), top_p=jnp.float32(top_p),
                      max_new_tokens=jnp.int32(max_new_tokens))  # trace_decode mirrors these
        g = num_samples
        outs = []
        for rows, state in self.prefill_chunks(
                params, input_ids, attention_mask, pixel_values, image_grid_thw,
                position_ids=position_ids, rope_deltas=rope_deltas, row_images=row_images,
                share_prefix=share_prefix, group=g, new_tokens=new_bucket):
            ids = np.where(rows >= 0, stream[np.maximum(rows, 0)], 0)[:, None] * g + np.arange(g)
            _, tokens, logprobs, lengths = self._decode(
                params, state, rng, row_ids=self._put(ids.reshape(-1).astype(np.int32),
                                                      ("batch",)),
                group=g, new_bucket=new_bucket, top_k=top_k, **shared)
            outs.append((rows, tokens, logprobs, lengths))
        # fetch after dispatching every chunk, so the host never waits between chunks
        # (shd.to_host: with a mesh over several processes, a gather every process joins)
        tokens = np.full((n * g, max_new_tokens), pad, np.int32)
        logprobs = np.zeros((n * g, max_new_tokens), np.float32)
        lengths = np.zeros((n * g,), np.int32)
        for rows, t, p, n_ in outs:
            real = np.flatnonzero(rows >= 0)
            src = (real[:, None] * g + np.arange(g)).reshape(-1)
            dst = (rows[real][:, None] * g + np.arange(g)).reshape(-1)
            tokens[dst] = shd.to_host(t)[src, :max_new_tokens]
            logprobs[dst] = shd.to_host(p)[src, :max_new_tokens]
            lengths[dst] = shd.to_host(n_)[src]
        return SampleOutput(tokens=tokens, logprobs=logprobs, lengths=lengths)

    def score(self, params, input_ids, attention_mask=None, pixel_values=None,
              image_grid_thw=None, *, continuations: Sequence[Sequence[int]],
              position_ids=None, rope_deltas=None, pad_token_id: int | None = None,
              row_images: Sequence[Sequence[int]] | None = None,
              temperature: float = 1.0, share_prefix: bool = False) -> np.ndarray:
        """log p(continuation | prompt) for every prompt x continuation -> [B, C] float32.

        The sum of the continuation's token log-probs under the full softmax of the logits
        divided by `temperature` (1 = the model's own distribution; nothing forbidden, no
        top-p: every candidate keeps a probability). Each prompt is prefilled once; the
        continuations' distinct proper prefixes (a token trie: "n", "n one" and "no" feed 2
        tokens, not 3) run through the decoder in ONE multi-token call with a tree mask, so
        scoring costs one prefill plus one short forward.
        share_prefix: prefill each group's common prefix once (module docstring).
        """
        conts = [list(map(int, cont)) for cont in continuations]
        if not conts or min(map(len, conts)) < 1:
            raise ValueError("score: give at least one continuation, each with >= 1 token")
        if not temperature > 0:
            raise ValueError(f"score: temperature must be > 0, got {temperature}")
        pad = _pad_of(self.config) if pad_token_id is None else int(pad_token_id)
        trie = continuation_trie(conts, pad, self.buckets.new_tokens_score)
        n_nodes = int(trie.nodes.shape[0])
        trie_d = jax.tree.map(lambda x: self._put(x, (None,) * x.ndim), trie)
        temp_d = jnp.float32(temperature)
        outs = []
        for rows, state in self.prefill_chunks(
                params, input_ids, attention_mask, pixel_values, image_grid_thw,
                position_ids=position_ids, rope_deltas=rope_deltas, row_images=row_images,
                share_prefix=share_prefix, group=1, new_tokens=max(1, n_nodes),
                logit_positions=max(1, n_nodes)):
            _, logp = self._score(params, state, trie_d, temp_d)
            outs.append((rows, logp))
        out = np.zeros((np.shape(input_ids)[0], len(conts)), np.float32)
        for rows, lp in outs:
            real = rows >= 0
            out[rows[real]] = shd.to_host(lp)[real]
        return out


# Logical axes of the prefill program's host inputs (how `prefill_chunks` places them).
_PREFILL_AXES = {"input_ids": ("batch", None), "attention_mask": ("batch", None),
                 "position_ids": (None, "batch", None), "next_pos": ("batch",),
                 "row_valid": ("batch",), "pixel_values": (None, None),
                 "image_slot": ("batch", None)}


def _grid_of(image_grid_thw) -> np.ndarray:
    return (np.zeros((0, 3), np.int64) if image_grid_thw is None
            else np.asarray(image_grid_thw, np.int64).reshape(-1, 3))


def _padded_ids(ids: Sequence[int], multiple: int = 4) -> np.ndarray:
    """ids padded with -1 (matches no token) to a multiple of 4: no recompile per EOS count."""
    n = max(multiple, -(-len(ids) // multiple) * multiple)
    out = np.full((n,), -1, np.int32)
    out[:len(ids)] = ids
    return out


def _config_eos(config) -> tuple[int, ...]:
    eos = config.text.eos_token_id
    if eos is None:
        return ()
    return tuple(int(i) for i in eos) if isinstance(eos, (tuple, list)) else (int(eos),)


def _pad_of(config) -> int:
    if config.text.pad_token_id is not None:
        return int(config.text.pad_token_id)
    eos = _config_eos(config)
    return eos[0] if eos else 0


# ----------------------------------------------------------------------------------------------
# A few recent Samplers, so repeated `generate` calls reuse their compiled programs.
_SAMPLERS: collections.OrderedDict[tuple, Sampler] = collections.OrderedDict()
_MAX_SAMPLERS = 8


def get_sampler(model, mesh=None, **kw) -> Sampler:
    """A Sampler shared by `generate` calls with the same model config, mesh and settings."""
    key = (model.config, mesh, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _SAMPLERS:
        _SAMPLERS[key] = Sampler(model, mesh=mesh, **kw)
        while len(_SAMPLERS) > _MAX_SAMPLERS:
            _SAMPLERS.popitem(last=False)
    _SAMPLERS.move_to_end(key)
    return _SAMPLERS[key]


def generate(model, params, input_ids, attention_mask=None, pixel_values=None,
             image_grid_thw=None, *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             eos_token_ids: Sequence[int] | None = None, rng=None, mesh=None,
             buckets: SamplerBuckets | None = None, chunk_size: int | None = None,
             memory_limit_bytes: int | None = None, **kwargs) -> SampleOutput:
    """Functional entry point (docs/architecture.md): `get_sampler(model, mesh, ...).generate(...)`.

    kwargs: forbidden_token_ids, pad_token_id, valid_vocab_size, position_ids, rope_deltas.
    """
    opts = dict(chunk_size=chunk_size, memory_limit_bytes=memory_limit_bytes)
    if buckets is not None:
        opts["buckets"] = buckets
    sampler = get_sampler(model, mesh, **opts)
    return sampler.generate(params, input_ids, attention_mask, pixel_values, image_grid_thw,
                            max_new_tokens=max_new_tokens, num_samples=num_samples,
                            temperature=temperature, top_p=top_p, top_k=top_k,
                            eos_token_ids=eos_token_ids, rng=rng, **kwargs)
