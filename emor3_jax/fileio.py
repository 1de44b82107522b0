"""One I/O layer for the run's files, local or gs:// alike (`etils.epath`).

The driver writes metrics, TensorBoard events, the report, curves, the export and the run's
provenance through these functions, so `--workdir=gs://bucket/run` behaves as a local
directory does (orbax and jax.profiler already speak gs://). GCS objects cannot be appended
to, so files that grow (metrics.jsonl) are rewritten whole, atomically: a reader or a killed
writer never sees half a file.
"""
from __future__ import annotations

import logging
import os
import re
import uuid

from etils import epath


class _OncePerBucket(logging.Filter):
    """gcsfs asks GCS's control-plane API for a bucket's layout before every access and, when
    it cannot (no credentials for that API, an emulator), warns that it falls back to the
    plain GCS file system at every access, without caching the answer: a pod's log drowned in
    it. The fallback is what this package uses anyway; the first warning per bucket stays."""
    _BUCKET = re.compile(r"(?:bucket name|Bucket) (\S+?):? (?:not found|[A-Z])")

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "falling back to GCSFileSystem" not in message.replace("Falling", "falling"):
            return True
        match = self._BUCKET.search(message)
        bucket = match.group(1) if match else message
        if bucket in self.seen:
            return False
        self.seen.add(bucket)
        return True


logging.getLogger("gcsfs").addFilter(_OncePerBucket())


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def path(p) -> epath.Path:
    """An epath.Path (gs:// kept intact; `pathlib.Path("gs://b/x")` would collapse it)."""
    return epath.Path(os.fspath(p))


def join(*parts) -> str:
    """String join of path parts that keeps a gs:// prefix."""
    return os.fspath(path(parts[0]).joinpath(*map(os.fspath, parts[1:])))


def makedirs(p) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def check_writable(p, field: str = "--workdir") -> None:
    """Create directory `p` and write (then delete) a probe file in it, so that a run whose
    workdir it cannot write fails at once, naming the path and what to do (credentials,
    bucket), rather than at its first checkpoint."""
    probe = path(p) / f".write_probe.{uuid.uuid4().hex[:8]}"
    try:
        makedirs(p)
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # noqa: BLE001  (gcsfs/google-auth raise many types; classified)
        if not is_remote(p):
            raise
        raise remote_error(os.fspath(p), field, e, write=True) from e


def remote_error(uri: str, field: str, error: Exception, write: bool = False) -> Exception:
    """The exception to raise for a failed read (or write) of `uri`, saying what to do."""
    what = f"{type(error).__name__}: {error}".strip()
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"{field}={uri!r}: not found (no such bucket, or nothing under "
                                 f"this path); check it with `gcloud storage ls {uri}` ({what})")
    code = getattr(error, "code", None)
    text = what.lower()
    verb, role = ("write to", "objectUser") if write else ("read", "objectViewer")
    if code in (401, 403) or any(k in text for k in (
            "forbidden", "unauthorized", "credential", "anonymous caller", "permission",
            "refresherror", "401", "403")):
        return PermissionError(
            f"{field}={uri!r}: cannot {verb} it: no Google Cloud credentials, or they lack "
            f"permission. On a TPU/GCE VM give the VM's service account {verb.split()[0]} "
            f"access to the bucket (roles/storage.{role}); elsewhere run `gcloud auth "
            f"application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a key file "
            f"({what})")
    return OSError(f"{field}={uri!r}: {'writing' if write else 'reading'} it failed ({what})")


def exists(p) -> bool:
    return path(p).exists()


def read_text(p) -> str:
    return path(p).read_text()


def write_atomic(p, data: str | bytes) -> None:
    """Write the whole file so that it appears complete or not at all: a GCS object upload
    is atomic by itself; a local file goes through a temporary sibling and a rename."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target if is_remote(p) else target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    if tmp != target:
        tmp.replace(target)


def walk_files(p) -> list[str]:
    """Every file under `p`, recursively (GCS has no recursive glob in epath)."""
    root, out = path(p), []
    if not root.exists():
        return out
    for child in root.iterdir():
        if child.is_dir():
            out += walk_files(child)
        else:
            out.append(os.fspath(child))
    return sorted(out)
