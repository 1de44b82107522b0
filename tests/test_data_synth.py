"""emo_synth: the documented cue rule is learnable, noisy at the documented rate, deterministic."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

import emor3_jax.data as data
from emor3_jax.configs import base
from emor3_jax.data import synth


def _split(n, split, seed=0):
    out = list(synth.generate_split(n, split, seed=seed))
    return (np.stack([o[1] for o in out]), np.array([o[2] for o in out]),
            np.array([o[3] for o in out]))


@pytest.fixture(scope="module")
def train_test():
    return _split(1200, "train"), _split(400, "test")


def test_cue_classifier_reaches_08_while_majority_class_is_chance(train_test):
    _, (x, y, clean) = train_test
    pred = synth.predict_from_features(synth.cue_features(x))
    assert (pred == y).mean() >= 0.8
    assert (pred == clean).mean() >= 0.97          # the rule itself is almost always visible
    majority = np.bincount(y, minlength=8).max() / len(y)
    assert 0.10 <= majority <= 0.16                # chance is 12.5 %
    assert set(np.unique(y)) == set(range(8))


def test_label_noise_rate_and_balanced_clean_labels():
    clean, noisy = synth.split_labels(4000, "train", seed=5, label_noise=0.1)
    assert np.bincount(clean).tolist() == [500] * 8
    assert 0.085 <= (clean != noisy).mean() <= 0.115
    no_noise_clean, no_noise = synth.split_labels(100, "test", 5, 0.0)
    np.testing.assert_array_equal(no_noise, no_noise_clean)


def test_fitted_classifiers_learn_it_from_cues_and_from_14px_patches(train_test):
    (x_tr, y_tr, _), (x_te, y_te, _) = train_test
    # Nearest centroid on the three standardized cue features, fitted on train.
    f_tr, f_te = synth.cue_features(x_tr), synth.cue_features(x_te)
    mu, sd = f_tr.mean(0), f_tr.std(0)
    centroids = np.stack([((f_tr - mu) / sd)[y_tr == k].mean(0) for k in range(8)])
    distances = ((((f_te - mu) / sd)[:, None, :] - centroids[None]) ** 2).sum(-1)
    pred = distances.argmin(axis=1)
    assert (pred == y_te).mean() >= 0.8

    # A linear probe on what a 14-px patch ViT sees at 56x56: per-patch mean and spread.
    def patch_stats(x):
        p = x.astype(np.float64).reshape(len(x), 4, 14, 4, 14, 3) / 255.0
        return np.concatenate([p.mean((2, 4)).reshape(len(x), -1),
                               p.std((2, 4)).reshape(len(x), -1), np.ones((len(x), 1))], 1)

    a_tr, a_te = patch_stats(x_tr), patch_stats(x_te)
    onehot = np.eye(8)[y_tr]
    w = np.linalg.solve(a_tr.T @ a_tr + 1e-2 * np.eye(a_tr.shape[1]), a_tr.T @ onehot)
    assert ((a_te @ w).argmax(1) == y_te).mean() >= 0.6


def test_rule_matches_valence_arousal():
    for label, (warm, sharp, bright) in synth.LABEL_CUES.items():
        valence, arousal = base.VALENCE_AROUSAL[label]
        assert warm == (valence == "positive"), label
        if label != "fear":  # the documented exception (2/2/3/1 quadrants on a 2x2x2 grid)
            assert sharp == (arousal == "high"), label
    assert sorted(synth.LABEL_CUES) == sorted(base.MIKELS_LABELS)
    assert len(set(synth.LABEL_CUES.values())) == 8


def test_captions_describe_the_clean_cues_and_never_name_an_emotion():
    assert synth.caption_of_cues((1, 1, 1)) == "The scene is warm, vivid and bright."
    assert synth.caption_of_cues((0, 0, 0)) == "The scene is cool, muted and dark."
    out = list(synth.generate_split(64, "train", seed=3))
    noisy = 0
    for _, image, label, clean, caption in out:
        assert caption == synth.caption_of_cues(synth.LABEL_CUES[synth.LABELS[clean]])
        assert not any(name in caption.lower() for name in synth.LABELS)
        # The caption follows what the image shows (the measured cues), not the noisy label.
        measured = synth.predict_from_features(synth.cue_features(image[None]))[0]
        assert caption == synth.caption_of_cues(synth.LABEL_CUES[synth.LABELS[measured]])
        noisy += label != clean
    assert noisy > 0     # some labels disagree with their caption: the label noise
    assert len({o[4] for o in out}) == 8


def test_deterministic_from_seed():
    a, ya, _ = _split(16, "validation", seed=7)
    b, yb, _ = _split(16, "validation", seed=7)
    c, _, _ = _split(16, "validation", seed=8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="split must be one of"):
        next(synth.generate_split(1, "dev"))


def test_tfds_emo_synth_builds_the_generated_examples(tmp_path):
    config = data.synth_config(num_train=24, num_validation=8, num_test=16, seed=11, image_size=56)
    assert config.name == "s56_n24-8-16_seed11_noise0p1"
    builder = data.EmoSynth(config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        "train": 24, "validation": 8, "test": 16}
    assert builder.info.features["label"].names == list(base.MIKELS_LABELS)
    x, y, clean = _split(16, "test", seed=11)
    source = builder.as_data_source("test")
    for ex in source:
        i = int(ex["id"].decode().split("/")[1])
        np.testing.assert_array_equal(ex["image"], x[i])
        assert ex["label"] == y[i] and ex["clean_label"] == clean[i]
        cues = synth.LABEL_CUES[synth.LABELS[clean[i]]]
        assert ex["caption"].decode() == synth.caption_of_cues(cues)
        assert ex["problem"].decode() == base.question_text(base.MIKELS_LABELS)
    assert data.skip_counts(builder) == {"data/emo_synth/skipped": 0}
    # Registered by name too (default config).
    assert tfds.builder("emo_synth", data_dir=str(tmp_path)).builder_config.num_train == 2000
