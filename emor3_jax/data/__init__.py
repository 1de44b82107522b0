"""Emotion data sets: TFDS builders (registered on import) and the grain input pipeline.

Importing this package registers the TFDS builders `emoset2k`, `emotion6`, `webemo` (users'
files via TFDS' manual_dir) and `emo_synth` (generated from a seed). The host-side input
pipeline lives in `emor3_jax.data.pipeline`.
"""
from emor3_jax.data.builders import (EmoSynth, EmoSynthConfig, Emoset2k, Emotion6,  # noqa: F401
                                     EmotionFilesBuilder, Webemo, skip_counts, skip_report,
                                     synth_config)
