"""SFT targets: the SET template, the caption in step 1, random labels; errors name the fix."""
import numpy as np
import pytest

import emor3_jax.data as data
from emor3_jax import policy
from emor3_jax.learners import sft
from emor3_jax.configs import base
from emor3_jax.data import pipeline, synth
from emor3_jax.processing.tokenizer import build_demo_tokenizer, token_ids
from emor3_jax.rewards import emotion


@pytest.fixture(scope="module")
def synth_batch(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    config = data.synth_config(num_train=8, num_validation=0, num_test=6, seed=4)
    data.EmoSynth(config=config, data_dir=str(data_dir)).download_and_prepare()
    tokenizer = build_demo_tokenizer()
    cfg = pipeline.PipelineConfig(batch_size=8, eval_mode=True, min_pixels=56 * 56,
                                  max_pixels=56 * 56, max_prompt_len=256, prompt_buckets=(256,))
    batch = next(iter(pipeline.make_pipeline("emo_synth", "test", tokenizer, cfg,
                                             data_dir=str(data_dir), config=config)))
    return batch, tokenizer


def _model_config(ids):
    model = base.get_config().model
    model.tiny = "tiny"
    return policy.tiny_model_config(model, ids)


def test_set_targets_have_the_format_the_reward_checks():
    for target in ("set_template", "set_caption"):
        text = sft.sft_target("awe", target, caption="The scene is warm, muted and dark.")
        assert emotion.format_reward(text) == 1.0
        assert emotion.accuracy_reward(text, "awe") == 1.0
    assert "warm, muted and dark" in sft.sft_target("awe", "set_caption",
                                                    caption="The scene is warm, muted and dark.")
    assert "warm, muted" not in sft.sft_target("awe", "set_template",
                                               caption="The scene is warm, muted and dark.")
    assert sft.sft_target("fear", "boxed") == "\\boxed{fear}"


def test_set_caption_puts_each_rows_caption_before_its_label(synth_batch):
    batch, tokenizer = synth_batch
    assert batch.valid.tolist() == [True] * 6 + [False] * 2
    labels = sft.batch_labels(batch, random_labels=True, rng=np.random.default_rng(0))
    ids = token_ids(tokenizer)
    ub = sft.pack_sft_batch(_model_config(ids), batch, tokenizer, ids, labels=labels,
                            target="set_caption", max_len=96, micro_batch_rows=4)
    tokens = np.asarray(ub.inputs.response_ids).reshape(8, -1)
    mask = np.asarray(ub.inputs.response_mask).reshape(8, -1)
    for row in range(8):
        text = tokenizer.decode(tokens[row][mask[row] != 0][:-1])   # without end-of-turn
        if not batch.valid[row]:
            assert mask[row].sum() == 0      # filler rows teach nothing
            continue
        caption = batch.caption[row]
        assert caption.startswith("The scene is ")
        assert text == sft.sft_target(labels[row], "set_caption", caption)
        assert text.startswith(f"<step1>{caption}</step1>")
        assert text.endswith(f"\\boxed{{{labels[row]}}}")
    assert set(labels) <= set(synth.LABELS)


def test_set_caption_without_captions_names_the_field_and_the_fix(synth_batch):
    batch, tokenizer = synth_batch
    no_caption = batch.replace(caption=np.asarray([""] * 8, dtype=object))
    with pytest.raises(ValueError, match="caption.*set_template"):
        sft.pack_sft_batch(_model_config(token_ids(tokenizer)), no_caption, tokenizer,
                           token_ids(tokenizer),
                           labels=list(base.MIKELS_LABELS), target="set_caption", max_len=96,
                           micro_batch_rows=4)
