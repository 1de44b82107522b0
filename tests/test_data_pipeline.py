"""grain pipeline: batch format, determinism, resumption (with workers too), host shards, skips."""
import dataclasses
import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

import emor3_jax.data as data
from emor3_jax.configs import base
from emor3_jax.data import hosts, images, pipeline
from emor3_jax.data.sample_files import encode, photo, write_image_folder
from emor3_jax.processing import chat, image as image_processing
from emor3_jax.processing.rope_index import get_rope_index
from emor3_jax.processing.tokenizer import build_demo_tokenizer, token_ids

flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags

SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, max_prompt_len=512,
             prompt_buckets=(128, 256, 512), process_index=0, process_count=1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    config = data.synth_config(num_train=40, num_validation=8, num_test=21, seed=2)
    data.EmoSynth(config=config, data_dir=str(data_dir)).download_and_prepare()
    return str(data_dir), config


def _synth(synth_dir, tokenizer, split="train", **cfg):
    data_dir, config = synth_dir
    return pipeline.make_pipeline("emo_synth", split, tokenizer,
                                  pipeline.PipelineConfig(**{**SMALL, **cfg}),
                                  data_dir=data_dir, config=config)


def assert_same_batch(x, y):
    for f in dataclasses.fields(x):
        a, b = getattr(x, f.name), getattr(y, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype, f.name
            np.testing.assert_array_equal(a, b, err_msg=f.name)
        else:
            assert a == b, f.name


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_same_batch(x, y)


def _ids(batches):
    return [i for b in batches for i, v in zip(b.example_id, b.valid) if v]


# --------------------------------------------------------------------------------------------
def test_batch_format_on_real_photos(tmp_path, tokenizer):
    manual = tmp_path / "manual"
    write_image_folder(manual, {"test": ["joy", "fear", "anger"]}, height=48, width=64)
    for i, label in enumerate(["sadness", "joy"]):  # larger photos: other grids and lengths
        (manual / "test" / label).mkdir(exist_ok=True)
        (manual / "test" / label / f"big{i}.jpg").write_bytes(encode(photo(10 + i, 120, 90)))
    builder, source = pipeline.open_source("emotion6", "test", data_dir=str(tmp_path / "tfds"),
                                           manual_dir=str(manual))
    cfg = pipeline.PipelineConfig(batch_size=4, eval_mode=True, **SMALL)
    batches = list(pipeline.Pipeline(source, tokenizer, base.LABELS["emotion6"], cfg))
    assert len(batches) == 2
    ids = token_ids(tokenizer)
    by_id = {ex["id"].decode(): ex for ex in builder.as_data_source(
        "test", decoders={"image": tfds.decode.SkipDecoding()})}
    for batch in batches:
        b, length = batch.input_ids.shape
        assert b == 4 and length in SMALL["prompt_buckets"]
        assert batch.position_ids.shape == (b, 3, length)
        assert batch.labels_of_dataset == base.LABELS["emotion6"]
        for row in range(b):
            mask = batch.attention_mask[row].astype(bool)
            assert mask[-1] and (mask[:-1] <= mask[1:]).all()  # left padding
            assert (batch.input_ids[row][~mask] == ids.pad).all()
            if not batch.valid[row]:
                assert batch.label[row] == -1 and batch.label_text[row] == ""
            else:
                ex = by_id[batch.example_id[row]]
                rgb = images.decode_rgb(ex["image"])
                pv, grid = image_processing.process_image(rgb, min_pixels=SMALL["min_pixels"],
                                                          max_pixels=SMALL["max_pixels"])
                (pixels, row_grid), = batch.row_images(row)     # one image per row
                assert row_grid == grid
                np.testing.assert_array_equal(pixels, pv)
                assert batch.label[row] == ex["label"]
                assert batch.label_text[row] == base.LABELS["emotion6"][ex["label"]]
                assert batch.problem[row] == ex["problem"].decode()
                assert batch.caption[row] == ""       # emotion6 has no caption feature
                prompt = chat.encode_prompt(tokenizer, chat.task_prompt(batch.problem[row], "set"),
                                            [grid])
                np.testing.assert_array_equal(batch.input_ids[row][mask], prompt)
                # mRoPE of the row alone equals the row inside the padded batch.
                pos, delta = get_rope_index(prompt[None], [grid], image_token_id=ids.image_pad)
                np.testing.assert_array_equal(batch.position_ids[row][:, mask], pos[:, 0])
                assert batch.rope_deltas[row] == delta[0]
        # Each row's patches, then zero rows up to the bucket of the batch's largest image.
        for row, n in enumerate(batch.num_patches):
            assert (batch.pixel_values[row, n:] == 0).all()
        assert batch.pixel_values.shape[1] == pipeline.patch_bucket(batch.num_patches.max(), None)
    assert sorted(_ids(batches)) == sorted(by_id)
    assert [int(b.valid.sum()) for b in batches] == [4, 1]


def test_captions_travel_with_their_rows(synth_dir, tokenizer):
    data_dir, config = synth_dir
    by_id = {ex["id"].decode(): ex["caption"].decode() for ex in tfds.builder(
        "emo_synth/" + config.name, data_dir=data_dir).as_data_source("test")}
    batches = list(_synth(synth_dir, tokenizer, split="test", batch_size=8, eval_mode=True))
    for batch in batches:
        for example_id, caption, valid in zip(batch.example_id, batch.caption,
                                              batch.valid):
            assert caption == (by_id[example_id] if valid else "")
    merged = hosts.concat_batches(batches[:2],
                                     cfg=pipeline.PipelineConfig(batch_size=8, **SMALL))
    assert list(merged.caption) == list(batches[0].caption) + list(batches[1].caption)


def test_resume_continues_with_the_same_batches(synth_dir, tokenizer):
    pipe = _synth(synth_dir, tokenizer, batch_size=4, num_epochs=2, seed=5)
    reference = list(pipe)
    assert len(reference) == 20
    it = iter(pipe)
    head = [next(it) for _ in range(7)]
    saved = pipeline.state_to_bytes(it)
    json.loads(saved)  # JSON-serializable
    resumed = iter(_synth(synth_dir, tokenizer, batch_size=4, num_epochs=2, seed=5))
    pipeline.state_from_bytes(resumed, saved)
    _assert_batches_equal(head + list(resumed), reference)


def test_worker_processes_give_the_same_batches_and_resume(synth_dir, tokenizer, tmp_path):
    kwargs = dict(batch_size=4, num_epochs=None, seed=9)
    reference_it = iter(_synth(synth_dir, tokenizer, **kwargs))
    reference = [next(reference_it) for _ in range(8)]
    it = iter(_synth(synth_dir, tokenizer, num_workers=2, **kwargs))
    head = [next(it) for _ in range(3)]
    # Save through grain's orbax checkpoint handler, restore into a fresh worker pipeline.
    handler = grain.checkpoint.CheckpointHandler()
    (tmp_path / "ckpt").mkdir()  # orbax creates it in a real run
    handler.save(tmp_path / "ckpt", item=it)
    it.close()
    resumed = iter(_synth(synth_dir, tokenizer, num_workers=2, **kwargs))
    handler.restore(tmp_path / "ckpt", item=resumed)
    tail = [next(resumed) for _ in range(5)]
    resumed.close()
    _assert_batches_equal(head + tail, reference)


def test_epochs_are_reshuffled_and_seeded(synth_dir, tokenizer):
    batches = list(_synth(synth_dir, tokenizer, batch_size=8, num_epochs=2, seed=1))
    epochs = np.concatenate([b.epoch for b in batches])
    ids = np.asarray(_ids(batches))
    assert len(batches) == 10 and (np.bincount(epochs) == [40, 40]).all()
    first, second = ids[epochs == 0], ids[epochs == 1]
    assert sorted(first) == sorted(second) and len(set(first)) == 40
    assert list(first) != list(second)                        # a fresh shuffle each epoch
    again = _ids(_synth(synth_dir, tokenizer, batch_size=8, num_epochs=1, seed=1))
    other = _ids(_synth(synth_dir, tokenizer, batch_size=8, num_epochs=1, seed=2))
    assert again == list(first) and other != again
    unshuffled = _ids(_synth(synth_dir, tokenizer, batch_size=8, shuffle=False))
    assert unshuffled != again and sorted(unshuffled) == sorted(again)


def test_two_hosts_get_disjoint_shards_covering_the_split(synth_dir, tokenizer):
    all_ids = [ex["id"].decode() for ex in tfds.builder(
        "emo_synth/" + synth_dir[1].name, data_dir=synth_dir[0]).as_data_source("test")]
    shards = []
    for host in (0, 1):
        pipe = _synth(synth_dir, tokenizer, "test", batch_size=4, eval_mode=True,
                      process_index=host, process_count=2)
        batches = list(pipe)
        assert len(batches) == pipe.num_batches == 3        # ceil(ceil(21 / 2) / 4) on both
        shards.append(_ids(batches))
        assert all(b.input_ids.shape[0] == 4 for b in batches)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(all_ids)
    assert (len(shards[0]), len(shards[1])) == (11, 10)
    # Training shards: equal sizes, wrapping around instead of leaving examples out.
    train = [pipeline.shard_indices(21, h, 2, wrap=True) for h in (0, 1)]
    assert [len(t) for t in train] == [11, 11]
    assert set(np.concatenate(train)) == set(range(21))


def test_a_host_without_examples_still_yields_its_eval_batches(tokenizer):
    labels = base.MIKELS_LABELS
    source = [{"image": encode(photo(i, 40, 40)), "label": i, "problem": b"Feeling?",
               "id": f"r{i}".encode()} for i in range(2)]
    per_host = []
    for host in range(3):
        cfg = pipeline.PipelineConfig(batch_size=2, eval_mode=True,
                                      **{**SMALL, "process_index": host, "process_count": 3})
        per_host.append(list(pipeline.Pipeline(source, tokenizer, labels, cfg)))
    assert [len(b) for b in per_host] == [1, 1, 1]
    assert [b[0].valid.tolist() for b in per_host] == [[True, False], [True, False],
                                                          [False, False]]
    assert per_host[2][0].input_ids.shape == per_host[0][0].input_ids.shape


def test_eval_mode_keeps_order_and_pads_the_last_batch(synth_dir, tokenizer):
    data_dir, config = synth_dir
    source_ids = [ex["id"].decode() for ex in tfds.builder(
        "emo_synth/" + config.name, data_dir=data_dir).as_data_source("test")]
    batches = list(_synth(synth_dir, tokenizer, "test", batch_size=4, eval_mode=True))
    assert len(batches) == 6 and _ids(batches) == source_ids
    last = batches[-1]
    assert last.valid.tolist() == [True, False, False, False]
    assert (last.label[1:] == -1).all() and (last.epoch[1:] == -1).all()
    assert (last.image_grid_thw[1:] > 0).all() and (last.attention_mask[1:].sum(1) > 0).all()


def test_bad_examples_at_read_time_are_counted_never_raised(tokenizer):
    labels = base.MIKELS_LABELS
    question = base.question_text(labels).encode()

    def record(i, image, problem=question):
        return {"image": image, "label": i % 8, "problem": problem, "id": f"r{i}".encode()}

    source = [record(0, encode(photo(0, 40, 40))), record(1, b"broken bytes"),
              record(2, encode(photo(2, 56, 56))), record(3, b""),
              record(4, encode(photo(4, 40, 40)), problem=b"why? " * 300),   # too long
              record(5, encode(photo(5, 10, 2500))),                         # aspect ratio 250
              record(6, encode(photo(6, 30, 50)))]
    cfg = pipeline.PipelineConfig(batch_size=2, eval_mode=True, **SMALL)
    it = iter(pipeline.Pipeline(source, tokenizer, labels, cfg))
    batches = list(it)
    assert _ids(batches) == ["r0", "r2", "r6"]
    assert it.skip_counts() == {"corrupt_image": 1, "empty_file": 1, "too_long": 1,
                                "unprocessable": 1}
    assert sum(b.num_skipped for b in batches) == 4
    assert it.get_state()["skips"] == it.skip_counts()


def test_config_checks_and_from_config():
    with pytest.raises(ValueError, match="exceeds the largest prompt bucket"):
        pipeline.PipelineConfig(batch_size=2, max_prompt_len=4096)
    with pytest.raises(ValueError, match="prompt_format"):
        pipeline.PipelineConfig(batch_size=2, prompt_format="cot")
    config = base.get_config()
    cfg = pipeline.from_config(config, process_count=4)
    assert cfg.batch_size == 128 and cfg.num_epochs is None and cfg.shuffle
    assert cfg.max_prompt_len == 2048 and cfg.min_pixels == base.MIN_PIXELS
    assert dataclasses.replace(cfg, batch_size=3).batch_size == 3
    ev = pipeline.from_config(config, eval_mode=True, process_count=2)
    assert ev.eval_mode and not ev.shuffle and ev.batch_size == 32
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.from_config(config, process_count=3)
    assert [pipeline.patch_bucket(n, None) for n in (1, 64, 65, 97, 200, 5000)] == [
        64, 64, 96, 128, 256, 6144]
    assert pipeline.patch_bucket(70, 32) == 96 and pipeline.patch_bucket(70, (50, 100)) == 100
