"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries logical axis names (see emor3_jax/sharding.py LOGICAL_RULES); kernels
keep HF's flat shapes ([in, out] = HF Linear weight transposed) so tensor-parallel
divisibility is decided on the flat dimension, and the safetensors mapping is a transpose.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked rows stay NaN-free


class Dense(nn.Module):
    """y = x @ kernel (+ bias), kernel [in, out] (HF Linear weight transposed).

    Leading dimensions are flattened into one before the matmul: the weight gradient is then a
    plain 2-D contraction, which XLA's CPU and GPU backends run markedly faster than a
    contraction over (batch, length); on TPU the reshape is free.
    """
    features: int
    names: tuple[str, str]
    use_bias: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.init_std), self.names),
            (x.shape[-1], self.features), self.param_dtype)
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (self.names[1],)), (self.features,),
                self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y.reshape(*lead, self.features)


def dense(features: int, names: tuple[str, str], *, use_bias: bool, dtype, param_dtype,
          init_std: float = 0.02, name: str | None = None) -> Dense:
    """Dense with logically partitioned kernel [in, out] and bias [out]."""
    return Dense(features, tuple(names), use_bias, dtype, param_dtype, init_std, name=name)


class RMSNorm(nn.Module):
    """HF Qwen2RMSNorm: normalise in fp32, cast back, then scale (param named `weight` as HF)."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                   ("norm",)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * x32.astype(self.dtype)


def activation(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
    }[name]


class GatedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); bias only in the vision tower (as HF)."""
    hidden_size: int
    intermediate_size: int
    act: str
    use_bias: bool
    axes: tuple[str, str]          # (embed axis, mlp axis)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        embed, mlp = self.axes
        gate = dense(self.intermediate_size, (embed, mlp), name="gate_proj", **kw)(x)
        up = dense(self.intermediate_size, (embed, mlp), name="up_proj", **kw)(x)
        return dense(self.hidden_size, (mlp, embed), name="down_proj", **kw)(
            activation(self.act)(gate) * up)


# ------------------------------------------------------------------------------------------
# Rotary embeddings (angles in fp32, rotation in fp32, result cast back).

def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """x [..., L, heads, head_dim]; cos/sin [..., L, head_dim] (fp32)."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def vision_rotary(pos_hw, head_dim: int, theta: float):
    """HF Qwen2_5_VLVisionRotaryEmbedding: pos_hw [P, 2] -> cos, sin [P, head_dim] fp32."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    freqs = pos_hw.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    freqs = freqs.reshape(pos_hw.shape[0], -1)              # [h freqs, w freqs]
    emb = jnp.concatenate([freqs, freqs], -1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope(position_ids, head_dim: int, theta: float, mrope_section: Sequence[int]):
    """HF Qwen2_5_VLRotaryEmbedding: position_ids [3, B, L] -> cos, sin [B, L, head_dim] fp32.

    Frequency i of the first `mrope_section[0]` uses the temporal row, the next
    `mrope_section[1]` the height row, the rest the width row (Qwen2/2.5-VL, not interleaved).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    row = np.repeat(np.arange(3), np.asarray(mrope_section))          # [head_dim/2]
    pos = position_ids.astype(jnp.float32)[row]                       # [hd/2, B, L]
    freqs = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], -1)
    return jnp.cos(emb), jnp.sin(emb)


# ------------------------------------------------------------------------------------------
# Attention core, swappable implementation.

def attention(q, k, v, mask, *, impl: str = "einsum"):
    """Softmax attention with grouped KV heads.

    q [B, T, N, H]; k, v [B, S, K, H] (N a multiple of K); mask bool broadcastable to
    [B, 1, T, S] (True = attend). `impl`: "einsum" (plain XLA, fp32 softmax; the CPU default
    and the reference), "xla" or "cudnn" (`jax.nn.dot_product_attention`, fused on GPU).
    Rows with no visible key return finite garbage (callers ignore them).
    The einsum path is rematerialized under autodiff: the backward pass recomputes the
    [T, S] scores instead of keeping them (like a fused kernel), so training memory stays
    linear in S and there are no fp32 [T, S] residuals to store and reload.
    """
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    return _einsum_attention(q, k, v, mask)


@jax.checkpoint
def _einsum_attention(q, k, v, mask):
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (h ** -0.5)
    logits = jnp.where(mask[:, :, None], logits, _MASK_VALUE)      # [B, 1, 1, T, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def remat_policy(name: str):
    """none: keep everything; block: recompute a block's elementwise ops, keep its matmuls;
    full: keep only each block's input (recompute the whole block in the backward pass)."""
    if name == "block":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    return None
