"""A real GCS JSON API for tests: gcp-storage-emulator, in this process, on a free port.

    with gcs_emulator() as (host_url, make_bucket):
        root = make_bucket("models")          # "gs://models"; gcsfs/epath/orbax now talk to it

or the `gcs` pytest fixture (`from gcs_testutil import gcs  # noqa: F401`), which yields the
same pair. Inside, the clients of every layer point at the emulator: gcsfs and
google-cloud-storage through STORAGE_EMULATOR_HOST, tensorstore (orbax) through
TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING; the environment is restored after.
fsspec/epath cache filesystem objects (and gcsfs their listings), so those caches are cleared on
entry and exit: a test never sees another test's emulator.
"""
from __future__ import annotations

import contextlib
import os
import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def clear_filesystem_caches() -> None:
    """Forget cached gcsfs instances (and their directory listings) and epath's filesystem."""
    import gcsfs
    from etils.epath import backend
    gcsfs.GCSFileSystem.clear_instance_cache()
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def _serve_generation_headers() -> None:
    """Media downloads answer with `x-goog-generation` / `x-goog-metageneration`, as real GCS
    does; the emulator leaves them out and tensorstore (orbax's OCDBT manifests) then fails
    with "Malformed StorageGeneration". Patched into the emulator's routing table once."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    if getattr(objects, "_emor3_patched", False):
        return
    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
        except Exception:       # not found: the original already answered 404
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    objects.download = download         # objects.get serves ?alt=media through it
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = download
    objects._emor3_patched = True


def _quiet_when_clients_leave(httpd) -> None:
    """A client that went away mid-request (a training process a test SIGKILLs) is expected:
    the server drops that reply instead of printing socketserver's traceback into the test
    output; any other error is printed as before."""
    import sys
    original = httpd.handle_error

    def handle_error(request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            original(request, client_address)

    httpd.handle_error = handle_error


@contextlib.contextmanager
def gcs_emulator():
    """Start an in-memory GCS emulator; yield (host_url, make_bucket(name) -> "gs://name")."""
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    _serve_generation_headers()
    port = free_port()
    server = create_server("localhost", port, in_memory=True)
    server.start()
    _quiet_when_clients_leave(server._api._httpd)
    host = f"http://localhost:{port}"
    env = {"STORAGE_EMULATOR_HOST": host, "TENSORSTORE_GCS_HTTP_URL": host,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    clear_filesystem_caches()

    def make_bucket(name: str) -> str:
        storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(name)
        return f"gs://{name}"

    try:
        yield host, make_bucket
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_filesystem_caches()
        server.stop()


@pytest.fixture
def gcs():
    """(host_url, make_bucket) of a fresh emulator for one test."""
    with gcs_emulator() as emulator:
        yield emulator
