"""How users' emotion data sets look on disk, and how to read them as raw (unchecked) examples.

Three layouts are detected under the TFDS `manual_dir` (or its `<dataset name>/` subfolder):

- `parquet`: Hugging Face `datasets` exports (`[data/]<split>-00000-of-00001.parquet` or
  `<split>.parquet`) with an image column (`image`: struct {bytes, path} as `datasets` writes it,
  or raw bytes; or `images`: a one-element list of such structs), `problem` (the question) and
  `answer` (the label; `label` also accepted, string or ClassLabel index).
- `manifest`: JSON-lines (`*.jsonl`) or CSV (`*.csv`) files with `path` (relative to the
  manifest's folder, or absolute), `label`, optional `problem` and optional `split`; without a
  `split` field the file name is the split (`train.jsonl`, `test.csv`).
- `image_folder`: `<split>/<label>/<file>` trees (files may sit in subfolders of a label folder).

Hidden files and folders (`.DS_Store`, `.cache/`) are not data and are passed over.

If several are present, parquet wins over manifests, and manifests over folders (manifests
usually point into image folders); the files of the losing layouts are reported as ignored.
Split names are lower-cased, non-word characters become `_`, and `val`/`valid`/`dev` become
`validation`.

Readers only find examples: they check nothing about images or labels (the builder does) but
they report rows that cannot become examples (missing fields) as `RawExample.error`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

PARQUET = "parquet"
MANIFEST = "manifest"
IMAGE_FOLDER = "image_folder"

_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
_MANIFEST_SUFFIXES = (".jsonl", ".csv")
# Accepted column names, first match wins.
_PATH_FIELDS = ("path", "image", "file", "image_path")
_LABEL_FIELDS = ("label", "answer")
_PROBLEM_FIELDS = ("problem", "question")


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One example as found on disk: image bytes or a file to read, label text, question."""
    key: str                      # unique within the data set; also the example id
    label: str | None = None
    problem: str | None = None
    image_bytes: bytes | None = None
    image_path: Path | None = None
    error: tuple[str, str] | None = None  # (reason, message) when the row cannot be used


@dataclasses.dataclass(frozen=True)
class FoundLayout:
    kind: str
    root: Path
    splits: dict[str, tuple[Path, ...]]   # split -> parquet files / manifests / split folders
    ignored: tuple[str, ...] = ()         # files of a layout that lost to another


def split_name(raw: str) -> str:
    name = re.sub(r"\W+", "_", raw.strip().lower()).strip("_")
    return _SPLIT_ALIASES.get(name, name)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _visible_files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files under root (with one of `suffixes`, or any), skipping hidden files and folders."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and (suffixes is None or p.suffix.lower() in suffixes)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _parquet_split(path: Path) -> str:
    """`train-00000-of-00001.parquet` / `train.parquet` -> train; `train/0000.parquet` -> train."""
    prefix = path.stem.split("-")[0]
    return split_name(path.parent.name if prefix.isdigit() else prefix)


def detect(manual_dir: Path | str, dataset_name: str, labels: tuple[str, ...]) -> FoundLayout:
    """Find the layout and its splits; a clear error when nothing usable is there."""
    manual_dir = Path(manual_dir)
    root = manual_dir / dataset_name if (manual_dir / dataset_name).is_dir() else manual_dir
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset_name}: manual_dir {root} does not exist; put the data "
                                "set's files there (parquet, JSONL/CSV manifests, or "
                                "<split>/<label>/<file> folders)")
    parquets = _visible_files(root, (".parquet",))
    manifests = _visible_files(root, _MANIFEST_SUFFIXES)
    if parquets:
        splits: dict[str, list[Path]] = {}
        for f in parquets:
            splits.setdefault(_parquet_split(f), []).append(f)
        ignored = tuple(_rel(m, root) for m in manifests)
        return FoundLayout(PARQUET, root, {s: tuple(v) for s, v in splits.items()}, ignored)
    if manifests:
        splits = {}
        for f in manifests:
            for split in _manifest_splits(f):
                splits.setdefault(split, []).append(f)
        return FoundLayout(MANIFEST, root, {s: tuple(v) for s, v in splits.items()})
    split_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not split_dirs:
        raise FileNotFoundError(
            f"{dataset_name}: found no parquet files, no *.jsonl/*.csv manifests and no "
            f"<split>/<label>/ folders under {root}; see the builder's manual download "
            "instructions for the accepted layouts")
    lowered = {label.lower() for label in labels}
    as_labels = [d.name for d in split_dirs if d.name.lower() in lowered]
    if as_labels:
        raise ValueError(
            f"{dataset_name}: {root} holds label folders ({', '.join(as_labels)}) directly; the "
            f"image-folder layout is <split>/<label>/<file>: move them into a split folder, e.g. "
            f"{root / 'test' / as_labels[0]}")
    splits = {}
    for d in split_dirs:
        splits.setdefault(split_name(d.name), []).append(d)
    return FoundLayout(IMAGE_FOLDER, root, {s: tuple(v) for s, v in splits.items()})


def read_split(found: FoundLayout, split: str) -> Iterator[RawExample]:
    """Every raw example of one split, in a stable order."""
    reader = {PARQUET: _read_parquet, MANIFEST: _read_manifest,
              IMAGE_FOLDER: _read_image_folder}[found.kind]
    for source in found.splits[split]:
        yield from reader(source, found.root, split)


# --------------------------------------------------------------------------------------------
# Image folders.

def _read_image_folder(split_dir: Path, root: Path, split: str) -> Iterator[RawExample]:
    for path in _visible_files(split_dir, None):
        rel = path.relative_to(split_dir)
        key = _rel(path, root)
        if len(rel.parts) < 2:
            yield RawExample(key, error=("missing_label", f"{key}: file is not inside a "
                                         f"<label>/ folder of split '{split}'; move it into one"))
            continue
        yield RawExample(key, label=rel.parts[0], image_path=path)


# --------------------------------------------------------------------------------------------
# JSONL / CSV manifests.

def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, None, f"invalid JSON ({e})"
                continue
            if not isinstance(row, dict):
                yield line_no, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield line_no, row, ""


def _iter_manifest(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, row dict or None, error text) for every non-blank row of a manifest."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for row in reader:
                # csv line of this row (header is line 1); multi-line cells are rare here.
                yield reader.line_num, {k: v for k, v in row.items() if k is not None}, ""
        return
    yield from _jsonl_rows(path)


def _field(row: dict, names: tuple[str, ...]):
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip() != "":
            return value
    return None


def _manifest_splits(path: Path) -> list[str]:
    has_split = False
    splits = []
    for _, row, _ in _iter_manifest(path):
        if row is not None and "split" in row:
            has_split = True
            value = row.get("split")
            if value is not None and str(value).strip():
                name = split_name(str(value))
                if name not in splits:
                    splits.append(name)
    if not has_split:
        return [split_name(path.stem)]
    return splits


def _read_manifest(path: Path, root: Path, split: str) -> Iterator[RawExample]:
    manifest = _rel(path, root)
    for line_no, row, problem in _iter_manifest(path):
        key = f"{manifest}:{line_no}"
        if row is None:
            yield RawExample(key, error=("bad_manifest_row", f"{key}: {problem}; fix the line"))
            continue
        if "split" in row:
            row_split = row.get("split")
            if row_split is None or not str(row_split).strip():
                yield RawExample(key, error=("missing_field", f"{key}: field 'split' is empty; "
                                             "give every row a split or drop the column"))
                continue
            if split_name(str(row_split)) != split:
                continue
        elif split_name(path.stem) != split:
            continue
        image = _field(row, _PATH_FIELDS)
        label = _field(row, _LABEL_FIELDS)
        missing = [names[0] for names, value in ((_PATH_FIELDS, image), (_LABEL_FIELDS, label))
                   if value is None]
        if missing:
            yield RawExample(key, error=("missing_field", f"{key}: field(s) {', '.join(missing)} "
                                         f"missing or empty (row: {row}); add them or drop the row"))
            continue
        image_path = Path(str(image))
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        problem_text = _field(row, _PROBLEM_FIELDS)
        yield RawExample(key, label=str(label),
                         problem=None if problem_text is None else str(problem_text),
                         image_path=image_path)


# --------------------------------------------------------------------------------------------
# Hugging Face parquet exports.

def _parquet_label_names(schema) -> list[str] | None:
    """ClassLabel names from the `huggingface` schema metadata `datasets` writes, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    features = json.loads(meta).get("info", {}).get("features", {})
    for name in _LABEL_FIELDS:
        names = features.get(name, {}).get("names")
        if names:
            return list(names)
    return None


def _image_cell(cell, key: str, base: Path) -> RawExample | tuple[bytes | None, Path | None]:
    """An image column value -> (bytes, path); lists must hold exactly one image."""
    if isinstance(cell, list):
        if len(cell) != 1:
            return RawExample(key, error=("not_single_image", f"{key}: image list holds "
                                          f"{len(cell)} images; one image per example expected"))
        cell = cell[0]
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell), None
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:  # b"" too: reported as an empty file
            return bytes(cell["bytes"]), None
        if cell.get("path"):
            path = Path(cell["path"])
            return None, path if path.is_absolute() else base / path
    return RawExample(key, error=("missing_field", f"{key}: image cell has neither bytes nor a "
                                  f"path ({type(cell).__name__}); re-export with image bytes"))


def _read_parquet(path: Path, root: Path, split: str) -> Iterator[RawExample]:
    import pyarrow.parquet as pq  # only this layout needs it

    file = pq.ParquetFile(path)
    columns = file.schema_arrow.names
    rel = _rel(path, root)
    image_col = next((c for c in ("image", "images") if c in columns), None)
    label_col = next((c for c in _LABEL_FIELDS if c in columns), None)
    problem_col = next((c for c in _PROBLEM_FIELDS if c in columns), None)
    if image_col is None or label_col is None:
        missing = [n for n, c in (("image", image_col), ("answer", label_col)) if c is None]
        raise ValueError(f"{rel}: parquet file lacks column(s) {', '.join(missing)} (has "
                         f"{columns}); expected a Hugging Face export with image, problem and "
                         "answer columns")
    label_names = _parquet_label_names(file.schema_arrow)
    wanted = [c for c in (image_col, label_col, problem_col) if c]
    row = 0
    for batch in file.iter_batches(batch_size=64, columns=wanted):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            key = f"{rel}:{row}"
            row += 1
            image = _image_cell(data[image_col][i], key, path.parent)
            if isinstance(image, RawExample):
                yield image
                continue
            label = data[label_col][i]
            if isinstance(label, int) and not isinstance(label, bool):
                if label_names is None or not 0 <= label < len(label_names):
                    yield RawExample(key, error=("unknown_label", f"{key}: integer label {label} "
                                                 "without ClassLabel names in the file metadata; "
                                                 "export labels as text"))
                    continue
                label = label_names[label]
            if label is None or not str(label).strip():
                yield RawExample(key, error=("missing_field", f"{key}: '{label_col}' is empty"))
                continue
            problem = data[problem_col][i] if problem_col else None
            yield RawExample(key, label=str(label), problem=problem,
                             image_bytes=image[0], image_path=image[1])


def count_candidates(found: FoundLayout, split: str) -> int:
    """Files or rows a split holds, without reading images (to leave out empty splits)."""
    if found.kind == PARQUET:
        import pyarrow.parquet as pq
        return sum(pq.ParquetFile(f).metadata.num_rows for f in found.splits[split])
    if found.kind == IMAGE_FOLDER:
        return sum(len(_visible_files(d, None)) for d in found.splits[split])
    count = 0
    for path in found.splits[split]:
        for _, row, _ in _iter_manifest(path):
            in_split = (row is None or "split" not in row
                        or split_name(str(row.get("split") or "")) == split)
            count += in_split
    return count
