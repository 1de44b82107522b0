"""Host-side index arrays == transformers: mRoPE positions/deltas and vision window layouts."""
import numpy as np
import pytest
import torch
from transformers import vision_utils

from emor3_jax.models.config import tiny_config
from emor3_jax.processing import rope_index, vision
from qwen_testutil import chat_row, hf_model, left_pad


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    return cfg, hf_model(cfg)


def _hf_rope(ref, cfg, ids, mask, grid):
    with torch.no_grad():
        pos, deltas = ref.model.get_rope_index(
            torch.tensor(ids, dtype=torch.long),
            mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)),
            image_grid_thw=None if grid is None else torch.tensor(grid),
            attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long))
    return pos.numpy(), deltas.numpy().reshape(-1)


GRIDS = np.array([[1, 10, 14], [1, 12, 8], [1, 4, 6], [1, 16, 4]])


@pytest.mark.parametrize("seed", [0, 1])
def test_rope_index_matches_hf_mixed_left_padded(setup, seed):
    cfg, ref = setup
    rng = np.random.default_rng(seed)
    rows = [chat_row(cfg, rng, [4, "img", 6, "img", 3], GRIDS[:2]),   # two images, w > h, h > w
            chat_row(cfg, rng, [9], []),                              # text only
            chat_row(cfg, rng, ["img", 5], GRIDS[2:3]),               # image first
            chat_row(cfg, rng, [2, "img"], GRIDS[3:])]                # image last (tall)
    ids, mask = left_pad(rows, cfg.text.pad_token_id, length=max(map(len, rows)) + 3)
    pos, deltas = rope_index.get_rope_index(ids, GRIDS, mask, image_token_id=cfg.image_token_id,
                                            vision_start_token_id=cfg.vision_start_token_id)
    hf_pos, hf_deltas = _hf_rope(ref, cfg, ids, mask, GRIDS)
    np.testing.assert_array_equal(pos, hf_pos)
    np.testing.assert_array_equal(deltas, hf_deltas)
    assert pos.dtype == np.int32 and pos.shape == (3, *ids.shape)


def test_rope_index_without_mask_and_text_positions(setup):
    cfg, ref = setup
    rng = np.random.default_rng(3)
    ids = np.array([chat_row(cfg, rng, [3, "img", 4], GRIDS[2:3])], np.int32)
    pos, deltas = rope_index.get_rope_index(ids, GRIDS[2:3], image_token_id=cfg.image_token_id)
    hf_pos, hf_deltas = _hf_rope(ref, cfg, ids, None, GRIDS[2:3])
    np.testing.assert_array_equal(pos, hf_pos)
    np.testing.assert_array_equal(deltas, hf_deltas)
    # Text-only batches: same answer as get_rope_index without images.
    ids, mask = left_pad([[1, 2, 3, 4], [5, 6]], 0)
    np.testing.assert_array_equal(
        rope_index.text_position_ids(mask),
        rope_index.get_rope_index(ids, None, mask, image_token_id=cfg.image_token_id)[0])


def test_decode_positions_continue_the_prompt(setup):
    """Position of generated token i (valid index) = i + delta = what get_rope_index gives the
    prompt extended by those tokens."""
    cfg, _ = setup
    rng = np.random.default_rng(4)
    prompts = [chat_row(cfg, rng, [2, "img", 3], GRIDS[:1]), chat_row(cfg, rng, [6], [])]
    ids, mask = left_pad(prompts, 0)
    pos, deltas = rope_index.get_rope_index(ids, GRIDS[:1], mask, image_token_id=cfg.image_token_id)
    new = rng.integers(0, 100, (2, 3))
    full, _ = rope_index.get_rope_index(np.concatenate([ids, new], 1), GRIDS[:1],
                                        np.concatenate([mask, np.ones_like(new)], 1),
                                        image_token_id=cfg.image_token_id)
    n_valid = mask.sum(1)
    for s in range(3):
        got = rope_index.decode_position_ids(deltas, n_valid + s)
        np.testing.assert_array_equal(got[:, :, 0], full[:, :, ids.shape[1] + s])
    np.testing.assert_array_equal(rope_index.next_positions(pos), full[0, :, ids.shape[1]])


def test_rope_index_errors(setup):
    cfg, _ = setup
    rng = np.random.default_rng(5)
    ids = np.array([chat_row(cfg, rng, [2, "img", 2], GRIDS[:1])])
    with pytest.raises(ValueError, match="image tokens"):
        rope_index.get_rope_index(ids, GRIDS[1:2], image_token_id=cfg.image_token_id)
    with pytest.raises(ValueError, match="lists 2 images"):
        rope_index.get_rope_index(ids, GRIDS[:2], image_token_id=cfg.image_token_id)
    with pytest.raises(ValueError, match="more image-token runs"):
        rope_index.get_rope_index(ids, None, image_token_id=cfg.image_token_id)


# ------------------------------------------------------------------------------------------
VISION_GRIDS = np.array([[1, 10, 14], [2, 8, 8], [1, 16, 16], [1, 2, 30]])


def test_vision_window_index_and_positions_match_hf():
    grid = torch.tensor(VISION_GRIDS)
    hf_index, hf_cu = vision_utils.get_vision_window_index(grid, spatial_merge_size=2,
                                                           window_size=112, patch_size=14)
    index, cu = vision.window_index(VISION_GRIDS)
    np.testing.assert_array_equal(index, hf_index.numpy())
    np.testing.assert_array_equal(cu, hf_cu.numpy())
    np.testing.assert_array_equal(vision.vision_position_ids(VISION_GRIDS),
                                  vision_utils.get_vision_position_ids(grid, 2).numpy())
    np.testing.assert_array_equal(np.cumsum(np.r_[0, vision.frame_seqlens(VISION_GRIDS)]),
                                  vision_utils.get_vision_cu_seqlens(grid).numpy())


def test_build_vision_inputs_layout():
    pad = vision.VisionPadding(num_patches=[512, 1024], num_windows=8, num_frames=8, frame_len=64)
    vin = vision.build_vision_inputs(VISION_GRIDS, padding=pad)
    n = int(VISION_GRIDS.prod(1).sum())
    assert vin.num_patches == 1024 and vin.merged_order.shape == (256,)
    assert vin.window_index.shape[1] == 64 and vin.window_index.shape[0] % 8 == 0
    # window order is a permutation of the real patches; padded slots read padded rows
    assert sorted(vin.patch_order[:n]) == list(range(n))
    np.testing.assert_array_equal(vin.patch_order[n:], np.arange(n, 1024))
    # each group is a contiguous run of window-order slots, and slot maps back to it
    for index, valid, slot in ((vin.window_index, vin.window_valid, vin.window_slot),
                               (vin.frame_index, vin.frame_valid, vin.frame_slot)):
        members = index[valid]
        np.testing.assert_array_equal(np.sort(members), np.arange(n))
        np.testing.assert_array_equal(index.reshape(-1)[slot[:n]], np.arange(n))
        assert valid.reshape(-1)[slot[:n]].all()
    # frames are the images' frames: [140, 64, 64, 256, 60] patches
    np.testing.assert_array_equal(vin.frame_valid.sum(1)[:5], [140, 64, 64, 256, 60])
    # merged order undoes the window permutation of merged tokens
    perm, _ = vision.window_index(VISION_GRIDS)
    np.testing.assert_array_equal(perm[vin.merged_order[:n // 4]], np.arange(n // 4))
    with pytest.raises(ValueError, match="bucket"):
        vision.build_vision_inputs(VISION_GRIDS, padding=vision.VisionPadding(num_patches=[64]))
    with pytest.raises(ValueError, match="frame_len"):
        vision.build_vision_inputs(VISION_GRIDS, padding=vision.VisionPadding(frame_len=[128]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision.build_vision_inputs([[1, 3, 4]])
