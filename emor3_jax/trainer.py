"""The training loop: data, checkpoints, evaluation, metrics, preemption, profiling, export.

`Trainer` runs the phases of a run (a Cold-Start / baseline SFT, then RL) with one learner per
phase (emor3_jax/learners/: SFT, GRPO / EMO-R3, DAPO), which does the algorithm's step; the loop
does everything around it. `main.run` picks what a mode runs. One RL step of the default
learner:

    prompts (grain: each host's block, gathered) -> sampler: G responses per prompt (prefill once)
    -> rule rewards + reflective judge -> group advantages (-> DAPO resampling if enabled)
    -> reference log-probs (frozen initial policy) -> one update per mini-batch
    -> metrics (TensorBoard, JSONL, progress bar) -> eval / checkpoint on schedule

All I/O lives here; the stages are pure functions elsewhere. A checkpoint holds the train
state, what the phase's learner keeps beside it (GRPO: the reference params when they are not
the loaded weights), the base RNG key and the data iterator state, so a resumed run continues
exactly. SIGTERM (TPU preemption) saves a checkpoint and returns normally. Apart from the last
`train.keep_checkpoints` checkpoints, `checkpoints_best/` keeps the params of the RL evaluation
with the best validation score (mean in-domain accuracy, `evaluation.validation_score`), and the
report gives the final and the best checkpoint's numbers, each with its step.

Multi-host: every process runs this loop on the same global batch (each reads its block of
it; emor3_jax/distributed.py), so the host logic is replicated and device arrays are global.
All processes write their shards of a checkpoint; only process 0 writes metrics, the report and
the Hugging Face export.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time

import jax
import numpy as np

from emor3_jax import checkpoint as ckpt_lib
from emor3_jax import distributed, fileio, learners, metric_names as names
from emor3_jax import evaluation, metrics as metrics_lib, policy as policy_lib, report
from emor3_jax import provenance, sharding
from emor3_jax import recipe
from emor3_jax.data import pipeline as data_lib
from emor3_jax.rl import train_state as train_state_lib
from emor3_jax.sampling import Sampler

log = logging.getLogger(__name__)

TRAIN_SPLIT, EVAL_SPLIT = "train", "test"


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with a non-finite loss or gradient."""


def _count_nonfinite(bad_in_a_row: int, skipped: float, step: int, config, lr_field: str) -> int:
    """Consecutive skipped (non-finite) updates so far; NonFiniteError at
    `train.max_nonfinite_in_a_row` of them (0 = never halt, only skip and count)."""
    bad_in_a_row = bad_in_a_row + 1 if skipped else 0
    limit = int(config.train.max_nonfinite_in_a_row)
    if limit and bad_in_a_row >= limit:
        raise NonFiniteError(
            f"{bad_in_a_row} consecutive updates had a non-finite loss or gradient (last at "
            f"step {step}); each was skipped (metric '{names.SKIPPED}'). Lower "
            f"config.{lr_field}, check "
            "the data or use float32 params (config.model.param_dtype); "
            "config.train.max_nonfinite_in_a_row sets how many in a row halt the run")
    return bad_in_a_row


# --------------------------------------------------------------------------------------------
# Checks that run before anything is compiled or loaded.

def check_config(config, num_devices: int | None = None, process_count: int | None = None
                 ) -> None:
    """Raise a ValueError that says what to change, before any compile or load: the run's
    fields here, each learner's own in its `check_config`."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    m = config.mesh
    data, fsdp, _ = sharding.mesh_shape(m.data, m.fsdp, m.tensor, num_devices)
    dp = data * fsdp
    policy_lib.sampling_mesh_shape(config, num_devices)     # a rollout.mesh that fits
    if config.mode not in ("train", "sft", "eval", "export"):
        raise ValueError(f"config.mode={config.mode!r}; choose train, sft, eval or export")
    policy_lib.check_model_config(config.model)
    if config.mode == "train":
        learners.learner_class(config, "rl").check_config(config, data_parallel=dp,
                                                          process_count=process_count)
    if config.data.prompt_format not in recipe.PROMPT_FORMATS:
        raise ValueError(f"config.data.prompt_format={config.data.prompt_format!r}; choose one "
                         f"of {tuple(recipe.PROMPT_FORMATS)}")
    for name in [config.data.train, *config.data.eval]:
        if name not in recipe.LABELS:
            raise ValueError(f"data set {name!r} is unknown; choose from {tuple(recipe.LABELS)}")
    for name in config.data.get("labels", {}):
        data_lib.source_config(config, name)        # a bad label-list override fails here
    if config.eval.batch_size % process_count:
        raise ValueError(f"config.eval.batch_size={config.eval.batch_size} is not divisible by "
                         f"the {process_count} hosts")
    if config.sft.steps:
        learners.learner_class(config, "sft").check_config(config, data_parallel=dp,
                                                           process_count=process_count)


def phases(config) -> tuple[str, ...]:
    """The training phases of a run, in order: mode sft: ("sft",); mode train: ("sft", "rl")
    with a Cold-Start SFT (sft.steps > 0), else ("rl",)."""
    if config.mode == "sft":
        return ("sft",)
    return (("sft",) if config.sft.steps else ()) + ("rl",)


# --------------------------------------------------------------------------------------------
def _stop_requested() -> bool:
    # all hosts together (a host that saw SIGTERM alone would save while others step)
    return distributed.any_process(_SIGNAL["term"])


_SIGNAL = {"term": False}
_LAST_TRACE_STOP: dict[str, int] = {}   # profile dir -> second its last trace stopped


@contextlib.contextmanager
def profiled(steps, workdir: str, step: int):
    """A jax.profiler trace of this step into <workdir>/profile if it is one of `steps`
    (config.profile.steps), stopped even when the step fails."""
    if step not in tuple(steps):
        yield
        return
    path = fileio.join(workdir, "profile")
    jax.profiler.start_trace(path)
    try:
        yield
    finally:
        # A trace lands in plugins/profile/<the second stop_trace ran>: a second trace
        # stopped within the same second would overwrite the previous one.
        while int(time.time()) <= _LAST_TRACE_STOP.get(path, -1):
            time.sleep(0.05)
        jax.profiler.stop_trace()
        _LAST_TRACE_STOP[path] = int(time.time())
        log.info("profile: step %d traced into %s", step, path)


@contextlib.contextmanager
def sigterm_saves():
    """Turn SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""
    def handler(signum, frame):
        log.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
        _SIGNAL["term"] = True
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:      # not the main thread (e.g. a notebook worker): no handler
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _SIGNAL["term"] = False


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint as the loop reads it."""
    state: train_state_lib.TrainState
    saved: dict             # what the phase's learner keeps beside the state (Learner.saved)
    phase: str              # "sft" | "rl"
    step: int               # steps of `phase` done
    data: dict | None       # the data iterator's state
    history: list           # evaluations so far (the report's)


class Trainer:
    """The loop of one run: mesh, policy, sampler, data, checkpoints, evaluation, metrics,
    report and export; each training phase's step is its learner's (emor3_jax/learners/)."""

    def __init__(self, config, workdir: str):
        check_config(config)
        policy_lib.check_update_precision(config)
        self.config = config
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        provenance.check_resume(workdir, config)   # before anything is built
        if self.is_main:
            provenance.record(workdir, config)
        self.mesh = sharding.mesh_from_config(config.mesh)
        self.base_key = jax.random.key(config.seed)
        self.policy = policy_lib.build_policy(config.model, self.mesh,
                                              jax.random.fold_in(self.base_key, 0))
        self.model = self.policy.model
        self.sample_mesh = policy_lib.sampling_mesh(config, self.mesh)
        self.sampler = Sampler(self.model, mesh=self.sample_mesh,
                               buckets=learners.grpo.rollout_buckets(config),
                               chunk_size=config.rollout.chunk_size or None)
        self.learner_context = learners.Context(config=config, mesh=self.mesh,
                                                policy=self.policy, sampler=self.sampler,
                                                base_key=self.base_key,
                                                sample_mesh=self.sample_mesh)
        self.ckpt = ckpt_lib.Checkpointer(fileio.join(workdir, "checkpoints"),
                                          keep=config.train.keep_checkpoints)
        # the best RL evaluation's params, outside the rotation above (ckpt_lib.BestCheckpointer)
        self.best = ckpt_lib.BestCheckpointer(fileio.join(workdir, "checkpoints_best"))
        self.val_sets = evaluation.validation_sets(
            config.data.in_domain, config.data.eval, config.data.train
        ) if config.mode == "train" else ()
        self.pipe_kwargs = dict(data_dir=config.data.data_dir or None,
                                manual_dir=config.data.manual_dir or None)
        self.history: list[dict] = []

    def close(self) -> None:
        self.ckpt.close()     # waits for the last asynchronous save
        self.best.close()

    # ---------------------------------------------------------------------------- data --
    def _batches(self, phase: str, data_state=None):
        """The global batches a phase trains on (SFT: sft.data at sft.batch_size; RL: the
        training set at the generation batch size), from `data_state` if given."""
        pipe = (self._sft_pipeline() if phase == "sft" else
                self._pipeline(self.config.data.train, TRAIN_SPLIT, eval_mode=False))
        it = pipe.global_iter()
        if data_state is not None:
            it.set_state(data_state)
        return it

    def _pipeline(self, name: str, split: str, *, eval_mode: bool):
        cfg = data_lib.from_config(self.config, eval_mode=eval_mode)
        return data_lib.make_pipeline(name, split, self.policy.tokenizer, cfg,
                                      **self._source_kwargs(name))

    def _sft_pipeline(self):
        cfg = data_lib.from_config(self.config, eval_mode=False)
        cfg = dataclasses.replace(cfg, batch_size=self.config.sft.batch_size
                                  // jax.process_count())
        name = self.config.sft.data or self.config.data.train
        return data_lib.make_pipeline(name, TRAIN_SPLIT, self.policy.tokenizer, cfg,
                                      **self._source_kwargs(name))

    # ---------------------------------------------------------------------------- eval --
    def evaluate(self, params, step: int, writer=None) -> dict[str, dict]:
        """Accuracy on each `data.eval` set (validation: no judge)."""
        params = policy_lib.sampling_params(self.model, params, self.sample_mesh)
        c = self.config
        settings = evaluation.sampling_settings(c.eval, self.policy.ids)
        results, samples = {}, []
        for name in c.data.eval:
            pipe = self._pipeline(name, EVAL_SPLIT, eval_mode=True)

            key = jax.random.fold_in(jax.random.fold_in(self.base_key, 7), step + 1)  # final: -1
            results[name] = evaluation.evaluate_dataset(
                lambda batch, rng: self.sampler.generate(params, batch, settings, rng),
                pipe.global_iter(), self.policy.tokenizer, preset=c.reward.preset, rng=key,
                max_examples=c.eval.max_examples, samples=samples if not samples else None)
            log.info("eval step %d %s: accuracy %.4f format %.3f (%d examples)", step, name,
                     results[name]["accuracy"], results[name]["format"],
                     results[name]["examples"])
        if writer is not None:
            writer.write(step, names.evaluation(results), prefix=names.EVAL_PREFIX)
        if samples and self.is_main:
            log.info("eval sample (label %s): %s", samples[0]["label"], samples[0]["response"])
        return results

    # ------------------------------------------------------------------------ checkpoints --
    def track_best(self, step: int, results: dict[str, dict], params) -> bool:
        """Keep `params` in checkpoints_best/ if this RL evaluation has the best validation
        score so far (mean accuracy on `self.val_sets`, evaluation.validation_score says why
        accuracy), with its step, score and every eval set's accuracy; True if it did."""
        acc = {k: float(v["accuracy"]) for k, v in results.items()}
        score = evaluation.validation_score(acc, self.val_sets)
        return self.best.offer(step, score, params,
                               {"score_sets": list(self.val_sets), "accuracy": acc})

    def save(self, step: int, phase: str, state, saved: dict, it, *, force: bool = True):
        """Checkpoint `state` and what the learner keeps beside it (`saved`, its `saved()`)."""
        # numpy, not a host-local jax.Array: orbax refuses those with several processes
        tree = {"train": state, "rng": np.asarray(jax.random.key_data(self.base_key)), **saved}
        extra = {"phase": phase, "step": int(step), "data": it.get_state() if it else None,
                 "history": self.history}
        self.ckpt.save(self._ckpt_index(phase, step), tree, extra, force=force)

    def _ckpt_index(self, phase: str, step: int) -> int:
        """One increasing index over both phases (SFT steps first, then RL steps)."""
        return step if phase == "sft" else self.config.sft.steps + step

    def _init_state(self, learner_cls, params):
        return train_state_lib.init_train_state(self.model, params,
                                           learner_cls.make_optimizer(self.config), self.mesh)

    def restore(self, learner_cls, state):
        """The latest checkpoint, restored onto `state`'s shapes and shardings (a checkpoint of
        `learner_cls`'s phase): a `Restored`."""
        tree = {"train": state, "rng": np.asarray(jax.random.key_data(self.base_key)),
                **learner_cls.saved_like(self.config, state.params)}
        restored, extra = self.ckpt.restore(ckpt_lib.abstract_like(tree))
        if not np.array_equal(np.asarray(restored["rng"]), tree["rng"]):
            # the data order and every sample follow the seed: no exact resume with another
            raise ValueError(f"{self.ckpt.directory} was written by a run with another "
                             f"config.seed than {self.config.seed}; resume with that run's seed "
                             "or start afresh with a new --workdir")
        return Restored(state=restored["train"],
                        saved={k: v for k, v in restored.items() if k not in ("train", "rng")},
                        phase=extra["phase"], step=int(extra["step"]), data=extra.get("data"),
                        history=list(extra.get("history") or []))

    def latest_params(self):
        """The params of the latest checkpoint (either phase); the loaded weights without one."""
        extra = self.ckpt.read_extra()
        if extra is None:
            return self.policy.params
        cls = learners.learner_class(self.config, extra["phase"])
        return self.restore(cls, self._init_state(cls, self.policy.params)).state.params

    # ------------------------------------------------------------------------------ run --
    def train(self, run_phases: tuple[str, ...]):
        """Run `run_phases` (see `phases`) from the latest checkpoint, if any; returns (state,
        step) of the last phase's end, or None if SIGTERM stopped the run (after saving)."""
        c = self.config
        steps = {p: self._phase_steps(p) for p in run_phases}
        m = c.metrics
        writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_main,
                                          total_steps=sum(steps.values()),
                                          backends=tuple(m.backends),
                                          wandb_settings=dict(project=m.wandb_project,
                                                              entity=m.wandb_entity,
                                                              name=m.wandb_name))
        writer.hparams(provenance.flat_config(c))
        latest = self.ckpt.read_extra()
        if latest is not None and latest["phase"] not in run_phases:
            raise ValueError(f"{self.ckpt.directory} holds a checkpoint of the {latest['phase']} "
                             f"phase; config.mode={c.mode!r} runs {run_phases} (resume with the "
                             "run's mode, or start afresh with a new --workdir)")
        first = run_phases.index(latest["phase"]) if latest is not None else 0
        if latest is None:      # a run killed before its first checkpoint left rows to redo
            _drop_rows_after(writer, "sft", 0)
        params, state = self.policy.params, None
        for phase in run_phases[first:]:
            cls = learners.learner_class(c, phase)
            # each phase starts from the last one's params with a fresh optimizer
            state = self._init_state(cls, params)
            start, saved, data_state = 0, None, None
            if latest is not None and phase == latest["phase"]:
                restored = self.restore(cls, state)
                state, saved, start = restored.state, restored.saved, restored.step
                data_state, self.history = restored.data, restored.history
                log.info("resumed: phase %s step %d", phase, start)
                _drop_rows_after(writer, phase, start)
            # what the phase started from: this state at step 0; in a resumed phase that holds
            # nothing about it (a checkpoint of an RL phase without SFT), the loaded weights
            learner = cls(self.learner_context, saved=saved,
                          start_params=state.params if start == 0 else self.policy.params)
            state, stopped = self._run_phase(learner, state, start, steps[phase],
                                             self._batches(phase, data_state), writer)
            if stopped:
                self.ckpt.wait()
                self.best.wait()
                writer.close()
                return None
            params = state.params
        writer.close()
        return state, steps[run_phases[-1]]

    def _run_phase(self, learner, state, start: int, total: int, it, writer):
        """Steps `start` .. `total` of `learner`'s phase; returns (state, stopped by SIGTERM).
        The RL phase is also evaluated (at its start, every train.eval_every steps and at its
        end), profiled (profile.steps) and checkpointed at its end."""
        c = self.config
        phase = learner.phase
        rl = phase == "rl"
        if rl and start == 0 and c.train.eval_every:
            # the starting point; not a best candidate (the best is a trained RL checkpoint)
            self.history.append({"step": 0, **self.evaluate(state.params, 0, writer)})
        bad_in_a_row = 0
        for step in range(start, total):
            t0, sent = time.time(), distributed.bytes_sent()
            with profiled(self.config.profile.steps, self.workdir, step) if rl else \
                    contextlib.nullcontext():
                batch = next(it)
                state, m = learner.step(state, batch, step, it)
            done = step + 1 == total
            if rl:
                m[names.TIME_STEP] = time.time() - t0
                m[names.DATA_SKIPPED] = float(sum(it.skip_counts().values()))
                # host-level traffic of the step, and the pixel bytes that stayed on this host
                m[names.HOST_BYTES_SENT] = float(distributed.bytes_sent() - sent)
                m[names.HOST_PIXEL_BYTES_KEPT] = float(getattr(it, "pixel_bytes_kept", 0))
            # SFT rows at the 0-based step, RL rows at the step they complete (MetricWriter.resume)
            writer.write(step if phase == "sft" else step + 1, m, prefix=learner.metric_prefix)
            writer.progress(self._ckpt_index(phase, step + 1), learner.progress(m))
            if step % max(1, c.train.log_every) == 0:
                log.debug("%s step %d: %s", phase, step, m)
            bad_in_a_row = _count_nonfinite(bad_in_a_row, m.get(names.SKIPPED, 0),
                                            step + 1, c, learner.lr_field)
            if rl and c.train.eval_every and ((step + 1) % c.train.eval_every == 0 or done):
                results = self.evaluate(state.params, step + 1, writer)
                self.history.append({"step": step + 1, **results})
                self.track_best(step + 1, results, state.params)
            stop = _stop_requested()     # read once: a signal between two reads loses the save
            if stop or (rl and done) or (step + 1) % c.train.checkpoint_every == 0:
                self.save(step + 1, phase, state, learner.saved(), it)
            if stop:
                log.warning("SIGTERM: stopped after %s step %d (checkpoint saved)",
                        phase.upper(), step + 1)
                return state, True
        return state, False

    def total_rl_steps(self) -> int:
        """`train.max_steps`, else `rl_steps_from_epochs` of the training split's size and
        `train.epochs` (0: the release's for this training set and method)."""
        c = self.config
        if c.train.max_steps:
            return int(c.train.max_steps)
        builder, _ = data_lib.open_source(c.data.train, TRAIN_SPLIT,
                                          **self._source_kwargs(c.data.train))
        n = builder.info.splits[TRAIN_SPLIT].num_examples
        mini = data_lib.generation_batch_size(c)   # DAPO draws whole mini batches (EasyR1)
        n = (n // mini) * mini
        epochs = c.train.epochs or recipe.released_epochs(c.data.train, c.method)
        return rl_steps_from_epochs(n, c.rollout.batch_size, epochs, c.data.train)

    def _phase_steps(self, phase: str) -> int:
        return int(self.config.sft.steps) if phase == "sft" else self.total_rl_steps()

    def _source_kwargs(self, name: str) -> dict:
        """data_dir / manual_dir, and the data set's label-list override if the config has one."""
        config = data_lib.source_config(self.config, name)
        return self.pipe_kwargs if config is None else {**self.pipe_kwargs, "config": config}

    # -------------------------------------------------------------------------- finish --
    def finish(self, params, *, method: str, step: int | None = None):
        """Final evaluation of `params` (the final checkpoint, at `step`; None: the loaded
        weights), report (results + curves) and Hugging Face export of them. After training the
        report also holds the best checkpoint (checkpoints_best/) with its step, score and
        accuracies, from the evaluation that made it the best."""
        c = self.config
        last = self.history[-1] if self.history else {}
        if step is not None and last.get("step") == step and c.mode == "train":
            # the loop has just evaluated these very params: not run twice
            results = {k: v for k, v in last.items() if k != "step"}
        else:
            results = self.evaluate(params, -1)
        acc = {k: v["accuracy"] for k, v in results.items()}
        best = self.best.record if c.mode == "train" else None
        if self.is_main:
            report_dir = fileio.join(self.workdir, "report")
            out = report.write_report(report_dir, acc, train_set=c.data.train, method=method,
                                      step=step, best=best,
                                      extra={"eval": results, "history": self.history})
            rows = metrics_lib.read_jsonl(fileio.join(self.workdir, "metrics.jsonl"))
            report.plot_curves(rows, fileio.join(report_dir, "curves.png"))
            print(fileio.read_text(fileio.join(report_dir, "results.md")))
        else:
            out = None
        self.export(params)
        return out

    def export(self, params):
        from emor3_jax.models import qwen2_5_vl
        out_dir = fileio.join(self.workdir, "export")
        qwen2_5_vl.save_hf(params, self.model.config, out_dir,   # every process (gathers)
                           tokenizer=self.policy.tokenizer, min_pixels=self.config.data.min_pixels,
                           max_pixels=self.config.data.max_pixels)
        if self.is_main:
            log.info("export: Hugging Face checkpoint written to %s", out_dir)
            best = self.best.record
            if best is not None:
                log.info("export: these are the final params; the best validation checkpoint "
                         "(RL step %d, score %.4f on %s) is kept in %s", best["step"],
                         best["score"], "+".join(best.get("score_sets", [])),
                         self.best.directory)
        return out_dir


def rl_steps_from_epochs(num_examples: int, batch_size: int, epochs, data_set: str = "") -> int:
    """RL steps of `epochs` passes, as released: full batches per epoch (the last partial batch
    of an epoch is dropped) times epochs; EmoSet-2k: 2,100 // 512 = 4 per epoch, 80 in 20."""
    per_epoch = int(num_examples) // int(batch_size)
    if per_epoch < 1:
        raise ValueError(
            f"the training set {data_set!r} has {num_examples} examples, fewer than one batch of "
            f"config.rollout.batch_size={batch_size} (an epoch's last partial batch is dropped, "
            "as released, so an epoch would have no step): lower config.rollout.batch_size (and "
            "config.rl.mini_batch_size with it), or set config.train.max_steps")
    steps = int(per_epoch * epochs)
    if steps < 1:
        raise ValueError(f"config.train.epochs={epochs} x {per_epoch} batches per epoch of "
                         f"{data_set!r} is less than one RL step; raise config.train.epochs or "
                         "set config.train.max_steps")
    return steps


# --------------------------------------------------------------------------------------------
def compile_cache_dir(config, workdir: str) -> str | None:
    """Where XLA executables persist across runs: config.compile_cache_dir, "" = the
    JAX_COMPILATION_CACHE_DIR environment variable if set, else `jax_cache` beside the
    workdir (a resumed spot run then loads its programs instead of compiling them for
    minutes); "none" = off."""
    choice = config.get("compile_cache_dir", "")
    if choice == "none":
        return None
    if choice:
        return choice
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or fileio.join(
        os.fspath(fileio.path(workdir).parent), "jax_cache")


def use_compile_cache(config, workdir: str) -> None:
    """Turn on the persistent compilation cache. Several CPU processes get their own folder in
    it, named by the process count: jax's CPU cache key names devices by id only, so a
    one-process run's program over devices 0-3 and a two-process one's share a key. Two
    processes reading the shared folder hung in their first cross-process collective (jax
    0.10); in their own folder a resumed two-process run loads its programs and runs
    (tests/test_multihost.py)."""
    path = compile_cache_dir(config, workdir)
    if path is None:
        return
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        path = fileio.join(path, f"cpu-{jax.process_count()}-processes")
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    log.info("compilation cache: %s", path)


def _drop_rows_after(writer, phase: str, step: int) -> None:
    dropped = writer.resume(phase, step)
    if dropped:
        log.info("metrics: dropped %d row(s) logged after the checkpoint (%s step %d); the "
                 "resumed run writes those steps again", dropped, phase, step)
