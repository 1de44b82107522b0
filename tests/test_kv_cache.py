"""Prefill + decode with the KV cache == one full forward over the concatenated sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.processing import rope_index, vision
from qwen_testutil import chat_row, hf_model, images, left_pad

STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config(tie_word_embeddings=False)
    d = str(tmp_path_factory.mktemp("hf_cache"))
    hf_model(cfg, seed=3).save_pretrained(d)
    model, params = qwen2_5_vl.load_hf(d)
    pv, grid = images([("chelsea", (200, 250))])
    rng = np.random.default_rng(0)
    prompts = [chat_row(cfg, rng, [3, "img", 5], grid), chat_row(cfg, rng, [7], [])]
    ids, mask = left_pad(prompts, cfg.text.pad_token_id)
    new = rng.integers(0, 500, (2, STEPS)).astype(np.int32)
    return cfg, model, params, pv, grid, ids, mask, new


def _full_logits(cfg, model, params, pv, grid, ids, mask, new):
    ids_full = np.concatenate([ids, new], 1)
    mask_full = np.concatenate([mask, np.ones_like(new)], 1)
    return np.asarray(model.apply({"params": params}, ids_full, mask_full, pv, grid).logits)


@pytest.fixture(scope="module")
def compiled(setup):
    """Jitted prefill (max_len = prompt + STEPS) and decode, plus the prompt's metadata."""
    cfg, model, params, pv, grid, ids, mask, new = setup
    vin = vision.build_vision_inputs_for(cfg, grid)
    pos, deltas = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    prefill = jax.jit(lambda p: model.apply(
        {"params": p}, ids, mask, max_len=ids.shape[1] + STEPS, pixel_values=pv,
        vision_inputs=vin, position_ids=pos, method=model.prefill))
    decode = jax.jit(lambda p, tok, pos, cache, i: model.apply(
        {"params": p}, tok, pos, cache, i, method=model.decode), donate_argnums=(3,))
    return prefill, decode, deltas


def test_prefill_then_decode_equals_full_forward(setup, compiled):
    cfg, model, params, pv, grid, ids, mask, new = setup
    prefill, decode, deltas = compiled
    full = _full_logits(*setup)
    length = ids.shape[1]
    logits, cache = prefill(params)
    assert logits.shape == (2, 1, cfg.text.vocab_size)
    assert cache.k.shape == (cfg.text.num_hidden_layers, 2, length + STEPS,
                             cfg.text.num_key_value_heads, cfg.text.head_dim)
    assert qwen2_5_vl.cache_bytes(cfg, 2, length + STEPS) == cache.k.nbytes * 2 + cache.key_mask.size
    np.testing.assert_allclose(logits[:, 0], full[:, length - 1], atol=1e-5)
    n_valid = mask.sum(1)
    for s in range(STEPS):
        step_pos = rope_index.decode_position_ids(jnp.asarray(deltas), jnp.asarray(n_valid + s))
        logits, cache = decode(params, new[:, s:s + 1], step_pos, cache, length + s)
        np.testing.assert_allclose(logits[:, 0], full[:, length + s], atol=1e-5)
    assert bool(cache.key_mask[:, length:].all())
    np.testing.assert_array_equal(np.asarray(cache.key_mask[:, :length]), mask.astype(bool))


def test_repeat_cache_is_prompt_major(setup, compiled):
    cfg, model, params, pv, grid, ids, mask, new = setup
    prefill, decode, deltas = compiled
    length, group = ids.shape[1], 3
    _, cache = prefill(params)
    big = qwen2_5_vl.repeat_cache(cache, group)
    assert big.batch_size == 2 * group
    tok = np.repeat(new[:, :1], group, 0)          # row b*G + g continues prompt b
    pos = rope_index.decode_position_ids(np.repeat(deltas, group), np.repeat(mask.sum(1), group))
    out, _ = decode(params, tok, pos, big, length)
    ref, _ = decode(params, new[:, :1], rope_index.decode_position_ids(deltas, mask.sum(1)),
                    cache, length)
    np.testing.assert_allclose(out[:, 0], np.repeat(ref[:, 0], group, 0), atol=1e-6)
