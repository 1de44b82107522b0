"""The attention implementations agree with the einsum reference (values and gradients, fp32).

`blockwise` (pure-JAX flash attention) on every mask the model builds: causal + left padding,
decode against a cache, vision groups with padding, dense masks with fully masked rows; a
whole tiny model with blockwise equals einsum; its compiled memory is far below einsum's at
T = S = 4096. `splash` (TPU Pallas kernel) runs in the Pallas interpreter on CPU.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.models import layers as L
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from qwen_testutil import chat_row, images, left_pad

TOL = 1e-5
B, N, K, H = 2, 4, 2, 16


def _qkv(t, s, seed=0, b=B):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, N, H))
    k, v = rng.normal(size=(2, b, s, K, H))
    cot = rng.normal(size=(b, t, N, H))
    return [jnp.asarray(x, jnp.float32) for x in (q, k, v, cot)]


def _key_valid(s, pads=(5, 0)):
    valid = np.ones((len(pads), s), bool)
    for row, p in enumerate(pads):
        valid[row, :p] = False
    return jnp.asarray(valid)


def _value_and_grads(fn, q, k, v, cot):
    def run(q, k, v, cot):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot)
    return jax.jit(run)(q, k, v, cot)


def _check(fn, q, k, v, cot, dense):
    """fn vs einsum with `dense`, on rows with a visible key (einsum returns finite garbage in
    the others: their cotangent is zeroed so both gradients mean the same thing)."""
    seen = jnp.broadcast_to(dense, (q.shape[0], 1, q.shape[1], k.shape[1])).any(-1)[:, 0]
    cot = jnp.where(seen[..., None, None], cot, 0.0)
    want, want_g = _value_and_grads(lambda q, k, v: L.attention(q, k, v, dense), q, k, v, cot)
    got, got_g = _value_and_grads(fn, q, k, v, cot)
    assert all(bool(jnp.isfinite(x).all()) for x in (got, *got_g))
    rows = np.asarray(seen)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=TOL, rtol=TOL)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=TOL, rtol=TOL)
    return got


def test_blockwise_causal_left_padding_gqa():
    """Prefill: 37 tokens (not a multiple of either block), two rows, one left-padded."""
    q, k, v, cot = _qkv(37, 37)
    mask = L.Mask(_key_valid(37))
    fn = lambda q, k, v: L.blockwise_attention(q, k, v, mask, block_q=8, block_k=16)
    _check(fn, q, k, v, cot, mask.dense(37))


def test_blockwise_dense_mask_fully_masked_rows():
    """A dense [B, 1, T, S] mask, here the old causal one where padding queries see nothing:
    finite everywhere, zero in those rows."""
    t = 21
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None] & _key_valid(t)[:, None, None, :]
    q, k, v, cot = _qkv(t, t, seed=1)
    fn = lambda q, k, v: L.blockwise_attention(q, k, v, causal, block_q=4, block_k=8)
    got = _check(fn, q, k, v, cot, causal)
    assert float(jnp.abs(got[0, :5]).max()) == 0.0


def test_blockwise_decode_against_cache():
    """One new token at slot 24 of a 29-slot cache (traced offset, later slots unwritten)."""
    s, start, t = 29, 24, 1
    q, k, v, cot = _qkv(t, s, seed=2)
    key_mask = _key_valid(s, pads=(3, 0)).at[:, start + t:].set(False)

    def fn(q, k, v, start):
        return L.attention(q, k, v, qwen2_5_vl.decode_mask(key_mask, start), impl="blockwise")

    dense = qwen2_5_vl.decode_mask(key_mask, start).dense(t)
    _check(lambda q, k, v: fn(q, k, v, jnp.int32(start)), q, k, v, cot, dense)


def test_blockwise_vision_groups():
    """Non-causal groups with padded slots, one group entirely padding (no visible key)."""
    valid = jnp.asarray(np.arange(24)[None, :] < np.array([[24], [17], [0]]))
    q, k, v, cot = _qkv(24, 24, seed=3, b=3)
    mask = L.Mask(valid, causal=False)
    fn = lambda q, k, v: L.blockwise_attention(q, k, v, mask, block_q=8, block_k=8)
    _check(fn, q, k, v, cot, mask.dense(24))


def test_blockwise_memory_is_linear():
    """Compiled forward+backward at T = S = 4096 (one row, 4 heads): einsum's temporaries hold
    [T, S] fp32 scores, blockwise's only a tile."""
    t = 4096
    shape = lambda heads: jax.ShapeDtypeStruct((1, t, heads, 64), jnp.float32)
    mask = L.Mask(jnp.ones((1, t), bool))

    def temp_bytes(impl):
        loss = lambda q, k, v: L.attention(q, k, v, mask, impl=impl).sum()
        grad = jax.jit(jax.grad(loss, (0, 1, 2)))
        compiled = grad.lower(shape(N), shape(K), shape(K)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    einsum, blockwise = temp_bytes("einsum"), temp_bytes("blockwise")
    print(f"\nfwd+bwd temp bytes at T=S={t}, 4 heads: einsum {einsum / 2**20:.1f} MiB, "
          f"blockwise {blockwise / 2**20:.1f} MiB")
    assert einsum >= N * t * t * 4          # the fp32 scores
    assert blockwise * 8 < einsum


def test_tiny_model_blockwise_equals_einsum(monkeypatch):
    """Whole-model logits (vision windows, full attention, left-padded text) with 8-wide
    blocks, so every attention spans several tiles."""
    monkeypatch.setattr(L, "BLOCK", 8)
    cfg = tiny_config(vision_depth=2, fullatt_block_indexes=(1,))
    ref_model = qwen2_5_vl.build_model(cfg)
    model = qwen2_5_vl.build_model(cfg.replace(attention_impl="blockwise"))
    rng = np.random.default_rng(0)       # random params from the shapes (nothing to compile)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                          nn.unbox(qwen2_5_vl.abstract_params(ref_model)))
    pv, grid = images([("astronaut", (200, 280))])
    ids, mask = left_pad([chat_row(cfg, rng, [5, "img", 7], grid), chat_row(cfg, rng, [9], [])],
                         cfg.text.pad_token_id)
    logits = lambda m: jax.jit(lambda p: m.apply({"params": p}, ids, mask, pv, grid).logits)(
        params)
    want, got = logits(ref_model), logits(model)
    valid = np.asarray(mask, bool)
    assert np.abs(np.asarray(want)[valid]).max() > 1.0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=TOL,
                               rtol=TOL)


# -- splash (TPU Pallas kernel) in the interpreter -------------------------------------------

@pytest.mark.parametrize("case", ["prefill", "decode_rows", "vision"])
def test_splash_interpret_matches_einsum(case):
    """Causal + left padding (120 -> padded to 128), response rows after a prompt (offset 120),
    non-causal groups with padding; padding rows are compared nowhere."""
    if case == "prefill":
        t, s, mask = 120, 120, L.Mask(_key_valid(120))
    elif case == "decode_rows":
        t, s = 100, 220
        mask = L.Mask(_key_valid(220).at[1, 200:].set(False), 120)    # a short response
    else:
        t, s = 130, 130
        mask = L.Mask(jnp.asarray(np.arange(130)[None] < np.array([[130], [77]])), causal=False)
    q, k, v, cot = _qkv(t, s, seed=4)
    seen = np.asarray(mask.key_valid)[:, mask.q_offset:mask.q_offset + t]   # real query rows
    cot = jnp.where(jnp.asarray(seen)[..., None, None], cot, 0.0)
    fn = lambda q, k, v: L.splash_attention(q, k, v, mask, interpret=True)
    _check(fn, q, k, v, cot, jnp.asarray(mask.dense(t)) & jnp.asarray(seen)[:, None, :, None])


def test_splash_shard_map_over_mesh(devices8):
    """Under a mesh context the kernel runs per batch shard (shard_map), same values."""
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    q, k, v, _ = _qkv(128, 128, seed=5, b=8)
    mask = L.Mask(jnp.asarray(np.arange(128)[None] >= np.arange(8)[:, None] * 9))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: L.splash_attention(q, k, v, mask, interpret=True))(q, k, v)
    rows = np.asarray(mask.key_valid)        # padding queries differ (they see padding keys)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(L.attention(q, k, v, mask))[rows],
                               atol=TOL, rtol=TOL)


def test_splash_needs_tpu_and_falls_back_for_traced_offsets():
    q, k, v, _ = _qkv(16, 16)
    with pytest.raises(ValueError, match="model.attention='splash'.*cpu"):
        L.attention(q, k, v, L.Mask(_key_valid(16)), impl="splash")
    # decode against a growing cache (traced offset) runs blockwise on any backend
    out = jax.jit(lambda q, k, v, i: L.attention(q, k, v, L.Mask(_key_valid(16), i),
                                                 impl="splash"))(q[:, :1], k, v, jnp.int32(15))
    assert out.shape == (B, 1, N, H)


@pytest.mark.parametrize("t,s,causal", [(37, 37, True), (36, 51, False), (1, 37, True)])
def test_cudnn_padding_to_even_lengths_keeps_values_and_gradients(t, s, causal):
    """model.attention=cudnn pads odd lengths (cuDNN trains with a mask only on even ones) and
    drops what it added: the same padding through jax's XLA attention on CPU equals einsum,
    values and gradients, with left padding, GQA, causal and key-only masks and a decode row."""
    q, k, v, cot = _qkv(t, s)
    mask = L.Mask(_key_valid(s), causal=causal, q_offset=s - t)
    dense = mask.dense(t)
    fn = lambda q, k, v: L._cudnn_attention(q, k, v, dense, implementation="xla")
    _check(fn, q, k, v, cot, dense)
