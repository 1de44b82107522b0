"""Qwen2-VL image preprocessing in numpy + PIL (pre-resize, smart_resize, rescale, normalize,
patchify), as the authors' release (EasyR1 fork) sizes images.

The release first pre-resizes the PIL image into [min_pixels, max_pixels] (EasyR1
`verl/utils/dataset.py` `process_image`: `image.resize((w, h))` with PIL's default filter, sizes
truncated with `int`, see `release_preresize`) and only then runs the Hugging Face Qwen2-VL
image processor, whose `smart_resize` uses the same bounds. E.g. a 500x375 photo is pre-resized
to 591x443 and smart-resized to 588x448: 21x16 merged tokens = 336 (smart_resize alone: 352).
`process_image` (default `preresize=True`) is numerically equal to that pre-resize followed by
transformers' `Qwen2VLImageProcessorPil` (same PIL bicubic resize, same float64-then-float32
rescale, same float32 normalize, same patch order); with `preresize=False` it equals the
processor alone. Pixel values made here feed both this project's JAX vision tower and the
Hugging Face PyTorch reference. `grid_thw_for_size` gives the same grid from the size alone.
Kept free of transformers so the data pipeline does not import it on the training path.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from emor3_jax import recipe

# Largest allowed max(h, w) / min(h, w); beyond it the patch grid degenerates (HF's limit).
MAX_ASPECT_RATIO = 200
_RESCALE_FACTOR = 1 / 255


def smart_resize(height: int, width: int, factor: int = recipe.PATCH_SIZE * recipe.MERGE_SIZE,
                 min_pixels: int = recipe.MIN_PIXELS,
                 max_pixels: int = recipe.MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min, max] pixels, aspect kept.

    Same rounding as Hugging Face's Qwen2-VL `smart_resize` (Python's round-half-to-even, then
    floor when shrinking and ceil when growing), so token counts agree with the HF processor.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of size {height}x{width} (height x width) has aspect ratio {ratio:.1f}; "
            f"Qwen2-VL needs an absolute aspect ratio of at most {MAX_ASPECT_RATIO}: crop or "
            "drop this image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def release_preresize_size(height: int, width: int, min_pixels: int = recipe.MIN_PIXELS,
                           max_pixels: int = recipe.MAX_PIXELS) -> tuple[int, int]:
    """(height, width) after the release's PIL pre-resize into [min_pixels, max_pixels].

    The size arithmetic of EasyR1's `process_image`: an image above max_pixels is scaled by
    sqrt(max_pixels / area), then one (still) below min_pixels by sqrt(min_pixels / area), each
    side truncated with `int`; so the area can end a little outside the bounds (smart_resize
    clamps it afterwards). Sizes already within the bounds are kept.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if width * height > max_pixels:
        resize_factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * resize_factor), int(height * resize_factor)
        if width <= 0 or height <= 0:
            raise ValueError(f"image pre-resize to max_pixels={max_pixels} leaves a size of "
                             f"{height}x{width} (height x width): the aspect ratio is too "
                             "extreme; crop or drop this image")
    if width * height < min_pixels:
        resize_factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * resize_factor), int(height * resize_factor)
    return height, width


def release_preresize(image: Image.Image, min_pixels: int = recipe.MIN_PIXELS,
                      max_pixels: int = recipe.MAX_PIXELS) -> Image.Image:
    """The release's pre-resize of a PIL image (EasyR1 `process_image`), in the image's own mode.

    Same calls as released: `image.resize((width, height))` with PIL's default filter (BICUBIC;
    NEAREST for modes "1" and "P"; RGBA/LA resized premultiplied), once for max_pixels and
    then once for min_pixels. The release's `convert("RGB")` comes after; here the caller's RGB
    conversion does (`_pil_to_rgb`), which composites transparency onto white where the
    release's `convert("RGB")` drops alpha (the HF processor then sees an RGB image either way).
    """
    image.load()
    if (image.width * image.height) > max_pixels:
        resize_factor = math.sqrt(max_pixels / (image.width * image.height))
        width, height = int(image.width * resize_factor), int(image.height * resize_factor)
        image = image.resize((width, height))
    if (image.width * image.height) < min_pixels:
        resize_factor = math.sqrt(min_pixels / (image.width * image.height))
        width, height = int(image.width * resize_factor), int(image.height * resize_factor)
        image = image.resize((width, height))
    return image


def target_size(height: int, width: int, *, min_pixels: int = recipe.MIN_PIXELS,
                max_pixels: int = recipe.MAX_PIXELS,
                factor: int = recipe.PATCH_SIZE * recipe.MERGE_SIZE,
                preresize: bool = True) -> tuple[int, int]:
    """(height, width) the model sees: release pre-resize (if `preresize`), then smart_resize."""
    if preresize:
        height, width = release_preresize_size(height, width, min_pixels, max_pixels)
    return smart_resize(height, width, factor, min_pixels, max_pixels)


def num_image_tokens(grid_thw: Sequence[int], merge_size: int = recipe.MERGE_SIZE) -> int:
    """LLM tokens (`<|image_pad|>` copies) for one image: t*h*w / merge_size^2."""
    t, h, w = (int(v) for v in grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid_thw {tuple(grid_thw)} is not divisible by merge_size {merge_size}")
    return t * h * w // (merge_size * merge_size)


def grid_thw_for_size(height: int, width: int, *, min_pixels: int = recipe.MIN_PIXELS,
                      max_pixels: int = recipe.MAX_PIXELS, patch_size: int = recipe.PATCH_SIZE,
                      merge_size: int = recipe.MERGE_SIZE, preresize: bool = True
                      ) -> tuple[int, int, int]:
    """The (t, h, w) patch grid an image of this size gets, without decoding its pixels.

    Equals `process_image`'s grid (same `preresize`), so the data pipeline measures prompt
    lengths (and drops over-long prompts) cheaply and exactly.
    """
    h, w = target_size(height, width, min_pixels=min_pixels, max_pixels=max_pixels,
                       factor=patch_size * merge_size, preresize=preresize)
    return 1, h // patch_size, w // patch_size


# --------------------------------------------------------------------------------------------
# Input normalization: anything image-like -> RGB uint8 [H, W, 3], as HF's PIL backend sees it.

def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """HF `convert_to_rgb`: transparency is composited onto white, other modes via PIL."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return np.asarray(rgb)


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    """HF `convert_to_rgb` for channels-last arrays: 1 channel repeated, alpha over white."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] "
                         f"(channels last), got shape {image.shape}")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        floating = np.issubdtype(image.dtype, np.floating)
        if floating and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(f"a float RGBA image must hold values in [0, 1], got "
                             f"[{image.min()}, {image.max()}]")
        white = 1.0 if floating else 255
        alpha = image[..., 3:4] / white
        composite = alpha * image[..., :3] + (1 - alpha) * white
        if floating:
            return composite.astype(image.dtype)
        return np.round(composite).astype(image.dtype)
    return image


def _quantize_to_uint8(image: np.ndarray) -> np.ndarray:
    """HF's PIL conversion rule: integer values in [0, 255] kept, floats in [0, 1] scaled by 255.

    Float images in [0, 1] are multiplied by 255 and truncated (not rounded), as transformers'
    `to_pil_image` does before the bicubic resize.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_ or not (np.issubdtype(image.dtype, np.integer)
                                       or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"unsupported image dtype {image.dtype}: use uint8 or float in [0, 1]")
    if not np.all(np.isfinite(image)):
        raise ValueError("image holds NaN or infinite values")
    lo, hi = image.min(), image.max()
    if np.allclose(image, image.astype(int)):
        if lo < 0 or hi > 255:
            raise ValueError(f"integer-valued image must lie in [0, 255], got [{lo}, {hi}]")
        return image.astype(np.uint8)
    if lo < 0 or hi > 1:
        raise ValueError(f"float image must lie in [0, 1] (or hold integers in [0, 255]), "
                         f"got [{lo}, {hi}]")
    return (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)


def to_rgb_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any PIL image (RGB/RGBA/L/LA/P/CMYK/...) or HWC/HW array as RGB uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _quantize_to_uint8(_array_to_rgb(image))
    raise TypeError(f"image must be a PIL.Image.Image or a numpy array, got {type(image).__name__}")


# --------------------------------------------------------------------------------------------
def patchify(image_chw: np.ndarray, *, patch_size: int = recipe.PATCH_SIZE,
             merge_size: int = recipe.MERGE_SIZE,
             temporal_patch_size: int = recipe.TEMPORAL_PATCH_SIZE) -> np.ndarray:
    """[C, H, W] -> [grid_h*grid_w, C*T*P*P] in HF order (merge windows contiguous).

    Rows run over (h_block, w_block, h_in_block, w_in_block) so each run of merge_size^2 rows
    is one merged LLM token; a still image is repeated over the temporal patch.
    """
    channels, height, width = image_chw.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h * patch_size != height or grid_w * patch_size != width or grid_h % merge_size \
            or grid_w % merge_size:
        raise ValueError(f"image {height}x{width} is not a multiple of patch_size*merge_size "
                         f"({patch_size}*{merge_size}); resize it with smart_resize first")
    patches = image_chw.reshape(channels, grid_h // merge_size, merge_size, patch_size,
                                grid_w // merge_size, merge_size, patch_size)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
    patches = np.broadcast_to(patches[:, :, :, :, :, None],
                              (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]))
    return patches.reshape(grid_h * grid_w,
                           channels * temporal_patch_size * patch_size * patch_size)


def process_image(image: Image.Image | np.ndarray, *, min_pixels: int = recipe.MIN_PIXELS,
                  max_pixels: int = recipe.MAX_PIXELS, patch_size: int = recipe.PATCH_SIZE,
                  merge_size: int = recipe.MERGE_SIZE,
                  temporal_patch_size: int = recipe.TEMPORAL_PATCH_SIZE,
                  mean: Sequence[float] = recipe.IMAGE_MEAN,
                  std: Sequence[float] = recipe.IMAGE_STD,
                  preresize: bool = True) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values [n_patches, 3*T*P*P] float32, grid_thw (1, h, w)).

    With `preresize` (the release's behaviour) the image is first pre-resized into
    [min_pixels, max_pixels] (`release_preresize`): a PIL image in its own mode, before the RGB
    conversion, as released; an array after its conversion to RGB uint8 (the data pipeline's
    stored images are RGB already). Then the HF processor's steps (smart_resize, bicubic resize,
    rescale, normalize, patchify). Sizes (and the aspect-ratio check) are settled before any
    pixel is resized.

    Arrays are channels-last ([H, W], [H, W, C] with C in 1/3/4); uint8, integer values in
    [0, 255], or float in [0, 1] (quantized to uint8 first, exactly as HF's PIL path does).
    """
    factor = patch_size * merge_size
    if isinstance(image, Image.Image):
        # Raises (aspect ratio) before any resize; equal to the size after the resizes below.
        new_h, new_w = target_size(image.height, image.width, min_pixels=min_pixels,
                                   max_pixels=max_pixels, factor=factor, preresize=preresize)
        if preresize:
            image = release_preresize(image, min_pixels, max_pixels)
        rgb = to_rgb_uint8(image)
    else:
        rgb = to_rgb_uint8(image)
        new_h, new_w = target_size(*rgb.shape[:2], min_pixels=min_pixels,
                                   max_pixels=max_pixels, factor=factor, preresize=preresize)
        if preresize:
            rgb = np.asarray(release_preresize(Image.fromarray(rgb), min_pixels, max_pixels))
    height, width = rgb.shape[:2]
    assert (new_h, new_w) == smart_resize(height, width, factor, min_pixels, max_pixels)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.BICUBIC))
    chw = resized.transpose(2, 0, 1)
    # HF: rescale in float64 then cast to float32; normalize in float32.
    scaled = (chw.astype(np.float64) * _RESCALE_FACTOR).astype(np.float32)
    mean32 = np.asarray(mean, np.float32)[:, None, None]
    std32 = np.asarray(std, np.float32)[:, None, None]
    normalized = (scaled - mean32) / std32
    pixel_values = patchify(normalized, patch_size=patch_size, merge_size=merge_size,
                            temporal_patch_size=temporal_patch_size)
    grid_thw = (1, new_h // patch_size, new_w // patch_size)
    return np.ascontiguousarray(pixel_values, dtype=np.float32), grid_thw


def process_images(images: Sequence[Image.Image | np.ndarray], **kwargs
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values concatenated over images, grid_thw int64 [N, 3]).

    The layout of the HF processor's `pixel_values` / `image_grid_thw` for a multi-image batch.
    `kwargs` are those of `process_image`.
    """
    if len(images) == 0:
        raise ValueError("process_images needs at least one image")
    outs = [process_image(image, **kwargs) for image in images]
    pixel_values = np.concatenate([pv for pv, _ in outs], axis=0)
    grid_thw = np.asarray([g for _, g in outs], dtype=np.int64)
    return pixel_values, grid_thw
