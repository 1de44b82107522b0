"""Image bytes in, checked RGB images out: the one place that decides whether an image is usable.

Used twice: when a data set is prepared (bad files become counted skips, good ones are stored as
RGB JPEG/PNG bytes) and when the pipeline decodes stored bytes (a failure there is a counted
skip too, never a crash mid-training).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from emor3_jax.processing.image import to_rgb_uint8

# Decompression-bomb guard: far above any photo a VLM sees (the recipe's max is 4.2 MP), far
# below what would exhaust host memory when decoded (64 MP RGB = 192 MB).
MAX_IMAGE_PIXELS = 64_000_000
# Formats stored as they come (the bytes already decode to RGB); anything else is re-encoded.
_KEPT_FORMATS = ("JPEG", "PNG")


class BadImage(ValueError):
    """An image that cannot be used; `reason` is a short stable key for skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _open(data: bytes, name: str) -> Image.Image:
    if not data:
        raise BadImage("empty_file", f"{name}: zero-byte image file")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit and raises above twice it; our limit is lower.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("image_too_large", f"{name}: {e}") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise BadImage("corrupt_image", f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImage("image_too_large",
                       f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                       f"{MAX_IMAGE_PIXELS:,} (decompression-bomb guard); downscale the file")
    if width == 0 or height == 0:
        raise BadImage("corrupt_image", f"{name}: image has size {width}x{height}")
    return image


def _load(image: Image.Image, name: str) -> Image.Image:
    try:
        image.load()  # decodes every pixel: truncated files fail here, not later
    except Exception as e:
        raise BadImage("corrupt_image", f"{name}: image data cannot be decoded "
                       f"({type(e).__name__}: {e})") from e
    return image


def decode_rgb(data: bytes, name: str = "<image>") -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3]; raises BadImage with a reason key."""
    image = _load(_open(data, name), name)
    return to_rgb_uint8(image)


def image_size(data: bytes, name: str = "<image>") -> tuple[int, int]:
    """(height, width) from the header only (cheap), with the same checks as `decode_rgb`."""
    width, height = _open(data, name).size
    return height, width


def normalized_image_bytes(data: bytes, name: str = "<image>") -> bytes:
    """Checked bytes for storage: RGB JPEG/PNG kept byte for byte, anything else re-encoded.

    Re-encoding (grayscale, palette, alpha, CMYK, other formats, EXIF-rotated photos) yields an
    RGB PNG so the stored image decodes to exactly what the model should see, with no loss.
    """
    image = _load(_open(data, name), name)
    rotated = image.getexif().get(0x0112, 1) not in (1, None)  # EXIF orientation tag
    if image.format in _KEPT_FORMATS and image.mode == "RGB" and not rotated:
        return data
    if rotated:
        image = ImageOps.exif_transpose(image)
    out = io.BytesIO()
    Image.fromarray(to_rgb_uint8(image)).save(out, format="PNG")
    return out.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG bytes (lossless; used by the synthetic data set)."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(out, format="PNG")
    return out.getvalue()
