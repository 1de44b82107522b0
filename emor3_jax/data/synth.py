"""`emo_synth`: a procedurally generated emotion data set, made from a seed (no files).

The rule (what a model has to learn). Three binary visual cues pick one of the eight Mikels
labels (emor3_jax/recipe.py MIKELS_LABELS):

    warm   (valence):  hue red..yellow (warm)              vs  cyan..violet (cool)
    sharp  (arousal):  vivid (saturation 0.70-0.95) with    vs  muted (saturation 0.12-0.32)
                       10-18 small hard-edged shapes            with 2-3 large soft blobs
    bright (tone):     HSV value 0.70-0.92 (bright)        vs  0.16-0.38 (dark)

    label        warm sharp bright     label      warm sharp bright
    amusement     1    1     1         disgust     0    1     1
    excitement    1    1     0         anger       0    1     0
    contentment   1    0     1         sadness     0    0     1
    awe           1    0     0         fear        0    0     0

Valence always follows emor3_jax/recipe.py VALENCE_AROUSAL (warm = positive) and arousal follows
it for seven labels (sharp = high). Fear is the exception: Mikels' quadrants hold 2/2/3/1
labels, which a 2x2x2 grid cannot, so fear takes the cool-smooth-dark cell (darkness, fog).

Arousal is shown twice on purpose: saturation is a colour statistic that a patch embedding
reads at once (a vision probe learns all three cues in about 25 steps of 32 images), while
edge sharpness alone took a probe more than 500 steps, far too slow for a CPU demo.

Nuisance (so it is not trivial): hue, saturation and value within each range, a background
gradient, shape count, size, kind, position and contrast sign all vary; one or two soft
blobs of a random hue (the image's saturation) sit on top; pixel noise. Label noise: with
probability `label_noise` (default 0.1) the stored label is a uniformly drawn *different*
label (`clean_label` keeps the rule's answer), so the best possible accuracy is about 0.9 and
chance (balanced classes) is 0.125.

Every cue is strong at 56x56 (a 14-px patch ViT sees 4x4 patches): colour and value are global,
and a hard edge crosses most 14-px patches of a sharp image. `cue_features` measures the three
cues and `predict_from_features` applies the rule: the documented cue classifier.
Everything is a pure function of (seed, split, index): the same seed gives the same images.
"""
from __future__ import annotations

import numpy as np

from emor3_jax import recipe

LABELS = recipe.LABELS["emo_synth"]
CUE_NAMES = ("warm", "sharp", "bright")
LABEL_CUES = {
    "amusement": (1, 1, 1), "excitement": (1, 1, 0), "contentment": (1, 0, 1), "awe": (1, 0, 0),
    "disgust": (0, 1, 1), "anger": (0, 1, 0), "sadness": (0, 0, 1), "fear": (0, 0, 0),
}
_CUES_TO_LABEL = {cues: LABELS.index(label) for label, cues in LABEL_CUES.items()}
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}

# Documented decision thresholds of the cue classifier (midpoints between the cue ranges).
WARMTH_THRESHOLD = 0.0      # mean(R) - mean(B)
BRIGHTNESS_THRESHOLD = 0.54  # mean HSV value, max(R, G, B)
SHARPNESS_THRESHOLD = 0.018  # mean |difference| of the HSV value between neighbouring pixels


def label_of_cues(warm: int, sharp: int, bright: int) -> int:
    return _CUES_TO_LABEL[(int(warm), int(sharp), int(bright))]


# Words for (absent, present) of each cue, in CUE_NAMES order.
CUE_WORDS = (("cool", "warm"), ("muted", "vivid"), ("dark", "bright"))


def caption_of_cues(cues: tuple[int, int, int]) -> str:
    """What the image shows, in words (the `caption` feature): "The scene is warm, vivid and
    bright." Built from the rule's cues, so it describes the image even when the stored label
    is noisy; it never names an emotion."""
    words = [pair[int(c)] for pair, c in zip(CUE_WORDS, cues)]
    return f"The scene is {words[0]}, {words[1]} and {words[2]}."


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorized HSV -> RGB, all in [0, 1] (h in turns, wrapping)."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int32) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _sharp_value_map(rng: np.random.Generator, v0: float, size: int, yy, xx) -> np.ndarray:
    """Value map of a cluttered image: many small hard-edged shapes of strong contrast."""
    value = np.full((size, size), v0)
    scale = size / 56.0
    for _ in range(rng.integers(10, 19)):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(3.0, 7.0) * scale
        kind = rng.integers(3)
        if kind == 0:    # rectangle
            mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * rng.uniform(0.5, 1.5))
        elif kind == 1:  # disc
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:            # thick bar at a random angle
            a = rng.uniform(0, np.pi)
            along = (yy - cy) * np.cos(a) + (xx - cx) * np.sin(a)
            across = -(yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
            mask = (np.abs(along) < 2.2 * r) & (np.abs(across) < 0.45 * r + 1)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        value = np.where(mask, v0 + sign * rng.uniform(0.28, 0.42), value)
    return value


def _smooth_value_map(rng: np.random.Generator, v0: float, size: int, yy, xx) -> np.ndarray:
    """Value map of a calm image: two or three large soft blobs of low contrast."""
    value = np.full((size, size), v0)
    for _ in range(rng.integers(2, 4)):
        cy, cx = rng.uniform(0, size, 2)
        sigma = rng.uniform(0.2, 0.35) * size
        amp = rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.18)
        value = value + amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    return value


def render(rng: np.random.Generator, cues: tuple[int, int, int], size: int = 56) -> np.ndarray:
    """One RGB uint8 [size, size, 3] image showing the given (warm, sharp, bright) cues."""
    warm, sharp, bright = cues
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    hue = rng.uniform(-0.04, 0.14) if warm else rng.uniform(0.5, 0.72)
    sat = rng.uniform(0.7, 0.95) if sharp else rng.uniform(0.12, 0.32)
    v0 = rng.uniform(0.7, 0.92) if bright else rng.uniform(0.16, 0.38)
    value_map = (_sharp_value_map if sharp else _smooth_value_map)(rng, v0, size, yy, xx)
    # Nuisance: a gentle background gradient in a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((yy - size / 2) * np.cos(angle) + (xx - size / 2) * np.sin(angle)) / size
    value_map = np.clip(value_map + rng.uniform(0.0, 0.12) * ramp, 0.02, 1.0)
    hue_map = hue + rng.uniform(-0.02, 0.02) + 0.03 * ramp
    rgb = _hsv_to_rgb(hue_map, np.full_like(value_map, sat), value_map)
    # Nuisance: one or two soft blobs of any hue laid over the scene.
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0, size, 2)
        sigma = rng.uniform(0.06, 0.1) * size
        alpha = 0.55 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
        color = _hsv_to_rgb(np.array(rng.random()), np.array(sat),
                            np.array(v0))
        rgb = rgb * (1 - alpha[..., None]) + color * alpha[..., None]
    rgb = rgb + rng.normal(0.0, 0.012, rgb.shape)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def split_labels(num_examples: int, split: str, seed: int, label_noise: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(clean labels, stored labels) of a split: balanced classes, then label noise."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 0])
    clean = rng.permutation(np.arange(num_examples) % len(LABELS))
    noisy = clean.copy()
    flip = rng.random(num_examples) < label_noise
    # A uniformly drawn *different* label: shift by 1..7 modulo 8.
    noisy[flip] = (clean[flip] + rng.integers(1, len(LABELS), flip.sum())) % len(LABELS)
    return clean, noisy


def generate_split(num_examples: int, split: str, *, seed: int = 0, size: int = 56,
                   label_noise: float = 0.1):
    """Yield (index, image uint8 [size, size, 3], label, clean_label, caption) for one split."""
    if split not in SPLIT_IDS:
        raise ValueError(f"emo_synth split must be one of {tuple(SPLIT_IDS)}, got {split!r}")
    clean, noisy = split_labels(num_examples, split, seed, label_noise)
    for i in range(num_examples):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], 1, i])
        cues = LABEL_CUES[LABELS[clean[i]]]
        yield i, render(rng, cues, size), int(noisy[i]), int(clean[i]), caption_of_cues(cues)


# --------------------------------------------------------------------------------------------
# The documented cue classifier.

def cue_features(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, 3] float: (warmth, sharpness, brightness) as documented."""
    x = np.asarray(images, np.float64) / 255.0
    warmth = x[..., 0].mean(axis=(1, 2)) - x[..., 2].mean(axis=(1, 2))
    value = x.max(axis=-1)
    sharpness = 0.5 * (np.abs(np.diff(value, axis=1)).mean(axis=(1, 2))
                       + np.abs(np.diff(value, axis=2)).mean(axis=(1, 2)))
    brightness = value.mean(axis=(1, 2))
    return np.stack([warmth, sharpness, brightness], axis=-1)


def predict_from_features(features: np.ndarray) -> np.ndarray:
    """The rule applied to measured cues with the documented thresholds: [N, 3] -> [N] labels."""
    warm = features[:, 0] > WARMTH_THRESHOLD
    sharp = features[:, 1] > SHARPNESS_THRESHOLD
    bright = features[:, 2] > BRIGHTNESS_THRESHOLD
    return np.array([label_of_cues(w, s, b) for w, s, b in zip(warm, sharp, bright)],
                    dtype=np.int64)
