"""TFDS builders on users' files: every layout, real photos, and bad input that must be reported."""
import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import emor3_jax.data as data
from emor3_jax.configs import base
from emor3_jax.data import images, layouts
from emor3_jax.data.sample_files import encode, photo, write_image_folder


def _prepare(name, tmp_path, manual_dir):
    builder = tfds.builder(name, data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _read(builder, split):
    """{id: (label name, problem, image)} of a prepared split, read through as_data_source."""
    names = builder.info.features["label"].names
    out = {}
    for ex in builder.as_data_source(split):
        out[ex["id"].decode()] = (names[ex["label"]], ex["problem"].decode(), ex["image"])
    return out


def _huge_png_header(width=9000, height=8000) -> bytes:
    """A PNG whose header claims width x height (72 MP) with almost no data: a decompression bomb."""
    png = bytearray(encode(photo(0, 8, 8), "PNG"))
    ihdr = png[16:29]  # IHDR data: width, height, depth, color type, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(png)


def _skipped(builder):
    return {e["file"]: e["reason"] for e in data.skip_report(builder)["skipped"]}


# --------------------------------------------------------------------------------------------
def test_image_folder_layout_keeps_good_examples_and_reports_bad_ones(tmp_path):
    manual = tmp_path / "manual"
    good = write_image_folder(manual, {
        "train": ["amusement", "fear", "fear", "sadness", "awe"],
        "test": ["anger", "Excitement"],  # label folders match case-insensitively
    })
    # A grayscale PNG and an RGBA PNG: stored as RGB.
    (manual / "train" / "disgust").mkdir()
    gray = photo(7, 40, 30).mean(-1).astype(np.uint8)
    (manual / "train" / "disgust" / "gray.png").write_bytes(encode(gray, "PNG"))
    rgba = np.dstack([photo(8, 30, 40), np.full((30, 40), 128, np.uint8)])
    (manual / "train" / "disgust" / "rgba.png").write_bytes(encode(rgba, "PNG"))
    good["train/disgust/gray.png"] = ("train", "disgust")
    good["train/disgust/rgba.png"] = ("train", "disgust")
    # Bad input: corrupt, zero-byte, truncated, enormous, unknown label, file outside a label.
    (manual / "train" / "fear" / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    (manual / "train" / "fear" / "empty.png").write_bytes(b"")
    (manual / "train" / "fear" / "truncated.jpg").write_bytes(encode(photo(3, 200, 200))[:900])
    (manual / "test" / "anger" / "bomb.png").write_bytes(_huge_png_header())
    (manual / "train" / "boredom").mkdir()
    (manual / "train" / "boredom" / "x.jpg").write_bytes(encode(photo(4, 32, 32)))
    (manual / "train" / "loose.jpg").write_bytes(encode(photo(5, 32, 32)))
    (manual / "train" / "fear" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # not data

    builder = _prepare("emoset2k", tmp_path, manual)
    assert set(builder.info.splits) == {"train", "test"}
    read = {**_read(builder, "train"), **_read(builder, "test")}
    assert set(read) == set(good)
    for key, (split, label) in good.items():
        assert read[key][0] == label.lower()
        assert read[key][1] == base.question_text(base.MIKELS_LABELS)
        image = read[key][2]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    # JPEGs are stored byte for byte: same pixels as decoding the user's file.
    jpeg = "train/amusement/00000.jpg"
    np.testing.assert_array_equal(read[jpeg][2], images.decode_rgb((manual / jpeg).read_bytes()))
    np.testing.assert_array_equal(read["train/disgust/gray.png"][2], np.dstack([gray] * 3))

    assert _skipped(builder) == {
        "train/fear/corrupt.jpg": "corrupt_image", "train/fear/empty.png": "empty_file",
        "train/fear/truncated.jpg": "corrupt_image", "test/anger/bomb.png": "image_too_large",
        "train/boredom/x.jpg": "unknown_label", "train/loose.jpg": "missing_label"}
    report = data.skip_report(builder)
    assert report["layout"] == "image_folder"
    assert report["splits"] == {"train": 7, "test": 2}
    message = next(e["message"] for e in report["skipped"] if e["file"] == "train/boredom/x.jpg")
    assert "'boredom'" in message and "amusement" in message
    assert data.skip_counts(builder) == {
        "data/emoset2k/skipped": 6, "data/emoset2k/skipped/corrupt_image": 2,
        "data/emoset2k/skipped/empty_file": 1, "data/emoset2k/skipped/image_too_large": 1,
        "data/emoset2k/skipped/missing_label": 1, "data/emoset2k/skipped/unknown_label": 1}
    # The counts also live in the DatasetInfo metadata of the prepared data set.
    reloaded = tfds.builder("emoset2k", data_dir=str(tmp_path / "tfds"))
    assert reloaded.info.metadata["skipped_counts"]["total"] == 6


def _parquet_image_type():
    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_parquet_layout_reads_hugging_face_exports(tmp_path):
    manual = tmp_path / "manual"
    (manual / "data").mkdir(parents=True)
    labels = base.LABELS["emotion6"]
    rows = {"train": [], "test": []}
    expected = {}
    for i in range(6):
        split = "train" if i < 4 else "test"
        question = f"<image>Question {i}: " + base.question_text(labels)
        rows[split].append({"image": {"bytes": encode(photo(i, 36, 52)), "path": f"img{i}.jpg"},
                            "problem": question, "answer": labels[i % len(labels)]})
        expected[(split, len(rows[split]) - 1)] = (labels[i % len(labels)], question)
    rows["train"].append({"image": {"bytes": b"\x89PNG broken", "path": "bad.png"},
                          "problem": "q", "answer": "joy"})
    rows["train"].append({"image": {"bytes": b"", "path": "empty.png"},
                          "problem": "q", "answer": "joy"})
    rows["test"].append({"image": {"bytes": encode(photo(9, 30, 30)), "path": "x.jpg"},
                         "problem": "q", "answer": "amusement"})  # not an Emotion6 label
    schema = pa.schema([("image", _parquet_image_type()), ("problem", pa.string()),
                        ("answer", pa.string())])
    for split, split_rows in rows.items():
        pq.write_table(pa.Table.from_pylist(split_rows, schema=schema),
                       manual / "data" / f"{split}-00000-of-00001.parquet")

    builder = _prepare("emotion6", tmp_path, manual)
    assert builder.info.features["label"].names == list(labels)
    for split in ("train", "test"):
        read = _read(builder, split)
        want = {f"data/{split}-00000-of-00001.parquet:{row}": v
                for (s, row), v in expected.items() if s == split}
        assert {k: v[:2] for k, v in read.items()} == want
    assert _skipped(builder) == {"data/train-00000-of-00001.parquet:4": "corrupt_image",
                                 "data/train-00000-of-00001.parquet:5": "empty_file",
                                 "data/test-00000-of-00001.parquet:2": "unknown_label"}
    assert data.skip_report(builder)["layout"] == "parquet"


def test_manifest_layouts_jsonl_and_csv(tmp_path):
    manual = tmp_path / "manual"
    (manual / "images").mkdir(parents=True)
    for i in range(5):
        (manual / "images" / f"{i}.png").write_bytes(encode(photo(i, 40, 40), "PNG"))
    train = [
        {"path": "images/0.png", "label": "joy", "problem": "How does it feel?"},
        {"path": "images/1.png", "label": "Love"},
        {"path": "images/2.png"},                                # missing label
        {"path": "images/404.png", "label": "joy"},              # missing file
        {"path": "images/3.png", "label": "amusement"},          # unknown label
        {"path": "images/corrupt.png", "label": "fear"},
        {"path": "images/empty.jpg", "label": "fear"},
    ]
    (manual / "images" / "corrupt.png").write_bytes(encode(photo(6, 40, 40), "PNG")[:60])
    (manual / "images" / "empty.jpg").write_bytes(b"")
    (manual / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n\n")
    (manual / "test.csv").write_text("path,label\nimages/4.png,sadness\n,fear\n")

    builder = _prepare("webemo", tmp_path, manual)
    question = base.question_text(base.LABELS["webemo"])
    assert {k: v[:2] for k, v in _read(builder, "train").items()} == {
        "train.jsonl:1": ("joy", "How does it feel?"), "train.jsonl:2": ("love", question)}
    assert {k: v[:2] for k, v in _read(builder, "test").items()} == {
        "test.csv:2": ("sadness", question)}
    assert _skipped(builder) == {"train.jsonl:3": "missing_field", "train.jsonl:4": "missing_file",
                                 "train.jsonl:5": "unknown_label", "train.jsonl:6": "corrupt_image",
                                 "train.jsonl:7": "empty_file", "test.csv:3": "missing_field"}


def test_single_manifest_with_split_column_and_split_aliases(tmp_path):
    manual = tmp_path / "manual"
    (manual / "imgs").mkdir(parents=True)
    lines = ["path,label,split"]
    for i, split in enumerate(["train", "train", "val", "test"]):
        (manual / "imgs" / f"{i}.jpg").write_bytes(encode(photo(i, 30, 40)))
        lines.append(f"imgs/{i}.jpg,{base.LABELS['emoset2k'][i]},{split}")
    (manual / "all.csv").write_text("\n".join(lines) + "\n")
    builder = _prepare("emoset2k", tmp_path, manual)
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        "train": 2, "validation": 1, "test": 1}


def test_webemo_test_only_and_empty_split_is_reported(tmp_path):
    manual = tmp_path / "manual" / "webemo"  # the <name>/ subfolder of manual_dir is used
    write_image_folder(manual, {"test": ["joy", "surprise", "confusion"]})
    (manual / "train").mkdir()                      # an empty split folder
    builder = _prepare("webemo", tmp_path, tmp_path / "manual")
    assert set(builder.info.splits) == {"test"}
    report = data.skip_report(builder)
    assert report["empty_splits"] == ["train"] and report["splits"] == {"test": 3}
    # WebEmo's classes (Parrott's mid level): confusion is one, disgust is not
    assert builder.info.features["label"].names == [
        "anger", "confusion", "fear", "joy", "love", "sadness", "surprise"]


def test_a_config_overrides_a_data_sets_label_list(tmp_path):
    """Another variant's labels (config.data.labels.<name>): its own prepared files, its labels
    in the ClassLabel and the default question, and the base labels' images skipped."""
    manual = tmp_path / "manual"
    write_image_folder(manual, {"test": ["happy", "sad", "sad", "fear"]})
    config = data.builders.labels_config(["Happy", "sad"])
    builder = tfds.builder("webemo", data_dir=str(tmp_path / "tfds"), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder.info.features["label"].names == ["Happy", "sad"]
    rows = _read(builder, "test")
    assert sorted(label for label, _, _ in rows.values()) == ["Happy", "sad", "sad"]
    assert {problem for _, problem, _ in rows.values()} == {base.question_text(("Happy", "sad"))}
    assert data.skip_report(builder)["skipped_counts"]["by_reason"] == {"unknown_label": 1}
    assert config.name in builder.data_dir and data.builders.labels_config(
        ["Happy", "sad"]).name == config.name != data.builders.labels_config(["sad", "Happy"]).name
    with pytest.raises(ValueError, match="two distinct"):
        data.builders.labels_config(["joy", "JOY"])


def test_missing_or_unusable_manual_dir_gives_clear_errors(tmp_path):
    with pytest.raises(AssertionError, match="(?s)does not exist or is empty.*<split>/<label>"):
        _prepare("emoset2k", tmp_path, tmp_path / "nowhere")
    flat = tmp_path / "flat"
    write_image_folder(flat / "x", {"y": ["fear"]})
    (flat / "x").rename(flat / "fear_parent")
    (flat / "fear_parent" / "y" / "fear").rename(flat / "fear")  # label folder at the top
    with pytest.raises(ValueError, match=r"(?s)label folders \(fear\).*<split>/<label>/<file>"):
        _prepare("emoset2k", tmp_path, flat)


def test_a_split_whose_every_example_is_bad_is_an_error_naming_it(tmp_path):
    manual = tmp_path / "manual"
    (manual / "test" / "fear").mkdir(parents=True)
    (manual / "test" / "fear" / "a.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"all 1 example\(s\) of split 'test'"):
        _prepare("emoset2k", tmp_path, manual)


def test_layout_detection_prefers_parquet_and_lists_ignored_manifests(tmp_path):
    (tmp_path / "a").mkdir()
    pq.write_table(pa.Table.from_pylist(
        [{"image": {"bytes": encode(photo(0, 20, 20)), "path": None}, "answer": "fear"}],
        schema=pa.schema([("image", _parquet_image_type()), ("answer", pa.string())])),
        tmp_path / "a" / "test.parquet")
    (tmp_path / "a" / "notes.csv").write_text("path,label\n")
    found = layouts.detect(tmp_path / "a", "emoset2k", base.MIKELS_LABELS)
    assert found.kind == layouts.PARQUET and list(found.splits) == ["test"]
    assert found.ignored == ("notes.csv",)
    example, = layouts.read_split(found, "test")
    assert example.label == "fear" and example.problem is None
    # The Hugging Face "refs/convert/parquet" spelling: <split>/0000.parquet.
    (tmp_path / "b" / "Val").mkdir(parents=True)
    (tmp_path / "a" / "test.parquet").rename(tmp_path / "b" / "Val" / "0000.parquet")
    assert list(layouts.detect(tmp_path / "b", "emoset2k", ()).splits) == ["validation"]


def test_image_checks():
    good = encode(photo(1, 20, 30))
    assert images.image_size(good) == (20, 30)
    assert images.normalized_image_bytes(good) == good
    with pytest.raises(images.BadImage, match="exceeds the limit") as e:
        images.decode_rgb(_huge_png_header(), "bomb.png")
    assert e.value.reason == "image_too_large"
    # Palette image -> stored as RGB PNG with the same pixels.
    palette = Image.fromarray(photo(2, 16, 16)).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    stored = images.normalized_image_bytes(buf.getvalue())
    np.testing.assert_array_equal(images.decode_rgb(stored), np.asarray(palette.convert("RGB")))
