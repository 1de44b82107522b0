"""Global batches from every host's block: the small fields gathered, each host's pixel rows
kept on its own devices (`Pipeline.global_iter`; docs/architecture.md, Multi-host)."""
from __future__ import annotations

import collections
import logging
from typing import Any, Sequence

import numpy as np

from emor3_jax import patches as patch_lib
from emor3_jax.batches import PromptBatch, concat_prompt_batches
from emor3_jax.data.pipeline import BatchIterator, PipelineConfig, patch_bucket

log = logging.getLogger(__name__)


def concat_batches(batches: Sequence[PromptBatch], *, cfg: PipelineConfig) -> PromptBatch:
    """Host batches -> one batch of all their rows, in order, padded and bucketed exactly as
    `collate` pads one batch of those rows (prompt and patch buckets of `cfg`; batches without
    pixel rows get none)."""
    out = concat_prompt_batches(batches)
    return out.padded(patches=global_patches(out, cfg))


def global_patches(batch: PromptBatch, cfg: PipelineConfig) -> int:
    """The pixel rows per prompt of a global batch: the patch bucket of its largest image."""
    return patch_bucket(int(batch.num_patches.max(initial=0)), cfg.patch_buckets)


class GlobalBatchIterator:
    """Every host's next batch, concatenated in process order (`Pipeline.global_iter`).

    Only the small fields cross hosts (`gather(obj)` returns every process's obj in process
    order: `distributed.allgather_objects`): each host keeps its rows' pixels and places them
    on its own devices (`patches.PatchStore`), and the global batch's `pixel_values` is a
    `patches.DevicePatches` view of them, gathered on device by the programs that take them.
    Checkpointable: the state holds every host's BatchIterator state ({"hosts": [...]}), so a
    resumed run restores each host's own position (and must use the same host count).
    """

    def __init__(self, host_iterator: BatchIterator, *, combine, patches_of, gather, index: int,
                 count: int):
        """combine(host batches) -> the global batch; patches_of(global batch) -> its pixel
        rows per prompt."""
        self._it, self._combine, self._gather = host_iterator, combine, gather
        self._patches_of = patches_of
        self._index, self._count = index, count
        self._skips: dict[str, int] = {}
        self.pixel_bytes_kept = 0       # this host's pixel bytes of the last batch

    def __iter__(self):
        return self

    def __next__(self) -> PromptBatch:
        try:
            batch = next(self._it)
        except StopIteration:
            batch = None
        pixels = None
        if batch is not None:           # pixel rows up to the widest real image only
            batch = batch.trimmed()
            pixels, batch = batch.pixel_values, batch.replace(pixel_values=None)
        parts = self._gather((batch, self._it.skip_counts()))
        skips: collections.Counter = collections.Counter()
        for _, counts in parts:
            skips.update(counts)
        self._skips = dict(skips)
        done = [b is None for b, _ in parts]
        if any(done):
            if not all(done):
                log.warning("data pipeline: hosts %s ran out of batches before the others; "
                            "every host stops", [p for p, d in enumerate(done) if d])
            raise StopIteration
        batches = [b for b, _ in parts]
        out = self._combine(batches)
        if pixels is None:
            self.pixel_bytes_kept = 0
            return out
        patches = self._patches_of(out)
        local = np.zeros((pixels.shape[0], patches, pixels.shape[2]), np.float32)
        local[:, :pixels.shape[1]] = pixels
        rows = [b.num_rows for b in batches]
        store = patch_lib.PatchStore.from_host_rows(local, rows_per_host=max(rows))
        self.pixel_bytes_kept = int(pixels.nbytes)
        index = patch_lib.host_rows_index(rows, max(rows), patches)
        return out.replace(pixel_values=patch_lib.DevicePatches(store, index))

    def skip_counts(self) -> dict[str, int]:
        """Examples skipped so far on all hosts together, by reason."""
        return dict(sorted(self._skips.items()))

    def get_state(self) -> dict[str, Any]:
        """Every host's iterator state (a collective: all processes call it)."""
        return {"hosts": self._gather(self._it.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        hosts = state.get("hosts") if isinstance(state, dict) else None
        if hosts is None or len(hosts) != self._count:
            have = "one process" if hosts is None else f"{len(hosts)} processes"
            raise ValueError(f"data iterator state was saved by {have}; this run has "
                             f"{self._count}: resume with the same number of processes")
        self._it.set_state(hosts[self._index])
