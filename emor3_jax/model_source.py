"""Model sources: a local directory, a gs:// directory or a Hugging Face hub id -> local files.

`config.model.hf_dir`, `config.model.tokenizer` and `config.reward.judge_dir` each name one of
    /path/to/Qwen2.5-VL-3B-Instruct              used as it is
    gs://bucket/models/Qwen2.5-VL-3B-Instruct    copied once per host into the cache
    Qwen/Qwen2.5-VL-3B-Instruct[@revision]       huggingface_hub.snapshot_download (its own cache)
and `resolve` turns it into a local directory, because safetensors' `safe_open` (memory-mapped,
shard-by-shard reads straight onto the mesh) and transformers' tokenizer loaders need local
files. The gs:// cache lives under $EMOR3_CACHE (default ~/.cache/emor3_jax) and is a mirror
with a manifest (name -> size, object generation) that is only extended after a file has been
copied completely: a killed copy is redone, a re-uploaded model is re-fetched file by file,
unchanged files are never fetched twice, and processes of one host take turns (a file lock).
Hub ids use huggingface_hub's cache, so `HF_HUB_OFFLINE=1` with a filled cache needs no network.
Every failure names the config field, the path and what to do.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import re
from pathlib import Path

from emor3_jax.fileio import is_remote, remote_error

log = logging.getLogger(__name__)

# What a model directory needs: config, weights, tokenizer, processor and chat template files.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken")
# What a tokenizer needs (config.json: AutoTokenizer may read the model type from it).
TOKENIZER_FILES = ("config.json", "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*", "*.tiktoken")
# A data set's files (config.data.manual_dir): everything under a gs:// directory; the parquet
# exports of a hub dataset repo (TFDS' first layout, data/<split>-*.parquet).
DATA_FILES = ("*",)
HUB_DATA_FILES = ("*.parquet",)
MANIFEST = ".emor3_manifest.json"
# org/name[@revision]; a path starting with "/" or "." is never a hub id.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?")


def cache_root() -> Path:
    return Path(os.environ.get("EMOR3_CACHE") or "~/.cache/emor3_jax").expanduser()




def classify(source) -> str:
    """The kind of a source: remote (gs://...), local (an existing path), hub (org/name[@rev])
    or missing."""
    s = os.fspath(source)
    if is_remote(s):
        return "remote"
    if os.path.exists(s):
        return "local"
    return "hub" if _HUB_ID.fullmatch(s) else "missing"


def check(source, field: str) -> None:
    """Fail fast, without network, on a local path that does not exist and is no hub id."""
    if classify(source) == "missing":
        raise FileNotFoundError(
            f"{field}={os.fspath(source)!r} does not exist: pass a local or gs:// Hugging Face "
            "directory (config.json, safetensors, tokenizer files) or a hub repo id such as "
            "Qwen/Qwen2.5-VL-3B-Instruct[@revision]")


def resolve(source, field: str = "model source", patterns=MODEL_FILES,
            repo_type: str = "model") -> str:
    """A local directory holding `source`'s files (those matching `patterns` for remote ones;
    repo_type "dataset" for a hub dataset repo, e.g. config.data.manual_dir)."""
    s = os.fspath(source)
    kind = classify(s)
    check(s, field)
    if kind == "remote":
        return _mirror_remote(s, field, tuple(patterns))
    if kind == "hub":
        return _hub_snapshot(s, field, tuple(patterns), repo_type)
    return s


# ------------------------------------------------------------------------------------------
# gs:// (any fsspec URL): mirror into the cache.

def _remote_fs(uri: str):
    import fsspec
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise ImportError(f"reading {uri}: {e}; `pip install gcsfs` for gs:// paths") from e


def _version(info: dict) -> str:
    for key in ("generation", "md5Hash", "crc32c", "ETag", "etag", "mtime", "created"):
        if info.get(key):
            return str(info[key])
    return ""


def _matches(rel: str, patterns) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def _list_remote(fs, root: str, uri: str, field: str, patterns) -> dict[str, list]:
    """{relative name: [size, version]} of the files under `uri` that match `patterns`."""
    try:
        listing = fs.find(root, detail=True, withdirs=False)
    except Exception as e:  # noqa: BLE001  (gcsfs/google-auth raise many types; classified)
        raise remote_error(uri, field, e) from e
    if not listing:
        raise remote_error(uri, field, FileNotFoundError("no objects under this prefix"))
    out = {}
    for path, info in listing.items():
        rel = posixpath.relpath(path, root.rstrip("/"))
        if _matches(rel, patterns) and info.get("type", "file") == "file":
            out[rel] = [int(info.get("size") or 0), _version(info)]
    if not out:
        raise FileNotFoundError(f"{field}={uri!r} holds no model files (none of "
                                f"{', '.join(patterns)}): is it a Hugging Face model directory?")
    return out


def _read_manifest(dest: Path) -> dict:
    try:
        return json.loads((dest / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_manifest(dest: Path, files: dict) -> None:
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(files, indent=1, sort_keys=True))
    os.replace(tmp, dest / MANIFEST)


def mirror_dir(uri: str) -> Path:
    """Where the cache mirrors the remote directory `uri` (the same relative layout below)."""
    scheme, rest = uri.split("://", 1)
    return cache_root() / "remote" / scheme / rest.strip("/")


def _mirror_remote(uri: str, field: str, patterns) -> str:
    from filelock import FileLock
    fs, root = _remote_fs(uri)
    remote = _list_remote(fs, root, uri, field, patterns)
    dest = mirror_dir(uri)
    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        have = _read_manifest(dest)
        stale = [r for r in have if _matches(r, patterns) and r not in remote]
        todo = sorted(r for r, v in remote.items() if have.get(r) != v or not (dest / r).is_file())
        if not stale and not todo:
            return str(dest)
        for r in stale + todo:
            have.pop(r, None)
        _write_manifest(dest, have)      # from here on a killed copy is redone by the next call
        for r in stale:
            (dest / r).unlink(missing_ok=True)
        if todo:
            size = sum(remote[r][0] for r in todo) / 2**20
            log.info("copying %d files (%.1f MiB) of %s to %s", len(todo), size, uri, dest)
            for r in todo:
                (dest / r).parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get([posixpath.join(root, r) for r in todo], [str(dest / r) for r in todo])
            except Exception as e:  # noqa: BLE001
                raise remote_error(uri, field, e) from e
            short = [r for r in todo if (dest / r).stat().st_size != remote[r][0]]
            if short:
                raise OSError(f"{field}={uri!r}: incomplete copy of {short} into {dest}; "
                              "run again (finished files are kept)")
        have.update({r: remote[r] for r in todo})
        _write_manifest(dest, have)
    return str(dest)


def upload(local_dir, out_uri: str, *, replace=("*.safetensors", "*.safetensors.index.json")
           ) -> None:
    """Copy the files of `local_dir` to the remote directory `out_uri`; remote files matching
    `replace` are deleted first (stale shards of an earlier export would confuse loaders)."""
    fs, root = _remote_fs(out_uri)
    field = "output directory"
    try:
        old = [p for p in fs.find(root) if _matches(posixpath.basename(p), replace)]
        if old:
            fs.rm(old)
        local = Path(local_dir)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        fs.put([str(p) for p in files],
               [posixpath.join(root, p.relative_to(local).as_posix()) for p in files])
    except Exception as e:  # noqa: BLE001
        raise remote_error(out_uri, field, e) from e


# ------------------------------------------------------------------------------------------
# Hugging Face hub ids.

def _offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in ("1", "true", "yes", "on")


def _hub_snapshot(source: str, field: str, patterns, repo_type: str = "model") -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    m = _HUB_ID.fullmatch(source)
    repo, rev = m["repo"], m["rev"]
    offline = _offline()
    where = f"{repo}" + (f" at revision {rev}" if rev else "")
    try:
        path = snapshot_download(repo, revision=rev, allow_patterns=list(patterns),
                                 local_files_only=offline, repo_type=repo_type)
    except LocalEntryNotFoundError as e:
        if offline:
            raise FileNotFoundError(
                f"{field}={source!r} is no local directory, and Hugging Face repo {where} is not "
                f"in the local hub cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1: "
                "download it once with "
                f"`hf download {repo}" + (f" --revision {rev}" if rev else "") + "` into that "
                "cache (HF_HUB_CACHE), or unset HF_HUB_OFFLINE") from e
        raise OSError(f"{field}={source!r}: could not reach the Hugging Face Hub for {where} "
                      f"and it is not cached ({e}); check the network or fill the cache") from e
    except GatedRepoError as e:
        raise PermissionError(f"{field}={source!r}: {repo} is gated or private: accept its "
                              "terms on huggingface.co and log in (`hf auth login` or "
                              "HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{field}={source!r} is neither a local directory nor a Hugging "
                                "Face repo you can access (check the spelling; private repos "
                                "need `hf auth login` or HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{field}={source!r}: {repo} has no revision {rev!r}") from e
    log.info("%s=%s: Hugging Face snapshot %s", field, source, path)
    return path

