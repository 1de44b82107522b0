"""TFDS builders: `emoset2k`, `emotion6`, `webemo` (users' files) and `emo_synth` (generated).

All four are written to array_record and read with `builder.as_data_source(split)` (no
TensorFlow). Features: `image` (RGB uint8, stored as JPEG/PNG bytes), `label` (ClassLabel with
the data set's label names from emor3_jax/recipe.py LABELS), `problem` (the question text;
`question_text(labels)` when the files have none) and `id` (where the example came from).

Preparation never drops an example silently: every file or row that cannot become an example is
logged and written, with its reason, to `skipped.json` in the prepared data set's directory;
`skip_report(builder)` reads it back and `skip_counts(builder)` gives numbers for run metrics.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from emor3_jax import recipe
from emor3_jax.data import images, layouts, synth

log = logging.getLogger(__name__)

SKIP_REPORT_FILE = "skipped.json"

_MANUAL_INSTRUCTIONS = """\
Put the data set's files in the manual_dir (or in a `{name}/` folder inside it), in one of
these layouts (detected automatically):
  1. Hugging Face parquet exports: `[data/]<split>-00000-of-00001.parquet` with columns
     `image` ({{bytes, path}} struct), `problem` and `answer`.
  2. JSONL or CSV manifests: `path` (relative to the manifest), `label`, optional `problem`,
     optional `split` (else the file name is the split: train.jsonl, test.csv).
  3. Image folders: `<split>/<label>/<image file>`.
Labels ({labels}) are matched case-insensitively. Bad files and rows are skipped and listed
in skipped.json next to the prepared data.
Then: tfds.builder("{name}", data_dir=...).download_and_prepare(
  download_config=tfds.download.DownloadConfig(manual_dir=...))
"""


def _manual_instructions(name: str) -> str:
    return _MANUAL_INSTRUCTIONS.format(name=name, labels=", ".join(recipe.LABELS[name]))


def _features(labels, extra=None):
    features = {
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(labels)),
        "problem": tfds.features.Text(),
        "id": tfds.features.Text(),
    }
    features.update(extra or {})
    return tfds.features.FeaturesDict(features)


class _ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes array_record by default: random access for grain, and no TensorFlow needed."""

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)


class _SkipLog:
    """Skipped files/rows with reasons; one entry per example key."""

    def __init__(self):
        self.entries: dict[str, dict] = {}

    def add(self, split: str, key: str, reason: str, message: str) -> None:
        if key not in self.entries:
            self.entries[key] = {"split": split, "file": key, "reason": reason, "message": message}
            log.warning("skipped %s (%s): %s", key, reason, message)

    def counts(self) -> dict:
        by_reason = collections.Counter(e["reason"] for e in self.entries.values())
        by_split = collections.Counter(e["split"] for e in self.entries.values())
        return {"total": len(self.entries), "by_reason": dict(sorted(by_reason.items())),
                "by_split": dict(sorted(by_split.items()))}


@dataclasses.dataclass(eq=False)
class EmotionFilesConfig(tfds.core.BuilderConfig):
    """The label list of a users'-files data set; () = emor3_jax/recipe.py LABELS[name]."""
    labels: tuple[str, ...] = ()


def labels_config(labels) -> EmotionFilesConfig:
    """A config for another variant's label list (config.data.labels.<name>), named from the
    labels so that two lists never share prepared files."""
    labels = tuple(str(label).strip() for label in labels)
    if len(labels) < 2 or not all(labels) or len({l.lower() for l in labels}) != len(labels):
        raise ValueError(f"a data set's label list needs at least two distinct, non-empty "
                         f"labels (case-insensitive); got {labels!r} (config.data.labels)")
    digest = hashlib.sha1("\n".join(labels).encode()).hexdigest()[:10]
    return EmotionFilesConfig(name=f"labels_{digest}", labels=labels,
                              description="labels: " + ", ".join(labels))


class EmotionFilesBuilder(_ArrayRecordBuilder, skip_registration=True):
    """Common builder for data sets that users bring as files (see `layouts` for the layouts).

    Its default config uses the data set's labels from emor3_jax/recipe.py; `labels_config(...)`
    gives another list (a variant of the data set) its own prepared files.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Parquet, manifest and image-folder layouts; skip report."}
    BUILDER_CONFIGS = [EmotionFilesConfig(name="default",
                                          description="the labels of emor3_jax/recipe.py LABELS")]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.builder_config.labels) or recipe.LABELS[self.name]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=_features(self.labels),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        found = layouts.detect(dl_manager.manual_dir, self.name, self.labels)
        self._skips = _SkipLog()
        self._written = {}
        self._found = found
        self._empty_splits = []
        splits = {}
        for split in found.splits:
            if layouts.count_candidates(found, split) == 0:
                self._empty_splits.append(split)
                log.warning("%s: split '%s' has no files or rows; it is not created",
                            self.name, split)
            else:
                splits[split] = self._generate_examples(found, split)
        if found.ignored:
            log.warning("%s: layout '%s' used; ignored %d other file(s): %s", self.name,
                        found.kind, len(found.ignored), ", ".join(found.ignored[:5]))
        if not splits:
            raise ValueError(f"{self.name}: every split found under {found.root} "
                             f"({', '.join(found.splits)}) is empty; add files")
        log.info("%s: layout '%s' under %s, splits found: %s", self.name, found.kind,
                 found.root, ", ".join(splits))
        return splits

    def _generate_examples(self, found, split):
        index = {label.lower(): i for i, label in enumerate(self.labels)}
        default_problem = recipe.question_text(self.labels)
        written = 0
        for raw in layouts.read_split(found, split):
            example = self._check(raw, split, index, default_problem)
            if example is not None:
                written += 1
                yield raw.key, example
        self._written[split] = written
        if written == 0:
            skipped = self._skips.counts()["by_split"].get(split, 0)
            raise ValueError(f"{self.name}: all {skipped} example(s) of split '{split}' under "
                             f"{found.root} were skipped (see the warnings above for each file "
                             "and reason); fix the files or remove the split")

    def _check(self, raw: layouts.RawExample, split, index, default_problem):
        """A feature dict for a usable raw example; None (and a logged skip) otherwise."""
        if raw.error is not None:
            self._skips.add(split, raw.key, *raw.error)
            return None
        label = raw.label.strip().lower()
        if label not in index:
            self._skips.add(split, raw.key, "unknown_label",
                            f"{raw.key}: label {raw.label!r} is not one of {self.name}'s labels "
                            f"({', '.join(self.labels)}); fix the label or remove the example")
            return None
        if raw.image_bytes is not None:
            data = raw.image_bytes
        else:
            try:
                data = raw.image_path.read_bytes()
            except FileNotFoundError:
                self._skips.add(split, raw.key, "missing_file",
                                f"{raw.key}: image file {raw.image_path} does not exist")
                return None
            except OSError as e:
                self._skips.add(split, raw.key, "unreadable_file",
                                f"{raw.key}: cannot read {raw.image_path} ({e})")
                return None
        try:
            image = images.normalized_image_bytes(data, raw.key)
        except images.BadImage as e:
            self._skips.add(split, raw.key, e.reason, str(e))
            return None
        problem = raw.problem if raw.problem and raw.problem.strip() else default_problem
        return {"image": image, "label": index[label], "problem": problem, "id": raw.key}

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        report = {
            "dataset": self.name,
            "layout": self._found.kind,
            "root": str(self._found.root),
            "splits": dict(self._written),
            "empty_splits": self._empty_splits,
            "ignored_files": list(self._found.ignored),
            "skipped_counts": self._skips.counts(),
            "skipped": list(self._skips.entries.values()),
        }
        _write_report(self, report)


class Emoset2k(EmotionFilesBuilder):
    """EmoSet-2k (Mikels' 8 emotions; train/test), from the user's files."""
    name = "emoset2k"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _manual_instructions("emoset2k")


class Emotion6(EmotionFilesBuilder):
    """Emotion6 (6 emotions; train/test), from the user's files."""
    name = "emotion6"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _manual_instructions("emotion6")


class Webemo(EmotionFilesBuilder):
    """WebEmo (the 7 mid-level emotions of Parrott's hierarchy; test only, out of domain), from
    the user's files."""
    name = "webemo"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {**EmotionFilesBuilder.RELEASE_NOTES,
                     "1.1.0": "WebEmo's classes: confusion, not disgust (1.0.0 skipped every "
                              "confusion image as an unknown label)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _manual_instructions("webemo")


# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class EmoSynthConfig(tfds.core.BuilderConfig):
    """Sizes and seed of the synthetic set; `synth_config(...)` names it from its fields."""
    image_size: int = 56
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 400
    seed: int = 0
    label_noise: float = 0.1


def synth_config(**fields) -> EmoSynthConfig:
    """An EmoSynthConfig whose name encodes its fields (so different sizes never share files)."""
    c = EmoSynthConfig(name="x", **fields)
    name = (f"s{c.image_size}_n{c.num_train}-{c.num_validation}-{c.num_test}"
            f"_seed{c.seed}_noise{c.label_noise:g}").replace(".", "p")
    return dataclasses.replace(c, name=name)


class EmoSynth(_ArrayRecordBuilder):
    """Synthetic emotion images whose hue, saturation + texture and brightness decide the label.

    The rule, nuisance and label noise are documented in emor3_jax/data/synth.py.
    """
    name = "emo_synth"
    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "warm/sharp/bright cue rule, 10 % label noise.",
                     "1.1.0": "arousal is also shown by saturation (vivid vs muted).",
                     "1.2.0": "`caption`: the image's cues in words (synth.caption_of_cues)."}
    BUILDER_CONFIGS = [EmoSynthConfig(name="default",
                                      description="56x56, 2000/200/400 examples, seed 0")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=_features(synth.LABELS, {
                "clean_label": tfds.features.ClassLabel(names=list(synth.LABELS)),
                "caption": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split, num_examples):
        c = self.builder_config
        problem = recipe.question_text(synth.LABELS)
        for i, image, label, clean, caption in synth.generate_split(
                num_examples, split, seed=c.seed, size=c.image_size, label_noise=c.label_noise):
            key = f"{split}/{i:06d}"
            yield key, {"image": images.encode_png(image), "label": label, "problem": problem,
                        "id": key, "clean_label": clean, "caption": caption}

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        _write_report(self, {"dataset": self.name, "layout": "generated",
                             "splits": {s: i.num_examples for s, i in self.info.splits.items()},
                             "empty_splits": [], "ignored_files": [],
                             "skipped_counts": {"total": 0, "by_reason": {}, "by_split": {}},
                             "skipped": []})


# --------------------------------------------------------------------------------------------
def _write_report(builder, report: dict) -> None:
    """skipped.json beside the prepared files, its numbers in the DatasetInfo metadata, a log."""
    counts = report["skipped_counts"]
    builder.info.metadata["skipped_counts"] = counts
    builder.info.metadata["layout"] = report["layout"]
    Path(builder.data_dir, SKIP_REPORT_FILE).write_text(json.dumps(report, indent=1))
    log.info("%s prepared: splits %s; skipped %d %s (each listed in %s beside the data)",
             builder.name, report["splits"], counts["total"], counts["by_reason"],
             SKIP_REPORT_FILE)
    if report["ignored_files"]:
        log.warning("%s: %d file(s) of another layout were ignored (listed in %s)",
                    builder.name, len(report["ignored_files"]), SKIP_REPORT_FILE)


def skip_report(builder) -> dict:
    """The preparation report of a prepared data set (layout, splits, every skipped file)."""
    path = Path(builder.data_dir, SKIP_REPORT_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{builder.name}: no {SKIP_REPORT_FILE} in {builder.data_dir}; "
                                "prepare the data set with download_and_prepare() first")
    return json.loads(path.read_text())


def skip_counts(builder) -> dict[str, int]:
    """Flat numbers for run metrics: {"data/<name>/skipped": n, ".../skipped/<reason>": n}."""
    counts = skip_report(builder)["skipped_counts"]
    prefix = f"data/{builder.name}/skipped"
    out = {prefix: counts["total"]}
    out.update({f"{prefix}/{reason}": n for reason, n in counts["by_reason"].items()})
    return out
