"""Host input pipeline: TFDS data source -> grain -> padded, bucketed numpy batches.

Stages: source (`builder.as_data_source(split)`, images left encoded) -> this host's shard
(process index / count) -> shuffle and repeat (training; a fresh shuffle every epoch) ->
per-example preprocessing (decode, the release's pre-resize then Qwen2-VL smart_resize within
the configured pixel bounds, the SET / GRPO-think / plain prompt through the Qwen2.5-VL chat
template, token ids) in
`num_workers` grain processes -> batching in the main process (left padding to the smallest
prompt bucket, pixel rows padded to a patch bucket, mRoPE position ids).

Nothing is lost silently. An example whose image cannot be decoded or processed, or whose
prompt is longer than `max_prompt_len` (prompts are never truncated, so an image span is never
cut), is skipped, logged and counted: `batch.num_skipped` for the batch and
`iterator.skip_counts()` in total (part of the saved state). Because skips travel through grain
as markers (no filtering inside grain), the batches are the same for any `num_workers`.

Batches are `emor3_jax.batches.PromptBatch`es (fields and shapes there; B = `batch_size` on
this host, L a prompt bucket, each row's one image padded to P pixel rows, a patch bucket of
the batch's largest image), with the pipeline's metadata filled: labels, the question, the
example id, the caption (what the image shows, in words; "" when the data set has none), the
epoch drawn and `num_skipped`.
Padding rows (only in the last batch of a finite pass, or to give every host the same number of
eval batches) hold a well-formed filler example (a grey image with the data set's question),
so every row has an image and real tokens; `valid` marks them and consumers must mask them.

Determinism and resumption: the order depends only on (seed, shard, epoch); the iterator's
`get_state()` is a JSON-serializable dict (grain's orbax `CheckpointHandler` works with it, as
do `state_to_bytes` / `state_from_bytes`), and a restored iterator continues with exactly the
batches the original would have produced.

Sharding: eval shards are disjoint (`range(process_index, N, process_count)`) and every host
yields ceil(ceil(N / count) / B) batches. Training reads ONE shuffled stream of the whole split
(the same for any host count); global batch k is its positions [k * B * count, (k + 1) * B *
count) and host p takes the contiguous block [p * B, (p + 1) * B) of it, so the host batches
concatenated in process order (`hosts.concat_batches`, `Pipeline.global_iter`) are exactly the batch
one process with the global batch size reads (as long as nothing is skipped: a host refills a
skipped example from its own next block). Skips can differ between hosts, so a multi-host
trainer should count steps (num_epochs=None) rather than wait for the end of a finite pass.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from emor3_jax.batches import PromptBatch, pack_row_images
from emor3_jax import recipe
from emor3_jax.data import images
from emor3_jax.processing import chat
from emor3_jax.processing import image as image_processing
from emor3_jax.processing.rope_index import get_rope_index
from emor3_jax.processing.tokenizer import token_ids
from emor3_jax.processing.vision import round_up

log = logging.getLogger(__name__)

# A skip is logged for the first few examples of each reason, then only counted.
_LOGGED_SKIPS_PER_REASON = 20
_FILLER_SIZE = 28  # filler image side (pre-resize and smart_resize grow it to min_pixels)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline does; `from_config` fills it from the run config."""
    batch_size: int                       # examples per batch on this host
    prompt_format: str = "set"            # key of emor3_jax/recipe.py PROMPT_FORMATS
    min_pixels: int = recipe.MIN_PIXELS
    max_pixels: int = recipe.MAX_PIXELS
    max_prompt_len: int = 2048            # longer prompts are skipped (counted), never cut
    prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    # Pixel rows per prompt (its image padded to the batch's largest, rounded up): a list of
    # sizes (smallest that fits), an int (a multiple), or None for powers of two and 1.5x
    # powers of two (at most 1/3 padding).
    patch_buckets: tuple[int, ...] | int | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1            # None = repeat forever
    eval_mode: bool = False               # no shuffle, one pass, equal batch count per host
    num_workers: int = 0                  # grain worker processes for preprocessing
    read_threads: int = 2                 # threads per process reading and preprocessing
    prefetch: int = 16                    # examples each process prepares ahead
    process_index: int | None = None      # None = jax.process_index()
    process_count: int | None = None      # None = jax.process_count()
    system_prompt: str = recipe.DEFAULT_SYSTEM_PROMPT

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.prompt_format not in recipe.PROMPT_FORMATS:
            raise ValueError(f"prompt_format {self.prompt_format!r} is not one of "
                             f"{sorted(recipe.PROMPT_FORMATS)}")
        if self.max_prompt_len > max(self.prompt_buckets):
            raise ValueError(f"max_prompt_len {self.max_prompt_len} exceeds the largest prompt "
                             f"bucket {max(self.prompt_buckets)}; add a bucket or lower it")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {self.num_epochs}")


def source_config(config, name: str):
    """The TFDS builder config of data set `name` in this run: its label-list override
    (config.data.labels.<name>), or None for the data set's own labels."""
    from emor3_jax.data import builders
    labels = tuple(config.data.get("labels", {}).get(name, ()) or ())
    return builders.labels_config(labels) if labels else None


def dataset_labels(config, name: str) -> tuple[str, ...]:
    """Data set `name`'s label list in this run (its override, else emor3_jax/recipe.py LABELS)."""
    override = source_config(config, name)
    return tuple(override.labels) if override is not None else tuple(recipe.LABELS[name])


def generation_batch_size(config) -> int:
    """Prompts per training batch: rollout.batch_size, or with DAPO's dynamic sampling
    (rl.learner "dapo") the mini rollout batch that each generation try draws (EasyR1
    data.mini_rollout_batch_size)."""
    r = config.rollout
    if config.rl.learner == "dapo" and r.get("mini_batch_size", 0):
        return int(r.mini_batch_size)
    return int(r.batch_size)


def from_config(config, *, eval_mode: bool = False, process_count: int | None = None
                ) -> PipelineConfig:
    """PipelineConfig from the run config (configs/base.py fields); batch sizes are global.

    Training streams repeat forever (the trainer stops by step count); eval is one pass.
    """
    import jax
    count = jax.process_count() if process_count is None else process_count
    global_batch = config.eval.batch_size if eval_mode else generation_batch_size(config)
    if global_batch % count:
        raise ValueError(f"global batch size {global_batch} is not divisible by the "
                         f"{count} hosts; change it so every host gets the same share")
    d = config.data
    return PipelineConfig(
        batch_size=global_batch // count, prompt_format=d.prompt_format,
        min_pixels=d.min_pixels, max_pixels=d.max_pixels, max_prompt_len=d.max_prompt_len,
        prompt_buckets=tuple(d.prompt_buckets), patch_buckets=tuple(d.get("patch_buckets", ())) or None,
        seed=config.seed, shuffle=d.shuffle and not eval_mode,
        num_epochs=1 if eval_mode else None, eval_mode=eval_mode, num_workers=d.num_workers,
        process_count=count)


# --------------------------------------------------------------------------------------------
# Per-example preprocessing (runs in grain worker processes).

def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Preprocess:
    """(index in the shard stream, source record) -> example dict, or a skip marker."""

    def __init__(self, tokenizer, labels: Sequence[str], cfg: PipelineConfig, shard_len: int):
        self.tokenizer = tokenizer
        self.labels = tuple(labels)
        self.cfg = cfg
        self.shard_len = shard_len
        # grain runs this in `read_threads` threads; an HF fast tokenizer may reconfigure its
        # Rust backend inside encode ("Already borrowed" under concurrency), so calls take turns.
        self._tokenizer_lock = threading.Lock()

    def __getstate__(self):  # pickled into grain worker processes; locks do not pickle
        state = dict(self.__dict__)
        del state["_tokenizer_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokenizer_lock = threading.Lock()

    def __call__(self, index: int, record: dict) -> dict:
        example_id = _text(record["id"])
        epoch = index // self.shard_len
        try:
            rgb = images.decode_rgb(record["image"], example_id)
            return self.example(rgb, _text(record["problem"]), int(record["label"]),
                                example_id, epoch, _text(record.get("caption", "")))
        except images.BadImage as e:
            return _skip(e.reason, str(e), example_id)
        except ValueError as e:  # pre-resize / smart_resize (aspect ratio), prompt building
            return _skip("unprocessable", f"{example_id}: {e}", example_id)

    def example(self, rgb: np.ndarray, problem: str, label: int, example_id: str,
                epoch: int, caption: str = "") -> dict:
        cfg = self.cfg
        grid = image_processing.grid_thw_for_size(*rgb.shape[:2], min_pixels=cfg.min_pixels,
                                                  max_pixels=cfg.max_pixels)
        text = chat.task_prompt(problem, cfg.prompt_format)
        with self._tokenizer_lock:
            ids = chat.encode_prompt(self.tokenizer, text, [grid], system_prompt=cfg.system_prompt)
        if len(ids) > cfg.max_prompt_len:  # checked before the costly resize
            return _skip("too_long", f"{example_id}: prompt of {len(ids)} tokens (image grid "
                         f"{grid}) exceeds max_prompt_len {cfg.max_prompt_len}", example_id)
        pixel_values, grid = image_processing.process_image(
            rgb, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        return {"input_ids": ids, "pixel_values": pixel_values,
                "grid_thw": np.asarray(grid, np.int32), "label": label,
                "label_text": self.labels[label] if label >= 0 else "", "problem": problem,
                "example_id": example_id, "epoch": epoch, "caption": caption}

    def filler(self) -> dict:
        """A well-formed padding row: a grey image with the data set's own question."""
        grey = np.full((_FILLER_SIZE, _FILLER_SIZE, 3), 128, np.uint8)
        out = self.example(grey, recipe.question_text(self.labels), -1, "", -1)
        if "skip" in out:
            raise ValueError(f"max_prompt_len {self.cfg.max_prompt_len} is too small for even "
                             f"the smallest image prompt: {out['message']}")
        return out


def _skip(reason: str, message: str, example_id: str) -> dict:
    return {"skip": reason, "message": message, "example_id": example_id}


# --------------------------------------------------------------------------------------------
# Batching (main process).

def patch_bucket(n: int, buckets: Sequence[int] | int | None, minimum: int = 64) -> int:
    """Padded pixel-row count for n rows (see PipelineConfig.patch_buckets)."""
    if buckets is not None:
        return round_up(n, buckets)
    size = minimum
    while size < n:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


def collate(rows: Sequence[dict], valid: Sequence[bool], *, labels: Sequence[str],
            cfg: PipelineConfig, ids) -> PromptBatch:
    """Examples (real rows first, then filler rows) -> one padded batch (module docstring)."""
    b = len(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    length = round_up(max(lengths), cfg.prompt_buckets)
    input_ids = np.full((b, length), ids.pad, np.int32)
    attention_mask = np.zeros((b, length), np.int32)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        input_ids[i, length - n:] = r["input_ids"]
        attention_mask[i, length - n:] = 1
    grid_thw = np.stack([r["grid_thw"] for r in rows]).astype(np.int32)
    position_ids, rope_deltas = get_rope_index(
        input_ids, grid_thw, attention_mask, image_token_id=ids.image_pad,
        vision_start_token_id=ids.vision_start, spatial_merge_size=recipe.MERGE_SIZE)
    patches = patch_bucket(max(r["pixel_values"].shape[0] for r in rows), cfg.patch_buckets)
    pixel_values, image_grid_thw = pack_row_images(
        [[(r["pixel_values"], r["grid_thw"])] for r in rows], patches)
    return PromptBatch(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=np.moveaxis(position_ids, 0, 1), rope_deltas=rope_deltas,
        pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        valid=np.asarray(valid, bool),
        label=np.asarray([r["label"] for r in rows], np.int32),
        label_text=np.asarray([r["label_text"] for r in rows], dtype=object),
        problem=np.asarray([r["problem"] for r in rows], dtype=object),
        example_id=np.asarray([r["example_id"] for r in rows], dtype=object),
        caption=np.asarray([r["caption"] for r in rows], dtype=object),
        epoch=np.asarray([r["epoch"] for r in rows], np.int32),
        labels_of_dataset=tuple(labels))


class BatchIterator(grain.DatasetIterator):
    """Pulls preprocessed examples, counts skips, emits padded batches; checkpointable."""

    def __init__(self, parent, *, collate_fn, filler_fn, batch_size: int,
                 num_batches: int | None):
        super().__init__(parent)
        self._collate = collate_fn
        self._filler_fn = filler_fn
        self._filler = None
        self._batch_size = batch_size
        self._num_batches = num_batches
        self._batches = 0
        self._skips: collections.Counter = collections.Counter()

    def __next__(self) -> PromptBatch:
        self._assert_not_closed()
        if self._num_batches is not None and self._batches >= self._num_batches:
            raise StopIteration
        rows, skipped = [], 0
        while len(rows) < self._batch_size:
            try:
                example = next(self._parent)
            except StopIteration:
                break
            if "skip" in example:
                skipped += 1
                self._count_skip(example)
                continue
            rows.append(example)
        if not rows and self._num_batches is None:
            raise StopIteration
        valid = [True] * len(rows) + [False] * (self._batch_size - len(rows))
        if len(rows) < self._batch_size:
            if self._filler is None:
                self._filler = self._filler_fn()
            rows += [self._filler] * (self._batch_size - len(rows))
        self._batches += 1
        return self._collate(rows, valid).replace(num_skipped=skipped)

    def _count_skip(self, marker: dict) -> None:
        reason = marker["skip"]
        self._skips[reason] += 1
        if self._skips[reason] <= _LOGGED_SKIPS_PER_REASON:
            log.warning("data pipeline skipped %s (%s): %s", marker["example_id"], reason,
                        marker["message"])
        elif self._skips[reason] == _LOGGED_SKIPS_PER_REASON + 1:
            log.warning("data pipeline: more '%s' skips; only counting them now", reason)

    def skip_counts(self) -> dict[str, int]:
        """Examples skipped so far, by reason (continues across checkpoint restores)."""
        return dict(sorted(self._skips.items()))

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "batches": self._batches,
                "skips": dict(self._skips)}

    def set_state(self, state: dict[str, Any]) -> None:
        if "hosts" in state:
            raise ValueError(f"data iterator state was saved by {len(state['hosts'])} processes "
                             "(GlobalBatchIterator); resume with that many processes")
        self._parent.set_state(state["parent"])
        self._batches = int(state["batches"])
        self._skips = collections.Counter({k: int(v) for k, v in state["skips"].items()})


def state_to_bytes(iterator: BatchIterator) -> bytes:
    return json.dumps(iterator.get_state()).encode("utf-8")


def state_from_bytes(iterator: BatchIterator, data: bytes) -> None:
    iterator.set_state(json.loads(data.decode("utf-8")))


# --------------------------------------------------------------------------------------------
class _Shard:
    """Random-access view of some indices of a data source (grain pickles it to workers)."""

    def __init__(self, source, indices: np.ndarray):
        self.source = source
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def shard_indices(n: int, process_index: int, process_count: int, *, wrap: bool) -> np.ndarray:
    """This host's example indices: strided; `wrap` pads every shard to ceil(n / count)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if not wrap:
        return np.arange(process_index, n, process_count)
    per_host = math.ceil(n / process_count)
    return (process_index + process_count * np.arange(per_host)) % n


class _HostBlocks(grain.MapDataset):
    """Host `index`'s rows of every global batch: positions [k * B * count + index * B,
    k * B * count + (index + 1) * B) of the global stream, k = 0, 1, ... (B = `block`)."""

    def __init__(self, parent: grain.MapDataset, block: int, count: int, index: int):
        super().__init__(parent)
        self._block, self._count, self._index = block, count, index
        n, size = len(parent), block * count
        self._length = n if n >= sys.maxsize else (
            n // size * block + min(max(n % size - index * block, 0), block))

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"_HostBlocks(block={self._block}, count={self._count}, index={self._index})"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        k, j = divmod(i, self._block)
        return self._parent[(k * self._count + self._index) * self._block + j]


class Pipeline:
    """An iterable of batches over one split; `iter()` gives a checkpointable BatchIterator."""

    def __init__(self, source, tokenizer, labels: Sequence[str], cfg: PipelineConfig):
        if len(source) == 0:
            raise ValueError("the data source is empty: prepare the split first (its skip "
                             "report says why examples were left out)")
        if cfg.process_index is None or cfg.process_count is None:
            import jax
            cfg = dataclasses.replace(
                cfg, process_index=jax.process_index() if cfg.process_index is None
                else cfg.process_index,
                process_count=jax.process_count() if cfg.process_count is None
                else cfg.process_count)
        self.cfg = cfg
        self.labels = tuple(labels)
        self.token_ids = token_ids(tokenizer)
        self.num_examples = len(source)
        if cfg.eval_mode:
            indices = shard_indices(len(source), cfg.process_index, cfg.process_count,
                                    wrap=False)
            self.shard_len = len(indices)
            ds = grain.MapDataset.source(_Shard(source, indices))
        else:   # one stream of the whole split for every host count (module docstring)
            self.shard_len = len(source)
            ds = grain.MapDataset.source(source)
            if cfg.shuffle:
                ds = ds.shuffle(seed=cfg.seed)
            ds = ds.repeat(cfg.num_epochs)
        self._preprocess = Preprocess(tokenizer, self.labels, cfg, max(self.shard_len, 1))
        ds = ds.map_with_index(self._preprocess)
        if not cfg.eval_mode and cfg.process_count > 1:
            ds = _HostBlocks(ds, cfg.batch_size, cfg.process_count, cfg.process_index)
        self._dataset = ds

    @property
    def num_batches(self) -> int | None:
        """Batches one pass yields on every host (eval), else None (training, or infinite)."""
        if not self.cfg.eval_mode:
            return None
        per_host = math.ceil(self.num_examples / self.cfg.process_count)
        return max(1, math.ceil(per_host / self.cfg.batch_size))

    def __iter__(self) -> BatchIterator:
        cfg = self.cfg
        examples = self._dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch))
        if cfg.num_workers > 0:
            examples = examples.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=max(1, cfg.prefetch // 4)))
        return BatchIterator(
            iter(examples),
            collate_fn=lambda rows, valid: collate(rows, valid, labels=self.labels, cfg=cfg,
                                                   ids=self.token_ids),
            filler_fn=self._preprocess.filler, batch_size=cfg.batch_size,
            num_batches=self.num_batches)

    def global_iter(self):
        """Iterator over global batches: `iter(self)` with one process; with several, every
        host's batch k gathered and concatenated in process order (`hosts.GlobalBatchIterator`), the
        same batch on every process, except that each host's pixel rows stay on its own devices
        (`patches.DevicePatches`). Each `next` is a collective: all processes iterate along."""
        import jax
        cfg = self.cfg
        if cfg.process_count == 1:
            return iter(self)
        if (cfg.process_index, cfg.process_count) != (jax.process_index(), jax.process_count()):
            raise ValueError(f"global_iter: the pipeline is shard {cfg.process_index} of "
                             f"{cfg.process_count} but this is process {jax.process_index()} of "
                             f"{jax.process_count()}; leave process_index/count unset (None)")
        from emor3_jax import distributed
        from emor3_jax.data.hosts import GlobalBatchIterator, concat_batches, global_patches
        return GlobalBatchIterator(
            iter(self), combine=lambda parts: concat_batches(parts, cfg=cfg),
            patches_of=lambda batch: global_patches(batch, cfg),
            gather=distributed.allgather_objects, index=cfg.process_index, count=cfg.process_count)


def open_source(name: str, split: str, *, data_dir: str | None = None,
                manual_dir: str | None = None, config=None, prepare: bool = True):
    """(builder, data source with images left encoded) for a registered data set split.

    Prepares the data set first when `prepare` and it is not prepared yet (users' files come
    from `manual_dir`; emo_synth needs none). With several processes, process 0 prepares
    first and the others wait (a shared data_dir is prepared once; host-local ones afterwards).
    """
    import tensorflow_datasets as tfds  # the builders are registered: this is emor3_jax.data
    from emor3_jax.fileio import is_remote

    remote = data_dir if data_dir and is_remote(data_dir) else None
    if remote:      # array_record reads local files only: a per-host mirror of the bucket's copy
        from emor3_jax import model_source
        data_dir = str(model_source.mirror_dir(remote))
    kwargs = {"data_dir": data_dir or None}
    if config is not None:
        kwargs["config"] = config
    builder = tfds.builder(name, **kwargs)
    if prepare:
        builder = _prepare(builder, lambda: tfds.builder(name, **kwargs), manual_dir, remote)
    if split not in builder.info.splits:
        raise ValueError(f"{name} has no split {split!r}; the prepared splits are "
                         f"{sorted(builder.info.splits)} (see {builder.data_dir})")
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return builder, source


def local_manual_dir(manual_dir: str | None) -> str | None:
    """config.data.manual_dir as a local directory: as it is, a gs:// directory copied once per
    host into the cache, or a Hugging Face dataset repo id (org/name[@revision]) whose parquet
    files are downloaded (emor3_jax/model_source.py). Only needed while preparing."""
    if not manual_dir:
        return None
    from emor3_jax import model_source
    kind = model_source.classify(manual_dir)
    if kind not in ("remote", "hub"):       # TFDS names a missing folder and the layouts
        return manual_dir
    patterns = model_source.HUB_DATA_FILES if kind == "hub" else model_source.DATA_FILES
    return model_source.resolve(manual_dir, "config.data.manual_dir", patterns,
                                repo_type="dataset")


def _prepare(builder, reopen, manual_dir, remote: str | None = None):
    """Prepare `builder` unless it is. `remote`: the gs:// data_dir that `builder`'s local
    data_dir mirrors; a version prepared there is fetched (only what changed), otherwise it is
    prepared locally and uploaded, so hosts and later runs prepare it once."""
    import jax
    import tensorflow_datasets as tfds
    from emor3_jax import model_source

    version_uri = None
    if remote:
        rel = os.path.relpath(builder.data_dir, model_source.mirror_dir(remote))
        version_uri = f"{remote.rstrip('/')}/{rel}"

    def fetch(b):
        if version_uri and _remote_prepared(version_uri):
            model_source.resolve(version_uri, "config.data.data_dir", model_source.DATA_FILES)
            return reopen()
        return b

    def run(b):
        b = fetch(b)
        if not b.is_prepared():
            b.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=local_manual_dir(manual_dir)))
            if version_uri:
                log.info("uploading the prepared %s to %s", b.name, version_uri)
                model_source.upload(b.data_dir, version_uri, replace=("*",))
        return b
    if jax.process_count() == 1:
        return run(builder)
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
        builder = run(builder)
    multihost_utils.sync_global_devices(f"emor3_jax: prepared {builder.name}")
    # a builder made before the data existed has no split info: open it again
    return builder if jax.process_index() == 0 else run(reopen())


def _remote_prepared(version_uri: str) -> bool:
    """Whether a prepared TFDS version directory exists at `version_uri` (its dataset_info)."""
    from emor3_jax import fileio
    uri = fileio.join(version_uri, "dataset_info.json")
    try:
        return fileio.exists(uri)
    except Exception as e:  # noqa: BLE001  (gcsfs/google-auth raise many types; classified)
        raise fileio.remote_error(uri, "config.data.data_dir", e) from e


def make_pipeline(name: str, split: str, tokenizer, cfg: PipelineConfig, **source_kwargs
                  ) -> Pipeline:
    """The usual entry point: a registered data set's split as a batch pipeline."""
    builder, source = open_source(name, split, **source_kwargs)
    return Pipeline(source, tokenizer, builder.info.features["label"].names, cfg)
