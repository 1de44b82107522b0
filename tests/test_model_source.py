"""Model sources: local paths, gs:// directories (through a real GCS API, the emulator) and
Hugging Face hub ids (through a pre-filled hub cache, offline), and their error messages."""
import http.server
import json
import os
import threading

import huggingface_hub
import jax
import numpy as np
import pytest

from emor3_jax import fileio, model_source
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.processing import tokenizer as tk
from gcs_testutil import clear_filesystem_caches, free_port, gcs  # noqa: F401  (fixture)
from qwen_testutil import hf_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOR3_CACHE", str(tmp_path / "emor3_cache"))
    return tmp_path / "emor3_cache"


def test_classify_and_check(tmp_path):
    assert model_source.classify(str(tmp_path)) == "local"
    assert model_source.classify("gs://bucket/models/x") == "remote"
    for hub in ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct@main",
                f"org/name@{COMMIT}", "org/name@refs/pr/1"):
        assert model_source.classify(hub) == "hub", hub
    for missing in (str(tmp_path / "nope"), "./org/name", "../x", "plainname", "a/b/c", "/a/b"):
        assert model_source.classify(missing) == "missing", missing
        with pytest.raises(FileNotFoundError, match=r"config\.model\.hf_dir=.*does not exist"):
            model_source.resolve(missing, "config.model.hf_dir")
    assert model_source.resolve(str(tmp_path), "f") == str(tmp_path)


def test_gcs_mirror_is_copied_once_and_kept_in_sync(gcs, tmp_path):
    _, make_bucket = gcs
    bucket = make_bucket("models")
    import fsspec
    fs = fsspec.filesystem("gs")
    fs.pipe({"models/m/config.json": b"{}", "models/m/model.safetensors": b"w" * 100,
             "models/m/tokenizer.json": b"t", "models/m/optimizer.pt": b"not copied"})
    uri = f"{bucket}/m"
    # tokenizer files first (a subset), then the whole model: nothing is fetched twice
    tok_dir = model_source.resolve(uri, "config.model.tokenizer", model_source.TOKENIZER_FILES)
    assert sorted(p for p in os.listdir(tok_dir) if not p.startswith(".")) == [
        "config.json", "tokenizer.json"]
    stamp = os.stat(os.path.join(tok_dir, "tokenizer.json")).st_mtime_ns
    local = model_source.resolve(uri, "config.model.hf_dir")
    assert local == tok_dir and local.startswith(os.environ["EMOR3_CACHE"])
    assert sorted(p for p in os.listdir(local) if not p.startswith(".")) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert os.stat(os.path.join(local, "tokenizer.json")).st_mtime_ns == stamp
    # a killed copy (file not in the manifest, partial content) is redone
    manifest = json.loads(open(os.path.join(local, model_source.MANIFEST)).read())
    del manifest["model.safetensors"]
    open(os.path.join(local, model_source.MANIFEST), "w").write(json.dumps(manifest))
    open(os.path.join(local, "model.safetensors"), "wb").write(b"w" * 10)
    model_source.resolve(uri, "config.model.hf_dir")
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == b"w" * 100
    # a re-uploaded model: changed files are fetched again, removed ones disappear
    fs.pipe({"models/m/model.safetensors": b"v" * 100})
    fs.rm("models/m/tokenizer.json")
    fs.invalidate_cache()
    model_source.resolve(uri, "config.model.hf_dir")
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == b"v" * 100
    assert not os.path.exists(os.path.join(local, "tokenizer.json"))


def test_gcs_errors_name_the_path(gcs):
    _, make_bucket = gcs
    make_bucket("empty")
    with pytest.raises(FileNotFoundError, match=r"config\.reward\.judge_dir='gs://missing-bucket/"
                                                r"m': not found .*gcloud storage ls"):
        model_source.resolve("gs://missing-bucket/m", "config.reward.judge_dir")
    with pytest.raises(FileNotFoundError, match=r"'gs://empty/m': not found"):
        model_source.resolve("gs://empty/m", "config.model.hf_dir")
    with pytest.raises(FileNotFoundError, match=r"'gs://missing-bucket/m': not found"):
        qwen2_5_vl.load_hf("gs://missing-bucket/m")
    with pytest.raises(FileNotFoundError, match=r"--workdir='gs://missing-bucket/run': not found"):
        fileio.check_writable("gs://missing-bucket/run")
    fileio.check_writable("gs://empty/run")
    assert fileio.walk_files("gs://empty/run") == []


class _Deny(http.server.BaseHTTPRequestHandler):
    """A GCS endpoint that refuses everyone, like a private bucket read without credentials."""
    code = 403

    def do_GET(self):
        body = json.dumps({"error": {"code": self.code, "message": "Anonymous caller does not "
                                     "have storage.objects.list access"}}).encode()
        self.send_response(self.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("code", [401, 403])
def test_gcs_without_credentials(code, monkeypatch):
    handler = type("Deny", (_Deny,), {"code": code})
    server = http.server.ThreadingHTTPServer(("localhost", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://localhost:{server.server_port}")
    clear_filesystem_caches()
    try:
        with pytest.raises(PermissionError, match=r"config\.model\.hf_dir='gs://private/m': "
                                                  r"cannot read it: no Google Cloud credentials"
                                                  r".*gcloud auth application-default login"):
            model_source.resolve("gs://private/m", "config.model.hf_dir")
        with pytest.raises(PermissionError, match=r"--workdir='gs://private/run': cannot write "
                                                  r"to it: .*roles/storage\.objectUser"):
            fileio.check_writable("gs://private/run")
    finally:
        server.shutdown()
        server.server_close()
        clear_filesystem_caches()


# ------------------------------------------------------------------------------------------
# Hub ids, offline (conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported).

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding org/tiny-vl (a tiny model + the demo tokenizer) at COMMIT = main."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-vl"
    snapshot = repo / "snapshots" / COMMIT
    cfg = tiny_config(vision_depth=1, fullatt_block_indexes=())
    hf_model(cfg, seed=3).save_pretrained(str(snapshot))
    tk.build_demo_tokenizer(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert model_source._offline()
    return str(snapshot)


def test_hub_id_from_offline_cache(hub_cache):
    for source in ("org/tiny-vl", "org/tiny-vl@main", f"org/tiny-vl@{COMMIT}"):
        assert os.path.realpath(model_source.resolve(source)) == os.path.realpath(hub_cache)
    _, p_hub = qwen2_5_vl.load_hf("org/tiny-vl")
    _, p_dir = qwen2_5_vl.load_hf(hub_cache)
    jax.tree.map(np.testing.assert_array_equal, p_hub, p_dir)
    tok = tk.load_tokenizer("org/tiny-vl@main")
    assert tok.get_vocab() == tk.load_tokenizer(hub_cache).get_vocab()


def test_hub_id_missing_offline(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"config\.model\.hf_dir='Qwen/Qwen2.5-VL-3B-"
                                                r"Instruct@v1'.*not in the local hub cache.*"
                                                r"hf download Qwen/Qwen2.5-VL-3B-Instruct "
                                                r"--revision v1.*unset HF_HUB_OFFLINE"):
        model_source.resolve("Qwen/Qwen2.5-VL-3B-Instruct@v1", "config.model.hf_dir")
    with pytest.raises(FileNotFoundError, match=r"config\.reward\.judge_dir='org/other'.*not in "
                                                r"the local hub cache"):
        model_source.resolve("org/other", "config.reward.judge_dir")


# ------------------------------------------------------------------------------------------
# Data sets: config.data.manual_dir as a gs:// directory or a hub dataset repo id.

def test_manual_dir_on_gcs_prepares_like_the_local_copy(gcs, tmp_path):
    from emor3_jax.data import pipeline
    from emor3_jax.data.sample_files import write_image_folder
    _, make_bucket = gcs
    bucket = make_bucket("data")
    local = tmp_path / "emotion"
    write_image_folder(local, {"test": ["joy", "fear", "anger", "love"]})
    model_source.upload(local, f"{bucket}/emotion")
    names = lambda b: sorted(str(e["id"]) for e in b.as_data_source("test"))  # noqa: E731
    remote, _ = pipeline.open_source("webemo", "test", data_dir=str(tmp_path / "tfds_gs"),
                                     manual_dir=f"{bucket}/emotion")
    mirror = pipeline.local_manual_dir(f"{bucket}/emotion")
    assert mirror.startswith(os.environ["EMOR3_CACHE"])
    here, _ = pipeline.open_source("webemo", "test", data_dir=str(tmp_path / "tfds_local"),
                                   manual_dir=str(local))
    assert names(remote) == names(here) and len(names(here)) == 4


def test_manual_dir_as_hub_dataset_downloads_its_parquet(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from emor3_jax.data import pipeline
    from emor3_jax.data.sample_files import encode, photo
    cache = tmp_path / "hub"
    snapshot = cache / "datasets--org--emo6" / "snapshots" / COMMIT
    (snapshot / "data").mkdir(parents=True)
    rows = [{"image": {"bytes": encode(photo(i, 40, 56)), "path": f"{i}.jpg"},
             "problem": "Which emotion?", "answer": label}
            for i, label in enumerate(["joy", "fear", "sadness"])]
    pq.write_table(pa.Table.from_pylist(rows), snapshot / "data" / "test-00000-of-00001.parquet")
    (snapshot / "README.md").write_text("not downloaded")
    (cache / "datasets--org--emo6" / "refs").mkdir()
    (cache / "datasets--org--emo6" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    builder, source = pipeline.open_source("emotion6", "test", data_dir=str(tmp_path / "tfds"),
                                           manual_dir="org/emo6")
    labels = builder.info.features["label"].names
    assert sorted(labels[e["label"]] for e in source) == ["fear", "joy", "sadness"]
    with pytest.raises(FileNotFoundError, match=r"config\.data\.manual_dir='org/nothing'"):
        pipeline.local_manual_dir("org/nothing")


def test_data_dir_on_gcs_is_prepared_once_and_mirrored(gcs, tmp_path, cache):
    """array_record reads local files only: a gs:// data_dir is prepared once, uploaded, and
    every later open (another host, a resumed run) mirrors the bucket's copy into the cache."""
    import shutil
    from emor3_jax import fileio
    from emor3_jax.data import pipeline
    from emor3_jax.data.sample_files import write_image_folder
    _, make_bucket = gcs
    bucket = make_bucket("data")
    write_image_folder(tmp_path / "emotion", {"test": ["joy", "fear", "anger", "love"]})
    ids = lambda src: sorted(str(e["id"]) for e in src)  # noqa: E731
    builder, first = pipeline.open_source("webemo", "test", data_dir=f"{bucket}/tfds",
                                          manual_dir=str(tmp_path / "emotion"))
    assert builder.data_dir.startswith(str(cache))
    version = f"{bucket}/tfds/webemo/default/{builder.version}"
    assert fileio.exists(f"{version}/dataset_info.json")
    assert fileio.exists(f"{version}/skipped.json")
    shutil.rmtree(cache)          # a fresh host: no local copy, no manual_dir
    _, again = pipeline.open_source("webemo", "test", data_dir=f"{bucket}/tfds")
    assert ids(again) == ids(first) and len(ids(first)) == 4


def test_gcs_fallback_warning_once_per_bucket(gcs, caplog):
    """gcsfs warns that it cannot read a bucket's layout (and falls back to the plain GCS file
    system) at every access; a run's log shows it once per bucket."""
    import logging
    from emor3_jax import fileio
    _, make_bucket = gcs
    roots = [make_bucket("fallback-a"), make_bucket("fallback-b")]
    with caplog.at_level(logging.WARNING, logger="gcsfs"):
        for root in roots * 3:
            fileio.write_atomic(f"{root}/run/metrics.jsonl", "{}\n")
            assert fileio.read_text(f"{root}/run/metrics.jsonl") == "{}\n"
            assert fileio.exists(f"{root}/run")
    shown = [r.getMessage() for r in caplog.records if r.name == "gcsfs"
             and "back to GCSFileSystem" in r.getMessage().replace("Falling", "falling")]
    for root in roots:
        assert sum(root[5:] in m for m in shown) == 1, shown     # the first one stays
    other = logging.LogRecord("gcsfs", logging.WARNING, "", 0, "Failed to close grpc_client: x",
                              None, None)
    assert all(f.filter(other) for f in logging.getLogger("gcsfs").filters)
