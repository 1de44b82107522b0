"""Fault tolerance of the trainer, end to end through `python -m emor3_jax.main`.

A run of the CPU demo config, shrunk to seconds (tiny model, 2 SFT steps, 4 GRPO steps of 2
prompts x G=2, 8-token responses), is
  1. run uninterrupted;
  2. run again, in a gs:// workdir on a real GCS JSON API (gcp-storage-emulator), killed with
     SIGKILL as soon as its end-of-SFT checkpoint exists, resumed with the same command (so
     the resume crosses the SFT -> RL boundary), sent SIGTERM after its first RL step (it must
     save the step it reached and exit 0), and resumed to the end;
and the final parameters, optimizer state, metrics, evaluation history and Hugging Face export
of 2, read back from the bucket, must equal those of 1 exactly (a deterministic program on
CPU); run 2 writes nothing to the local disk outside the data and compilation caches. Also: config errors are
reported before anything is compiled, a resume with another seed is refused, and K
non-finite updates in a row (a model loaded from an export with a NaN weight) are skipped,
counted and halt the run.

All runs read one frozen copy of configs/demo_cpu.py (the demo gets tuned; a change between
two runs of this module must not look like a resume bug), with the overrides below pinning the
learning rates. The children share a persistent XLA compilation cache (only the first run
compiles) and run on 1 CPU device, as the demo does on a laptop, not on the 8 virtual devices of this process: with
2 virtual devices on 2 busy cores, XLA:CPU's thunk executor can start two independent
collectives of one program in different orders on the two devices and deadlock (rendezvous
timeout, abort) -- an XLA:CPU scheduling issue, not the trainer's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from emor3_jax import fileio, metric_names as names, trainer
from emor3_jax.configs import demo_cpu

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.py"
CHILD_DEVICES = 1
SFT_STEPS, RL_STEPS, KEEP = 2, 4, 3

# The cheapest complete cold_start run of the demo config (all fields exist in configs/base.py).
TINY_RUN = {
    "model.tiny": "tiny", "optim.lr": 1e-3, "sft.lr": 2e-3,
    "sft.steps": SFT_STEPS, "sft.batch_size": 4,
    "train.max_steps": RL_STEPS, "train.eval_every": 2, "train.checkpoint_every": 1,
    "train.keep_checkpoints": KEEP,
    "rollout.batch_size": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 8,
    "rollout.response_buckets": "(8,)",
    "rl.mini_batch_size": 2, "rl.micro_batch_size": 2, "rl.logprob_micro_batch_size": 1,
    "eval.max_new_tokens": 8, "eval.max_examples": 2, "eval.batch_size": 2,
    "reward.preset": "set_only", "data.min_pixels": 56 * 56, "data.max_pixels": 56 * 56,
}
# A bucket on the emulator (served by this process) is listed twice a second, not 50 times:
# an RL step takes seconds, so a kill or SIGTERM still lands before the next checkpoint.
POLL_GCS = 0.5
# Wall-clock metrics differ between runs; everything else must not.
_TIMING = ("time", "per_s")


# --------------------------------------------------------------------------------- helpers --
@dataclasses.dataclass(frozen=True)
class Child:
    """How this module starts `python -m emor3_jax.main`: config file, environment, working
    directory and where the logs of runs in a gs:// workdir go."""
    config: Path
    env: dict
    cwd: Path = REPO
    logs: Path | None = None


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Child:
    """A frozen copy of the demo config; 1 CPU device and a shared compilation cache."""
    config = tmp_path_factory.mktemp("config") / "demo_cpu.py"
    config.write_text(DEMO.read_text())
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [
        f"--xla_force_host_platform_device_count={CHILD_DEVICES}"])
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return Child(config, env)


def _start(child: Child, workdir: Path, log_name: str, **overrides
           ) -> tuple[subprocess.Popen, Path]:
    args = [sys.executable, "-m", "emor3_jax.main", f"--config={child.config}",
            f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in {**TINY_RUN, **overrides}.items()]
    logs = child.logs if fileio.is_remote(workdir) else workdir.parent
    log_path = logs / f"{workdir.name}.{log_name}.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen(args, cwd=child.cwd, env=child.env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    log_file.close()
    return proc, log_path


def _tail(log_path: Path, n: int = 4000) -> str:
    return log_path.read_text()[-n:]


def _wait(proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the training process ran over {timeout}s:\n{_tail(log_path)}")


def _run(child: Child, workdir: Path, log_name: str, **overrides) -> tuple[int, str]:
    proc, log_path = _start(child, workdir, log_name, **overrides)
    return _wait(proc, log_path), log_path.read_text()


def _poll(proc: subprocess.Popen, log_path: Path, ready, what: str, timeout: float = 300,
          every: float = 0.02):
    """Wait until `ready()` (checked `every` seconds) while the process still runs."""
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process exited (rc {proc.returncode}) before {what}:\n"
                        f"{_tail(log_path)}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"no {what} after {timeout}s:\n{_tail(log_path)}")
        time.sleep(every)


def _fresh(path) -> epath.Path:
    """The path, with gcsfs's cached listings forgotten when it is remote (another process
    writes there)."""
    if fileio.is_remote(path):
        from gcs_testutil import clear_filesystem_caches
        clear_filesystem_caches()
    return epath.Path(path)


def _committed_steps(root) -> list[int]:
    """Committed checkpoints: orbax renames `<step>.orbax-checkpoint-tmp*` to `<step>` on a
    local disk; on GCS (no atomic rename) it writes `<step>/commit_success.txt` last."""
    root = _fresh(root)
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (
        not fileio.is_remote(root) or (p / "commit_success.txt").exists()))


def _checkpoint_steps(workdir) -> list[int]:
    return _committed_steps(epath.Path(workdir) / "checkpoints")


def _metric_rows(workdir) -> list[dict]:
    path = _fresh(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_metrics(workdir: Path) -> dict:
    """{(kind, step): {name: value}}, the last value written for each (a resumed run rewrites
    the steps after its checkpoint), without wall-clock timings."""
    out: dict = {}
    for row in _metric_rows(workdir):
        step = row.pop("step")
        for k, v in row.items():
            if any(t in k for t in _TIMING):
                continue
            kind = k.split("/")[0] if k.split("/")[0] in ("sft", "eval") else "rl"
            out.setdefault((kind, step), {})[k] = v
    return out


def _best_steps(workdir) -> list[int]:
    return _committed_steps(epath.Path(workdir) / "checkpoints_best")


def _read_state(workdir, step: int, root: str = "checkpoints", item: str = "state") -> dict:
    """The saved train state pytree of checkpoint `step`, as numpy arrays (or, with
    root="checkpoints_best" and item="params", the best checkpoint's params)."""
    import jax
    import orbax.checkpoint as ocp
    path = epath.Path(workdir) / root / str(step) / item
    path = path if fileio.is_remote(path) else path.resolve()
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _export(workdir) -> dict:
    from safetensors.numpy import load
    return load((epath.Path(workdir) / "export" / "model.safetensors").read_bytes())


def _report(workdir) -> dict:
    return json.loads((epath.Path(workdir) / "report" / "results.json").read_text())


def _assert_trees_equal(a, b, what: str):
    import jax
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb], f"{what}: different pytree structure"
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _terminate_after_an_rl_step(child: Child, workdir: Path, **overrides) -> dict:
    """Start (or resume) a run, send SIGTERM as soon as it logs an RL step, wait for it."""
    lines = len(_metric_rows(workdir))
    proc, log = _start(child, workdir, "terminated", **overrides)
    _poll(proc, log, lambda: any("reward/mean" in r for r in _metric_rows(workdir)[lines:]),
          "an RL step", every=POLL_GCS if fileio.is_remote(workdir) else 0.02)
    proc.send_signal(signal.SIGTERM)
    return {"term_rc": _wait(proc, log), "term_log": log.read_text(),
            "after_term": _checkpoint_steps(workdir),
            "exported_after_term": (workdir / "export").exists(),
            "rl_rows_before_term": [r["step"] for r in _metric_rows(workdir)[lines:]
                                    if "reward/mean" in r]}


# ---------------------------------------------------------------------------------- runs --
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, child):
    workdir = tmp_path_factory.mktemp("faults") / "uninterrupted"
    rc, log = _run(child, workdir, "run")
    assert rc == 0, log[-4000:]
    return workdir


@pytest.fixture(scope="module")
def gcs_bucket():
    """gs://runs on an emulator that lives as long as this module's tests."""
    from gcs_testutil import gcs_emulator
    with gcs_emulator() as (_, make_bucket):
        yield make_bucket("runs")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, child, uninterrupted, gcs_bucket):
    """In gs://runs/interrupted: SIGKILL at the end-of-SFT checkpoint, resume + SIGTERM after
    an RL step, resume."""
    workdir = epath.Path(gcs_bucket) / "interrupted"
    cwd = tmp_path_factory.mktemp("cwd")
    env = {**child.env, **{k: os.environ[k] for k in (
        "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
        "GOOGLE_CLOUD_PROJECT")}}
    child = Child(child.config, env, cwd=cwd, logs=tmp_path_factory.mktemp("gcs_logs"))
    info: dict = {}

    # 1. SIGKILL as soon as the end-of-SFT checkpoint is committed.
    proc, log1 = _start(child, workdir, "killed")
    _poll(proc, log1, lambda: SFT_STEPS in _checkpoint_steps(workdir), "the SFT checkpoint",
          every=POLL_GCS)
    proc.send_signal(signal.SIGKILL)
    info["kill_rc"] = _wait(proc, log1)
    info["after_kill"] = _checkpoint_steps(workdir)

    # 2. Resume (same command, periodic checkpoints off); SIGTERM once an RL step is logged.
    info.update(_terminate_after_an_rl_step(child, workdir, **{"train.checkpoint_every": 1000}))

    # 3. Resume to the end.
    rc, info["final_log"] = _run(child, workdir, "resumed",
                                 **{"train.checkpoint_every": 1000})
    assert rc == 0, info["final_log"][-4000:]
    info["workdir"] = workdir
    info["local_files"] = list(cwd.iterdir())
    return info


# --------------------------------------------------------------------------------- tests --
def test_uninterrupted_run_keeps_last_checkpoints(uninterrupted):
    total = SFT_STEPS + RL_STEPS
    assert _checkpoint_steps(uninterrupted) == list(range(total - KEEP + 1, total + 1))
    metrics = _final_metrics(uninterrupted)
    assert sorted(s for k, s in metrics if k == "rl") == list(range(1, RL_STEPS + 1))
    assert all(metrics[("rl", s)][names.SKIPPED] == 0 for s in range(1, RL_STEPS + 1))
    assert (uninterrupted / "export" / "model.safetensors").exists()
    state = _read_state(uninterrupted, total)
    assert int(state["train"]["step"]) == RL_STEPS          # RL optimizer steps
    assert set(state) == {"train", "rng", "ref"}            # reference saved (SFT changed it)
    # the report: final numbers from the last step; the best RL evaluation (in-domain accuracy,
    # earliest on ties) with its step, kept in checkpoints_best/ with that step's params
    rep = _report(uninterrupted)
    assert rep["final"] == {"step": RL_STEPS, "accuracy": rep["accuracy"]}
    evals = {h["step"]: h["emo_synth"]["accuracy"] for h in rep["history"] if h["step"] > 0}
    best = max(evals, key=lambda s: (evals[s], -s))
    assert rep["best"] == {"step": best, "score": evals[best], "score_sets": ["emo_synth"],
                           "accuracy": {"emo_synth": evals[best]}}
    assert _best_steps(uninterrupted) == [best]
    _assert_trees_equal(_read_state(uninterrupted, best, "checkpoints_best", "params"),
                        _read_state(uninterrupted, SFT_STEPS + best)["train"]["params"],
                        "best params")
    md = (uninterrupted / "report" / "results.md").read_text()
    assert f"(final, step {RL_STEPS})" in md and f"(best, step {best})" in md


def test_sigkill_then_resume_crosses_the_sft_rl_boundary(interrupted):
    assert interrupted["kill_rc"] == -signal.SIGKILL
    assert max(interrupted["after_kill"]) == SFT_STEPS, interrupted["after_kill"]
    assert f"resumed: phase sft step {SFT_STEPS}" in interrupted["term_log"]


def test_sigterm_saves_the_step_reached_and_exits_zero(interrupted):
    log = interrupted["term_log"]
    assert interrupted["term_rc"] == 0, log[-4000:]
    reached = max(interrupted["rl_rows_before_term"])
    assert reached < RL_STEPS, "SIGTERM came too late to stop the run mid-way"
    assert f"SIGTERM: stopped after RL step {reached}" in log
    # periodic checkpoints were off: the one written is the SIGTERM save of the step reached
    assert max(interrupted["after_term"]) == SFT_STEPS + reached
    assert not interrupted["exported_after_term"]     # it stopped; no final eval / export
    assert f"resumed: phase rl step {reached}" in interrupted["final_log"]


def test_resumed_run_equals_uninterrupted_run(uninterrupted, interrupted):
    resumed = interrupted["workdir"]
    total = SFT_STEPS + RL_STEPS
    # metrics of every step (SFT, RL, evaluations)
    want, got = _final_metrics(uninterrupted), _final_metrics(resumed)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], f"metrics of {key} differ"
    # ... each row exactly once, in order: rows after a checkpoint are dropped on resume
    untimed = lambda w: [{k: v for k, v in r.items() if not any(t in k for t in _TIMING)}  # noqa
                         for r in _metric_rows(w)]
    assert untimed(resumed) == untimed(uninterrupted)
    # the run's config and provenance are recorded
    recorded = json.loads((resumed / "run" / "config.json").read_text())
    assert recorded["train.max_steps"] == RL_STEPS and recorded["method"] == "cold_start"
    assert "git_revision" in json.loads((resumed / "run" / "provenance.json").read_text())
    # the whole train state: params, optimizer moments and counts, step, reference, RNG
    _assert_trees_equal(_read_state(resumed, total), _read_state(uninterrupted, total),
                        "checkpoint")
    # the Hugging Face export and the report (final evaluation + history across the restarts)
    _assert_trees_equal(_export(resumed), _export(uninterrupted), "export")
    assert _report(resumed) == _report(uninterrupted)
    assert [h["step"] for h in _report(resumed)["history"]] == [0, 2, 4]
    # the final evaluation is the loop's step-4 one, not a second run over the eval set
    last = _report(resumed)["history"][-1]
    assert _report(resumed)["eval"] == {k: v for k, v in last.items() if k != "step"}
    assert _best_steps(resumed) == _best_steps(uninterrupted)      # best record: in the report


def test_a_gs_workdir_holds_everything_the_run_writes(interrupted):
    """Checkpoints (orbax/tensorstore), metrics, TensorBoard, run record, report and export all
    land in the bucket; nothing is written to the local disk outside the data and compilation
    caches."""
    names = fileio.walk_files(interrupted["workdir"])
    for want in ("/report/results.json", "/report/curves.png", "/export/model.safetensors",
                 "/export/config.json", "/export/preprocessor_config.json",
                 "/run/config.json", "/run/provenance.json", "/metrics.jsonl"):
        assert any(n.endswith(want) for n in names), (want, names)
    assert sum("/tensorboard/events" in n for n in names) == 3      # one per run
    assert any(f"/checkpoints/{SFT_STEPS + RL_STEPS}/" in n for n in names)
    assert interrupted["local_files"] == []


@pytest.mark.slow
def test_resume_without_sft_keeps_the_loaded_weights_as_reference(tmp_path, child):
    """No SFT: the KL reference (not checkpointed) is the loaded policy, also after a resume."""
    over = {"sft.steps": 0, "train.checkpoint_every": 1000, "train.eval_every": 0}
    rc, log = _run(child, tmp_path / "a", "run", **over)
    assert rc == 0, log[-4000:]
    info = _terminate_after_an_rl_step(child, tmp_path / "b", **over)
    assert info["term_rc"] == 0 and max(info["rl_rows_before_term"]) < RL_STEPS
    rc, log = _run(child, tmp_path / "b", "resumed", **over)
    assert rc == 0, log[-4000:]
    assert _final_metrics(tmp_path / "b") == _final_metrics(tmp_path / "a")


def test_resume_with_another_recipe_is_refused_before_anything_is_built(tmp_path, child,
                                                                        uninterrupted):
    workdir = tmp_path / "copy"
    shutil.copytree(uninterrupted, workdir)
    rc, log = _run(child, workdir, "other_seed", seed=1, **{"rl.kl_coef": 0.02})
    assert rc != 0
    assert "holds a run with another config (rl.kl_coef: 0.1 -> 0.02; seed: 0 -> 1)" in log, \
        log[-3000:]
    assert "policy:" not in log


def test_resume_check_allows_cadence_and_split_changes(tmp_path):
    from emor3_jax import provenance
    c = _demo_config()
    provenance.record(str(tmp_path), c)
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    c.train.eval_every, c.rl.micro_batch_size, c.data.manual_dir = 7, 1, "/elsewhere"
    assert provenance.check_resume(str(tmp_path), c) == [
        "data.manual_dir", "rl.micro_batch_size", "train.eval_every"]
    c.data.labels.webemo = ("joy", "sadness")
    with pytest.raises(ValueError, match=r"data.labels.webemo: \[\] -> \['joy', 'sadness'\]"):
        provenance.check_resume(str(tmp_path), c)


# ------------------------------------------------------------------------- config errors --
# A valid training config on 2 devices (set here, not taken from the demo, which gets tuned).
VALID_ON_2 = {"rollout.batch_size": 4, "rollout.group_size": 2, "rl.mini_batch_size": 2,
              "rl.micro_batch_size": 2, "sft.steps": 2, "sft.batch_size": 4,
              "rollout.max_new_tokens": 48, "rollout.response_buckets": (48, 64),
              "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1, "reward.preset": "emor3"}


def _demo_config(**fields):
    c = demo_cpu.get_config()
    for path, value in {**VALID_ON_2, **fields}.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return c


@pytest.mark.parametrize("fields, error, words", [
    ({"mesh.data": 3, "mesh.fsdp": 1}, ValueError, ["config.mesh", "data*fsdp*tensor = 2"]),
    ({"mesh.fsdp": 4}, ValueError, ["fsdp=4", "2 devices"]),
    ({"rollout.mesh.tensor": 4}, ValueError, ["config.rollout.mesh", "2 devices"]),
    ({"rollout.batch_size": 3}, ValueError,
     ["config.rollout.batch_size=3", "config.rl.mini_batch_size=2"]),
    ({"rl.micro_batch_size": 3}, ValueError, ["rl.micro_batch_size=3", "change rl."]),
    ({"sft.batch_size": 6}, ValueError, ["config.sft.batch_size=6", "micro-batches"]),
    ({"rollout.group_size": 3, "rl.micro_batch_size": 3, "rl.logprob_micro_batch_size": 2},
     ValueError, ["rl.logprob_micro_batch_size=2", "6 responses"]),
    ({"rollout.group_size": 1}, ValueError, ["config.rollout.group_size=1"]),
    ({"optim.schedule": "linear"}, ValueError, ["config.optim.schedule='linear'", "cosine"]),
    ({"optim.schedule": "cosine", "optim.decay_steps": 0}, ValueError,
     ["config.optim.decay_steps=0", "updates per rollout"]),
    ({"optim.min_lr_ratio": -0.5}, ValueError, ["config.optim.min_lr_ratio=-0.5", "[0, 1]"]),
    ({"rollout.max_new_tokens": 100}, ValueError, ["config.rollout.max_new_tokens=100", "bucket"]),
    ({"model.hf_dir": "/nonexistent/qwen"}, FileNotFoundError,
     ["config.model.hf_dir='/nonexistent/qwen'", "config.json"]),
    ({"model.tiny": ""}, ValueError, ["config.model", "hf_dir"]),
    ({"reward.preset": "emor4"}, ValueError, ["config.reward.preset='emor4'", "set_only"]),
    ({"rollout.decode_window": -512}, ValueError, ["config.rollout.decode_window=-512",
                                                   "non-negative"]),
    ({"reward.judge_shared_suffix_max": -1}, ValueError,
     ["config.reward.judge_shared_suffix_max=-1", "non-negative"]),
    ({"reward.judge_source": "checkpoint"}, ValueError, ["config.reward.judge_dir"]),
    ({"data.train": "emoset3k"}, ValueError, ["'emoset3k'", "emoset2k"]),
    ({"data.prompt_format": "cot"}, ValueError, ["config.data.prompt_format='cot'"]),
    ({"mode": "serve"}, ValueError, ["config.mode='serve'"]),
    ({"rl.learner": "dapo", "rollout.filter_low": 0.5, "rollout.filter_high": 0.5},
     ValueError, ["config.rollout.filter_low=0.5", "filter_low < filter_high"]),
    ({"data.labels.webemo": ("joy",)}, ValueError, ["two distinct", "config.data.labels"]),
])
def test_check_config_names_the_field_and_the_fix(fields, error, words):
    with pytest.raises(error) as e:
        trainer.check_config(_demo_config(**fields), num_devices=2, process_count=1)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_check_config_counts_hosts():
    with pytest.raises(ValueError, match="rollout.batch_size=4 is not divisible by the 3 hosts"):
        trainer.check_config(_demo_config(), num_devices=6, process_count=3)
    trainer.check_config(_demo_config(), num_devices=2, process_count=1)   # valid otherwise


def test_rl_steps_drop_the_last_partial_batch_of_each_epoch():
    # EmoSet-2k as released: 2,100 // 512 = 4 batches per epoch, x 20 epochs = 80 (not 83)
    assert trainer.rl_steps_from_epochs(2100, 512, 20, "emoset2k") == 80
    assert trainer.rl_steps_from_epochs(2048, 512, 20) == 80        # no partial batch
    assert trainer.rl_steps_from_epochs(40, 32, 3) == 3
    with pytest.raises(ValueError) as e:
        trainer.rl_steps_from_epochs(300, 512, 20, "emotion6")
    for w in ("'emotion6' has 300 examples", "config.rollout.batch_size=512",
              "lower config.rollout.batch_size", "config.train.max_steps"):
        assert w in str(e.value), (w, str(e.value))
    with pytest.raises(ValueError, match="config.train.epochs=0"):
        trainer.rl_steps_from_epochs(2100, 512, 0)


def test_epochs_default_to_the_releases_for_the_training_set_and_method():
    """train.epochs = 0 (the default): EmoSet-2k 20 for every method; Emotion6 (setting B)
    30 for EMO-R3 and its Cold-Start variant, 25 for GRPO and DAPO, as the release's scripts."""
    from emor3_jax.configs import base
    assert base.get_config().train.epochs == 0
    want = {("emoset2k", m): 20 for m in base.METHODS}
    want.update({("emotion6", "emor3"): 30, ("emotion6", "cold_start"): 30,
                 ("emotion6", "grpo"): 25, ("emotion6", "dapo"): 25, ("webemo", "emor3"): 20})
    assert {k: base.released_epochs(*k) for k in want} == want


# ------------------------------------------------------------------------------------ DAPO --
# Dynamic sampling from mini rollout batches of 1 prompt, no KL, clip-high 0.28: each try keeps
# its group or drops it by the group's mean reward. The untrained tiny model earns reward 0, so
# a band around 0 keeps every group (2 tries fill the batch of 2) and the released band
# (0.01, 0.99) keeps none (the run stops after max_resample_tries, saying why).
DAPO = {"sft.steps": 0, "train.max_steps": 2, "train.eval_every": 0,
        "train.checkpoint_every": 1000, "rl.learner": "dapo",
        "rollout.mini_batch_size": 1, "rl.kl_coef": 0.0, "rl.clip_high": 0.28}


def test_dapo_fills_the_batch_from_mini_rollout_batches(tmp_path, child):
    rc, log = _run(child, tmp_path / "dapo", "dapo", **DAPO, **{"rollout.filter_low": -1.0})
    assert rc == 0, log[-4000:]
    rows = _final_metrics(tmp_path / "dapo")
    for step in (1, 2):
        m = rows[("rl", step)]
        assert m["dapo/tries"] == 2 and m["dapo/dropped_groups"] == 0, m
        assert m["reward/mean"] == 0, m
    rc, log = _run(child, tmp_path / "band", "band", **DAPO, **{"rollout.max_resample_tries": 3})
    assert rc != 0
    assert "after 3 tries only 0 of 2 prompts had a mean reward strictly inside (0.01, 0.99)" \
        in log, log[-4000:]


def test_config_error_stops_main_before_anything_is_built(tmp_path, child):
    t0 = time.time()
    rc, log = _run(child, tmp_path / "w", "bad_mesh", **{"mesh.data": 3, "mesh.fsdp": 1})
    assert rc == 2
    assert f"set config.mesh so data*fsdp*tensor = {CHILD_DEVICES}" in log, log[-3000:]
    assert "policy:" not in log                 # no model was built, nothing compiled
    assert time.time() - t0 < 60
    # the message alone, as the last lines; the traceback only when asked for
    assert "Traceback" not in log and log.rstrip().splitlines()[-2].startswith("error: mesh:")
    traced = dict(child.env, EMOR3_TRACEBACK="1")
    rc, log = _run(Child(child.config, traced), tmp_path / "w", "bad_mesh_traced",
                   **{"mesh.data": 3, "mesh.fsdp": 1})
    assert rc != 0 and "Traceback" in log and "data*fsdp*tensor" in log


def test_a_cpu_host_runs_without_probing_for_a_tpu(tmp_path, child):
    """With libtpu installed (the test extra) and no JAX_PLATFORMS, a host without TPU chips
    starts on the CPU without libtpu's warnings; a TPU config there says how to check it."""
    env = {k: v for k, v in child.env.items() if k != "JAX_PLATFORMS"}
    args = [sys.executable, "-m", "emor3_jax.main", f"--config={REPO / 'configs/tpu_v4.py'}",
            f"--workdir={tmp_path / 'w'}"]
    run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert "TPU" not in out.split("error:")[0], out           # nothing from libtpu before it
    assert "this config is for TPU v4:2x2x1" in out
    assert "python -m emor3_jax.aot --config=" in out and "Traceback" not in out


# ------------------------------------------------------------------------------- non-finite --
def test_nonfinite_counter_resets_and_zero_never_halts():
    c = _demo_config(**{"train.max_nonfinite_in_a_row": 3})
    bad = 0
    for step, skipped in enumerate([1, 1, 0, 1, 1], 1):
        bad = trainer._count_nonfinite(bad, skipped, step, c, "optim.lr")
    assert bad == 2
    with pytest.raises(trainer.NonFiniteError, match="3 consecutive updates .* step 6"):
        trainer._count_nonfinite(bad, 1.0, 6, c, "optim.lr")
    c.train.max_nonfinite_in_a_row = 0
    assert trainer._count_nonfinite(99, 1.0, 100, c, "optim.lr") == 100

@pytest.fixture(scope="module")
def nan_hf_dir(tmp_path_factory, uninterrupted) -> Path:
    """The uninterrupted run's Hugging Face export with a NaN final norm weight: every logit,
    loss and gradient of a model loaded from it is NaN (same programs: the compile cache hits)."""
    from safetensors.numpy import load_file, save_file
    out = tmp_path_factory.mktemp("nan_hf") / "model"
    shutil.copytree(uninterrupted / "export", out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"][:] = np.nan
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_nonfinite_rl_updates_are_skipped_counted_and_halt(tmp_path, child, nan_hf_dir):
    """GRPO from NaN weights: K=2 updates in a row are skipped (the state is left as it was),
    counted in the metrics, and halt the run with a message that says what to do."""
    workdir = tmp_path / "nan"
    rc, log = _run(child, workdir, "nan", **{
        "model.tiny": "", "model.hf_dir": nan_hf_dir, "sft.steps": 0,
        "train.max_nonfinite_in_a_row": 2, "train.eval_every": 0})
    assert rc == 2      # main prints the message alone (no traceback)
    assert "error: 2 consecutive updates had a non-finite loss or gradient (last at " \
           "step 2)" in log, log[-4000:]
    assert "config.train.max_nonfinite_in_a_row" in log and "config.optim.lr" in log
    rows = _final_metrics(workdir)
    assert [rows[("rl", s)][names.SKIPPED] for s in (1, 2)] == [1, 1]
    assert ("rl", 3) not in rows
    # checkpoint of step 1: the skipped update applied nothing (no step, zero Adam moments)
    state = _read_state(workdir, 1)["train"]
    assert int(state["step"]) == 0
    import jax
    assert all(not np.any(x) for x in jax.tree.leaves(state["opt_state"]))


def test_nonfinite_sft_steps_are_skipped_counted_and_halt(tmp_path, child, nan_hf_dir):
    workdir = tmp_path / "nan_sft"
    rc, log = _run(child, workdir, "nan_sft", **{
        "model.tiny": "", "model.hf_dir": nan_hf_dir, "sft.steps": 4,
        "train.max_nonfinite_in_a_row": 2})
    assert rc == 2      # main prints the message alone (no traceback)
    assert "error: 2 consecutive updates had a non-finite loss or gradient (last at " \
           "step 2)" in log, log[-4000:]
    assert "config.sft.lr" in log
    rows = _final_metrics(workdir)
    assert [rows[("sft", s)][names.SFT_PREFIX + names.SKIPPED] for s in (0, 1)] == [1, 1]
    assert ("sft", 2) not in rows
