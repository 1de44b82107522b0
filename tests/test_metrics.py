"""Metric backends: the JSONL log always, TensorBoard and Weights & Biases as configured.

W&B runs offline (WANDB_MODE=offline): what it would upload is its run file
`<workdir>/wandb/offline-run-*/run-<id>.wandb`, read back here record by record.
"""
import glob
import hashlib
import json
import os
import struct
import time

import pytest

from emor3_jax import metrics

pytest.importorskip("wandb")


def _wandb_records(path: str):
    """The protobuf records of a W&B run file: the LevelDB log format, a 7-byte file header
    (":W&B", magic, version), then 32 KiB blocks of records, each behind a 7-byte header (crc32,
    length, type: 1 whole, 2-4 first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:              # block trailer or padding
            pos += left
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _wandb_run(workdir) -> tuple[list, dict, list[dict]]:
    """(run records, config, history rows without W&B's own keys) over every offline run file."""
    runs, config, history = [], {}, []
    for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                runs.append(r.run)
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update
                               if not i.key.startswith("_")})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in r.history.item}
                history.append({k: v for k, v in row.items() if not k.startswith("_")})
    return runs, config, history


def _next_second():
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_gets_the_rows_and_config_and_a_resume_continues_its_run(tmp_path, wandb_offline):
    workdir = str(tmp_path / "run")
    settings = dict(project="emor3-test", entity="", name="")
    w = metrics.MetricWriter(workdir, backends=("tensorboard", "wandb"), progress=False,
                             wandb_settings=settings)
    w.hparams({"optim.lr": 2e-6, "data.prompt_buckets": (256, 512), "method": "emor3"})
    for step in range(2):
        w.write(step, {"loss": 1.0 / (step + 1)}, prefix="sft/")
    w.write(1, {"reward/mean": 0.25, "skip": "text"})
    w.close()
    # W&B names an offline run's folder by the second it starts and the run id: a resume in the
    # same second (only a test is that quick) would reuse the first run's folder and file
    _next_second()
    # resumed: the same W&B run (its id comes from the workdir), the rows go on
    w = metrics.MetricWriter(workdir, backends=("wandb",), progress=False, wandb_settings=settings)
    w.write(2, {"reward/mean": 0.5})
    w.close()

    runs, config, history = _wandb_run(workdir)
    run_id = hashlib.sha1(workdir.encode()).hexdigest()[:16]
    assert [(r.run_id, r.project, r.display_name) for r in runs] == [
        (run_id, "emor3-test", "run")] * 2
    assert config == {"optim.lr": 2e-6, "data.prompt_buckets": "[256, 512]", "method": "emor3"}
    assert history == [{"step": 0, "sft/loss": 1.0}, {"step": 1, "sft/loss": 0.5},
                       {"step": 1, "reward/mean": 0.25}, {"step": 2, "reward/mean": 0.5}]
    # the JSONL holds the same rows (with their wall time); TensorBoard only for the first run
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == history
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 2     # scalars + hparams


def test_unknown_backend_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"config.metrics.backends: \['mlflow'\] unknown"):
        metrics.MetricWriter(str(tmp_path), backends=("mlflow",))


def test_update_metric_names_every_learner_shares():
    """Every raw update metric (rl/update.py) gets one row name, the same in GRPO and SFT rows
    (SFT's under "sft/"): skipped updates are metric_names.SKIPPED in both, and the trainer's
    non-finite guard reads that name; counts are summed over a step's updates, the rest
    averaged."""
    from emor3_jax import metric_names as names
    from emor3_jax.rl import update
    raw = {k: 2.0 for k in update.METRIC_NAMES}
    rows = names.update(raw, updates=2)
    assert len(rows) == len(update.METRIC_NAMES)
    assert rows[names.SKIPPED] == 2.0 and rows["update/tokens"] == 2.0   # counted
    assert rows[names.LOSS] == 1.0 and rows[names.KL] == 1.0             # averaged
    assert rows["update/grad_norm"] == 1.0
    assert set(names.LOSS_TERMS) | set(names.COUNTED) <= set(update.METRIC_NAMES)
    assert names.evaluation({"a": {"accuracy": 0.5, "format": 1.0},
                             "b": {"accuracy": 1.0, "format": 1.0}}) == {
        "a/accuracy": 0.5, "a/format": 1.0, "b/accuracy": 1.0, "b/format": 1.0,
        names.EVAL_ACCURACY: 0.75}
