"""emor3_jax.processing.image vs transformers' Qwen2VLImageProcessorPil (numerical reference)."""
import math
import warnings

import numpy as np
import pytest
from PIL import Image

from emor3_jax.configs import base
from emor3_jax.processing import image as im

hf_qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
skdata = pytest.importorskip("skimage.data")

ATOL = 1e-5


def make_hf(**overrides):
    kwargs = dict(min_pixels=base.MIN_PIXELS, max_pixels=base.MAX_PIXELS,
                  image_mean=list(base.IMAGE_MEAN), image_std=list(base.IMAGE_STD),
                  patch_size=base.PATCH_SIZE, merge_size=base.MERGE_SIZE,
                  temporal_patch_size=base.TEMPORAL_PATCH_SIZE)
    kwargs.update(overrides)
    return hf_qwen2_vl.Qwen2VLImageProcessorPil(**kwargs)


@pytest.fixture(scope="module")
def hf():
    return make_hf()


def hf_process(proc, image, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = proc(image, **kwargs)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def assert_same(hf_out, ours):
    hf_pv, hf_grid = hf_out
    pv, grid = ours
    assert pv.dtype == np.float32
    assert tuple(hf_grid[0]) == tuple(grid)
    assert pv.shape == hf_pv.shape
    np.testing.assert_allclose(pv, hf_pv, rtol=0, atol=ATOL)


def random_rgb(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# smart_resize

def test_smart_resize_matches_hf_on_many_sizes():
    rng = np.random.RandomState(0)
    sizes = [(1, 1), (28, 28), (27, 29), (14, 2000), (40, 1500), (2000, 60), (512, 512),
             (3000, 2000), (2048, 2048), (4096, 1024), (10, 1999), (1999, 10)]
    sizes += [tuple(int(v) for v in rng.randint(1, 5000, 2)) for _ in range(300)]
    settings = [dict(factor=28, min_pixels=base.MIN_PIXELS, max_pixels=base.MAX_PIXELS),
                dict(factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
                dict(factor=32, min_pixels=64 * 64, max_pixels=512 * 512)]
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for s in settings:
            assert im.smart_resize(h, w, **s) == hf_qwen2_vl.smart_resize(h, w, **s), (h, w, s)
            checked += 1
    assert checked > 600


def test_smart_resize_respects_bounds_and_defaults():
    for h, w in [(1, 1), (100, 100), (5000, 5000), (300, 451), (40, 1500)]:
        rh, rw = im.smart_resize(h, w)
        assert rh % 28 == 0 and rw % 28 == 0
        assert base.MIN_PIXELS <= rh * rw <= base.MAX_PIXELS
    # Clamps: a tiny image grows to >= min_pixels, a huge one shrinks to <= max_pixels.
    assert im.smart_resize(10, 10) == (532, 532)
    rh, rw = im.smart_resize(8000, 8000)
    assert rh * rw <= base.MAX_PIXELS and rh == rw == 2044


def test_smart_resize_aspect_ratio_error_names_size():
    assert im.smart_resize(10, 2000)  # ratio exactly 200 is allowed, as in HF
    with pytest.raises(ValueError, match=r"10x2001") as err:
        im.smart_resize(10, 2001)
    assert "200" in str(err.value)
    with pytest.raises(ValueError):
        hf_qwen2_vl.smart_resize(10, 2001)  # HF refuses the same size
    with pytest.raises(ValueError, match="3000x10"):
        im.smart_resize(3000, 10)
    with pytest.raises(ValueError, match="positive"):
        im.smart_resize(0, 10)


# --------------------------------------------------------------------------------------------
# process_image vs HF

@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"])
def test_real_photos_match_hf(hf, name):
    photo = getattr(skdata, name)()
    assert_same(hf_process(hf, Image.fromarray(photo)), im.process_image(Image.fromarray(photo)))
    # A numpy HWC array gives the same result as the PIL image.
    assert_same(hf_process(hf, Image.fromarray(photo)), im.process_image(photo))


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (28, 28), (40, 1500), (2000, 60), (777, 333),
                                  (1100, 900), (10, 1999)])
def test_sizes_incl_clamps_and_extreme_aspect_match_hf(hf, size):
    arr = random_rgb(*size, seed=size[0] * 7 + size[1])
    pv, grid = im.process_image(Image.fromarray(arr))
    assert_same(hf_process(hf, Image.fromarray(arr)), (pv, grid))
    t, gh, gw = grid
    assert pv.shape == (t * gh * gw, 3 * base.TEMPORAL_PATCH_SIZE * base.PATCH_SIZE ** 2)
    assert base.MIN_PIXELS <= gh * gw * base.PATCH_SIZE ** 2 <= base.MAX_PIXELS


def test_large_image_is_clamped_to_max_pixels(hf):
    arr = random_rgb(2600, 1800, seed=3)  # 4.68 Mpx > MAX_PIXELS
    pv, grid = im.process_image(arr)
    assert_same(hf_process(hf, arr), (pv, grid))
    assert grid[1] * grid[2] * base.PATCH_SIZE ** 2 <= base.MAX_PIXELS


def test_non_default_settings_match_hf():
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, mean=(0.5, 0.5, 0.5),
              std=(0.5, 0.5, 0.5))
    hf_small = make_hf(min_pixels=kw["min_pixels"], max_pixels=kw["max_pixels"],
                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    photo = skdata.coffee()
    assert_same(hf_process(hf_small, photo), im.process_image(photo, **kw))
    hf_p16 = make_hf(patch_size=16, merge_size=2, temporal_patch_size=2,
                     min_pixels=32 * 32, max_pixels=32 * 32 * 100)
    assert_same(hf_process(hf_p16, photo),
                im.process_image(photo, patch_size=16, min_pixels=32 * 32,
                                 max_pixels=32 * 32 * 100))


def test_pil_modes_convert_like_hf(hf):
    rgb = Image.fromarray(skdata.chelsea())
    rgba = Image.fromarray(skdata.logo())  # a real RGBA image with transparency
    assert rgba.mode == "RGBA"
    palette_transparent = rgb.convert("P", palette=Image.ADAPTIVE, colors=32)
    palette_transparent.info["transparency"] = 3
    images = {
        "L": Image.fromarray(skdata.camera()),
        "LA": rgb.convert("LA"),
        "RGBA": rgba,
        "P": rgb.convert("P", palette=Image.ADAPTIVE, colors=64),
        "P+transparency": palette_transparent,
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
    }
    for mode, img in images.items():
        ours = im.process_image(img)
        assert_same(hf_process(hf, img), ours)
    # Transparent pixels are composited onto white, not black.
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    pv, _ = im.process_image(clear)
    white = (1.0 - np.asarray(base.IMAGE_MEAN)) / np.asarray(base.IMAGE_STD)
    channel_means = pv.reshape(-1, 3, 2 * 14 * 14).astype(np.float64).mean(axis=(0, 2))
    np.testing.assert_allclose(channel_means, white, atol=1e-5)


def test_numpy_grayscale_rgba_and_dtypes_match_hf(hf):
    camera = skdata.camera()  # real grayscale photo, [H, W] uint8
    ours_2d = im.process_image(camera)
    assert_same(hf_process(hf, camera[:, :, None]), ours_2d)  # HF takes [H, W, 1]
    assert_same(hf_process(hf, Image.fromarray(camera)), ours_2d)
    logo = skdata.logo()  # [H, W, 4] uint8
    assert_same(hf_process(hf, logo), im.process_image(logo))
    # Integer arrays other than uint8 (values in [0, 255]) are taken as pixel values.
    photo = skdata.chelsea()
    assert_same(hf_process(hf, photo), im.process_image(photo.astype(np.int64)))
    assert_same(hf_process(hf, photo), im.process_image(photo.astype(np.float32)))


def test_float_images_in_unit_range(hf):
    rng = np.random.RandomState(1)
    for shape in [(300, 200, 3), (300, 200, 4), (120, 90, 1)]:
        arr = rng.rand(*shape).astype(np.float32)
        ours = im.process_image(arr)
        # HF's PIL path scales [0, 1] floats to uint8 inside resize and back, then rescales once
        # more when do_rescale=True; do_rescale=False is its correct setting for such inputs.
        assert_same(hf_process(hf, arr, do_rescale=False), ours)
    # A float image equals the uint8 image HF's conversion gives (x*255 truncated).
    arr = rng.rand(200, 300, 3)
    as_uint8 = (arr * 255).astype(np.float32).astype(np.uint8)
    np.testing.assert_array_equal(im.process_image(arr)[0], im.process_image(as_uint8)[0])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        im.process_image(np.full((50, 50, 3), 1.5, np.float32))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        im.process_image(np.full((50, 50, 3), 300, np.int32))
    with pytest.raises(ValueError, match="shape"):
        im.process_image(np.zeros((50, 50, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        im.process_image(np.zeros((2, 50, 50, 3), np.uint8))
    with pytest.raises(TypeError, match="PIL"):
        im.process_image([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="NaN"):
        im.process_image(np.full((50, 50, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="aspect ratio"):
        im.process_image(np.zeros((5, 1200, 3), np.uint8))


# --------------------------------------------------------------------------------------------
# Batches, patch order and token counts

def test_batch_concatenates_like_hf(hf):
    images = [Image.fromarray(skdata.astronaut()), Image.fromarray(random_rgb(40, 1500)),
              Image.fromarray(skdata.camera()), Image.fromarray(skdata.coffee())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf(images)
    pv, grids = im.process_images(images)
    assert grids.dtype == np.int64
    np.testing.assert_array_equal(grids, np.asarray(out["image_grid_thw"]))
    np.testing.assert_allclose(pv, np.asarray(out["pixel_values"]), rtol=0, atol=ATOL)
    assert pv.shape[0] == int(np.prod(grids, axis=1).sum())
    with pytest.raises(ValueError, match="at least one"):
        im.process_images([])


def test_patch_order_is_merge_window_major():
    """Rows go (h_block, w_block, h_in, w_in); each row is (C, T, ph, pw) of one 14x14 patch."""
    h, w = 56, 84
    chw = np.arange(3 * h * w, dtype=np.float32).reshape(3, h, w)
    rows = im.patchify(chw)
    grid_h, grid_w = h // 14, w // 14
    assert rows.shape == (grid_h * grid_w, 3 * 2 * 14 * 14)
    row = 0
    for hb in range(grid_h // 2):
        for wb in range(grid_w // 2):
            for hi in range(2):
                for wi in range(2):
                    y, x = (hb * 2 + hi) * 14, (wb * 2 + wi) * 14
                    patch = chw[:, y:y + 14, x:x + 14]
                    expected = np.stack([patch, patch], axis=1).reshape(-1)  # temporal repeat
                    np.testing.assert_array_equal(rows[row], expected)
                    row += 1
    with pytest.raises(ValueError, match="smart_resize"):
        im.patchify(np.zeros((3, 30, 56), np.float32))


def test_token_count_helpers(hf):
    for size in [(512, 512), (300, 451), (40, 1500), (2600, 1800), (1, 1)]:
        grid = im.grid_thw_for_size(*size)
        _, processed_grid = im.process_image(random_rgb(*size))
        assert grid == processed_grid
        n_patches = hf.get_number_of_image_patches(*size)
        assert im.num_image_tokens(grid) == n_patches // base.MERGE_SIZE ** 2
        assert im.num_image_tokens(grid) == math.prod(grid) // 4
    assert im.num_image_tokens((1, 38, 38)) == 361
    assert im.num_image_tokens(np.array([1, 30, 46])) == 345
    with pytest.raises(ValueError, match="merge_size"):
        im.num_image_tokens((1, 3, 4))
