"""The learner seam (emor3_jax/learners/) and the rollout tree operations DAPO builds on.

The learners' numbers are tested end to end elsewhere (test_update.py: the GRPO learner's
update order; test_trainer_faults.py: SFT, GRPO and DAPO runs, resume; test_grpo_e2e.py)."""
import dataclasses

import numpy as np
import pytest

from emor3_jax import learners
from emor3_jax.batches import PromptBatch
from emor3_jax.configs import base
from emor3_jax.rl import rollout as rollout_lib

G = 2


def _rollout(widths_pad: int, seed: int, batch: int = 3) -> rollout_lib.Rollout:
    """`batch` prompts of 4 + widths_pad columns (left pads: id 0, mask 0), one image of
    1 x 2 x (i + 1) patches each, G responses per prompt."""
    r = np.random.default_rng(seed)
    width = 4 + widths_pad
    mask = np.ones((batch, width), np.int32)
    mask[:, :widths_pad] = 0
    images = [[(r.normal(size=(2 * (i + 1), 5)), (1, 2, i + 1))] for i in range(batch)]
    prompts = PromptBatch.create(
        r.integers(1, 50, (batch, width)) * mask, mask,
        r.integers(1, 9, (3, batch, width)) * mask, r.integers(0, 4, batch), images=images,
        label=np.arange(batch) + 10 * seed,
        label_text=np.array([f"l{seed}{i}" for i in range(batch)], object),
        labels_of_dataset=("a", "b"))
    n = batch * G
    return rollout_lib.Rollout(
        prompts=prompts, tokens=r.integers(0, 9, (n, 5)),
        logprobs=r.normal(size=(n, 5)).astype(np.float32), lengths=r.integers(1, 5, n),
        texts=[f"r{seed}.{i}" for i in range(n)], group_size=G,
        rewards=r.random(n).astype(np.float32),
        components={"accuracy": r.random(n), "format": r.random(n)},
        advantages=r.normal(size=n).astype(np.float32), judge={"consistency_yes": float(seed)})


def test_take_keeps_each_prompt_with_its_group_and_image():
    ro = _rollout(0, seed=1)
    part = ro.take(np.array([2, 0]))
    rows = [4, 5, 0, 1]                                      # prompt-major rows b * G + g
    np.testing.assert_array_equal(part.tokens, ro.tokens[rows])
    assert part.texts == [ro.texts[i] for i in rows]
    for k in ro.components:
        np.testing.assert_array_equal(part.components[k], ro.components[k][rows])
    np.testing.assert_array_equal(part.prompts.label, ro.prompts.label[[2, 0]])
    np.testing.assert_array_equal(part.prompts.mrope_positions,
                                  ro.prompts.mrope_positions[:, [2, 0]])
    for new, old in ((0, 2), (1, 0)):                      # each row keeps its own image
        (pixels, grid), = part.prompts.row_images(new)
        (want, want_grid), = ro.prompts.row_images(old)
        np.testing.assert_array_equal(pixels, want)
        assert grid == want_grid == (1, 2, old + 1)
    assert part.prompts.labels_of_dataset == ("a", "b")
    assert part.group_size == G and part.judge == ro.judge


def test_concat_left_pads_prompts_and_joins_every_response_field():
    a, b = _rollout(0, seed=1).take([1]), _rollout(2, seed=2).take([0, 2])
    ro = rollout_lib.concat_rollouts([a, b])
    assert ro.prompts.input_ids.shape == (3, 6)
    np.testing.assert_array_equal(ro.prompts.input_ids[0], np.r_[0, 0, a.prompts.input_ids[0]])
    np.testing.assert_array_equal(ro.prompts.attention_mask[0, :2], [0, 0])
    np.testing.assert_array_equal(ro.prompts.position_ids[0, :, :2], 0)
    assert ro.texts == a.texts + b.texts
    for f in dataclasses.fields(ro):
        if f.metadata.get("rows") and f.name not in ("texts", "components"):
            np.testing.assert_array_equal(
                getattr(ro, f.name), np.concatenate([getattr(a, f.name), getattr(b, f.name)]))
    np.testing.assert_array_equal(ro.components["format"],
                                  np.r_[a.components["format"], b.components["format"]])
    np.testing.assert_array_equal(ro.prompts.num_patches, [4, 2, 6])
    assert ro.prompts.pixel_values.shape[1] == 6            # padded to the largest image
    for row, part, old in ((0, a, 0), (1, b, 0), (2, b, 1)):
        np.testing.assert_array_equal(ro.prompts.row_images(row)[0][0],
                                      part.prompts.row_images(old)[0][0])
    assert ro.judge == b.judge                               # the last try's judge answers
    np.testing.assert_array_equal(ro.valid, np.ones(6, bool))


def test_learner_per_phase_and_method():
    c = base.get_config()
    assert learners.learner_class(c, "sft") is learners.SFTLearner
    assert learners.learner_class(c, "rl") is learners.GRPOLearner
    assert learners.learner_class(base.apply_method(base.get_config(), "dapo"), "rl") \
        is learners.DAPOLearner
    with pytest.raises(ValueError, match="unknown training phase"):
        learners.learner_class(c, "ppo")
    c.rl.learner = "ppo"
    with pytest.raises(ValueError, match=r"config.rl.learner='ppo' .* \['dapo', 'grpo'\]"):
        learners.learner_class(c, "rl")


def test_dapo_is_grpo_with_another_rollout():
    """DAPO's file overrides how a step's scored rollout is obtained and its config checks,
    nothing else: the seam a new algorithm uses."""
    own = {k for k in vars(learners.DAPOLearner) if not k.startswith("_")}
    assert own == {"check_config", "rollout"}, own
    assert issubclass(learners.DAPOLearner, learners.GRPOLearner)
