"""One decode step of G samples per prompt that share the prompt's KV cache (no G-fold copy).

GRPO samples G responses per prompt. The prompt's keys/values are identical for the G rows of
a group, so this step keeps ONE copy of them per prompt and a separate cache for the G
generated continuations; attention of row (b, g) runs over prompt b's keys followed by its own
generated keys, with one softmax over both. Logically this is the repeated cache
(`models.text.repeat_cache`, rows b*G + g); physically the prompt part is read once per group,
which cuts decode memory traffic and cache memory by up to G x for long prompts.

Cache layout (`GroupedCache`, every field a tuple with one array per decoder layer, so the
decode loop updates each layer's buffer in place; D = head_dim, K = KV heads; heads before
slots so the attention contractions are plain batched matmuls without per-step transposes):
    prompt_k, prompt_v  [B, K, Lp, D]      from the prefill; read-only while decoding
    prompt_mask         [B, Lp] bool       the prompt's attention mask (left padding False)
    gen_k, gen_v        [B*G, K, T, D]     row b*G + g; slot t holds the t-th generated token
Bytes: 2 * layers * K * D * itemsize * (B * Lp + B * G * T) (+ B * Lp for the mask); see
`grouped_cache_bytes`.

The layer math (norms, projections, rotary, MLP) is the model's own code
(`models.layers`, applied to each layer's slice of the stacked parameters); only the attention
core over the two caches is written here. `tests/test_sampling*.py` checks it against
`Qwen2_5_VLForConditionalGeneration.decode` on a repeated cache and against transformers.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from emor3_jax.models import layers as L
from emor3_jax.models.config import Qwen2_5_VLConfig

_MASK_VALUE = L._MASK_VALUE


@flax.struct.dataclass
class GroupedCache:
    prompt_k: tuple[jax.Array, ...]   # per layer [B, K, Lp, D]
    prompt_v: tuple[jax.Array, ...]
    prompt_mask: jax.Array            # [B, Lp] bool
    gen_k: tuple[jax.Array, ...]      # per layer [B*G, K, T, D]
    gen_v: tuple[jax.Array, ...]

    @property
    def group_size(self) -> int:
        return self.gen_k[0].shape[0] // self.prompt_k[0].shape[0]

    @property
    def max_new_tokens(self) -> int:
        return self.gen_k[0].shape[2]


def logical_axes() -> tuple[str | None, ...]:
    """Logical axis names of every k/v buffer ([rows, K, slots, D]; emor3_jax.sharding rules)."""
    return ("batch", "cache_heads", "length", None)


def grouped_cache_bytes(config: Qwen2_5_VLConfig, num_prompts: int, prompt_len: int,
                        group_size: int, max_new_tokens: int, dtype=None) -> int:
    """Bytes of a GroupedCache (the repeated layout would need B*G*(Lp+T) token slots)."""
    t = config.text
    item = jnp.dtype(config.compute_dtype if dtype is None else dtype).itemsize
    slots = num_prompts * prompt_len + num_prompts * group_size * max_new_tokens
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * item * slots \
        + num_prompts * prompt_len


def prompt_part(prompt_cache) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """A prefill `KVCache` ([layers, B, Lp, K, D]) -> per-layer (k, v) in [B, K, Lp, D]: heads
    before slots, so every attention contraction is a plain batched matmul (no transposes)."""
    n_layers = prompt_cache.k.shape[0]
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    return (tuple(heads_first(prompt_cache.k[i]) for i in range(n_layers)),
            tuple(heads_first(prompt_cache.v[i]) for i in range(n_layers)))


def with_empty_gen(prompt_k, prompt_v, prompt_mask, group_size: int,
                   max_new_tokens: int) -> GroupedCache:
    """A GroupedCache over the given prompt part with G empty rows per prompt of T slots."""
    b, kh, _, hd = prompt_k[0].shape
    zeros = lambda: jnp.zeros((b * group_size, kh, max_new_tokens, hd), prompt_k[0].dtype)
    return GroupedCache(prompt_k=tuple(prompt_k), prompt_v=tuple(prompt_v),
                        prompt_mask=prompt_mask, gen_k=tuple(zeros() for _ in prompt_k),
                        gen_v=tuple(zeros() for _ in prompt_k))


def split_layers(layer_params: Any, num_layers: int) -> list[Any]:
    """Stacked (nn.scan) layer parameters -> one tree per layer (slice once, outside the loop)."""
    return [jax.tree.map(lambda x, i=i: x[i], layer_params) for i in range(num_layers)]


def grouped_attention(q, prompt_k, prompt_v, prompt_mask, gen_k, gen_v, gen_valid):
    """Attention of S new tokens per row over its prompt's keys, then its own generated keys.

    q [B*G, S, N, D]; prompt_k/v [B, K, Lp, D]; prompt_mask [B, Lp]; gen_k/v [B*G, K, T, D]
    (the S new tokens already written); gen_valid [S, T] bool (which slots new token s sees:
    those written before it and itself; the same for every row). Returns [B*G, S, N, D].
    Scores, softmax statistics and sums in fp32: one softmax over both key sets, normalised at
    the end.
    """
    n_rows, s, n_heads, hd = q.shape
    b, kh, _, _ = prompt_k.shape
    g, r, t = n_rows // b, n_heads // kh, gen_k.shape[2]
    scale = hd ** -0.5
    f32 = jnp.float32
    qg = jnp.moveaxis(q.reshape(b, g, s, kh, r, hd), 3, 2)           # [B, G, K, S, R, D]
    qp = jnp.swapaxes(qg, 1, 2).reshape(b, kh, g * s * r, hd)        # a group's queries together
    s_p = jnp.einsum("bkqd,bksd->bkqs", qp, prompt_k, preferred_element_type=f32) * scale
    s_p = jnp.where(prompt_mask[:, None, None, :], s_p, _MASK_VALUE)
    gk = gen_k.reshape(b, g, kh, t, hd)
    s_g = jnp.einsum("bgkqd,bgktd->bgkqt", qg.reshape(b, g, kh, s * r, hd), gk,
                     preferred_element_type=f32) * scale
    s_g = jnp.where(jnp.repeat(gen_valid, r, axis=0), s_g, _MASK_VALUE)
    to_gen = lambda x: jnp.swapaxes(x.reshape(b, kh, g, s * r, *x.shape[3:]), 1, 2)
    to_prompt = lambda x: jnp.swapaxes(x, 1, 2).reshape(b, kh, g * s * r, *x.shape[4:])
    m = jnp.maximum(to_gen(s_p.max(-1)), s_g.max(-1))                 # [B, G, K, S*R]
    e_p = jnp.exp(s_p - to_prompt(m)[..., None])
    e_g = jnp.exp(s_g - m[..., None])
    denom = to_gen(e_p.sum(-1)) + e_g.sum(-1)
    o_p = jnp.einsum("bkqs,bksd->bkqd", e_p.astype(prompt_v.dtype), prompt_v,
                     preferred_element_type=f32)
    o_g = jnp.einsum("bgkqt,bgktd->bgkqd", e_g.astype(gen_v.dtype),
                     gen_v.reshape(b, g, kh, t, hd), preferred_element_type=f32)
    out = (to_gen(o_p) + o_g) / denom[..., None]                     # [B, G, K, S*R, D]
    out = jnp.moveaxis(out.reshape(b, g, kh, s, r, hd), 2, 3)
    return out.reshape(n_rows, s, n_heads, hd).astype(q.dtype)


def _layer_step(config: Qwen2_5_VLConfig, p, x, cos, sin, pk, pv, pmask, gk, gv, slot,
                gen_valid):
    """One decoder layer for S new tokens per row (x [B*G, S, D]); writes their k/v at gen
    slots [slot, slot + S)."""
    c, t = config, config.text
    kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
    dense = lambda feats, names, bias, params, h: L.Dense(
        feats, names, bias, **kw).apply({"params": params}, h)
    n, s, _ = x.shape
    a = p["self_attn"]
    h = L.RMSNorm(t.rms_norm_eps, **kw).apply({"params": p["input_layernorm"]}, x)
    q = dense(t.num_attention_heads * t.head_dim, ("embed", "heads"), True, a["q_proj"], h)
    k = dense(t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), True, a["k_proj"], h)
    v = dense(t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), True, a["v_proj"], h)
    q = L.apply_rotary(q.reshape(n, s, t.num_attention_heads, t.head_dim), cos, sin)
    k = L.apply_rotary(k.reshape(n, s, t.num_key_value_heads, t.head_dim), cos, sin)
    v = v.reshape(n, s, t.num_key_value_heads, t.head_dim)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2).astype(gk.dtype)    # [B*G, K, S, D]
    gk = jax.lax.dynamic_update_slice(gk, heads_first(k), (0, 0, slot, 0))
    gv = jax.lax.dynamic_update_slice(gv, heads_first(v), (0, 0, slot, 0))
    out = grouped_attention(q, pk.astype(q.dtype), pv.astype(q.dtype), pmask,
                            gk.astype(q.dtype), gv.astype(q.dtype), gen_valid)
    out = dense(t.hidden_size, ("heads", "embed"), False, a["o_proj"],
                out.reshape(n, s, t.num_attention_heads * t.head_dim))
    x = x + out
    h = L.RMSNorm(t.rms_norm_eps, **kw).apply({"params": p["post_attention_layernorm"]}, x)
    x = x + L.GatedMLP(t.hidden_size, t.intermediate_size, t.hidden_act, False,
                       ("embed", "mlp"), **kw).apply({"params": p["mlp"]}, h)
    return x, gk, gv


def decode_hidden(model, params, per_layer_params: list[Any], tokens, positions,
                  cache: GroupedCache, slot):
    """Feed S tokens per row (tokens [B*G, S]; positions [B*G, S] = mRoPE positions, equal on
    all three rows) at gen slots [slot, slot + S), causal among themselves; return
    (final-norm hidden [B*G, S, D], updated cache)."""
    c, t = model.config, model.config.text
    n, s = tokens.shape
    x = model.apply({"params": params}, tokens,
                    method=lambda m, ids: m.model.language_model.embed(ids))
    pos3 = jnp.broadcast_to(positions[None], (3, n, s))
    cos, sin = L.mrope(pos3, t.head_dim, t.rope_theta, t.mrope_section)     # [B*G, S, D]
    slots = jnp.arange(cache.max_new_tokens)
    gen_valid = slots[None, :] <= slot + jnp.arange(s)[:, None]            # [S, T]
    gen_k, gen_v = [], []
    for i, p in enumerate(per_layer_params):
        x, gk, gv = _layer_step(c, p, x, cos, sin, cache.prompt_k[i], cache.prompt_v[i],
                                cache.prompt_mask, cache.gen_k[i], cache.gen_v[i], slot,
                                gen_valid)
        gen_k.append(gk)
        gen_v.append(gv)
    h = model.apply({"params": params}, x, method=lambda m, h: m.model.language_model.norm(h))
    return h, cache.replace(gen_k=tuple(gen_k), gen_v=tuple(gen_v))


def decode_step(model, params, per_layer_params: list[Any], tokens, positions,
                cache: GroupedCache, slot):
    """One sampling step: tokens [B*G] at positions [B*G] into gen slot `slot`; returns
    (fp32 logits [B*G, V], updated cache)."""
    h, cache = decode_hidden(model, params, per_layer_params, tokens[:, None],
                             positions[:, None], cache, slot)
    return model.apply({"params": params}, h[:, 0], method=lambda m, h: m.logits(h)), cache
