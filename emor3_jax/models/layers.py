"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries logical axis names (see emor3_jax/sharding.py LOGICAL_RULES); kernels
keep HF's flat shapes ([in, out] = HF Linear weight transposed) so tensor-parallel
divisibility is decided on the flat dimension, and the safetensors mapping is a transpose.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

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
    # logical axes of the [..., intermediate] activation (None: left to the compiler)
    activation_axes: tuple[str | None, ...] | None = None

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        embed, mlp = self.axes
        gate = dense(self.intermediate_size, (embed, mlp), name="gate_proj", **kw)(x)
        up = dense(self.intermediate_size, (embed, mlp), name="up_proj", **kw)(x)
        hidden = activation(self.act)(gate) * up
        if self.activation_axes is not None:
            hidden = constrain(hidden, self.activation_axes)
        return dense(self.hidden_size, (mlp, embed), name="down_proj", **kw)(hidden)


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
# Attention core, swappable implementation (`Qwen2_5_VLConfig.attention_impl`).

BLOCK = 512   # blockwise query/key block (and the splash kernel's largest block)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Mask:
    """An attention mask in O(B*S) form, so no [T, S] mask has to exist.

    Key s is visible to query t iff key_valid[b, s] and, when causal, s <= q_offset + t
    (query t sits at key slot q_offset + t); a causal query always sees its own slot, so no
    causal row is empty (padding rows attend to themselves: finite, ignored by callers).
    Prefill: Mask(attention_mask != 0); decode against a cache: Mask(key_mask, write_index);
    vision groups: Mask(valid, causal=False). A Python-int q_offset stays static (the splash
    kernel needs it static); a traced one is a pytree leaf.
    """
    key_valid: jax.Array            # [B, S] bool
    q_offset: Any = 0               # int or int32 scalar
    causal: bool = True

    def tree_flatten(self):
        if isinstance(self.q_offset, (int, np.integer)):
            return (self.key_valid,), (int(self.q_offset), self.causal)
        return (self.key_valid, self.q_offset), (None, self.causal)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        offset, causal = aux
        return cls(leaves[0], leaves[1] if offset is None else offset, causal)

    def block(self, q_start, q_len: int, k_start, k_len: int):
        """Visibility of queries [q_start, +q_len) x keys [k_start, +k_len): [B, 1, q|1, k]."""
        kpos = k_start + jnp.arange(k_len)
        valid = jax.lax.dynamic_slice_in_dim(self.key_valid, k_start, k_len, axis=1)
        valid = valid[:, None, None, :]
        if not self.causal:
            return valid
        qpos = (self.q_offset + q_start + jnp.arange(q_len))[:, None]
        return (valid & (kpos <= qpos)) | (kpos == qpos)

    def dense(self, q_len: int):
        """The same mask as a bool array [B, 1, T|1, S]."""
        return self.block(0, q_len, 0, self.key_valid.shape[1])


def _pad_to(x, axis: int, size: int, value=False):
    """Pad `axis` of x at the end up to at least `size` (static)."""
    extra = max(0, size - x.shape[axis])
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def attention(q, k, v, mask, *, impl: str = "einsum"):
    """Softmax attention with grouped KV heads.

    q [B, T, N, H]; k, v [B, S, K, H] (N a multiple of K); mask: a `Mask`, or bool
    broadcastable to [B, 1, T, S] (True = attend). `impl`:
      "einsum"    plain XLA, fp32 [T, S] scores (the CPU default and the reference);
      "blockwise" flash-style pure JAX (`blockwise_attention`): O(T * BLOCK) memory forward
                  and backward, any backend;
      "splash"    the TPU Pallas kernel (`splash_attention`); needs a static-offset `Mask`,
                  anything else (decode against a growing cache, dense masks) runs blockwise;
      "xla" / "cudnn"  `jax.nn.dot_product_attention` (cuDNN: fused on GPU).
    Rows with no visible key return finite garbage (einsum) or zeros (blockwise); callers
    ignore them.
    """
    if impl == "splash" and isinstance(mask, Mask) and isinstance(mask.q_offset, int):
        return splash_attention(q, k, v, mask)
    if impl in ("blockwise", "splash"):
        return blockwise_attention(q, k, v, mask)
    if isinstance(mask, Mask):
        mask = mask.dense(q.shape[1])
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    return _einsum_attention(q, k, v, mask)


def _cudnn_attention(q, k, v, mask, implementation: str = "cudnn"):
    """cuDNN's fused attention takes the mask as a bias of the full [B, 1, T, S] shape, and
    with a bias it trains only on even T and S: an odd length gets one more query row (a copy
    of the last row's mask, its output dropped) or one more key (masked out). (The tests run
    the same padding through implementation="xla" on CPU.)"""
    t, s = q.shape[1], k.shape[1]
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, t, s))
    pt, ps = t % 2, s % 2
    if pt or ps:
        seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))   # noqa: E731
        q, k, v = seq(q, pt), seq(k, ps), seq(v, ps)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pt), (0, 0)), mode="edge")
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, ps)), constant_values=False)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out[:, :t]


@jax.checkpoint
def _einsum_attention(q, k, v, mask):
    """Rematerialized under autodiff: the backward recomputes the [T, S] scores instead of
    keeping fp32 residuals, but they still exist whole, once per layer, forward and backward."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (h ** -0.5)
    logits = jnp.where(mask[:, :, None], logits, _MASK_VALUE)      # [B, 1, 1, T, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


# -- blockwise (flash) attention in pure JAX --------------------------------------------------

def blockwise_attention(q, k, v, mask, *, block_q: int | None = None,
                        block_k: int | None = None):
    """Flash attention in plain JAX: online softmax over key blocks, one query block at a time.

    Same arguments as `attention`. Scores exist one [block_q, block_k] tile at a time (fp32);
    a custom VJP implements the flash backward (recompute the tile's scores from q, k and the
    saved log-sum-exp), so neither pass keeps anything of size T x S. Key/value heads are
    shared by their query group without copies; tiles with no visible key are skipped
    (`lax.cond`), which halves causal work. Lengths need not divide the blocks (padding).
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = min(block_q or BLOCK, t), min(block_k or BLOCK, s)
    nq, nk = -(-t // bq), -(-s // bk)
    if isinstance(mask, Mask):         # padded keys invisible (padded queries: discarded)
        mask = Mask(_pad_to(mask.key_valid, 1, nk * bk), mask.q_offset, mask.causal)
    else:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (mask.shape[0], 1, mask.shape[2], s))
        if mask.shape[2] != 1:
            mask = _pad_to(mask, 2, nq * bq)
        mask = _pad_to(mask, 3, nk * bk)
    # tiles: q [nq, B, K, G, bq, H], k/v [nk, B, K, bk, H]
    qb = _pad_to(q, 1, nq * bq, 0).reshape(b, nq, bq, kh, n // kh, h).transpose(1, 0, 3, 4, 2, 5)
    tiles = lambda x: _pad_to(x, 1, nk * bk, 0).reshape(b, nk, bk, kh, h).transpose(1, 0, 3, 2, 4)
    out = _flash(qb, tiles(k), tiles(v), mask)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, n, h)
    return out[:, :t]


def _tile_mask(mask, i, j, bq: int, bk: int):
    """Visibility of query tile i x key tile j: bool [B|1, 1, bq|1, bk]."""
    if isinstance(mask, Mask):
        return mask.block(i * bq, bq, j * bk, bk)
    if mask.shape[2] != 1:
        mask = jax.lax.dynamic_slice_in_dim(mask, i * bq, bq, axis=2)
    return jax.lax.dynamic_slice_in_dim(mask, j * bk, bk, axis=3)


def _tile_scores(qi, kj, vis):
    """Scaled fp32 scores [B, K, G, bq, bk] of a tile and its visibility broadcast to them."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=jnp.float32)
    return s * (qi.shape[-1] ** -0.5), vis[:, :, None]


@jax.custom_vjp
def _flash(qb, kb, vb, mask):
    return _flash_fwd(qb, kb, vb, mask)[0]


def _flash_fwd(qb, kb, vb, mask):
    bq, bk = qb.shape[4], kb.shape[3]

    def q_tile(args):
        qi, i = args
        stats = qi.shape[:-1]                                     # [B, K, G, bq]

        def k_tile(carry, xs):
            kj, vj, j = xs
            vis = _tile_mask(mask, i, j, bq, bk)

            def update(carry):
                m, l, acc = carry
                s, vis5 = _tile_scores(qi, kj, vis)
                m_new = jnp.maximum(m, jnp.where(vis5, s, _MASK_VALUE).max(-1))
                p = jnp.where(vis5, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(vj.dtype), vj,
                                preferred_element_type=jnp.float32)
                return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

            return jax.lax.cond(vis.any(), update, lambda c: c, carry), None

        init = (jnp.full(stats, _MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(k_tile, init, (kb, vb, jnp.arange(kb.shape[0])))
        empty = l == 0                                            # rows with no visible key
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        return out.astype(qi.dtype), m + jnp.log(jnp.where(empty, 1.0, l))

    out, lse = jax.lax.map(q_tile, (qb, jnp.arange(qb.shape[0])))
    return out, (qb, kb, vb, mask, out, lse)


def _flash_bwd(res, dout):
    """Flash backward: per query tile, per key tile, recompute p = exp(s - lse);
    dv += p^T do, ds = p * (do v^T - rowsum(do * o)), dq += ds k, dk += ds^T q."""
    qb, kb, vb, mask, out, lse = res
    bq, bk = qb.shape[4], kb.shape[3]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)
    scale = qb.shape[-1] ** -0.5

    def q_tile(dkv, xs):
        qi, doi, lsei, di, i = xs

        def k_tile(dqi, xs):
            kj, vj, dkj, dvj, j = xs
            vis = _tile_mask(mask, i, j, bq, bk)

            def update(args):
                dqi, dkj, dvj = args
                s, vis5 = _tile_scores(qi, kj, vis)
                p = jnp.where(vis5, jnp.exp(s - lsei[..., None]), 0.0)
                dvj = dvj + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(doi.dtype), doi,
                                       preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqh,bksh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - di[..., None]) * scale).astype(qi.dtype)
                dqi = dqi + jnp.einsum("bkgqs,bksh->bkgqh", ds, kj,
                                       preferred_element_type=jnp.float32)
                dkj = dkj + jnp.einsum("bkgqs,bkgqh->bksh", ds, qi,
                                       preferred_element_type=jnp.float32)
                return dqi, dkj, dvj

            dqi, dkj, dvj = jax.lax.cond(vis.any(), update, lambda a: a, (dqi, dkj, dvj))
            return dqi, (dkj, dvj)

        dk, dv = dkv
        dqi, dkv = jax.lax.scan(k_tile, jnp.zeros(qi.shape, jnp.float32),
                                (kb, vb, dk, dv, jnp.arange(kb.shape[0])))
        return dkv, dqi.astype(qi.dtype)

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_tile, (zeros, zeros),
                                (qb, dout, lse, delta, jnp.arange(qb.shape[0])))
    mask_ct = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
    return dq, dk.astype(kb.dtype), dv.astype(vb.dtype), mask_ct


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- splash: the TPU Pallas kernel -------------------------------------------------------------

# Logical name of a dimension split over every mesh axis (the LM head's vocabulary in
# rl/logprobs.py).
ALL_DEVICES = "all_devices"


def constrain(x, names):
    """x laid out by logical axis `names` (emor3_jax.sharding rules, plus ALL_DEVICES: every
    mesh axis) when tracing under a mesh (`layers.kernel_mesh`); axes a dimension does not
    divide are dropped. No-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    from jax.sharding import PartitionSpec as P

    from emor3_jax import sharding
    every = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    spec = sharding.logical_to_spec([None if n == ALL_DEVICES else n for n in names])
    spec = P(*[every if n == ALL_DEVICES else a
               for n, a in zip(names, tuple(spec) + (None,) * (len(names) - len(spec)))])
    return jax.lax.with_sharding_constraint(x, sharding._fit_spec(spec, x.shape, mesh))


def kernel_mesh(mesh):
    """Context to trace a program under: Pallas (Mosaic) kernels cannot be partitioned by XLA,
    so `splash_attention` shard_maps over this mesh (None or one device: nothing to do)."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def splash_attention(q, k, v, mask: Mask, *, interpret: bool = False):
    """`jax.experimental.pallas.ops.tpu.splash_attention` for a static-offset `Mask`.

    Causality is the kernel's static CausalMask (so it skips tiles above the diagonal) and
    padding is segment ids (valid tokens 1, padding 0, so a padding row sees padding keys and
    itself; keys that only fill the kernel's 128-multiples get -1, seen by no query). GQA:
    the kernel shares each KV head with its query group. Batch: vmap; under a mesh context
    (`jax.set_mesh(mesh)` around tracing) the call is a shard_map over the batch axes (and
    heads over `tensor` when both head counts divide it), since Mosaic kernels cannot be
    partitioned automatically. `interpret=True` runs the kernel in the Pallas interpreter
    (any backend; tests); otherwise it needs a TPU and says so.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    mesh = jax.sharding.get_abstract_mesh()
    if not interpret:
        device = getattr(mesh, "abstract_device", None)     # the mesh's, when one is set
        platform = jax.default_backend() if device is None else device.platform
        if platform != "tpu":
            raise ValueError(f"model.attention='splash' is a TPU kernel but this program runs "
                             f"on {platform}; use 'blockwise' (any backend) or 'cudnn' (GPU)")
    b, t, n, h = q.shape
    s, off = k.shape[1], mask.q_offset
    if (mask.causal and off + t > s) or (not mask.causal and (t != s or off)):
        raise ValueError(f"splash_attention: {t} queries at key offset {off} do not fit "
                         f"{s} keys (causal={mask.causal})")
    tp, sp = -(-t // 128) * 128, -(-s // 128) * 128
    bq = next(x for x in (BLOCK, 256, 128) if tp % x == 0)
    bk = next(x for x in (BLOCK, 256, 128) if sp % x == 0)
    kv_seg = mask.key_valid.astype(jnp.int32)
    q_seg = _pad_to(kv_seg[:, off:off + t], 1, tp, 1)
    kv_seg = _pad_to(kv_seg, 1, sp, -1)
    one = sa.CausalMask((tp, sp), offset=off) if mask.causal else sa.FullMask((tp, sp))
    blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                           block_kv_dq=bk)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([one] * n), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)

    def run(q, k, v, q_seg, kv_seg):
        heads_first = lambda x, size: jnp.swapaxes(_pad_to(x, 1, size, 0), 1, 2)
        one_row = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks))
        out = jax.vmap(one_row)(heads_first(q * jnp.asarray(h ** -0.5, q.dtype), tp),
                                heads_first(k, sp), heads_first(v, sp), q_seg, kv_seg)
        return jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)

    if mesh.empty or mesh.size == 1:
        return run(q, k, v, q_seg, kv_seg)
    from jax.sharding import PartitionSpec as P

    from emor3_jax import sharding
    batch = sharding._fit_spec(sharding.logical_to_spec(("batch",)), (b,), mesh)[0]
    tp_size = mesh.shape.get("tensor", 1)
    heads = "tensor" if tp_size > 1 and n % tp_size == 0 and k.shape[2] % tp_size == 0 else None
    qkv, seg = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv,
                         check_vma=False)(q, k, v, q_seg, kv_seg)


def remat_policy(name: str):
    """none: keep everything; block: recompute a block's elementwise ops, keep its matmuls;
    full: keep only each block's input (recompute the whole block in the backward pass)."""
    if name == "block":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    return None
