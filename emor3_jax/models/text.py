"""Qwen2.5-VL text decoder (HF `Qwen2_5_VLTextModel`) and its KV cache.

Decoder layers run under `nn.scan`: parameters stack on a leading "layers" axis (one compiled
layer body whatever the depth), and the KV cache is scanned along with them.

KV cache layout (`KVCache`): k and v are [num_layers, B, max_len, kv_heads, head_dim] in the
compute dtype, and key_mask [B, max_len] marks the cache slots that hold real tokens (left
padding of the prompt and not-yet-written slots are False). Size in bytes:
    2 * num_layers * B * max_len * kv_heads * head_dim * itemsize  (+ B * max_len for the mask)
e.g. Qwen2.5-VL-3B (36 layers, 2 KV heads, head_dim 128) in bf16: 36,864 bytes per token.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from emor3_jax.models.config import Qwen2_5_VLConfig
from emor3_jax.models.layers import (GatedMLP, RMSNorm, apply_rotary, attention, constrain, dense,
                                     mrope, remat_policy)

FORWARD, PREFILL, DECODE = "forward", "prefill", "decode"
# Prompts, then the responses that continue them, through each layer in turn (one scan; see
# TextModel.prompt_and_responses).
PROMPT_RESPONSES = "prompt_responses"


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values of a batch of sequences; see the module docstring for the layout."""
    k: jax.Array         # [layers, B, max_len, kv_heads, head_dim]
    v: jax.Array         # [layers, B, max_len, kv_heads, head_dim]
    key_mask: jax.Array  # [B, max_len] bool

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: Qwen2_5_VLConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache (all slots invalid) for prompt_len + max_new_tokens = max_len."""
    t = config.text
    shape = (t.num_hidden_layers, batch_size, max_len, t.num_key_value_heads, t.head_dim)
    dtype = config.compute_dtype if dtype is None else dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   key_mask=jnp.zeros((batch_size, max_len), bool))


def cache_bytes(config: Qwen2_5_VLConfig, batch_size: int, max_len: int, dtype=None) -> int:
    t = config.text
    item = jnp.dtype(config.compute_dtype if dtype is None else dtype).itemsize
    return (2 * t.num_hidden_layers * batch_size * max_len * t.num_key_value_heads * t.head_dim
            * item + batch_size * max_len)


def repeat_cache(cache: KVCache, repeats: int) -> KVCache:
    """Repeat every row `repeats` times along batch, prompt-major: new row b*G + g = old row b."""
    return KVCache(k=jnp.repeat(cache.k, repeats, axis=1), v=jnp.repeat(cache.v, repeats, axis=1),
                   key_mask=jnp.repeat(cache.key_mask, repeats, axis=0))


def cache_logical_axes() -> KVCache:
    """Logical axis names of each cache field (map with emor3_jax.sharding rules)."""
    kv = ("layers", "batch", "length", "cache_heads", None)
    return KVCache(k=kv, v=kv, key_mask=("batch", "length"))


def cache_shardings(config: Qwen2_5_VLConfig, mesh, batch_size: int, max_len: int) -> KVCache:
    """NamedShardings for a cache of this size: batch over data x fsdp, KV heads over tensor
    (each dropped where it does not divide, e.g. 2 KV heads on tensor=4)."""
    from jax.sharding import NamedSharding

    from emor3_jax import sharding
    t = config.text
    shapes = KVCache(k=(t.num_hidden_layers, batch_size, max_len, t.num_key_value_heads,
                        t.head_dim), v=None, key_mask=(batch_size, max_len))
    names = cache_logical_axes()
    one = lambda n, s: NamedSharding(mesh, sharding._fit_spec(sharding.logical_to_spec(n), s, mesh))
    kv = one(names.k, shapes.k)
    return KVCache(k=kv, v=kv, key_mask=one(names.key_mask, shapes.key_mask))


# Logical axes of the decoder's activations (emor3_jax.sharding.LOGICAL_RULES): rows over the
# data-parallel axes, heads and the MLP's intermediate over `tensor`, the residual stream
# replicated over `tensor` (Megatron's layout). Applied when tracing under a mesh
# (`layers.kernel_mesh`), so a tensor-parallel run cannot quietly replicate them.
ACTIVATION_AXES = {
    "hidden": ("batch", "length", "act_embed"),
    "q": ("batch", "length", "heads", None),
    "kv": ("batch", "length", "kv_heads", None),
    "mlp": ("batch", "length", "mlp"),
}


class Attention(nn.Module):
    config: Qwen2_5_VLConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, write_index, mode: str):
        c = self.config
        t = c.text
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype, init_std=t.initializer_range)
        b, length, _ = x.shape
        q = dense(t.num_attention_heads * t.head_dim, ("embed", "heads"), use_bias=True,
                  name="q_proj", **kw)(x)
        k = dense(t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), use_bias=True,
                  name="k_proj", **kw)(x)
        v = dense(t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), use_bias=True,
                  name="v_proj", **kw)(x)
        q = apply_rotary(q.reshape(b, length, t.num_attention_heads, t.head_dim), cos, sin)
        k = apply_rotary(k.reshape(b, length, t.num_key_value_heads, t.head_dim), cos, sin)
        v = v.reshape(b, length, t.num_key_value_heads, t.head_dim)
        q = constrain(q, ACTIVATION_AXES["q"])
        k, v = constrain(k, ACTIVATION_AXES["kv"]), constrain(v, ACTIVATION_AXES["kv"])
        new_cache = None
        if mode != FORWARD:
            ck, cv = layer_cache
            start = (0, write_index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
            new_cache = (ck, cv)
            if mode == DECODE:  # attend to everything cached so far (mask selects)
                k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        out = attention(q, k, v, mask, impl=c.attention_impl)
        out = out.reshape(b, length, t.num_attention_heads * t.head_dim)
        out = dense(t.hidden_size, ("heads", "embed"), use_bias=False, name="o_proj", **kw)(out)
        return out, new_cache


class DecoderLayer(nn.Module):
    config: Qwen2_5_VLConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, write_index, mode: str):
        c = self.config
        t = c.text
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        norm1 = RMSNorm(t.rms_norm_eps, name="input_layernorm", **kw)
        attn = Attention(c, name="self_attn")
        norm2 = RMSNorm(t.rms_norm_eps, name="post_attention_layernorm", **kw)
        mlp = GatedMLP(t.hidden_size, t.intermediate_size, t.hidden_act, False,
                       ("embed", "mlp"), activation_axes=ACTIVATION_AXES["mlp"], name="mlp", **kw)

        def block(x, layer_cache, cos, sin, mask, write_index, mode):
            x = constrain(x, ACTIVATION_AXES["hidden"])
            h, new_cache = attn(norm1(x), layer_cache, cos, sin, mask, write_index, mode)
            x = x + h
            return x + mlp(norm2(x)), new_cache

        if mode != PROMPT_RESPONSES:
            return block(x, layer_cache, cos, sin, mask, write_index, mode)
        # x = (prompt hidden [p, Lp, D], response hidden [n, T, D]); write_index = the prompt
        # row of each response [n]; cos/sin/mask: (prompt's, responses'). The prompts run as a
        # prefill into a [p, Lp + T] cache of this layer, whose rows are gathered to the
        # responses, which run as a decode step of T tokens against it.
        (xp, xr), rows = x, write_index
        lp, shape = xp.shape[1], (xp.shape[0], xp.shape[1] + xr.shape[1], t.num_key_value_heads,
                                  t.head_dim)
        empty = jnp.zeros(shape, c.compute_dtype)
        xp, (ck, cv) = block(xp, (empty, empty), cos[0], sin[0], mask[0], 0, PREFILL)
        kv = (jnp.take(ck, rows, axis=0), jnp.take(cv, rows, axis=0))
        xr, _ = block(xr, kv, cos[1], sin[1], mask[1], lp, DECODE)
        return (xp, xr), None


class TextModel(nn.Module):
    """embed_tokens, scanned decoder layers, final norm (HF model.language_model)."""
    config: Qwen2_5_VLConfig

    def setup(self):
        c = self.config
        t = c.text
        self.embed_tokens = nn.Embed(
            t.vocab_size, t.hidden_size, dtype=c.compute_dtype, param_dtype=c.params_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(t.initializer_range), ("vocab", "embed")))
        layer = DecoderLayer
        if c.remat != "none":
            layer = nn.remat(layer, policy=remat_policy(c.remat), prevent_cse=False,
                             static_argnums=(7,))
        self.layers = nn.scan(
            layer, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=t.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(c)
        self.norm = RMSNorm(t.rms_norm_eps, dtype=c.compute_dtype, param_dtype=c.params_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, position_ids, mask, *, kv=None, write_index=0,
                 mode: str = FORWARD):
        """inputs_embeds [B, L, D], position_ids [3, B, L], mask a `layers.Mask` (or bool
        [B, 1, L, S]; the splash kernel needs a Mask).

        mode "forward": no cache (S = L). "prefill": also writes this step's k/v into `kv`
        (a (k, v) pair of [layers, B, T, kv_heads, hd]) at `write_index`, attending to the fresh
        keys (S = L). "decode": writes, then attends to the whole cache (S = T).
        Returns (final-norm hidden [B, L, D], updated (k, v) or None).
        """
        t = self.config.text
        cos, sin = mrope(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        write_index = jnp.asarray(write_index, jnp.int32)
        x, new_kv = self.layers(inputs_embeds, kv, cos, sin, mask, write_index, mode)
        return self.norm(x), new_kv

    def prompt_and_responses(self, prompt_embeds, prompt_position_ids, prompt_mask,
                             response_embeds, response_position_ids, response_mask, rows):
        """Prompts and the responses that continue them, layer by layer in one scan.

        prompt_embeds [p, Lp, D] (left-padded), prompt_mask a causal `layers.Mask` over them;
        response_embeds [n, T, D], response_mask a `Mask` over the [n, Lp + T] keys with
        q_offset Lp (`decode_mask`); rows [n]: the prompt row each response continues.
        Returns the final-norm hidden states of both ([p, Lp, D], [n, T, D]).

        The same values as a prefill of the prompts followed by a decode of the responses
        against their rows of its cache (`__call__` in those modes), but each layer's
        parameters serve both in one scan step: the backward pass accumulates one gradient
        per layer instead of one per pass, and only one layer's prompt keys/values are gathered
        to the response rows at a time (never [layers, n, Lp + T, ...]).
        """
        t = self.config.text
        rope = lambda pos: mrope(pos, t.head_dim, t.rope_theta, t.mrope_section)
        (cos_p, sin_p), (cos_r, sin_r) = rope(prompt_position_ids), rope(response_position_ids)
        (xp, xr), _ = self.layers((prompt_embeds, response_embeds), None, (cos_p, cos_r),
                                  (sin_p, sin_r), (prompt_mask, response_mask), rows,
                                  PROMPT_RESPONSES)
        return self.norm(xp), self.norm(xr)

    def embedding_matrix(self):
        return self.embed_tokens.embedding
