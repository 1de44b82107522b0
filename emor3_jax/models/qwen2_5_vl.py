"""Qwen2.5-VL in Flax Linen, numerically matching transformers' Qwen2_5_VLForConditionalGeneration.

Public API:
    model, params = qwen2_5_vl.load_hf(hf_dir, dtype=jnp.float32, mesh=None)
    out = model.apply({"params": params}, input_ids, attention_mask=..., pixel_values=...,
                      image_grid_thw=...)            # out.logits [B, L, V]
    qwen2_5_vl.save_hf(params, model.config, out_dir)

Two ways to call it:
- Eager convenience (HF inputs exactly): pass concrete numpy `image_grid_thw`; the model
  builds the vision index arrays (`processing.vision.build_vision_inputs`) and the mRoPE
  positions (`processing.rope_index.get_rope_index`) on the host itself.
- Inside jit (training, sampling): build those on the host and pass
  `vision_inputs=VisionInputs(...)` and `position_ids=[3, B, L]` (pixel_values padded to
  `vision_inputs.num_patches` rows); `image_grid_thw` is then not needed.

Sampling interface (method calls through `model.apply(..., method=...)`):
    logits, cache = model.apply(v, ids, mask, max_len=T, pixel_values=..., vision_inputs=...,
                                position_ids=pos, method=model.prefill)   # logits [B, 1, V]
    cache = repeat_cache(cache, G)                                       # rows b*G + g
    logits, cache = model.apply(v, tok[B, 1], decode_position_ids(deltas, i), cache,
                                write_index, method=model.decode)        # logits [B, 1, V]
Per-token log-probs without [B, T, V] logits: `method=model.hidden_states` then
`method=model.logits` on sequence chunks.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax.models.config import (Qwen2_5_VLConfig, TextConfig, VisionConfig,  # noqa: F401
                                     get_tiny_config, qwen2_5_vl_3b_config, tiny_config,
                                     TINY_CONFIGS)
from emor3_jax.models.layers import Mask  # noqa: F401  (re-export)
from emor3_jax.models.text import (DECODE, FORWARD, PREFILL, KVCache, TextModel,  # noqa: F401
                                   cache_bytes, cache_logical_axes, cache_shardings, init_cache,
                                   repeat_cache)
from emor3_jax.models.vision import VisionTransformer
from emor3_jax.processing import rope_index as rope_lib
from emor3_jax.processing import vision as vision_lib
from emor3_jax.processing.rope_index import (decode_position_ids,  # noqa: F401
                                              get_rope_index)
from emor3_jax.processing.vision import (VisionInputs, VisionPadding,  # noqa: F401
                                         build_vision_inputs_for, pad_pixel_values)


@flax.struct.dataclass
class CausalLMOutput:
    logits: jax.Array | None          # [B, L, V] float32 (None for the hidden-states path)
    hidden_states: jax.Array          # [B, L, D] after the final norm


def _concrete(x) -> np.ndarray | None:
    """numpy value of x, or None if x is traced (inside jit)."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def scatter_image_embeds(inputs_embeds, image_mask, image_embeds, source_index=None):
    """Put merged image tokens, in order, at the image-pad positions (HF masked_scatter).

    inputs_embeds [B, L, D]; image_mask [B, L] bool; image_embeds [M, D] (images of the whole
    batch in row-major token order; extra padded rows are never read). Static shapes: the
    k-th image position (row-major) takes row k.
    source_index [B, L] int32 (optional): an explicit row of image_embeds for each masked
    position instead of the running count, so several sequences can share one image's
    embeddings (GRPO: the G responses of a prompt; see emor3_jax/rl/batching.py).
    """
    b, length, d = inputs_embeds.shape
    flat = image_mask.reshape(-1)
    if source_index is None:
        idx = jnp.cumsum(flat.astype(jnp.int32)) - 1
    else:
        idx = source_index.reshape(-1)
    idx = jnp.clip(idx, 0, image_embeds.shape[0] - 1)
    gathered = jnp.take(image_embeds.astype(inputs_embeds.dtype), idx, axis=0)
    return jnp.where(flat[:, None], gathered, inputs_embeds.reshape(-1, d)).reshape(b, length, d)


def causal_mask(attention_mask) -> Mask:
    """Key j visible to query i iff j <= i and j is not padding (or j == i), in O(B*L) form
    (`layers.Mask`; `.dense(L)` is the [B, 1, L, L] bool array)."""
    return Mask(attention_mask != 0)


def decode_mask(key_mask, write_index) -> Mask:
    """New token t (written at cache slot write_index + t) sees the valid slots up to its own,
    and always itself; key_mask [B, max_len] already marks the new tokens."""
    return Mask(key_mask, write_index)


class Qwen2_5_VLModel(nn.Module):
    """HF `model`: `visual` + `language_model`."""
    config: Qwen2_5_VLConfig

    def setup(self):
        c = self.config
        self.visual = VisionTransformer(c.vision, impl=c.attention_impl, remat=c.remat,
                                        dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.language_model = TextModel(c)

    def embed(self, input_ids, pixel_values=None, vision_inputs: VisionInputs | None = None,
              image_index=None):
        """Token embeddings with the vision tower's output scattered into image-pad positions.

        image_index [B, L] int32 (optional): row of the vision output each position takes,
        -1 = keep the token embedding (then the image-pad mask is image_index >= 0).
        """
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            if self.is_initializing():  # create the vision parameters from a dummy image
                vin = vision_lib.build_vision_inputs_for(self.config, [[1, 2, 2]])
                self.visual(jnp.zeros((4, self.config.vision.patch_dim), embeds.dtype), vin)
            return embeds
        image_embeds = self.visual(pixel_values, vision_inputs)
        if image_index is not None:
            return scatter_image_embeds(embeds, image_index >= 0, image_embeds, image_index)
        return scatter_image_embeds(embeds, input_ids == self.config.image_token_id, image_embeds)

    def __call__(self, input_ids, position_ids, mask, *, pixel_values=None, vision_inputs=None,
                 kv=None, write_index=0, mode=FORWARD, image_index=None):
        embeds = self.embed(input_ids, pixel_values, vision_inputs, image_index)
        return self.language_model(embeds, position_ids, mask, kv=kv, write_index=write_index,
                                   mode=mode)


class LMHead(nn.Module):
    """Untied `lm_head` (kernel [embed, vocab]); logits accumulated and returned in fp32."""
    config: Qwen2_5_VLConfig

    @nn.compact
    def __call__(self, h):
        t = self.config.text
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(t.initializer_range), ("embed", "vocab")),
            (t.hidden_size, t.vocab_size), self.config.params_dtype)
        return jnp.einsum("...d,dv->...v", h, kernel.astype(h.dtype),
                          preferred_element_type=jnp.float32)


class Qwen2_5_VLForConditionalGeneration(nn.Module):
    """HF `Qwen2_5_VLForConditionalGeneration`: `model` + `lm_head` (absent when tied)."""
    config: Qwen2_5_VLConfig

    def setup(self):
        self.model = Qwen2_5_VLModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = LMHead(self.config)

    # -- host-side metadata ------------------------------------------------------------------
    def _prepare(self, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
                 vision_inputs):
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if pixel_values is not None and vision_inputs is None:
            grid = _concrete(image_grid_thw)
            if grid is None:
                raise ValueError("pixel_values given without vision_inputs and with a traced (or "
                                 "missing) image_grid_thw: inside jit pass vision_inputs="
                                 "processing.vision.build_vision_inputs_for(config, grid_thw)")
            vision_inputs = vision_lib.build_vision_inputs_for(c, grid)
            ids = _concrete(input_ids)
            n_tokens = int(vision_lib.num_image_tokens(grid, c.vision.spatial_merge_size).sum())
            if ids is not None and int((ids == c.image_token_id).sum()) != n_tokens:
                raise ValueError(f"image tokens ({int((ids == c.image_token_id).sum())}) do not "
                                 f"match image features ({n_tokens}) for image_grid_thw "
                                 f"{grid.tolist()}")
        if position_ids is None:
            grid = _concrete(image_grid_thw)
            ids, mask = _concrete(input_ids), _concrete(attention_mask)
            if grid is not None and ids is not None and mask is not None:
                position_ids, _ = rope_lib.get_rope_index(
                    ids, grid, mask, image_token_id=c.image_token_id,
                    spatial_merge_size=c.vision.spatial_merge_size)
            elif pixel_values is None and image_grid_thw is None:
                m = (attention_mask != 0).astype(jnp.int32)
                pos = jnp.where(m > 0, jnp.cumsum(m, -1) - 1, 0)
                position_ids = jnp.broadcast_to(pos[None], (3,) + pos.shape)
            else:
                raise ValueError("images inside jit need position_ids: compute them on the host "
                                 "with processing.rope_index.get_rope_index")
        return attention_mask, jnp.asarray(position_ids, jnp.int32), vision_inputs

    # -- forward ---------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 *, position_ids=None, vision_inputs: VisionInputs | None = None,
                 return_logits: bool = True, image_index=None) -> CausalLMOutput:
        """Full forward over [B, L] tokens (left padding allowed) -> CausalLMOutput.

        image_index: see Qwen2_5_VLModel.embed (rows sharing one image's vision output).
        """
        attention_mask, position_ids, vision_inputs = self._prepare(
            input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_inputs)
        hidden, _ = self.model(input_ids, position_ids, causal_mask(attention_mask),
                               pixel_values=pixel_values, vision_inputs=vision_inputs,
                               image_index=image_index)
        if self.is_initializing() and self.config.tie_word_embeddings is False:
            self.lm_head(hidden[:, :1])
        return CausalLMOutput(logits=self.logits(hidden) if return_logits else None,
                              hidden_states=hidden)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None,
                      image_grid_thw=None, *, position_ids=None, vision_inputs=None,
                      image_index=None):
        """Final-norm hidden states [B, L, D] without the LM head (chunk the logits yourself)."""
        return self(input_ids, attention_mask, pixel_values, image_grid_thw,
                    position_ids=position_ids, vision_inputs=vision_inputs,
                    return_logits=False, image_index=image_index).hidden_states

    def logits(self, hidden):
        """LM head on hidden states [..., D] -> fp32 logits [..., V] (tied or untied)."""
        if self.config.tie_word_embeddings:
            emb = self.model.language_model.embedding_matrix()
            return jnp.einsum("...d,vd->...v", hidden, emb.astype(hidden.dtype),
                              preferred_element_type=jnp.float32)
        return self.lm_head(hidden)

    # -- KV-cache sampling interface -------------------------------------------------------
    def prefill(self, input_ids, attention_mask, *, max_len: int, pixel_values=None,
                image_grid_thw=None, position_ids=None, vision_inputs=None,
                return_all_logits: bool = False):
        """Run the vision tower and the prompt; return (logits, cache).

        input_ids/attention_mask [B, L] (left-padded so every prompt ends at L-1);
        max_len = L + max_new_tokens. logits: [B, 1, V] fp32 at the last prompt position
        ([B, L, V] with return_all_logits). The cache holds the prompt at slots [0, L) with
        key_mask = attention_mask; the first decode step writes at index L.
        """
        attention_mask, position_ids, vision_inputs = self._prepare(
            input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_inputs)
        b, length = input_ids.shape
        if max_len < length:
            raise ValueError(f"max_len={max_len} is shorter than the prompt length {length}")
        cache = init_cache(self.config, b, max_len)
        hidden, (k, v) = self.model(input_ids, position_ids, causal_mask(attention_mask),
                                    pixel_values=pixel_values, vision_inputs=vision_inputs,
                                    kv=(cache.k, cache.v), write_index=0, mode=PREFILL)
        key_mask = cache.key_mask.at[:, :length].set(attention_mask != 0)
        logits = self.logits(hidden if return_all_logits else hidden[:, -1:])
        return logits, KVCache(k=k, v=v, key_mask=key_mask)

    def decode(self, tokens, position_ids, cache: KVCache, write_index, token_mask=None):
        """Append tokens [B, S] (S = 1 for sampling) at cache slots [write_index, +S).

        position_ids [3, B, S]: for sampling, `rope_index.decode_position_ids(deltas, i)`
        (last position + 1, the same on all three rows). token_mask [B, S] (default all True)
        marks which new tokens later steps may attend to. Returns (logits [B, S, V] fp32,
        updated cache). Each new token attends to valid cache slots up to its own.
        """
        b, s = tokens.shape
        write_index = jnp.asarray(write_index, jnp.int32)
        new_valid = jnp.ones((b, s), bool) if token_mask is None else token_mask != 0
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, new_valid, (0, write_index))
        hidden, (k, v) = self.model(tokens, jnp.asarray(position_ids, jnp.int32),
                                    decode_mask(key_mask, write_index),
                                    kv=(cache.k, cache.v), write_index=write_index, mode=DECODE)
        return self.logits(hidden), KVCache(k=k, v=v, key_mask=key_mask)


# ------------------------------------------------------------------------------------------
def build_model(config: Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration(config.validate())


def _dummy_inputs(config: Qwen2_5_VLConfig):
    ids = np.zeros((1, 4), np.int32)
    return ids, np.ones_like(ids)


def _init_model(config: Qwen2_5_VLConfig):
    """The model to trace `init` with: parameters do not depend on the attention op, and with
    einsum no kernel (splash: TPU only, shard_mapped) has to run on the dummy input."""
    return Qwen2_5_VLForConditionalGeneration(config.replace(attention_impl="einsum"))


def abstract_params(model: Qwen2_5_VLForConditionalGeneration) -> Any:
    """Boxed (nn.LogicallyPartitioned) ShapeDtypeStructs of every parameter, without allocating."""
    return _abstract_params(model.config)


@functools.lru_cache(maxsize=16)
def _abstract_params(config: Qwen2_5_VLConfig) -> Any:
    """Traced once per config: the sampler asks for its weights' layout at every RL step, and
    tracing `init` of even the demo's model takes ~0.6 s on 2 cores (a sixth of its step).
    The tree holds immutable ShapeDtypeStructs only, so sharing it is safe."""
    ids, mask = _dummy_inputs(config)
    return jax.eval_shape(lambda: _init_model(config).init(jax.random.key(0), ids, mask))["params"]


def init_params(model: Qwen2_5_VLForConditionalGeneration, rng, mesh=None) -> Any:
    """Random parameters (unboxed); placed on `mesh` with param_shardings when given."""
    ids, mask = _dummy_inputs(model.config)
    init = lambda r: nn.unbox(_init_model(model.config).init(r, ids, mask)["params"])
    if mesh is None:
        return jax.jit(init)(rng)
    from emor3_jax import sharding
    shardings = sharding.param_shardings(abstract_params(model), mesh)
    return jax.jit(init, out_shardings=shardings)(rng)


def param_shardings(model: Qwen2_5_VLForConditionalGeneration, mesh, rules=None):
    """NamedShardings of the parameter tree (logical names mapped by emor3_jax.sharding's
    `rules`, by default its LOGICAL_RULES)."""
    from emor3_jax import sharding
    return sharding.param_shardings(abstract_params(model), mesh, rules)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


from emor3_jax.models.hf_io import load_hf, save_hf  # noqa: E402,F401  (re-export)
