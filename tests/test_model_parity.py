"""Logits of our Flax Qwen2.5-VL == transformers' Qwen2_5_VLForConditionalGeneration (fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.processing import rope_index, vision
from qwen_testutil import chat_row, hf_logits, hf_model, images, left_pad, max_diff_valid

TOL = 1e-4
# Two non-square photos: grids (1, 10, 14) and (1, 14, 10), 4 windows of <= 8x8 patches each.
IMAGE_SPECS = [("astronaut", (200, 280)), ("chelsea", (240, 160))]


def _setup(tmp_path_factory, tie: bool, seed: int):
    # vision depth 3 with block 1 full attention: window, full, window.
    cfg = tiny_config(tie_word_embeddings=tie, vision_depth=3, fullatt_block_indexes=(1,))
    ref = hf_model(cfg, seed=seed)
    d = str(tmp_path_factory.mktemp(f"hf_tie{int(tie)}"))
    ref.save_pretrained(d)
    model, params = qwen2_5_vl.load_hf(d)
    return cfg, ref, model, params


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _setup(tmp_path_factory, tie=False, seed=0)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _setup(tmp_path_factory, tie=True, seed=1)


def _mixed_batch(cfg, seed=0):
    """Row 0: two images of different sizes; row 1: one image; row 2: text only; left padded."""
    pv, grid = images(IMAGE_SPECS + [("coffee", (150, 220))])
    rng = np.random.default_rng(seed)
    rows = [chat_row(cfg, rng, [5, "img", 7, "img", 4], grid[:2]),
            chat_row(cfg, rng, [3, "img", 9], grid[2:]),
            chat_row(cfg, rng, [17], [])]
    ids, mask = left_pad(rows, cfg.text.pad_token_id)
    return ids, mask, pv, grid


def _jit_forward(model):
    return jax.jit(lambda p, ids, mask, pv, vin, pos: model.apply(
        {"params": p}, ids, mask, pv, vision_inputs=vin, position_ids=pos).logits)


def test_eager_hf_inputs_untied(untied):
    """The convenience path: exactly the HF processor's inputs, metadata built on the host."""
    cfg, ref, model, params = untied
    ids, mask, pv, grid = _mixed_batch(cfg)
    expected = hf_logits(ref, cfg, ids, mask, pv, grid)
    assert np.abs(expected).max() > 1.0  # weights large enough for a meaningful comparison
    out = model.apply({"params": params}, ids, attention_mask=mask, pixel_values=pv,
                      image_grid_thw=grid)
    assert out.logits.shape == (*ids.shape, cfg.text.vocab_size)
    assert max_diff_valid(out.logits, expected, mask) <= TOL


def test_jit_padded_buckets_tied(tied):
    """Inside jit with padded (bucketed) vision shapes and host-built metadata; tied head."""
    cfg, ref, model, params = tied
    ids, mask, pv, grid = _mixed_batch(cfg, seed=1)
    expected = hf_logits(ref, cfg, ids, mask, pv, grid)
    pad = vision.VisionPadding(num_patches=256, num_windows=16, num_frames=4, frame_len=192)
    vin = vision.build_vision_inputs_for(cfg, grid, pad)
    assert vin.num_patches > pv.shape[0] and vin.window_index.shape[0] > 7
    pos, _ = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    logits = _jit_forward(model)(params, ids, mask,
                                 vision.pad_pixel_values(pv, vin.num_patches), vin, pos)
    assert max_diff_valid(logits, expected, mask) <= TOL
    assert "lm_head" not in params


def test_text_only_prompt(untied, tied):
    for cfg, ref, model, params in (untied, tied):
        rng = np.random.default_rng(2)
        ids, mask = left_pad([rng.integers(0, 500, 11).tolist(), rng.integers(0, 500, 6).tolist()],
                             cfg.text.pad_token_id)
        expected = hf_logits(ref, cfg, ids, mask)
        out = model.apply({"params": params}, ids, attention_mask=mask)
        assert max_diff_valid(out.logits, expected, mask) <= TOL


def test_hidden_states_chunked_logits(untied):
    """The log-prob path: hidden states, then the LM head on sequence chunks."""
    cfg, _, model, params = untied
    ids, mask, pv, grid = _mixed_batch(cfg, seed=3)
    full = model.apply({"params": params}, ids, mask, pv, grid).logits
    hidden = model.apply({"params": params}, ids, mask, pv, grid, method=model.hidden_states)
    chunks = [model.apply({"params": params}, hidden[:, i:i + 16], method=model.logits)
              for i in range(0, ids.shape[1], 16)]
    np.testing.assert_allclose(np.concatenate(chunks, 1), full, atol=1e-6)


def _loss_and_grad(cfg, params, ids, mask, pv, vin, pos):
    m = qwen2_5_vl.build_model(cfg)

    def loss(p):
        logits = m.apply({"params": p}, ids, mask, pv, vision_inputs=vin, position_ids=pos).logits
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def reference_grad(untied):
    cfg, _, _, params = untied
    ids, mask, pv, grid = _mixed_batch(cfg, seed=4)
    vin = vision.build_vision_inputs_for(cfg, grid)
    pos, _ = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    return (ids, mask, pv, grid, pos), _loss_and_grad(cfg, params, ids, mask, pv, vin, pos)


def _assert_same(a, b, what):
    (loss_a, grad_a), (loss_b, grad_b) = a, b
    assert abs(float(loss_a - loss_b)) < 1e-5, what
    for path, x in jax.tree_util.tree_flatten_with_path(grad_a)[0]:
        y = grad_b
        for k in path:
            y = y[k.key]
        err = float(jnp.abs(x - y).max())
        assert err <= 1e-5 * max(1.0, float(jnp.abs(x).max())), (what, path, err)


@pytest.mark.parametrize("runtime", [{"attention_impl": "xla"}, {"remat": "block"},
                                     {"remat": "full"}], ids=["xla", "remat_block", "remat_full"])
def test_attention_impl_and_remat_agree(untied, reference_grad, runtime):
    """Other attention implementation / remat policies: same loss and gradients."""
    cfg, _, _, params = untied
    (ids, mask, pv, grid, pos), ref = reference_grad
    vin = vision.build_vision_inputs_for(cfg, grid)
    _assert_same(ref, _loss_and_grad(cfg.replace(**runtime), params, ids, mask, pv, vin, pos),
                 runtime)


def test_padding_does_not_change_gradients(untied, reference_grad):
    """Padded patches/windows/frames (buckets) are inert in the backward pass too."""
    cfg, _, _, params = untied
    (ids, mask, pv, grid, pos), ref = reference_grad
    pad = vision.VisionPadding(num_patches=512, num_windows=16, num_frames=8, frame_len=256)
    vin = vision.build_vision_inputs_for(cfg, grid, pad)
    got = _loss_and_grad(cfg, params, ids, mask, vision.pad_pixel_values(pv, vin.num_patches),
                         vin, pos)
    _assert_same(ref, got, "padded")


def test_gather_rows_vjp_is_the_exact_transpose():
    """The custom backward of the window gather equals jnp.take's scatter-add transpose."""
    from emor3_jax.models.vision import grouped_attention
    vin = vision.build_vision_inputs([[1, 10, 14], [1, 6, 4]],
                                     padding=vision.VisionPadding(num_patches=256, num_windows=8))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((256, 2, 8)), jnp.float32) for _ in range(3))
    out_mask = jnp.asarray(vin.patch_valid)[:, None, None]

    def plain(q, k, v):  # reference: gathers with XLA's own transpose
        g, s = vin.window_index.shape
        grp = lambda x: jnp.take(x, vin.window_index, axis=0)
        from emor3_jax.models.layers import attention
        o = attention(grp(q), grp(k), grp(v), vin.window_valid[:, None, None, :])
        return jnp.take(o.reshape((g * s,) + o.shape[2:]), vin.window_slot, axis=0)

    def custom(q, k, v):
        return grouped_attention(q, k, v, vin.window_index, vin.window_valid, vin.window_slot,
                                 vin.patch_valid, "einsum")

    f = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * out_mask), argnums=(0, 1, 2))
    for a, b in zip(f(plain)(q, k, v), f(custom)(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_image_token_count_mismatch_is_reported(untied):
    cfg, _, model, params = untied
    ids, mask, pv, grid = _mixed_batch(cfg)
    ids = ids.copy()
    ids[np.nonzero(ids == cfg.image_token_id)[0][0], np.nonzero(ids == cfg.image_token_id)[1][0]] = 0
    with pytest.raises(ValueError, match="image tokens"):
        model.apply({"params": params}, ids, mask, pv, grid)


@pytest.mark.slow
def test_real_3b_widths_reduced_depth(tmp_path):
    """Qwen2.5-VL-3B widths (text 2048 / 16 heads / 2 KV / 11008; vision 1280 / 16 heads / 3420
    -> 2048) with 2 text layers, 4 vision blocks (block 3 full attention) and a small vocab."""
    cfg = tiny_config(vocab_size=1024, hidden_size=2048, intermediate_size=11008, num_layers=2,
                      num_heads=16, num_kv_heads=2, mrope_section=(16, 24, 24),
                      vision_depth=4, vision_hidden_size=1280, vision_intermediate_size=3420,
                      vision_heads=16, fullatt_block_indexes=(3,), tie_word_embeddings=True,
                      rope_theta=1000000.0)
    ref = hf_model(cfg, seed=11)
    ref.save_pretrained(str(tmp_path))
    model, params = qwen2_5_vl.load_hf(str(tmp_path))
    ids, mask, pv, grid = _mixed_batch(cfg, seed=5)
    expected = hf_logits(ref, cfg, ids, mask, pv, grid)
    vin = vision.build_vision_inputs_for(cfg, grid)
    pos, _ = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    logits = _jit_forward(model)(params, ids, mask, pv, vin, pos)
    assert max_diff_valid(logits, expected, mask) <= TOL   # ~8e-6 on logits up to ~5
