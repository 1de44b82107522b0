"""The programs `Sampler.generate` / `score` run, traced from shapes alone (the AOT tool,
emor3_jax/aot/): arguments are ShapeDtypeStructs laid out as the real calls place their host
arrays (params as given, e.g. abstract with shardings on a TPU topology mesh); `.lower()
.compile()` the result. A base of `Sampler` (sampler.py): it reads the sampler's config, mesh,
buckets and compiled programs, and buckets shapes as the sampler does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from emor3_jax.processing import vision as vision_lib
from emor3_jax.sampling import packing
from emor3_jax.sampling.packing import ContinuationTrie
from emor3_jax.sampling.programs import PREFILL_AXES, DecodeSettings, spec


class SamplerTracing:
    """`trace_*`: each program of `Sampler` as `jax.jit(...).trace` gives it, from shapes."""

    def _abstract(self, shape, dtype, names):
        sh = None if self.mesh is None else NamedSharding(self.mesh,
                                                          spec(names, shape, self.mesh))
        return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), dtype, sharding=sh)

    def _abstract_prefill_args(self, b: int, length: int, image_grid_thw) -> tuple:
        """`_prefill_args` of a chunk of b rows of `length` tokens, shapes only."""
        c = self.config
        a = lambda name, shape, dtype: self._abstract(shape, dtype, PREFILL_AXES[name])
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
        length = packing.round_to(prompt_len, self.buckets.prompt_len, "prompt_len")
        return self._prefill.trace(params, *self._abstract_prefill_args(b, length, image_grid_thw))

    def shared_chunk_rows(self, num_prompts: int, unit: int) -> tuple[int, int]:
        """share_prefix: (prefixes, suffix rows per prefix M) of a chunk of `num_prompts`
        prompts in units of `unit` prompts sharing a prefix (as `packing.shared_chunks` cuts it)."""
        m = packing.round_to(unit, self.buckets.num_prompts, "num_prompts")
        return self._chunk_rows(max(1, num_prompts // m)), m

    def trace_prefill_shared(self, params, *, num_prompts: int, unit: int, prefix_len: int,
                             suffix_len: int, image_grid_thw=None):
        """The share_prefix prefill of a chunk of `num_prompts` prompts in units of `unit`
        sharing a `prefix_len`-token prefix (one image each: `image_grid_thw` per prefix, None
        for text), each with its own `suffix_len`-token suffix, bucketed as the sampler does."""
        b, m = self.shared_chunk_rows(num_prompts, unit)
        lp = packing.round_to(prefix_len, self.buckets.prompt_len, "prompt_len")
        ls = packing.round_to(suffix_len, self.buckets.suffix_len, "suffix_len")
        grid = None if image_grid_thw is None else list(image_grid_thw)[:b]
        a = lambda shape, dtype: self._abstract(shape, dtype, ("batch",) + (None,) * (
            len(shape) - 1))
        return self._prefill_shared.trace(
            params, self._abstract_prefill_args(b, lp, grid), a((b * m, ls), np.int32),
            a((b * m, ls), np.int32), a((b * m, ls), np.int32), a((b * m,), np.int32),
            a((b * m,), np.bool_))

    def trace_decode(self, params, state, carry=None, *, group: int, new_tokens: int,
                     window: int | None = None, top_k: int = 0, top_p: float = 1.0):
        """The decode programs of `group` continuations of `new_tokens` (bucketed) per prompt of
        a prefilled chunk: window None, `decode_start` (`carry` unused); else the window's
        (`decode_windows`), from `carry` (the program before's). `state` is the prefill's
        output (abstract, with their shardings, as `carry`). top_p: only whether it is < 1 (a
        static choice, as in `generate`); the value is traced."""
        new_bucket = packing.round_to(new_tokens, self.buckets.new_tokens, "new_tokens")
        rep = lambda shape, dtype: self._abstract(shape, dtype, (None,) * len(shape))
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)     # uncommitted, as in generate
        eos = packing.padded_ids(packing.config_eos(self.config))
        n_rows = state.logits.shape[0] * group
        kw = dict(temperature=scalar(jnp.float32), top_p=scalar(jnp.float32),
                  eos_ids=rep(eos.shape, np.int32), pad_id=scalar(jnp.int32),
                  allowed=rep((self.config.text.vocab_size,), np.bool_),
                  row_ids=self._abstract((n_rows,), np.int32, ("batch",)),
                  settings=DecodeSettings(group, new_bucket, top_k, window or 0,
                                          nucleus=top_p < 1.0))
        key = scalar(jax.random.key(0).dtype)
        if window is None:
            return self._decode_start.trace(state, key, **kw)
        return self._decode.trace(params, state, carry, key,
                                  max_new_tokens=scalar(jnp.int32), **kw)

    def trace_score(self, params, state, *, num_continuations: int, width: int):
        """The score program of `num_continuations` continuations of up to `width` tokens per
        prompt of a prefilled chunk (`state` as for trace_decode), at the largest trie they can
        make (no shared prefixes: num_continuations * (width - 1) nodes, bucketed)."""
        n = num_continuations * (width - 1)
        n = packing.round_to(n, self.buckets.new_tokens_score, "new_tokens_score") if n else 0
        c, w = num_continuations, max(1, width - 1)
        a = lambda shape, dtype: self._abstract(shape, dtype, (None,) * len(shape))
        trie = ContinuationTrie(a((c,), np.int32), a((n,), np.int32), a((n,), np.int32),
                                a((n, n), np.bool_), a((c, w), np.int32), a((c, w), np.int32),
                                a((c, w), np.bool_))
        return self._score.trace(params, state, trie, jax.ShapeDtypeStruct((), jnp.float32))
