"""Where rows come from: files (JSON Lines, Parquet, CSV; a file, glob or directory), ``save_to_disk``
directories, hub names, and in-memory ``datasets.Dataset`` / ``ray.data.Dataset`` / lists of dicts.

File sources are planned on the driver into ``Chunk``s (byte ranges of a JSONL file, Parquet row groups,
whole CSV files, slices of a Python list); each chunk is one Ray Data read task, so the first batch
only waits for the first chunk, whatever the dataset size. Row ids are global line/row indices, stable
across runs: ``row_id = (rows in earlier files) + (0-based line in this file)``.
"""

from __future__ import annotations

import csv
import glob
import json
import mmap
import os
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dpo_ray.data.rows import MALFORMED_JSON, UNDECODABLE, BadRow
from dpo_ray.data.tokenize import RawRow

CHUNK_BYTES = 1 << 18  # JSONL bytes per read task (~3k short rows): the first block is ready fast
LIST_CHUNK_ROWS = 4096  # in-memory rows per read task
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


class DataSourceError(ValueError):
    """The dataset source cannot be found or read; the message says what to pass instead."""


@dataclass
class Chunk:
    kind: str  # jsonl | parquet | csv | rows
    source: str  # file path, or a label for in-memory rows
    first_row_id: int
    first_line: int  # 0-based line (row) in the file of the chunk's first row
    n_rows: int  # rows (lines) in the chunk; an upper bound for jsonl (blank lines count)
    start: int = 0  # jsonl: byte offset; parquet: row group
    end: int = 0  # jsonl: byte end (exclusive)
    payload: bytes | None = None  # rows: pickled list of rows

    def to_item(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ planning
def _plan_jsonl(path: str, first_row_id: int) -> list[Chunk]:
    size = os.path.getsize(path)
    if size == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:size].lstrip()[:1] == b"[":  # a JSON array file: one chunk, parsed whole
            return [Chunk("jsonarray", path, first_row_id, 0, 0, 0, size)]
        chunks, start, line = [], 0, 0
        while start < size:
            nl = mm.find(b"\n", min(start + CHUNK_BYTES, size) - 1)
            end = size if nl < 0 else nl + 1
            n = mm[start:end].count(b"\n") + (0 if mm[end - 1:end] == b"\n" else 1)
            chunks.append(Chunk("jsonl", path, first_row_id + line, line, n, start, end))
            start, line = end, line + n
    return chunks


def _plan_parquet(path: str, first_row_id: int) -> list[Chunk]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    chunks, line = [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        chunks.append(Chunk("parquet", path, first_row_id + line, line, n, g, g + 1))
        line += n
    return chunks


def _plan_csv(path: str, first_row_id: int) -> list[Chunk]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        n = max(0, sum(1 for _ in csv.reader(f)) - 1)  # minus the header
    return [Chunk("csv", path, first_row_id, 0, n)]


def _plan_json_array(path: str, first_row_id: int) -> list[Chunk]:
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataSourceError(f"{path} starts with '[' but is not a valid JSON array ({e}); write JSON Lines "
                              "(one object per line) instead") from None
    return plan_rows(rows, path, first_row_id)


def plan_files(paths: list[str], max_rows: int | None = None) -> tuple[list[Chunk], int]:
    """Chunks for the files, in order, and their row count (cheap: a newline count / Parquet metadata)."""
    chunks: list[Chunk] = []
    total = 0
    for p in paths:
        kind = EXTENSIONS.get(Path(p).suffix.lower())
        if kind is None:
            raise DataSourceError(f"{p}: unknown file type; use .jsonl/.json, .parquet or .csv")
        planned = {"jsonl": _plan_jsonl, "parquet": _plan_parquet, "csv": _plan_csv}[kind](p, total)
        if planned and planned[0].kind == "jsonarray":
            planned = _plan_json_array(p, total)
        chunks += planned
        total += sum(c.n_rows for c in planned)
        if max_rows is not None and total >= max_rows:
            break
    if max_rows is not None:
        chunks, total = _cap(chunks, max_rows)
    return chunks, total


def _cap(chunks: list[Chunk], max_rows: int) -> tuple[list[Chunk], int]:
    out, total = [], 0
    for c in chunks:
        if total >= max_rows:
            break
        if total + c.n_rows > max_rows and c.kind != "rows":
            c.n_rows = max_rows - total  # readers stop after n_rows lines
        out.append(c)
        total += c.n_rows
    return out, min(total, max_rows)


def plan_rows(rows: list, label: str = "in-memory rows", first_row_id: int = 0) -> list[Chunk]:
    return [Chunk("rows", label, first_row_id + i, i, len(rows[i:i + LIST_CHUNK_ROWS]),
                  payload=pickle.dumps(rows[i:i + LIST_CHUNK_ROWS], protocol=5))
            for i in range(0, len(rows), LIST_CHUNK_ROWS)]


# ------------------------------------------------------------------------------------------- reading
def _parse_line(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(UNDECODABLE, f"the line holds bytes that are not UTF-8 ({e.reason} at byte {e.start}); "
                                   "re-encode the file as UTF-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow(MALFORMED_JSON, f"the line is not valid JSON ({e.msg} at column {e.colno})")


def iter_chunk(c: Chunk) -> Iterator[RawRow]:
    """The raw rows of one chunk, each with its row id and 1-based line number."""
    if c.kind == "jsonl":
        with open(c.source, "rb") as f:
            f.seek(c.start)
            data = f.read(c.end - c.start)
        for i, raw in enumerate(data.split(b"\n")[: c.n_rows]):
            if raw.strip():
                yield RawRow(c.first_row_id + i, c.first_line + i + 1, _parse_line(raw))
    elif c.kind == "parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(c.source).read_row_group(c.start).to_pylist()[: c.n_rows]
        for i, r in enumerate(rows):
            yield RawRow(c.first_row_id + i, c.first_line + i + 1, r)
    elif c.kind == "csv":
        with open(c.source, encoding="utf-8", errors="surrogateescape", newline="") as f:
            for i, r in enumerate(csv.DictReader(f)):
                if i >= c.n_rows:
                    break
                # CSV has no nulls: an empty cell is a missing value
                yield RawRow(c.first_row_id + i, i + 2, {k: (v if v != "" else None) for k, v in r.items()
                                                         if k is not None})
    elif c.kind == "rows":
        for i, r in enumerate(pickle.loads(c.payload)):
            yield RawRow(c.first_row_id + i, None, r)
    else:
        raise ValueError(f"unknown chunk kind {c.kind!r}")


# ----------------------------------------------------------------------------------------- resolving
@dataclass
class Resolved:
    """What a dataset_name resolved to: files, or an in-memory table (save_to_disk / hub)."""

    files: list[str] | None = None
    table: Any = None  # datasets.Dataset
    label: str = ""


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _split_files(files: list[Path], split: str) -> list[Path]:
    return [f for f in files if f.stem == split or f.stem.startswith(f"{split}-") or f.stem.startswith(f"{split}_")
            or f"_{split}" in f.stem or f.parent.name == split]


def _sibling(path: Path, test_split: str) -> Path | None:
    cands = [path.with_name(test_split + path.suffix)]
    if "train" in path.name:
        cands.append(path.with_name(path.name.replace("train", test_split)))
    return next((c for c in cands if c.exists() and c != path), None)


def _is_save_to_disk(d: Path) -> bool:
    return (d / "dataset_dict.json").exists() or (d / "state.json").exists()


def resolve(name: str, split: str, config: str | None, for_eval_of: str | None = None) -> Resolved:
    """dataset_name (file, glob, directory, save_to_disk dir, hub name) -> files or a datasets.Dataset."""
    p = Path(name).expanduser()
    if p.is_file():
        return Resolved(files=[str(p)], label=str(p))
    if p.is_dir():
        if _is_save_to_disk(p):
            return Resolved(table=_load_from_disk(p, split), label=f"{p} [{split}]")
        files = _data_files(p)
        if not files:
            raise DataSourceError(f"dataset_name={name!r} is a directory with no .jsonl/.json/.parquet/.csv files "
                                  "and is not a save_to_disk directory")
        chosen = _split_files(files, split)
        if not chosen:
            if for_eval_of is not None:
                return Resolved()  # no eval split in this directory
            chosen = files  # no split names: every file is training data
        return Resolved(files=[str(f) for f in chosen], label=str(p))
    if any(ch in name for ch in "*?["):
        files = sorted(glob.glob(os.path.expanduser(name), recursive=True))
        if not files:
            raise DataSourceError(f"dataset_name={name!r} is a glob that matches no files")
        return Resolved(files=files, label=name)
    return Resolved(table=_load_hub(name, config, split), label=f"{name} [{split}]")


def _load_from_disk(d: Path, split: str):
    import datasets

    ds = datasets.load_from_disk(str(d))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(f"{d} has splits {', '.join(ds)}, not {split!r}; set dataset_train_split / "
                                  "dataset_test_split to one of them")
        return ds[split]
    return ds


def _load_hub(name: str, config: str | None, split: str):
    if name.startswith((".", "/", "~")) or Path(name).suffix.lower() in EXTENSIONS:
        raise DataSourceError(f"dataset_name={name!r}: no such file or directory")
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here means: not reachable / not found
        raise DataSourceError(
            f"dataset_name={name!r} is not a local file, directory or glob, so it was looked up on the Hugging Face "
            f"hub, which failed ({type(e).__name__}: {str(e)[:200]}). The hub cannot be reached from this machine: "
            "download the dataset where it can (datasets.load_dataset(...).save_to_disk(DIR), or the jsonl/parquet "
            "files), copy it here, and pass the local path as dataset_name.") from None


def eval_files_beside(train: Resolved, name: str, test_split: str | None,
                      config: str | None = None) -> Resolved | None:
    """The eval split that sits beside the training data: a `test` file, split files in the directory."""
    if test_split is None:
        return None
    p = Path(name).expanduser()
    if p.is_file():
        sib = _sibling(p, test_split)
        return Resolved(files=[str(sib)], label=str(sib)) if sib else None
    if p.is_dir() and not _is_save_to_disk(p):
        files = _split_files(_data_files(p), test_split)
        return Resolved(files=[str(f) for f in files], label=str(p)) if files else None
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict) and test_split in ds:
            return Resolved(table=ds[test_split], label=f"{p} [{test_split}]")
        return None
    if train.table is not None:  # hub dataset: try the test split
        try:
            return Resolved(table=_load_hub(name, config, test_split), label=f"{name} [{test_split}]")
        except DataSourceError:
            return None
    return None
