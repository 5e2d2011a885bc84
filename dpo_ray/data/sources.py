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
import os
import pickle
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpo_ray.data.rows import MALFORMED_JSON, UNDECODABLE, BadRow, misnamed_columns, misnamed_message
from dpo_ray.data.tokenize import RawRow
from dpo_ray.errors import DataSourceError

CHUNK_BYTES = 1 << 18  # JSONL bytes per read task (~3k short rows): the first block is ready fast
READ_BYTES = 1 << 20  # planning reads files in blocks of this size: driver memory does not grow with the file
JSON_ARRAY_MAX_BYTES = 64 << 20  # a JSON array is one document, parsed whole on the driver: bounded here
LIST_CHUNK_ROWS = 4096  # in-memory rows per read task
PARQUET_BATCH_ROWS = 1024  # Parquet rows decoded at a time (a row group may hold millions)
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark (Excel's "CSV UTF-8", Notepad): read as utf-8-sig
# Split names recognised in file and folder names, besides dataset_train_split / dataset_test_split
# themselves: a file named for any of them is never training data by default.
SPLIT_ALIASES = {"train": ("training",), "test": ("testing",)}
OTHER_SPLITS = ("train", "training", "test", "testing", "eval", "evaluation", "validation", "valid", "val",
                "dev")


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
def _first_byte(f) -> bytes:
    """The file's first byte that is not whitespace (after a BOM), reading block by block."""
    f.seek(0)
    if f.read(3) != BOM:
        f.seek(0)
    while block := f.read(READ_BYTES):
        head = block.lstrip()
        if head:
            return head[:1]
    return b""


def _plan_jsonl(path: str, first_row_id: int) -> list[Chunk]:
    """Byte ranges of about CHUNK_BYTES cut after a newline, and their line counts: one pass over the file in
    READ_BYTES blocks, so the driver's memory stays flat whatever the file size."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    chunks: list[Chunk] = []
    start = line = n = pos = 0  # chunk start byte and line, newlines since start, bytes read so far
    last = b""
    with open(path, "rb") as f:
        if _first_byte(f) == b"[":  # a JSON array file: one chunk, parsed whole
            return [Chunk("jsonarray", path, first_row_id, 0, 0, 0, size)]
        f.seek(0)
        while block := f.read(READ_BYTES):
            i = 0
            while True:  # cut at the first newline at or after byte start + CHUNK_BYTES - 1
                nl = block.find(b"\n", max(start + CHUNK_BYTES - 1 - pos, i))
                if nl < 0:
                    n += block.count(b"\n", i)
                    break
                n += block.count(b"\n", i, nl + 1)
                chunks.append(Chunk("jsonl", path, first_row_id + line, line, n, start, pos + nl + 1))
                start, line, n, i = pos + nl + 1, line + n, 0, nl + 1
            pos += len(block)
            last = block[-1:]
    if start < size:  # the tail after the last cut (its last line may lack a newline)
        chunks.append(Chunk("jsonl", path, first_row_id + line, line, n + (last != b"\n"), start, size))
    return chunks


def _plan_parquet(path: str, first_row_id: int) -> list[Chunk]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    check_columns(meta.schema.to_arrow_schema().names, path)
    chunks, line = [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        chunks.append(Chunk("parquet", path, first_row_id + line, line, n, g, g + 1))
        line += n
    return chunks


def check_columns(names, source: str) -> None:
    """A file's columns (CSV header, Parquet schema, table columns): a known column spelled another way (case,
    BOM, invisible characters) is an error naming both spellings, before any row is read."""
    misnamed = misnamed_columns(names)
    if misnamed:
        raise DataSourceError(f"{source}: {misnamed_message(misnamed)}")


def _csv_rows(path: str, f) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) of each non-blank CSV record; a malformed line is an error naming file and line."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # cells of long completions (the default is 128 KiB)
    reader = csv.reader(f)
    start = 1
    try:
        for cells in reader:
            if cells:
                yield start, cells
            start = reader.line_num + 1  # a quoted cell may span lines
    except csv.Error as e:
        raise DataSourceError(f"{path} line {reader.line_num}: not readable as CSV ({e}); check the quoting "
                              "of that line, or write the data as JSON Lines or Parquet") from None


def _open_text(path: str):
    # utf-8-sig: a BOM (Excel's "CSV UTF-8") is not part of the first column's name
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _check_header(path: str, line: int, header: list[str]) -> None:
    """Two columns of one name: a dict keeps only the last, so the other's cells would be lost."""
    seen: dict[str, int] = {}
    for i, name in enumerate(header, 1):
        if name in seen:
            raise DataSourceError(f"{path} line {line}: the header names column {name!r} twice (columns "
                                  f"{seen[name]} and {i}); a row keeps only one of them. Rename or drop one "
                                  "in the header")
        seen[name] = i


def _check_cells(path: str, header: list[str], line: int, cells: list[str]) -> None:
    """A row with more or fewer cells than the header (an unquoted comma in a text) would shift its
    columns."""
    if len(cells) != len(header):
        raise DataSourceError(
            f"{path} line {line}: {len(cells)} cells, but the header has {len(header)} "
            f"({', '.join(header)}); a text with a comma (or a line break) must be quoted (\"a, b\"): write "
            "the file with a CSV writer (csv.writer, pandas to_csv), or as JSON Lines")


def _plan_csv(path: str, first_row_id: int) -> list[Chunk]:
    """One chunk per file; the planning pass reads every record, so a row whose cell count is not the header's
    is an error here, on the driver, before anything trains (the reader checks again: the file may change)."""
    n = 0
    with _open_text(path) as f:
        rows = _csv_rows(path, f)
        header = next(rows, None)
        if header is not None:
            check_columns(header[1], path)
            _check_header(path, *header)
            for line, cells in rows:
                _check_cells(path, header[1], line, cells)
                n += 1
    return [Chunk("csv", path, first_row_id, 0, n)]


def _plan_json_array(path: str, first_row_id: int) -> list[Chunk]:
    size = os.path.getsize(path)
    if size > JSON_ARRAY_MAX_BYTES:
        raise DataSourceError(
            f"{path} is one JSON array of {size / 2**20:.0f} MiB; a JSON array is parsed whole on the "
            f"driver, so dpo_ray reads arrays of at most {JSON_ARRAY_MAX_BYTES >> 20} MiB. Write it as JSON "
            "Lines (one object per line, e.g. `jq -c '.[]' in.json > in.jsonl`), which is read in parallel "
            "pieces")
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8-sig"))
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
        if c.start == 0 and data.startswith(BOM):
            data = data[len(BOM):]
        for i, raw in enumerate(data.split(b"\n")[: c.n_rows]):
            if raw.strip():
                yield RawRow(c.first_row_id + i, c.first_line + i + 1, _parse_line(raw))
    elif c.kind == "parquet":
        import pyarrow.parquet as pq

        # bounded batches, never the whole row group: a file written as one 200k-row group is not read whole
        # to preview 32 rows, and a read task holds PARQUET_BATCH_ROWS rows as Python objects at a time
        batches = pq.ParquetFile(c.source).iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[c.start])
        i = 0
        for batch in batches:
            for r in batch.to_pylist()[: c.n_rows - i]:
                yield RawRow(c.first_row_id + i, c.first_line + i + 1, r)
                i += 1
            if i >= c.n_rows:
                break
    elif c.kind == "csv":
        with _open_text(c.source) as f:
            rows = _csv_rows(c.source, f)
            header = next(rows, (0, []))[1]
            for i, (line, cells) in enumerate(rows):
                if i >= c.n_rows:
                    break
                _check_cells(c.source, header, line, cells)
                # CSV has no nulls: an empty cell is a null, a bad row in a text column (rows.TEXT_COLUMNS)
                r = {k: (v if v != "" else None) for k, v in zip(header, cells)}
                yield RawRow(c.first_row_id + i, line, r)
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
    # "FILE (why)": data files beside these, not in this split
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings for the run's data summary


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _names(split: str) -> set[str]:
    s = split.lower()
    return {s, *SPLIT_ALIASES.get(s, ())}


def _words(part: str) -> list[str]:
    return [w for w in re.split(r"[-_.\s]+", part.lower()) if w]


def split_of(rel: Path, splits: tuple[str, ...]) -> str | None:
    """The split a file's path names: its folders (relative to the dataset root) and its stem, cut into
    words at - _ . and spaces ('train/0.jsonl', 'prefs_train.jsonl', 'train-00000-of-00002.parquet' ->
    'train'). ``splits`` (the configured names, first wins on a tie) and OTHER_SPLITS are recognised; None: no
    split named; '?': two."""
    words = {w for part in (*rel.parent.parts, rel.stem) for w in _words(part)}
    named = [sp for sp in splits if words & _names(sp)]
    known = set().union(*(_names(sp) for sp in splits))
    named += sorted(words & set(OTHER_SPLITS) - known)
    if not named:
        return None
    return named[0] if len(named) == 1 else "?"


def split_files(root: Path, split: str, other: str | None, fallback: bool,
                files: list[Path] | None = None) -> tuple[list[Path], list[str]]:
    """(files of ``split`` in directory ``root``, "FILE (why)" for the data files left out).

    The files named for ``split``; when none is and ``fallback``, the files named for no split. A file named
    for another split (``other``, or one of OTHER_SPLITS) or for two is never taken, so no file is in two
    splits. ``files``: the candidates (a glob's matches, each under ``root``); default every data file under
    ``root``."""
    files = _data_files(root) if files is None else files
    splits = (split,) if not other or other == split else (split, other)
    label = {f: split_of(f.relative_to(root), splits) for f in files}
    chosen = [f for f in files if label[f] == split]
    if not chosen and fallback:
        chosen = [f for f in files if label[f] is None]
    why = {None: "named for no split", "?": "named for two splits"}
    ignored = [f"{f} ({why.get(label[f], f'named for split {label[f]!r}')})" for f in files
               if f not in chosen]
    return chosen, ignored


def _sibling(path: Path, train_split: str, test_split: str) -> Path | None:
    """The eval file a training file's name pairs it with, only when the names say so: the train word replaced
    by the test split (train.jsonl -> test.jsonl, foo_train.parquet -> foo_test.parquet), or for a name with
    no split word, the name + _test / -test (prefs.jsonl -> prefs_test.jsonl). Never an unrelated
    test.jsonl."""
    parts = re.split(r"([-_.\s]+)", path.stem)
    hits = [i for i, part in enumerate(parts) if part.lower() in _names(train_split)]
    if hits:
        stems = ["".join(test_split if j == i else part for j, part in enumerate(parts)) for i in hits]
    elif split_of(Path(path.name), (train_split, test_split)) is None:
        stems = [f"{path.stem}{sep}{test_split}" for sep in ("_", "-", ".")]
    else:
        return None  # the file is itself named for another split
    cands = [path.with_name(stem + path.suffix) for stem in stems]
    return next((c for c in cands if c.is_file() and c != path), None)


def _is_save_to_disk(d: Path) -> bool:
    return (d / "dataset_dict.json").exists() or (d / "state.json").exists()


def resolve(name: str, split: str, config: str | None, other_split: str | None = None) -> Resolved:
    """dataset_name (file, glob, directory, save_to_disk dir, hub name) -> files or a datasets.Dataset.

    A directory gives the files named for ``split``, else the files named for no split (``split_files``);
    ``other_split`` is the split the same directory's other files may be named for (never taken here)."""
    p = Path(name).expanduser()
    if p.is_file():
        return Resolved(files=[str(p)], label=str(p))
    if p.is_dir():
        if _is_save_to_disk(p):
            return Resolved(table=_load_from_disk(p, split), label=f"{p} [{split}]")
        if not _data_files(p):
            raise DataSourceError(f"dataset_name={name!r} is a directory with no .jsonl/.json/.parquet/.csv "
                                  "files and is not a save_to_disk directory")
        chosen, ignored = split_files(p, split, other_split, fallback=True)
        if not chosen:
            raise DataSourceError(
                f"dataset_name={name!r}: no file in this directory is named for split {split!r} or for no "
                f"split, so none is training data ({'; '.join(ignored)}). Name the training files *{split}* "
                "(or set dataset_train_split), or give one file as dataset_name")
        return Resolved(files=[str(f) for f in chosen], label=str(p), ignored=ignored)
    if is_glob(name):
        root, files = glob_files(name)
        if not files:
            raise DataSourceError(f"dataset_name={name!r} is a glob that matches no files")
        chosen, ignored = split_files(root, split, other_split, fallback=True, files=files)
        if not chosen:
            raise DataSourceError(
                f"dataset_name={name!r}: no file the glob matches is named for split {split!r} or for no "
                f"split below {str(root)!r} ({'; '.join(ignored[:5])}). Name the training files or folders "
                f"*{split}* (or set dataset_train_split), or narrow the glob to the files to train on")
        return Resolved(files=[str(f) for f in chosen], label=name, ignored=ignored)
    return Resolved(table=_load_hub(name, config, split), label=f"{name} [{split}]")


def is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def glob_files(pattern: str) -> tuple[Path, list[Path]]:
    """(the glob's fixed folder, its data files). A split is read from the path below the fixed folder -- the
    folders and the file name the wildcards matched (``data/**/*.jsonl`` over ``data/train/`` and
    ``data/test/``) -- never from the folders the pattern names itself (``runs/test_3/*.jsonl`` is the user's
    choice)."""
    pattern = os.path.expanduser(pattern)
    fixed = []
    for part in Path(pattern).parts:
        if is_glob(part):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    return root, [Path(f) for f in sorted(glob.glob(pattern, recursive=True)) if Path(f).is_file()]


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
            f"dataset_name={name!r} is not a local file, directory or glob, so it was looked up on the "
            f"Hugging Face hub, which failed ({type(e).__name__}: {str(e)[:200]}). The hub cannot be reached "
            "from this machine: download the dataset where it can "
            "(datasets.load_dataset(...).save_to_disk(DIR), or the jsonl/parquet files), copy it here, and "
            "pass the local path as dataset_name.") from None


def eval_files_beside(train: Resolved, name: str, train_split: str, test_split: str | None,
                      config: str | None = None) -> Resolved | None:
    """The eval split that sits beside the training data, when names say so: the paired sibling of a training
    file (``_sibling``), the files named for ``test_split`` in the directory, a DatasetDict's split."""
    if test_split is None:
        return None
    p = Path(name).expanduser()
    if p.is_file():
        sib = _sibling(p, train_split, test_split)
        return Resolved(files=[str(sib)], label=str(sib)) if sib else None
    if p.is_dir() and not _is_save_to_disk(p):
        files, _ = split_files(p, test_split, train_split, fallback=False)
        return Resolved(files=[str(f) for f in files], label=str(p)) if files else None
    # a glob: its files named for the test split
    if train.files is not None and is_glob(name) and not p.exists():
        root, matched = glob_files(name)
        files, _ = split_files(root, test_split, train_split, fallback=False, files=matched)
        return Resolved(files=[str(f) for f in files], label=name) if files else None
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
