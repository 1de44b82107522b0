"""emor3_jax.processing.image vs the release's sizing (EasyR1 `process_image` pre-resize, copied
below) followed by transformers' Qwen2VLImageProcessorPil (numerical reference); the processor
stage alone (`preresize=False`) vs Qwen2VLImageProcessorPil."""
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


def hf_only(image, **kwargs):
    """Our processor stage alone (no release pre-resize): what Qwen2VLImageProcessorPil does."""
    return im.process_image(image, preresize=False, **kwargs)


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
    assert_same(hf_process(hf, Image.fromarray(photo)), hf_only(Image.fromarray(photo)))
    # A numpy HWC array gives the same result as the PIL image.
    assert_same(hf_process(hf, Image.fromarray(photo)), hf_only(photo))


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (28, 28), (40, 1500), (2000, 60), (777, 333),
                                  (1100, 900), (10, 1999)])
def test_sizes_incl_clamps_and_extreme_aspect_match_hf(hf, size):
    arr = random_rgb(*size, seed=size[0] * 7 + size[1])
    pv, grid = hf_only(Image.fromarray(arr))
    assert_same(hf_process(hf, Image.fromarray(arr)), (pv, grid))
    t, gh, gw = grid
    assert pv.shape == (t * gh * gw, 3 * base.TEMPORAL_PATCH_SIZE * base.PATCH_SIZE ** 2)
    assert base.MIN_PIXELS <= gh * gw * base.PATCH_SIZE ** 2 <= base.MAX_PIXELS


def test_large_image_is_clamped_to_max_pixels(hf):
    arr = random_rgb(2600, 1800, seed=3)  # 4.68 Mpx > MAX_PIXELS
    pv, grid = hf_only(arr)
    assert_same(hf_process(hf, arr), (pv, grid))
    assert grid[1] * grid[2] * base.PATCH_SIZE ** 2 <= base.MAX_PIXELS


def test_non_default_settings_match_hf():
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, mean=(0.5, 0.5, 0.5),
              std=(0.5, 0.5, 0.5))
    hf_small = make_hf(min_pixels=kw["min_pixels"], max_pixels=kw["max_pixels"],
                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    photo = skdata.coffee()
    assert_same(hf_process(hf_small, photo), hf_only(photo, **kw))
    hf_p16 = make_hf(patch_size=16, merge_size=2, temporal_patch_size=2,
                     min_pixels=32 * 32, max_pixels=32 * 32 * 100)
    assert_same(hf_process(hf_p16, photo),
                hf_only(photo, patch_size=16, min_pixels=32 * 32, max_pixels=32 * 32 * 100))


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
        ours = hf_only(img)
        assert_same(hf_process(hf, img), ours)
    # Transparent pixels are composited onto white, not black.
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    pv, _ = im.process_image(clear)
    white = (1.0 - np.asarray(base.IMAGE_MEAN)) / np.asarray(base.IMAGE_STD)
    channel_means = pv.reshape(-1, 3, 2 * 14 * 14).astype(np.float64).mean(axis=(0, 2))
    np.testing.assert_allclose(channel_means, white, atol=1e-5)


def test_numpy_grayscale_rgba_and_dtypes_match_hf(hf):
    camera = skdata.camera()  # real grayscale photo, [H, W] uint8
    ours_2d = hf_only(camera)
    assert_same(hf_process(hf, camera[:, :, None]), ours_2d)  # HF takes [H, W, 1]
    assert_same(hf_process(hf, Image.fromarray(camera)), ours_2d)
    logo = skdata.logo()  # [H, W, 4] uint8
    assert_same(hf_process(hf, logo), hf_only(logo))
    # Integer arrays other than uint8 (values in [0, 255]) are taken as pixel values.
    photo = skdata.chelsea()
    assert_same(hf_process(hf, photo), hf_only(photo.astype(np.int64)))
    assert_same(hf_process(hf, photo), hf_only(photo.astype(np.float32)))


def test_float_images_in_unit_range(hf):
    rng = np.random.RandomState(1)
    for shape in [(300, 200, 3), (300, 200, 4), (120, 90, 1)]:
        arr = rng.rand(*shape).astype(np.float32)
        ours = hf_only(arr)
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
    pv, grids = im.process_images(images, preresize=False)
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
        grid = im.grid_thw_for_size(*size, preresize=False)
        _, processed_grid = hf_only(random_rgb(*size))
        assert grid == processed_grid
        n_patches = hf.get_number_of_image_patches(*size)
        assert im.num_image_tokens(grid) == n_patches // base.MERGE_SIZE ** 2
        assert im.num_image_tokens(grid) == math.prod(grid) // 4
    assert im.num_image_tokens((1, 38, 38)) == 361
    assert im.num_image_tokens(np.array([1, 30, 46])) == 345
    with pytest.raises(ValueError, match="merge_size"):
        im.num_image_tokens((1, 3, 4))


# --------------------------------------------------------------------------------------------
# The release's pre-resize (EasyR1 verl/utils/dataset.py) before the HF processor

def release_process_image(image, min_pixels, max_pixels):
    """EasyR1 `process_image` as released (the PIL branch), the reference for the pre-resize."""
    image.load()
    if (image.width * image.height) > max_pixels:
        resize_factor = math.sqrt(max_pixels / (image.width * image.height))
        width, height = int(image.width * resize_factor), int(image.height * resize_factor)
        image = image.resize((width, height))
    if (image.width * image.height) < min_pixels:
        resize_factor = math.sqrt(min_pixels / (image.width * image.height))
        width, height = int(image.width * resize_factor), int(image.height * resize_factor)
        image = image.resize((width, height))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


class _SizeOnly:
    """Stands in for a PIL image in `release_process_image` to check its size arithmetic."""
    mode = "RGB"

    def __init__(self, width, height):
        self.width, self.height = width, height

    def load(self):
        pass

    def resize(self, size):
        return _SizeOnly(*size)


SMALL_BOUNDS = dict(min_pixels=50_000, max_pixels=200_000)


@pytest.fixture(scope="module")
def hf_small_bounds():
    return make_hf(**SMALL_BOUNDS)


def test_release_preresize_500x375_photo_gets_336_tokens():
    assert im.release_preresize_size(375, 500) == (443, 591)
    assert im.target_size(375, 500) == (448, 588)
    grid = im.grid_thw_for_size(375, 500)
    assert grid == (1, 32, 42) and im.num_image_tokens(grid) == 336
    assert im.process_image(random_rgb(375, 500))[1] == grid
    assert im.process_image(Image.fromarray(random_rgb(375, 500)))[1] == grid
    # smart_resize alone (the HF processor without the release's pre-resize): 352 tokens.
    assert im.num_image_tokens(im.grid_thw_for_size(375, 500, preresize=False)) == 352


def test_release_preresize_size_matches_release_arithmetic():
    rng = np.random.RandomState(0)
    sizes = [(1, 1), (375, 500), (512, 512), (2048, 2048), (2049, 2048), (10, 2000), (30, 2000),
             (2000, 30), (4000, 3000), (223, 224), (224, 223)]
    sizes += [tuple(int(v) for v in rng.randint(1, 6000, 2)) for _ in range(1000)]
    bounds = [dict(min_pixels=base.MIN_PIXELS, max_pixels=base.MAX_PIXELS), SMALL_BOUNDS,
              dict(min_pixels=60_000, max_pixels=60_000), dict(min_pixels=28 * 28, max_pixels=10**9)]
    for h, w in sizes:
        for b in bounds:
            ref = release_process_image(_SizeOnly(w, h), **b)
            assert im.release_preresize_size(h, w, **b) == (ref.height, ref.width), (h, w, b)


# (100, 192), (107, 120), (600, 500) and (40, 6000) get a different grid than smart_resize alone.
@pytest.mark.parametrize("size", [(30, 40), (150, 200), (199, 251), (100, 192),  # < min_pixels
                                  (107, 120),
                                  (300, 400), (250, 260),                 # within bounds
                                  (600, 500), (1000, 700), (777, 333),    # above max_pixels
                                  (30, 2000), (2000, 30), (40, 6000)])    # extreme aspect
def test_release_sizing_matches_release_then_hf(hf_small_bounds, size):
    h, w = size
    pil = Image.fromarray(random_rgb(h, w, seed=h * 7 + w))
    ref = hf_process(hf_small_bounds, release_process_image(pil.copy(), **SMALL_BOUNDS))
    ours = im.process_image(pil, **SMALL_BOUNDS)
    assert_same(ref, ours)
    assert_same(ref, im.process_image(np.asarray(pil), **SMALL_BOUNDS))  # array input
    assert im.grid_thw_for_size(h, w, **SMALL_BOUNDS) == ours[1]
    t, gh, gw = ours[1]
    assert t == 1 and gh * gw * base.PATCH_SIZE ** 2 >= SMALL_BOUNDS["min_pixels"]


def test_release_sizing_pil_modes_match_release_then_hf(hf_small_bounds):
    """Resized in the image's own mode (NEAREST for P), then converted, as released."""
    rgb = Image.fromarray(random_rgb(180, 150, seed=5))        # below min_pixels
    big = Image.fromarray(skdata.astronaut())                   # 512x512, above max_pixels
    opaque = rgb.convert("RGBA")                                # alpha 255: same either way
    for img in [rgb.convert("L"), rgb.convert("P", palette=Image.ADAPTIVE, colors=64),
                big.convert("P", palette=Image.ADAPTIVE, colors=64), big.convert("CMYK"),
                big.convert("L"), opaque]:
        ref = hf_process(hf_small_bounds, release_process_image(img.copy(), **SMALL_BOUNDS))
        assert_same(ref, im.process_image(img, **SMALL_BOUNDS))
        assert im.grid_thw_for_size(img.height, img.width, **SMALL_BOUNDS) == tuple(ref[1][0])


def test_release_sizing_default_bounds_and_real_photos(hf):
    for name in ["chelsea", "coffee", "astronaut"]:
        pil = Image.fromarray(getattr(skdata, name)())
        ref = hf_process(hf, release_process_image(pil.copy(), base.MIN_PIXELS, base.MAX_PIXELS))
        assert_same(ref, im.process_image(pil))
        assert im.grid_thw_for_size(pil.height, pil.width) == tuple(ref[1][0])
    images = [Image.fromarray(skdata.coffee()), Image.fromarray(random_rgb(40, 1500))]
    pv, grids = im.process_images(images)
    refs = [hf_process(hf, release_process_image(i.copy(), base.MIN_PIXELS, base.MAX_PIXELS))
            for i in images]
    np.testing.assert_array_equal(grids, np.concatenate([g for _, g in refs]))
    np.testing.assert_allclose(pv, np.concatenate([p for p, _ in refs]), rtol=0, atol=ATOL)


def test_release_preresize_can_push_aspect_ratio_over_the_limit():
    """10x2000 is allowed by smart_resize alone, but the release grows it to 36x7240 (ratio
    201.1), which the HF processor refuses: both size and pixel paths raise, before resizing."""
    assert im.release_preresize_size(10, 2000) == (36, 7240)
    with pytest.raises(ValueError):
        hf_qwen2_vl.smart_resize(36, 7240)
    assert im.grid_thw_for_size(10, 2000, preresize=False)
    for call in [lambda: im.grid_thw_for_size(10, 2000),
                 lambda: im.process_image(np.zeros((10, 2000, 3), np.uint8)),
                 lambda: im.process_image(Image.new("RGB", (2000, 10)))]:
        with pytest.raises(ValueError, match="aspect ratio"):
            call()
