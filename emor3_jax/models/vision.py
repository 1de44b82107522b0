"""Qwen2.5-VL vision tower (HF `Qwen2_5_VisionTransformerPretrainedModel`) with static shapes.

Data flow (P = padded patch count, see emor3_jax/processing/vision.py for the index arrays):
  pixel rows (HF patch order) --patch_order--> window order --patch_embed--> [P, D]
  blocks (nn.scan; per block: window attention, or per-frame full attention when the block
  index is in fullatt_block_indexes, chosen with lax.cond) --merger--> [P/4, out]
  --merged_order--> merged tokens in HF order (what the image-pad positions receive).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax.models.config import VisionConfig
from emor3_jax.models.layers import (GatedMLP, Mask, RMSNorm, activation, apply_rotary,
                                     attention, dense, remat_policy, vision_rotary)
from emor3_jax.processing.vision import VisionInputs


@jax.custom_vjp
def gather_rows(x, index, inverse, inverse_valid):
    """x[index] (rows) for a one-to-one layout change whose transpose is again a gather.

    `inverse` [len(x)] gives, for every row of x, the flattened position of its copy in the
    output, and `inverse_valid` says whether it has one. Precondition (true for the window and
    frame layouts): every valid row appears exactly once in `index`, and output positions that
    are not the copy of a valid row receive zero cotangent (masked keys, unread query rows).
    XLA lowers the transpose of a plain gather to a scatter-add, which is slow on CPU/GPU.
    """
    return jnp.take(x, index, axis=0)


def _gather_rows_fwd(x, index, inverse, inverse_valid):
    return jnp.take(x, index, axis=0), (index, inverse, inverse_valid)


def _gather_rows_bwd(res, g):
    index, inverse, inverse_valid = res
    flat = g.reshape((-1,) + g.shape[index.ndim:])
    dx = jnp.take(flat, inverse, axis=0)
    dx = jnp.where(inverse_valid.reshape(inverse_valid.shape + (1,) * (dx.ndim - 1)), dx, 0)
    return dx.astype(g.dtype), None, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def grouped_attention(q, k, v, index, valid, slot, patch_valid, impl: str):
    """Attention inside groups of patches (windows or frames).

    q, k, v [P, heads, head_dim]; index/valid [G, S] (slots of each group); slot [P] (where
    each patch sits in the flattened [G*S] layout). Memory is O(G * S^2), not O(P^2).
    Grouping already exploits the block-diagonal structure, so "splash" runs blockwise here:
    windows hold 64 patches (half a kernel block) and the head dim (80) is not lane-aligned.
    """
    g, s = index.shape
    group = lambda x: gather_rows(x, index, slot, patch_valid)          # [G, S, heads, hd]
    impl = "blockwise" if impl == "splash" else impl
    out = attention(group(q), group(k), group(v), Mask(valid, causal=False), impl=impl)
    out = out.reshape((g * s,) + out.shape[2:])
    return gather_rows(out, slot, index.reshape(-1), valid.reshape(-1))  # [P, heads, hd]


class VisionAttention(nn.Module):
    config: VisionConfig
    impl: str
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cos, sin, is_full, vin: VisionInputs):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        qkv = dense(3 * c.hidden_size, ("vision_embed", "vision_heads"), name="qkv", **kw)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(x.shape[0], 3, c.num_heads, c.head_dim), 1, 0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        window = lambda q, k, v: grouped_attention(q, k, v, vin.window_index, vin.window_valid,
                                                   vin.window_slot, vin.patch_valid, self.impl)
        frame = lambda q, k, v: grouped_attention(q, k, v, vin.frame_index, vin.frame_valid,
                                                  vin.frame_slot, vin.patch_valid, self.impl)
        if isinstance(is_full, (bool, np.bool_)):
            out = (frame if is_full else window)(q, k, v)
        else:
            out = jax.lax.cond(is_full, frame, window, q, k, v)
        out = out.reshape(x.shape[0], c.hidden_size)
        return dense(c.hidden_size, ("vision_heads", "vision_embed"), name="proj", **kw)(out)


class VisionBlock(nn.Module):
    config: VisionConfig
    impl: str
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, is_full, cos, sin, vin: VisionInputs):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(1e-6, name="norm1", **kw)(x)
        x = x + VisionAttention(c, self.impl, name="attn", **kw)(h, cos, sin, is_full, vin)
        h = RMSNorm(1e-6, name="norm2", **kw)(x)
        x = x + GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, True,
                         ("vision_embed", "vision_mlp"), name="mlp", **kw)(h)
        return x, None


class PatchMerger(nn.Module):
    """RMSNorm, 2x2 concat, Linear, GELU (exact), Linear (HF merger.ln_q / mlp.0 / mlp.2)."""
    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        width = c.hidden_size * c.merge_unit
        x = RMSNorm(1e-6, name="ln_q", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = x.reshape(-1, width)
        x = dense(width, ("vision_embed", "vision_mlp"), name="mlp_0", **kw)(x)
        x = activation("gelu")(x)
        return dense(c.out_hidden_size, ("vision_mlp", "embed"), name="mlp_2", **kw)(x)


class VisionTransformer(nn.Module):
    """pixel rows [P, C*T*p*p] (HF patch order, padded) -> merged tokens [P/4, out] (HF order)."""
    config: VisionConfig
    impl: str = "einsum"
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, vin: VisionInputs):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixel_values.shape[0] != vin.num_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but VisionInputs "
                             f"expects {vin.num_patches} (pad with processing.vision.pad_pixel_values)")
        x = jnp.take(pixel_values, vin.patch_order, axis=0).astype(self.dtype)
        # Conv3d with stride = kernel is a dense map over the flattened (C, T, p, p) patch.
        x = PatchEmbed(c, name="patch_embed", **kw)(x)
        cos, sin = vision_rotary(vin.rotary_pos, c.head_dim, c.rope_theta)
        is_full = np.isin(np.arange(c.depth), np.asarray(c.fullatt_block_indexes))
        block = VisionBlock
        if self.remat != "none":
            block = nn.remat(block, policy=remat_policy(self.remat), prevent_cse=False)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(c, self.impl, name="blocks", **kw)(x, jnp.asarray(is_full), cos, sin, vin)
        merged = PatchMerger(c, name="merger", **kw)(x)
        return jnp.take(merged, vin.merged_order, axis=0)


class PatchEmbed(nn.Module):
    """HF patch_embed.proj (Conv3d, no bias) as a kernel [C*T*p*p, hidden] named `proj`."""
    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        return dense(self.config.hidden_size, ("patch", "vision_embed"), use_bias=False,
                     name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
