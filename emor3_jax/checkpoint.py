"""Orbax checkpoints: the whole training state for exact resume, and the best one by validation.

A checkpoint holds the train state pytree (params, optimizer state, step, RNG, reference
params when they differ from the initial weights) and a JSON side-car (data iterator state,
counters) so a resumed run continues with exactly the examples and random numbers it would
have seen. Saves are asynchronous; every host takes part (orbax writes each host's shards).

`Checkpointer` keeps the last `train.keep_checkpoints` of them (`<workdir>/checkpoints`).
`BestCheckpointer` keeps, apart from that rotation, the params of the evaluation with the best
validation score so far (`<workdir>/checkpoints_best`, one checkpoint, as the release keeps
its best checkpoint by validation reward). Its side-car is the record of that evaluation (step,
score, accuracies); the directory itself is the memory of a resumed run, so a resumed run never
replaces a better best with a worse one.
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


class BestCheckpointer:
    """The params of the best-scoring evaluation so far, kept in `directory` (one checkpoint).

    `offer(step, score, params, record)` saves when `score` is strictly higher than the best
    so far (so among equal scores the earliest step stays); orbax's `best_fn` over the saved
    metric then removes the previous best once the new one is committed, and rotation by step
    never applies (a best at step 20 survives later, worse evaluations and any number of
    regular checkpoints). On construction the best so far is read back from the directory: a
    resumed run (or a re-run of steps a preempted run had evaluated) offers the same or worse
    scores and leaves it as it is. Every process calls `offer` with the same score (the
    evaluation is global), so all of them take part in the save or none does.
    """

    METRIC = "score"

    def __init__(self, directory: str, async_save: bool = True):
        self.directory = os.fspath(directory)
        if "://" not in self.directory:
            self.directory = os.path.abspath(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, best_fn=lambda m: float(m[self.METRIC]),
            best_mode="max", keep_checkpoints_without_metrics=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._record: dict | None = None
        step = self._manager.best_step()
        if step is not None:
            out = self._manager.restore(step, args=ocp.args.Composite(
                record=ocp.args.JsonRestore()))
            self._record = dict(out["record"])
            log.info("best checkpoint so far: step %d, score %.4f (%s)", step,
                     self._record["score"], self.directory)

    @property
    def record(self) -> dict | None:
        """{"step", "score", ...what `offer` was given} of the best so far; None before any."""
        return None if self._record is None else dict(self._record)

    @property
    def score(self) -> float:
        return float("-inf") if self._record is None else float(self._record["score"])

    def offer(self, step: int, score: float, params: Any, record: dict | None = None) -> bool:
        """Save `params` as the best if `score` beats the best so far; True if it did."""
        score = float(score)
        if not score > self.score:       # also refuses NaN
            return False
        if step in self._manager.all_steps():
            # a re-run of an evaluated step (resume after a preemption) that now scores higher
            self._manager.wait_until_finished()
            self._manager.delete(step)
        rec = {**(record or {}), "step": int(step), "score": score}
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), record=ocp.args.JsonSave(rec)),
            metrics={self.METRIC: score}, force=True)
        previous, self._record = self._record, rec
        log.info("best checkpoint: step %d, score %.4f (was %s); saving to %s", step, score,
                 "none" if previous is None else f"{previous['score']:.4f} at step "
                 f"{previous['step']}", self.directory)
        return True

    def restore(self, abstract_params: Any) -> tuple[Any, dict] | None:
        """(params, record) of the best, onto the shardings of `abstract_params`; None if none."""
        self._manager.wait_until_finished()
        step = self._manager.best_step()
        if step is None:
            return None
        out = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), record=ocp.args.JsonRestore()))
        return out["params"], dict(out["record"])

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live pytree, the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
