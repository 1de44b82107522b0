"""Orbax checkpoints of the whole training state, for exact resume.

A checkpoint holds the train state pytree (params, optimizer state, step, RNG, reference
params when they differ from the initial weights) and a JSON side-car (data iterator state,
counters) so a resumed run continues with exactly the examples and random numbers it would
have seen. Saves are asynchronous; every host takes part (orbax writes each host's shards).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Keeps the last `keep` checkpoints of (state pytree, JSON extras) under `directory`."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.fspath(directory)
        if "://" not in self.directory:            # orbax wants absolute local paths
            self.directory = os.path.abspath(self.directory)
        # cleanup_tmp_directories: a process killed mid-save (SIGKILL, lost host) leaves a
        # half-written `<step>.orbax-checkpoint-tmp*` folder; it is never a restore candidate
        # and is removed here so the resumed run can write that step again.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, extra: dict, *, force: bool = False) -> bool:
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          extra=ocp.args.JsonSave(extra)), force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def read_extra(self, step: int | None = None) -> dict | None:
        """The JSON side-car alone (cheap): tells what the state pytree of `step` holds."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(out["extra"])

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """Restore onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                              extra=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not fit this run's train state ({e}). "
                "It was written with another model or optimizer config: resume with that "
                "config, or start afresh with a new --workdir") from e
        log.info("checkpoint: restored step %d from %s", step, self.directory)
        return out["state"], dict(out["extra"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live pytree, the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
