"""One decode step of G samples per prompt that share the prompt's KV cache (no G-fold copy).

GRPO samples G responses per prompt. The prompt's keys/values are identical for the G rows of
a group, so this step keeps ONE copy of them per prompt and a separate cache for the G
generated continuations; attention of row (b, g) runs over prompt b's keys followed by its own
generated keys, with one softmax over both. Logically this is the repeated cache
(`models.text.repeat_cache`, rows b*G + g); physically the prompt part is read once per group,
which cuts decode memory traffic and cache memory by up to G x for long prompts.

Cache layout (`GroupedCache`, every field a tuple with one array per decoder layer, so the
decode loop updates each layer's buffer in place; D = head_dim, K = KV heads). Heads come
before slots and keys are stored transposed (D before slots), so both attention contractions
are plain [q, D] x [D, slots] and [q, slots] x [slots, D] batched matmuls: with keys as
[slots, D] XLA's CPU dot transposes the whole key buffer of every layer on every step (2x the
cost of the score matmul for a 64-row decode):
    prompt_k            [B, K, D, Lp]      from the prefill; read-only while decoding
    prompt_v            [B, K, Lp, D]
    prompt_mask         [B, Lp] bool       the prompt's attention mask (left padding False)
    gen_k               [B*G, K, D, T]     row b*G + g; slot t holds the t-th generated token
    gen_v               [B*G, K, T, D]
Bytes: 2 * layers * K * D * itemsize * (B * Lp + B * G * T) (+ B * Lp for the mask).

Shared prompt prefixes (the judge's G consistency prompts of one image differ only after the
image and the question) add a middle level: the prompt part is then the prefix shared by M
prompts, and each prompt's own suffix sits in
    suffix_k, suffix_v  [B*M, K, D, Ls], [B*M, K, Ls, D]: prompt m of prefix b (left-padded)
    suffix_mask         [B*M, Ls] bool
with the generated rows [B*M*G] below it (row (b*M + m)*G + g). Attention is one softmax over
the three key sets (`attend`: any number of levels, each read once per row group). The
suffixes themselves are prefilled by `decode_hidden` with S = Ls tokens per row over the
prefix, written as "generated" slots with a per-row key mask (their left padding).

The layer math (norms, rotary, activation) is the model's own code (`models.layers`, applied
to each layer's slice of the stacked parameters); the projections are `layers.Dense`'s matmul
on kernels concatenated once per program (q/k/v, and gate/up: `split_layers`), and the
attention core over the cache levels is written here. `tests/test_sampling*.py` checks it against
`Qwen2_5_VLForConditionalGeneration.decode` on a repeated cache and against transformers.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from emor3_jax.models import layers as L
from emor3_jax.models.config import Qwen2_5_VLConfig

_MASK_VALUE = L._MASK_VALUE


@flax.struct.dataclass
class GroupedCache:
    prompt_k: tuple[jax.Array, ...]   # per layer [B, K, D, Lp] (keys transposed)
    prompt_v: tuple[jax.Array, ...]   # per layer [B, K, Lp, D]
    prompt_mask: jax.Array            # [B, Lp] bool
    gen_k: tuple[jax.Array, ...]      # per layer [B*G, K, D, T] (B*M*G with a suffix level)
    gen_v: tuple[jax.Array, ...]      # per layer [B*G, K, T, D]
    suffix_k: tuple[jax.Array, ...] = ()   # per layer [B*M, K, D, Ls]; () = no shared prefix
    suffix_v: tuple[jax.Array, ...] = ()   # per layer [B*M, K, Ls, D]
    suffix_mask: jax.Array | None = None   # [B*M, Ls] bool

    @property
    def group_size(self) -> int:
        """Generated rows per prompt (per suffix row when there is a suffix level)."""
        above = self.suffix_k[0] if self.suffix_k else self.prompt_k[0]
        return self.gen_k[0].shape[0] // above.shape[0]

    @property
    def max_new_tokens(self) -> int:
        return self.gen_v[0].shape[2]


def logical_axes() -> tuple[str | None, ...]:
    """Logical axis names of every k/v buffer ([rows, K, slots, D] or, keys, [rows, K, D,
    slots]: only rows and heads are sharded; emor3_jax.sharding rules)."""
    return ("batch", "cache_heads", None, None)


def prompt_part(prompt_cache) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """A prefill `KVCache` ([layers, B, Lp, K, D]) -> per-layer k [B, K, D, Lp] and v
    [B, K, Lp, D] (the module docstring's layout), transposed once here, not per step."""
    n_layers = prompt_cache.k.shape[0]
    return (tuple(jnp.transpose(prompt_cache.k[i], (0, 2, 3, 1)) for i in range(n_layers)),
            tuple(jnp.swapaxes(prompt_cache.v[i], 1, 2) for i in range(n_layers)))


def with_empty_gen(prompt_k, prompt_v, prompt_mask, group_size: int,
                   max_new_tokens: int, suffix_k=(), suffix_v=(), suffix_mask=None
                   ) -> GroupedCache:
    """A GroupedCache over the given prompt part (and suffix level, if any) with G empty rows
    of T slots per prompt (per suffix row)."""
    b, kh, _, hd = (suffix_v or prompt_v)[0].shape
    zeros = lambda *shape: jnp.zeros((b * group_size, kh) + shape, prompt_k[0].dtype)
    return GroupedCache(prompt_k=tuple(prompt_k), prompt_v=tuple(prompt_v),
                        prompt_mask=prompt_mask,
                        gen_k=tuple(zeros(hd, max_new_tokens) for _ in prompt_k),
                        gen_v=tuple(zeros(max_new_tokens, hd) for _ in prompt_k),
                        suffix_k=tuple(suffix_k),
                        suffix_v=tuple(suffix_v), suffix_mask=suffix_mask)


def split_layers(layer_params: Any, num_layers: int) -> list[Any]:
    """Stacked (nn.scan) layer parameters -> one tree per layer (slice once, outside the loop),
    with the k/v kernels and biases interleaved into one `kv` projection and the MLP's gate/up
    kernels into one `gate_up`: a decode step runs 5 matmuls per layer instead of 7, wider ones,
    which XLA:CPU runs faster for the few rows of a decode step. Interleaving (not
    concatenating) keeps a device's slice of the columns (`sharding.SAMPLING_RULES`) the same
    slice of both halves, so nothing is gathered; q stays apart, as a GQA model has more q
    columns than k/v ones."""
    a, mlp = layer_params["self_attn"], layer_params["mlp"]
    fused = {"input_layernorm": layer_params["input_layernorm"],
             "post_attention_layernorm": layer_params["post_attention_layernorm"],
             "q": a["q_proj"],
             "kv": {name: interleave(a["k_proj"][name], a["v_proj"][name])
                    for name in ("kernel", "bias")},
             "o_proj": a["o_proj"],
             "gate_up": interleave(mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]),
             "down_proj": mlp["down_proj"]["kernel"]}
    return [jax.tree.map(lambda x, i=i: x[i], fused) for i in range(num_layers)]


def interleave(x, y):
    """[..., n] and [..., n] -> [..., 2n] with column j of each at 2j and 2j + 1: a device's
    slice of the columns holds the same columns of both (`uninterleave` splits them)."""
    return jnp.stack([x, y], axis=-1).reshape(*x.shape[:-1], 2 * x.shape[-1])


def uninterleave(xy):
    """The inverse of `interleave` on a projection's output [..., 2n] -> ([..., n], [..., n])."""
    x, y = jnp.moveaxis(xy.reshape(*xy.shape[:-1], -1, 2), -1, 0)
    return x, y


def _no_constraint(x, names):
    return x


def attend(q, levels):
    """Attention of S new tokens per row over several key levels, one softmax over all.

    q [N, S, H, D]; levels: (k [B_l, K, D, L_l] (transposed), v [B_l, K, L_l, D],
    key_mask [B_l, L_l] bool or None, query_mask [S, L_l] bool or None), where B_l divides N
    and row n reads entry n // (N / B_l) of the level (the rows of a group share it and read
    it as one batched matmul).
    key_mask: which keys of each entry exist (padding); query_mask: which keys new token s sees
    (the same for every row, e.g. causal among the new tokens). Every query must see at least
    one key. Returns [N, S, H, D]. Scores, softmax statistics and sums in fp32, normalised at
    the end.
    """
    n, s, n_heads, hd = q.shape
    kh = levels[0][0].shape[1]
    r = n_heads // kh
    scale = hd ** -0.5
    f32 = jnp.float32
    qh = jnp.moveaxis(q.reshape(n, s, kh, r, hd), 2, 1).reshape(n, kh, s * r, hd)

    # a level's query layout [B_l, K, g*S*R, ...] <-> the rows' layout [N, K, S*R, ...]
    def to_rows(x, b):
        g = n // b
        return jnp.swapaxes(x.reshape(b, kh, g, s * r, *x.shape[3:]), 1, 2).reshape(
            n, kh, s * r, *x.shape[3:])

    def to_level(x, b):
        g = n // b
        return jnp.swapaxes(x.reshape(b, g, kh, s * r, *x.shape[3:]), 1, 2).reshape(
            b, kh, g * s * r, *x.shape[3:])

    scores = []
    for k, _, key_mask, query_mask in levels:
        b = k.shape[0]
        sc = jnp.einsum("bkqd,bkds->bkqs", to_level(qh, b), k, preferred_element_type=f32)
        sc = sc * scale
        if key_mask is not None:
            sc = jnp.where(key_mask[:, None, None, :], sc, _MASK_VALUE)
        if query_mask is not None:
            sc = jnp.where(jnp.tile(jnp.repeat(query_mask, r, axis=0), (n // b, 1)), sc,
                           _MASK_VALUE)
        scores.append(sc)
    m = functools.reduce(jnp.maximum, [to_rows(sc.max(-1), sc.shape[0]) for sc in scores])
    denom, out = 0.0, 0.0
    for sc, (k, v, _, _) in zip(scores, levels):
        b = k.shape[0]
        e = jnp.exp(sc - to_level(m, b)[..., None])
        denom = denom + to_rows(e.sum(-1), b)
        out = out + to_rows(jnp.einsum("bkqs,bksd->bkqd", e.astype(v.dtype), v,
                                       preferred_element_type=f32), b)
    out = out / denom[..., None]                                     # [N, K, S*R, D]
    return jnp.moveaxis(out.reshape(n, kh, s, r, hd), 1, 2).reshape(n, s, n_heads, hd).astype(
        q.dtype)


# New tokens per attention block when many are fed at once (a shared-prefix judge's suffixes,
# up to a response long): the fp32 scores [rows, K, block * R, keys] of one block at a time.
QUERY_BLOCK = 256


def attend_blocked(q, levels, block: int = QUERY_BLOCK):
    """`attend` over blocks of `block` new tokens, one after another (lax.map), so the scores
    of S new tokens never exist at once; the same result."""
    n, s = q.shape[:2]
    if s <= block:
        return attend(q, levels)
    nb = -(-s // block)
    pad = nb * block - s
    blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[0], nb, block, *x.shape[2:]), 1, 0)
    qb = blocks(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))))
    # padded queries see what the last real one sees (never no key); their rows are dropped
    masks = [None if qm is None else jnp.pad(qm, ((0, pad), (0, 0)), mode="edge").reshape(
        nb, block, qm.shape[-1]) for *_, qm in levels]

    def one(args):
        qi, mi = args
        return attend(qi, [(k, v, km, m) for (k, v, km, _), m in zip(levels, mi)])

    out = jax.lax.map(one, (qb, masks))                       # [nb, N, block, H, D]
    return jnp.moveaxis(out, 0, 1).reshape(n, nb * block, *q.shape[2:])[:, :s]


def grouped_attention(q, prompt_k, prompt_v, prompt_mask, gen_k, gen_v, gen_valid, *,
                      suffix_k=None, suffix_v=None, suffix_mask=None, gen_mask=None):
    """Attention of S new tokens per row over its prompt's keys, then its own generated keys.

    q [B*G, S, N, D]; prompt_k [B, K, D, Lp], prompt_v [B, K, Lp, D]; prompt_mask [B, Lp];
    gen_k [B*G, K, D, T], gen_v [B*G, K, T, D] (the S new tokens already written);
    gen_valid [S, T] bool (which slots new token s sees: those written before it and itself;
    the same for every row). Returns [B*G, S, N, D]. With a shared prefix, suffix_k/v
    [B*M, K, D, Ls] / [B*M, K, Ls, D] and suffix_mask [B*M, Ls] sit between the prompt
    (prefix) and the generated rows [B*M*G]; gen_mask [B*G, T]: per-row validity of the
    generated slots (the left padding of suffixes prefilled as generated tokens).
    """
    levels = [(prompt_k, prompt_v, prompt_mask, None)]
    if suffix_k is not None:
        levels.append((suffix_k, suffix_v, suffix_mask, None))
    levels.append((gen_k, gen_v, gen_mask, gen_valid))
    return attend_blocked(q, levels)


def _layer_step(config: Qwen2_5_VLConfig, p, x, cos, sin, pk, pv, pmask, gk, gv, slot,
                gen_valid, sk=None, sv=None, smask=None, gen_mask=None,
                constrain=_no_constraint):
    """One decoder layer for S new tokens per row (x [B*G, S, D]); writes their k/v at gen
    slots [slot, slot + S) and attends to the first gen_valid.shape[1] slots only (a decode
    window: the slots after it are unwritten, and reading them would cost as much as the
    written ones).

    constrain(x, logical names): the activations' layout on a mesh (the sampler's). Rows live
    with their cache (`batch`); each projection's input is every row on every device, its
    output a slice of heads or MLP columns, and o_proj / down_proj sum their partial outputs
    back onto the rows' devices. So the weights never move: each step moves activations of
    [rows, D] a few times per layer, where the weights' FSDP split (over D) summed [rows, 2F]
    MLP activations across devices at every layer and token."""
    c, t = config, config.text
    kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
    n, s, _ = x.shape
    nq = t.num_attention_heads * t.head_dim
    every_row = lambda h: constrain(h, (None, None, None))
    rows = lambda y: constrain(y, ("batch",) + (None,) * (y.ndim - 1))
    h = every_row(L.RMSNorm(t.rms_norm_eps, **kw).apply({"params": p["input_layernorm"]}, x))
    q = constrain(_dense(c, h, p["q"]["kernel"], p["q"]["bias"]), (None, None, "heads"))
    k, v = uninterleave(_dense(c, h, p["kv"]["kernel"], p["kv"]["bias"]))
    q = rows(L.apply_rotary(q.reshape(n, s, t.num_attention_heads, t.head_dim), cos, sin))
    k = L.apply_rotary(k.reshape(n, s, t.num_key_value_heads, t.head_dim), cos, sin)
    v = v.reshape(n, s, t.num_key_value_heads, t.head_dim)
    k = rows(jnp.transpose(k, (0, 2, 3, 1)).astype(gk.dtype))          # [B*G, K, D, S]
    v = rows(jnp.swapaxes(v, 1, 2).astype(gv.dtype))                   # [B*G, K, S, D]
    gk = jax.lax.dynamic_update_slice(gk, k, (0, 0, 0, slot))
    gv = jax.lax.dynamic_update_slice(gv, v, (0, 0, slot, 0))
    cast = lambda x: None if x is None else x.astype(q.dtype)
    w = gen_valid.shape[1]
    out = rows(grouped_attention(q, cast(pk), cast(pv), pmask, cast(gk[..., :w]),
                                 cast(gv[:, :, :w]), gen_valid, suffix_k=cast(sk),
                                 suffix_v=cast(sv), suffix_mask=smask,
                                 gen_mask=None if gen_mask is None else gen_mask[:, :w]))
    out = constrain(out.reshape(n, s, nq), (None, None, "heads"))   # attention by rows, then
                                                                    # heads to their devices
    x = x + rows(_dense(c, out, p["o_proj"]["kernel"]))
    h = every_row(L.RMSNorm(t.rms_norm_eps, **kw).apply(
        {"params": p["post_attention_layernorm"]}, x))
    gate, up = uninterleave(constrain(_dense(c, h, p["gate_up"]), (None, None, "mlp")))
    mid = constrain(L.activation(t.hidden_act)(gate) * up, (None, None, "mlp"))
    return x + rows(_dense(c, mid, p["down_proj"])), gk, gv


def _dense(config: Qwen2_5_VLConfig, x, kernel, bias=None):
    """`layers.Dense` on a kernel given directly (x [..., in] @ kernel [in, out], + bias), in
    the compute dtype."""
    dtype = config.compute_dtype
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def decode_hidden(model, params, per_layer_params: list[Any], tokens, positions,
                  cache: GroupedCache, slot, gen_mask=None, gen_valid=None,
                  window: int | None = None, constrain=_no_constraint):
    """Feed S tokens per row (tokens [B*G, S]; positions [B*G, S] = mRoPE positions, equal on
    all three rows) at gen slots [slot, slot + S), causal among themselves; return
    (final-norm hidden [B*G, S, D], updated cache). gen_mask [B*G, T] bool: per-row validity
    of the gen slots (None: all; a suffix prefill's left padding is False). gen_valid [S, T]
    bool: which gen slots new token s sees, instead of the causal default (slots up to its
    own), e.g. the ancestors in a token tree. window: attention reads gen slots [0, window)
    only (static; slot + S <= window; None = all T). constrain: the activations' layout on a
    mesh (`_layer_step`)."""
    c, t = model.config, model.config.text
    n, s = tokens.shape
    x = constrain(model.apply({"params": params}, tokens,
                              method=lambda m, ids: m.model.language_model.embed(ids)),
                  ("batch", None, None))
    pos3 = jnp.broadcast_to(positions[None], (3, n, s))
    cos, sin = L.mrope(pos3, t.head_dim, t.rope_theta, t.mrope_section)     # [B*G, S, D]
    slots = jnp.arange(cache.max_new_tokens if window is None else window)
    if gen_valid is None:
        gen_valid = slots[None, :] <= slot + jnp.arange(s)[:, None]        # [S, W]
    gen_k, gen_v = [], []
    for i, p in enumerate(per_layer_params):
        suffix = ((cache.suffix_k[i], cache.suffix_v[i], cache.suffix_mask) if cache.suffix_k
                  else (None, None, None))
        x, gk, gv = _layer_step(c, p, x, cos, sin, cache.prompt_k[i], cache.prompt_v[i],
                                cache.prompt_mask, cache.gen_k[i], cache.gen_v[i], slot,
                                gen_valid, *suffix, gen_mask, constrain)
        gen_k.append(gk)
        gen_v.append(gv)
    h = model.apply({"params": params}, x, method=lambda m, h: m.model.language_model.norm(h))
    return h, cache.replace(gen_k=tuple(gen_k), gen_v=tuple(gen_v))
