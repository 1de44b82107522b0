"""Grouped sampling for GRPO: prefill each prompt once, draw G continuations inside jit.

    sampler = Sampler(model, mesh=mesh)                       # keeps its compiled programs
    settings = SamplingSettings.for_ids(ids, max_new_tokens=256, num_samples=8,
                                        temperature=1.0)              # types.py
    res = sampler.generate(params, batch, settings, rng=key)  # a PromptBatch or Prompts
    res.tokens [B*G, T] int32 (pad after the end), res.logprobs [B*G, T] fp32 (0 after the end),
    res.lengths [B*G] int32 (EOS included); rows are prompt-major: row b*G + g.

Per chunk of prompts (host numpy, then compiled programs):
 1. host: split the batch's images per prompt, bucket the prompt length (left padding), the
    vision index arrays (processing.vision) and the batch; mRoPE positions from the caller's
    `position_ids`/`rope_deltas` or `processing.rope_index.get_rope_index`;
 2. `prefill` program: vision tower + prompt, once per prompt (never G times) -> a
    `PromptState`: the prompt's KV cache (grouped_decode layout) and next-token logits;
 3. `decode` programs: a `GroupedCache` whose prompt part is shared by the G rows of a group
    (see grouped_decode.py: logically the repeated cache, physically one prompt copy) plus G
    empty generated-token rows. `decode_start` makes them and draws the first token of every
    row from the prompt's logits; then a `lax.while_loop` feeds one token per row until every
    row has ended or max_new_tokens is reached, in windows (`decode_windows`: steps < 128,
    then < 512, < 2048, ...: `buckets.decode_window`, then 4x each), one program each, whose
    attention reads only the window's gen slots; a window whose rows have all ended returns
    at once. The cache and the rows' tokens are the carry (`DecodeCarry`), donated from one
    program to the next and updated in place; the prompt state is donated and handed back.
    Decode positions are last prompt position + 1 + step on all three mRoPE rows.
 `score` (the judge's candidate answers) replaces step 3 by one multi-token call over the
 token trie of C fixed continuations per prompt (tree attention mask) and returns
 log p(continuation | prompt).

Shared prefixes (`settings.share_prefix`, the judge): prompts showing the same images (text-only
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
bucket) for prefill_shared; plus (G, new-token bucket, top_k, window) for decode and (C,
trie-node bucket, longest continuation) for score. Temperature, top-p and max_new_tokens are traced.
`num_programs` counts the programs compiled so far (the bench and the tests read it).

Prompts may share images (`row_images`, e.g. the judge's G consistency prompts of one rollout
image): each chunk then runs the vision tower once per distinct image.

Sharding: with a mesh (of one or several processes), prompts (and their G rows) are split over
the data/fsdp axes, KV heads over `tensor` where they divide; params keep the shardings the caller placed them with
(`qwen2_5_vl.param_shardings`). Each program is compiled for its shapes before it first runs
and checked against the device (`memory_limit_bytes`, else the device's
`memory_stats()["bytes_limit"]`, else the host's RAM) by XLA's memory analysis (memory.py); a
program that cannot fit fails with the number it needs, and one that fits runs as compiled.

Modules: types.py (what goes in and out), packing.py (host numpy: chunks, buckets, shared
prefixes, the continuation trie), programs.py (the jitted program bodies), memory.py (the fit
check), tracing.py (the programs traced from shapes, for the AOT tool), this file (the API).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from emor3_jax import sharding as shd
from emor3_jax.batches import PromptBatch
from emor3_jax.patches import DevicePatches
from emor3_jax.processing import vision as vision_lib
from emor3_jax.sampling import memory, packing, rules
from emor3_jax.sampling.memory import SamplerMemoryError  # noqa: F401 (public here)
from emor3_jax.sampling.packing import (Buckets, ContinuationTrie,  # noqa: F401 (public here)
                                        continuation_trie)
from emor3_jax.sampling.programs import (PREFILL_AXES, CompiledProgram,  # noqa: F401
                                         DecodeSettings, PromptState, SamplerPrograms,
                                         decode_windows, spec)
from emor3_jax.sampling.tracing import SamplerTracing
from emor3_jax.sampling.types import Prompts, Samples, SamplingSettings

log = logging.getLogger(__name__)



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
    decode_window: int = 128          # the first decode window's gen slots (decode_windows)
    vision: vision_lib.VisionPadding = vision_lib.VisionPadding(
        num_patches=geometric_buckets(16), num_windows=geometric_buckets(1),
        num_frames=geometric_buckets(1), frame_len=geometric_buckets(16))


class Sampler(SamplerTracing):
    """Compiled grouped sampling for one model (and mesh); reuse it across calls.

    chunk_size: prompts per program call (a rollout of 512 prompts x 8 runs in pieces);
    None = the whole batch at once. memory_limit_bytes: per-device budget for the fit check
    (None: the device's bytes_limit, or the host RAM on CPU; 0 disables the check).
    On a TPU topology description (emor3_jax/aot/) programs are only traced
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
        self._said_whole = False
        self.programs = SamplerPrograms(model, mesh)
        self._prefill = CompiledProgram(self.programs.prefill, "prefill", self._check_fits)
        self._prefill_shared = CompiledProgram(self.programs.prefill_shared, "prefill_shared",
                                               self._check_fits)
        self._decode_start = CompiledProgram(self.programs.decode_start, "decode_start",
                                             self._check_fits, static_argnames=("settings",),
                                             donate_argnames=("state",))
        self._decode = CompiledProgram(self.programs.decode, "decode", self._check_fits,
                                       static_argnames=("settings",),
                                       donate_argnames=("state", "carry"))
        self._score = CompiledProgram(self.programs.score, "score", self._check_fits,
                                      donate_argnames=("state",))

    @property
    def compiled(self) -> collections.Counter:
        """Program kind -> programs compiled (traced) so far."""
        return self.programs.compiled

    @property
    def num_programs(self) -> int:
        """Programs compiled so far (prefill, prefill_shared, decode_start, decode, score)."""
        return sum(self.compiled.values())

    @property
    def data_parallel(self) -> int:
        return 1 if self.mesh is None else shd.data_parallel_size(self.mesh)

    # -- placement -----------------------------------------------------------------------------
    def _put(self, x, names):
        if x is None:
            return None
        if self.mesh is None:
            return jnp.asarray(x)
        return shd.put_global(x, NamedSharding(self.mesh, spec(names, np.shape(x), self.mesh)))

    def _prefill_args(self, ch: packing.Chunk) -> tuple:
        """A chunk's prefill arguments, placed on the mesh."""
        vin = None if ch.vision_inputs is None else jax.tree.map(
            lambda x: self._put(x, (None,) * np.ndim(x)), ch.vision_inputs)
        return (self._put(ch.input_ids, PREFILL_AXES["input_ids"]),
                self._put(ch.attention_mask, PREFILL_AXES["attention_mask"]),
                self._put(ch.position_ids, PREFILL_AXES["position_ids"]),
                self._put(ch.next_pos, PREFILL_AXES["next_pos"]),
                self._put(ch.row_valid, PREFILL_AXES["row_valid"]),
                self._put(ch.pixel_values, PREFILL_AXES["pixel_values"]), vin,
                self._put(ch.image_slot, PREFILL_AXES["image_slot"]))

    def _chunk_rows(self, chunk: int) -> int:
        return packing.chunk_rows(chunk, self.buckets, self.data_parallel)

    # -- memory --------------------------------------------------------------------------------
    def _check_fits(self, name: str, compiled, args, kwargs) -> None:
        """Before an executable's first run: raise SamplerMemoryError if XLA's memory analysis
        says it needs more than the device limit (memory.py)."""
        limit, source = memory.device_limit(self.mesh, self.memory_limit_bytes)
        memory.check_fits(compiled, _describe(name, args, kwargs), limit, source)

    # -- prefill of a batch, chunk by chunk ---------------------------------------------------
    def prefill_chunks(self, params, prompts: Prompts, *, share_prefix: bool = False,
                       shared_suffix_max: int = 0):
        """Yield (rows, PromptState) per chunk; rows [R]: the caller's row of each of the
        state's prompt rows, -1 on filler rows."""
        c = self.config
        p = prompts
        input_ids, attention_mask = np.asarray(p.input_ids), p.attention_mask
        pixel_values, image_grid_thw = p.pixel_values, p.image_grid_thw
        position_ids, rope_deltas = p.position_ids, p.rope_deltas
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
        if pixel_values is not None and not isinstance(pixel_values, DevicePatches):
            pixel_values = np.asarray(pixel_values)
        images = packing.images_per_row(c, input_ids, attention_mask, image_grid_thw,
                                        p.row_images)
        whole = np.arange(input_ids.shape[0])
        if share_prefix:
            chunks, whole = packing.shared_chunks(
                c, self.buckets, self.chunk_size, self.data_parallel, input_ids, attention_mask,
                pixel_values, image_grid_thw, position_ids, rope_deltas, images,
                max_suffix=shared_suffix_max)
            if len(whole) and not self._said_whole:
                self._said_whole = True
                log.info("sampler: %d of %d prompts have suffixes of more than %d tokens and "
                         "run whole, the rest share their prefixes (shared_suffix_max; said "
                         "once)", len(whole), input_ids.shape[0], shared_suffix_max)
            whole = whole[np.argsort(attention_mask[whole].sum(1), kind="stable")]
            for ch in chunks:
                state = self._prefill_shared(
                    params, self._prefill_args(ch.prefix),
                    self._put(ch.input_ids, ("batch", None)),
                    self._put(ch.attention_mask, ("batch", None)),
                    self._put(ch.positions, ("batch", None)), self._put(ch.next_pos, ("batch",)),
                    self._put(ch.row_valid, ("batch",)))
                yield ch.rows, state
        n = len(whole)
        if not n:
            return
        chunk = min(self.chunk_size or n, n)
        n_chunk_rows = self._chunk_rows(chunk)
        for start in range(0, n, chunk):
            rows = whole[start:start + chunk]
            ch = packing.pack_chunk(c, self.buckets, rows, n_chunk_rows, input_ids,
                                    attention_mask, position_ids, rope_deltas, pixel_values,
                                    image_grid_thw, images)
            state = self._prefill(params, *self._prefill_args(ch))
            yield np.concatenate([rows, np.full(n_chunk_rows - len(rows), -1)]), state

    # -- public --------------------------------------------------------------------------------
    def generate(self, params, prompts: Prompts | PromptBatch, settings: SamplingSettings,
                 rng=None) -> Samples:
        """`settings.num_samples` continuations of every prompt (module docstring); rng: a jax
        PRNG key (greedy decoding, temperature 0, needs none)."""
        c, s = self.config, settings
        prompts = as_prompts(prompts)
        eos = packing.config_eos(c) if s.eos_token_ids is None else s.eos_token_ids
        pad = packing.pad_of(c) if s.pad_token_id is None else int(s.pad_token_id)
        forbidden = set(s.forbidden_token_ids) | {
            c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id}
        allowed = rules.allowed_mask(c.text.vocab_size, sorted(forbidden), s.valid_vocab_size)
        if s.temperature == 0.0 and rng is None:
            rng = jax.random.key(0)          # unused by greedy decoding
        if rng is None:
            raise ValueError("sampling with temperature > 0 needs rng (a jax PRNG key)")
        n = prompts.num_rows
        stream = (np.arange(n) if prompts.row_ids is None
                  else np.asarray(prompts.row_ids, np.int64).reshape(-1))
        if len(stream) != n:
            raise ValueError(f"row_ids has {len(stream)} entries for {n} prompts")
        new_bucket = packing.round_to(s.max_new_tokens, self.buckets.new_tokens, "new_tokens")
        shared = dict(eos_ids=self._put(packing.padded_ids(eos), (None,)),
                      pad_id=jnp.int32(pad), allowed=self._put(allowed, (None,)),
                      temperature=jnp.float32(s.temperature), top_p=jnp.float32(s.top_p),
                      max_new_tokens=jnp.int32(s.max_new_tokens))  # trace_decode mirrors these
        start_args = {k: v for k, v in shared.items() if k != "max_new_tokens"}
        g = s.num_samples
        outs = []
        for rows, state in self.prefill_chunks(params, prompts, share_prefix=s.share_prefix,
                                               shared_suffix_max=s.shared_suffix_max):
            ids = np.where(rows >= 0, stream[np.maximum(rows, 0)], 0)[:, None] * g + np.arange(g)
            ids = self._put(ids.reshape(-1).astype(np.int32), ("batch",))
            decode = DecodeSettings(g, new_bucket, s.top_k, nucleus=s.top_p < 1.0)
            state, carry = self._decode_start(state, rng, row_ids=ids, settings=decode,
                                              **start_args)
            for window in decode_windows(new_bucket, self.buckets.decode_window):
                state, carry = self._decode(
                    params, state, carry, rng, row_ids=ids,
                    settings=dataclasses.replace(decode, window=window), **shared)
            outs.append((rows, carry.tokens, carry.logprobs, carry.lengths))
            del state, carry                  # the cache, before the next chunk's prefill
        # fetch after dispatching every chunk, so the host never waits between chunks
        # (shd.to_host: with a mesh over several processes, a gather every process joins)
        t_out = s.max_new_tokens
        tokens = np.full((n * g, t_out), pad, np.int32)
        logprobs = np.zeros((n * g, t_out), np.float32)
        lengths = np.zeros((n * g,), np.int32)
        for rows, t, p, n_ in outs:
            real = np.flatnonzero(rows >= 0)
            src = (real[:, None] * g + np.arange(g)).reshape(-1)
            dst = (rows[real][:, None] * g + np.arange(g)).reshape(-1)
            tokens[dst] = shd.to_host(t)[src, :t_out]
            logprobs[dst] = shd.to_host(p)[src, :t_out]
            lengths[dst] = shd.to_host(n_)[src]
        return Samples(tokens=tokens, logprobs=logprobs, lengths=lengths)

    def score(self, params, prompts: Prompts | PromptBatch,
              continuations: Sequence[Sequence[int]], *, temperature: float = 1.0,
              pad_token_id: int | None = None, share_prefix: bool = False,
              shared_suffix_max: int = 0) -> np.ndarray:
        """log p(continuation | prompt) for every prompt x continuation -> [B, C] float32.

        The sum of the continuation's token log-probs under the full softmax of the logits
        divided by `temperature` (1 = the model's own distribution; nothing forbidden, no
        top-p: every candidate keeps a probability). Each prompt is prefilled once; the
        continuations' distinct proper prefixes (a token trie: "n", "n one" and "no" feed 2
        tokens, not 3) run through the decoder in ONE multi-token call with a tree mask, so
        scoring costs one prefill plus one short forward.
        share_prefix, shared_suffix_max: as in `SamplingSettings`.
        """
        prompts = as_prompts(prompts)
        conts = [list(map(int, cont)) for cont in continuations]
        if not conts or min(map(len, conts)) < 1:
            raise ValueError("score: give at least one continuation, each with >= 1 token")
        if not temperature > 0:
            raise ValueError(f"score: temperature must be > 0, got {temperature}")
        pad = packing.pad_of(self.config) if pad_token_id is None else int(pad_token_id)
        trie = continuation_trie(conts, pad, self.buckets.new_tokens_score)
        trie_d = jax.tree.map(lambda x: self._put(x, (None,) * x.ndim), trie)
        temp_d = jnp.float32(temperature)
        outs = []
        for rows, state in self.prefill_chunks(params, prompts, share_prefix=share_prefix,
                                               shared_suffix_max=shared_suffix_max):
            _, logp = self._score(params, state, trie_d, temp_d)
            outs.append((rows, logp))
        out = np.zeros((prompts.num_rows, len(conts)), np.float32)
        for rows, lp in outs:
            real = rows >= 0
            out[rows[real]] = shd.to_host(lp)[real]
        return out




def generate(model, params, prompts: Prompts | PromptBatch, settings: SamplingSettings,
             rng=None, *, mesh=None, buckets: SamplerBuckets | None = None,
             chunk_size: int | None = None, memory_limit_bytes: int | None = None) -> Samples:
    """Functional entry point for one call (docs/architecture.md): a `Sampler` that compiles its
    programs and is dropped after. Keep a Sampler for repeated calls."""
    opts = {} if buckets is None else {"buckets": buckets}
    sampler = Sampler(model, mesh=mesh, chunk_size=chunk_size,
                      memory_limit_bytes=memory_limit_bytes, **opts)
    return sampler.generate(params, prompts, settings, rng)


def as_prompts(prompts: Prompts | PromptBatch) -> Prompts:
    """The sampler's view of a data pipeline batch (a `Prompts` passes through)."""
    if not isinstance(prompts, PromptBatch):
        return prompts
    pixel_values, image_grid_thw = prompts.flat_images()
    return Prompts(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                   pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                   position_ids=prompts.mrope_positions, rope_deltas=prompts.rope_deltas)


def _describe(name: str, args, kwargs) -> str:
    """A program call's shapes, for the memory check's message."""
    if name in ("prefill", "prefill_shared"):
        ids = args[1] if name == "prefill" else args[1][0]
        pv = args[6] if name == "prefill" else args[1][5]
        out = (f"{name} of {ids.shape[0]} prompts (prompt bucket {ids.shape[1]}"
               + (f", {pv.shape[0]} image patches" if pv is not None else ""))
        if name == "prefill_shared":
            out += (f"; {args[2].shape[0]} suffix rows of {args[2].shape[1]} tokens; the "
                    "prompt bucket is the shared prefix's")
        return out + ")"
    state = args[0] if name == "decode_start" else args[1] if len(args) > 1 else kwargs["state"]
    prompts, lp = state.logits.shape[0], state.prompt_mask.shape[1]
    if name in ("decode", "decode_start"):
        s = kwargs["settings"]
        window = (", its start" if name == "decode_start" else
                  f", the window of steps < {s.window}" if s.window < s.new_tokens else "")
        return (f"decode of {prompts} prompts x G={s.group} (prompt bucket {lp}, "
                f"{s.new_tokens} new tokens{window})")
    trie = args[2]
    return (f"score of {prompts} prompts (prompt bucket {lp}) x {trie.first.shape[0]} "
            f"continuations ({trie.nodes.shape[0]} trie nodes)")
