"""Real photos (scikit-image's sample images) written as users' files: for tests, bench, docs.

scikit-image is a test/bench dependency, imported only here and only when called.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel")


def photo(index: int, height: int, width: int) -> np.ndarray:
    """RGB uint8 [height, width, 3]: a crop of one of scikit-image's photos, resized."""
    import skimage.data

    source = getattr(skimage.data, _PHOTOS[index % len(_PHOTOS)])()
    h, w = source.shape[:2]
    # A different crop for each pass through the photo list.
    shift = (index // len(_PHOTOS)) % 4
    crop = source[shift * h // 16: h - (3 - shift) * h // 16, shift * w // 16: w - (3 - shift) * w // 16]
    return np.asarray(Image.fromarray(crop).resize((width, height), Image.BICUBIC))


def encode(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    """Image array -> file bytes in a PIL format ("JPEG", "PNG", ...)."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt)
    return out.getvalue()


def write_image_folder(root: Path | str, examples: dict[str, list[str]], *,
                       height: int = 48, width: int = 64, fmt: str = "JPEG"
                       ) -> dict[str, tuple[str, str]]:
    """Write `<root>/<split>/<label>/<n>.<ext>` for each split's list of labels.

    Returns {example id (path relative to root): (split, label)}.
    """
    root = Path(root)
    ext = {"JPEG": "jpg", "PNG": "png"}.get(fmt, fmt.lower())
    written, n = {}, 0
    for split, labels in examples.items():
        for label in labels:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{n:05d}.{ext}"
            path.write_bytes(encode(photo(n, height, width), fmt))
            written[path.relative_to(root).as_posix()] = (split, label)
            n += 1
    return written
