"""build_datasets: sources -> Ray Data pipelines of tokenized rows (docs/CONTRACTS.md), lazily.

    source chunks (driver plan) --map_batches(read + normalise + template + tokenize + truncate)--> rows

One fused ``map_batches`` stage per split, fractional CPUs (``DATA_TASK_CPUS``) so it runs beside
training workers on a small Ray. Nothing is tokenized before training asks for the first batch, except
a preflight of the first few rows on the driver, which surfaces format errors before workers start.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dpo_ray import ray_private
from dpo_ray.data import bundled
from dpo_ray.data.sources import (
    Chunk,
    Resolved,
    check_columns,
    eval_files_beside,
    iter_chunk,
    plan_files,
    plan_rows,
    resolve,
)
from dpo_ray.data.stats import DataStats, StatsRecorder, too_many_dropped
from dpo_ray.data.tokenize import RawRow, RowProcessor, TokenizeOptions, table_to_columns
from dpo_ray.errors import DataSourceError, ModelFilesError, TooFewRowsError

DATA_TASK_CPUS = 0.25
PIECE_ROWS = 1024  # rows tokenized per call (and per output block)
PREFLIGHT_ROWS = 32
BLOCK_BYTES = 1 << 20  # target output block size: small blocks reach the first batch sooner
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ------------------------------------------------------------------------------------------ tokenizer
def load_tokenizer(cfg_or_path: Any = None):
    """The model directory's tokenizer (AutoTokenizer); the bundled one only when there is no model directory
    at all (the embedded default). A model directory without tokenizer files is an error, never the bundled
    tokenizer in its place. Pad falls back to EOS."""
    from transformers import AutoTokenizer

    path = getattr(cfg_or_path, "model_name_or_path", cfg_or_path)
    if path is None:
        tok = AutoTokenizer.from_pretrained(str(bundled.TOKENIZER_DIR))
    elif not Path(path).is_dir():
        raise ModelFilesError(f"model_name_or_path={str(path)!r} is not a directory, so it has no tokenizer "
                              "to load; give the directory that save_pretrained wrote (dpo_ray downloads "
                              "nothing)")
    elif not any((Path(path) / f).exists() for f in _TOKENIZER_FILES):
        raise ModelFilesError(
            f"model_name_or_path={str(path)!r} has no tokenizer files (none of "
            f"{', '.join(_TOKENIZER_FILES)}): model.save_pretrained(DIR) writes only the model; also run "
            "tokenizer.save_pretrained(DIR) for the tokenizer the model was trained with, or pass "
            "processing_class=tokenizer from Python. dpo_ray does not substitute its bundled 66-token "
            "tokenizer for a model of yours")
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer from {path or bundled.TOKENIZER_DIR} has neither a pad nor an "
                             "EOS token; set tokenizer.pad_token before training")
        tok.pad_token = tok.eos_token
    return tok


def load_processing_class(cfg_or_path: Any = None):
    """A vision model directory's AutoProcessor (image processor + tokenizer), else ``load_tokenizer``."""
    from dpo_ray.vision import has_processor, is_vision_model_dir, text_tokenizer

    path = getattr(cfg_or_path, "model_name_or_path", cfg_or_path)
    if not (is_vision_model_dir(path) and has_processor(path)):
        return load_tokenizer(cfg_or_path)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    tok = text_tokenizer(processor)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return processor


def is_bundled_tokenizer(tokenizer) -> bool:
    from dpo_ray.vision import text_tokenizer

    path = getattr(text_tokenizer(tokenizer), "name_or_path", "") or ""
    return bool(path) and Path(path).resolve() == bundled.TOKENIZER_DIR.resolve()


def describe_tokenizer(tokenizer) -> str:
    """'the bundled tokenizer (66 tokens, ...)' / 'DIR (32000 tokens)', for the run's data summary."""
    from dpo_ray.vision import text_tokenizer

    tok = text_tokenizer(tokenizer)
    path = getattr(tok, "name_or_path", "") or type(tok).__name__
    if is_bundled_tokenizer(tokenizer):
        return f"the bundled tokenizer ({len(tok)} tokens, {path})"
    return f"{path} ({len(tok)} tokens)"


# ------------------------------------------------------------------------------------------- in-process
def tokenize_rows(rows: list[dict], tokenizer, cfg, mode: str = "dpo") -> dict[str, Any]:
    """Tokenize a list of raw rows in this process (no Ray): the columns ``collate_pairs`` takes.

    Applies ``cfg.on_bad_row`` exactly as the pipeline does (raise, or skip and drop).
    """
    from dpo_ray.data.groups import is_group_row

    if mode == "dpo" and rows and is_group_row(rows[0]):  # prompt groups: the group columns (collate_groups)
        mode = "groups"
    proc = RowProcessor(tokenizer, TokenizeOptions.from_config(cfg, mode), "in-memory rows")
    table, _ = proc.process([RawRow(i, None, r) for i, r in enumerate(rows)])
    return table_to_columns(table)


# ------------------------------------------------------------------------------------------- split rule
def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def in_eval(row_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic held-out membership: hash(row_id, seed) < fraction. Same rows every run and epoch."""
    h = _splitmix(np.asarray(row_ids, dtype=np.int64).astype(np.uint64)
                  ^ np.uint64(seed * 0x632BE59BD9B4E019 % 2**64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


@dataclass
class SplitRule:
    split: str  # "train" | "eval": which side of the held-out rule this pipeline keeps
    fraction: float = 0.0
    seed: int = 0

    def keep(self, rows: list[RawRow]) -> list[RawRow]:
        if self.fraction <= 0:
            return rows
        mask = in_eval(np.array([r.row_id for r in rows], dtype=np.int64), self.fraction, self.seed)
        want = self.split == "eval"
        return [r for r, m in zip(rows, mask) if bool(m) == want]


# ------------------------------------------------------------------------------------------- map UDFs
def chunk_pieces(batch: pa.Table) -> Iterator[tuple[Chunk, int, list[RawRow]]]:
    """The rows of each chunk spec in ``batch`` (a Ray Data batch of ``Chunk.to_item()`` rows), PIECE_ROWS at
    a time, as (chunk, piece number, rows); a chunk without rows gives one empty piece. Training's and
    inspect-data's UDFs both read chunks through this."""
    for spec in batch.to_pylist():
        chunk = Chunk(**spec)
        piece, k = [], 0
        for row in iter_chunk(chunk):
            piece.append(row)
            if len(piece) == PIECE_ROWS:
                yield chunk, k, piece
                piece, k = [], k + 1
        if piece or k == 0:
            yield chunk, k, piece


def table_rows(batch: pa.Table) -> list[RawRow]:
    """The rows of an in-memory table batch, which carry their ``row_id``."""
    return [RawRow(int(r.pop("row_id")), None, r) for r in batch.to_pylist()]


class _ChunkUDF:
    """Ray Data UDF: one chunk spec in, tokenized tables out (a generator: the first piece is ready early)."""

    def __init__(self, proc: RowProcessor, rule: SplitRule, record: StatsRecorder):
        self.proc, self.rule, self.record = proc, rule, record

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for chunk, k, rows in chunk_pieces(batch):
            self.proc.source = chunk.source
            yield self._process(chunk, k, rows)

    def _process(self, chunk: Chunk, k: int, rows: list[RawRow]) -> pa.Table:
        table, stats = self.proc.process(self.rule.keep(rows))
        self.record((chunk.source, chunk.first_row_id, k), stats.to_dict())
        return table


class _TableUDF:
    """Ray Data UDF for in-memory tables (datasets.Dataset, ray.data.Dataset): rows carry ``row_id``."""

    def __init__(self, proc: RowProcessor, rule: SplitRule, record: StatsRecorder):
        self.proc, self.rule, self.record = proc, rule, record

    def __call__(self, batch: pa.Table) -> pa.Table:
        raw = table_rows(batch)
        table, stats = self.proc.process(self.rule.keep(raw))
        if raw:
            self.record(("table", raw[0].row_id), stats.to_dict())
        return table


# ------------------------------------------------------------------------------------------- sources
@dataclass
class _Source:
    """A planned source: chunks (files, lists) or an in-memory Ray dataset with row_id; and its row count."""

    label: str
    num_rows: int
    chunks: list[Chunk] | None = None
    ray_ds: Any = None
    preview: list[RawRow] | None = None
    files: list[str] = field(default_factory=list)  # the source files, for the run's data summary
    ignored: list[str] = field(default_factory=list)  # "FILE (why)": data files beside them left out
    notes: list[str] = field(default_factory=list)
    # an in-memory table's slices (with row_id), put in the object store on use
    table_blocks: list | None = None

    def dataset(self):
        """The Ray dataset of an in-memory source; a table reaches the object store only here, when read."""
        if self.ray_ds is None and self.table_blocks is not None:
            import ray

            self.ray_ds = ray.data.from_arrow(self.table_blocks)
        return self.ray_ds


def _from_table(table, label: str, max_rows: int | None) -> _Source:
    """A datasets.Dataset / pyarrow.Table -> in-memory Ray dataset with a row_id column (made when read)."""
    if not isinstance(table, pa.Table):
        table = table.with_format("arrow")[:]  # respects select/shuffle index mappings
    check_columns(table.column_names, label)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    table = table.append_column("row_id", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    blocks = [table.slice(i, PIECE_ROWS * 4) for i in range(0, max(table.num_rows, 1), PIECE_ROWS * 4)]
    preview = [RawRow(r.pop("row_id"), None, r) for r in table.slice(0, PREFLIGHT_ROWS).to_pylist()]
    return _Source(label, table.num_rows, table_blocks=blocks, preview=preview)


def _from_ray(ds, max_rows: int | None) -> _Source:
    """A user's ray.data.Dataset: materialised once to give every row a stable row_id (block order)."""
    import ray

    if max_rows is not None:
        ds = ds.limit(max_rows)
    check_columns(ds.schema().names if ds.schema() is not None else [], "ray.data.Dataset")
    if "row_id" in (ds.schema().names if ds.schema() is not None else []):
        return _Source("ray.data.Dataset", ds.count(), ray_ds=ds)
    refs = ds.to_arrow_refs()
    counts = ray.get([_num_rows.remote(r) for r in refs])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int) if counts else []
    with_ids = [_add_row_ids.remote(r, int(o)) for r, o in zip(refs, offsets)]
    return _Source("ray.data.Dataset", int(sum(counts)), ray_ds=ray.data.from_arrow_refs(with_ids))


def _ray_remote(fn):
    import ray

    return ray.remote(num_cpus=0)(fn)


def _num_rows_fn(t: pa.Table) -> int:
    return t.num_rows


def _add_row_ids_fn(t: pa.Table, offset: int) -> pa.Table:
    return t.append_column("row_id", pa.array(np.arange(offset, offset + t.num_rows, dtype=np.int64)))


class _Lazy:
    def __init__(self, fn):
        self.fn, self.remote_fn = fn, None

    def remote(self, *args):
        if self.remote_fn is None:
            self.remote_fn = _ray_remote(self.fn)
        return self.remote_fn.remote(*args)


_num_rows, _add_row_ids = _Lazy(_num_rows_fn), _Lazy(_add_row_ids_fn)


def _from_resolved(r: Resolved, max_rows: int | None) -> _Source:
    if r.table is not None:
        src = _from_table(r.table, r.label, max_rows)
    else:
        chunks, n = plan_files(r.files, max_rows)
        src = _Source(r.label, n, chunks=chunks, files=list(r.files))
    src.ignored, src.notes = list(r.ignored), list(r.notes)
    return src


def _plan(data: Any, max_rows: int | None) -> _Source:
    """Any accepted in-memory dataset -> _Source."""
    import ray

    if isinstance(data, list):
        rows = data[:max_rows] if max_rows is not None else data
        return _Source("in-memory rows", len(rows), chunks=plan_rows(rows))
    if isinstance(data, ray.data.Dataset):
        return _from_ray(data, max_rows)
    if isinstance(data, (str, Path)):
        return _from_resolved(resolve(str(data), "train", None), max_rows)
    try:
        import datasets

        if isinstance(data, datasets.DatasetDict):
            raise DataSourceError("got a DatasetDict; pass one split (ds['train']) as train_dataset and "
                                  "another as eval_dataset")
        if isinstance(data, datasets.Dataset):
            return _from_table(data, "datasets.Dataset", max_rows)
    except ImportError:
        pass
    if isinstance(data, pa.Table):
        return _from_table(data, "pyarrow.Table", max_rows)
    raise DataSourceError(f"unsupported dataset type {type(data).__name__}; pass a datasets.Dataset, a "
                          "ray.data.Dataset, a list of dicts, or a path")


# ------------------------------------------------------------------------------------------- pipeline
def _preflight(src: _Source, proc: RowProcessor, split: str = "train", max_dropped: float = 1.0) -> list:
    """Tokenize the first rows on the driver: a format error (wrong columns, no chat template) surfaces here,
    before any worker starts; when those rows are the whole source, too few usable rows fail here too
    (``on_bad_row: skip``). Counts nothing (the pipeline counts these rows when it reads them).
    Returns those raw rows (the trainer's quick data checks read them)."""
    rows = src.preview
    whole = rows is not None and src.num_rows <= len(rows)
    proc.source = src.label
    if rows is None and src.chunks:
        rows = [r for _, r in zip(range(PREFLIGHT_ROWS + 1), iter_chunk(src.chunks[0]))]
        whole = len(src.chunks) == 1 and len(rows) <= PREFLIGHT_ROWS
        rows = rows[:PREFLIGHT_ROWS]
        proc.source = src.chunks[0].source
    if rows:
        _, stats = proc.process(rows)
        problem = whole and too_many_dropped(split, stats.seen, dict(stats.dropped), max_dropped)
        if problem:
            raise TooFewRowsError(f"{src.label}: {problem}")
    return [r.value for r in rows or [] if isinstance(r.value, dict)]


def _first_rows(src: _Source) -> list:
    """The first raw rows of a source, as read (the format detection's sample)."""
    if src.preview is not None:
        return [r.value for r in src.preview]
    if src.chunks:
        return [r.value for _, r in zip(range(PREFLIGHT_ROWS), iter_chunk(src.chunks[0]))]
    return []


def _has_group_column(src: _Source) -> bool:
    """A Ray dataset source (no rows read on the driver): its schema names a ``completions`` column."""
    ds = src.ray_ds if src.chunks is None and src.preview is None else None
    schema = ds.schema() if ds is not None else None
    return schema is not None and "completions" in schema.names


def detect_mode(src: _Source, cfg, mode: str) -> str:
    """``"groups"`` when a DPO source's first row is a prompt group (``completions``: dpo_ray.data.groups),
    else ``mode``. The first row decides for the whole dataset, eval included; a row of the other format is a
    bad row."""
    from dpo_ray.data.groups import is_group_row

    if mode != "dpo":
        return mode
    rows = _first_rows(src)
    if not (is_group_row(rows[0]) if rows else _has_group_column(src)):
        return mode
    if cfg.ld_alpha is not None:
        from dpo_ray.errors import ConfigError

        raise ConfigError([("ld_alpha",
                            f"{src.label} holds prompt groups (completions + scores/ranking); LD-DPO splits "
                            "each pair at its shorter completion, which a response shared by several pairs "
                            "does not have: unset ld_alpha")])
    return "groups"


def _concurrency(cfg) -> int:
    """Tasks in flight: dataset_num_proc, else the driver's cores (with fractional CPUs Ray would run
    4x more on a small box, time-slicing them so the first block arrives last)."""
    import os

    return cfg.dataset_num_proc or max(2, os.cpu_count() or 2)


def _dataset(src: _Source, proc: RowProcessor, rule: SplitRule, record: StatsRecorder, limit: int | None,
             concurrency: int):
    import ray

    if src.chunks is not None:
        if not src.chunks:
            raise DataSourceError(f"{src.label}: no rows")
        items = [c.to_item() for c in src.chunks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_ChunkUDF(proc, rule, record), batch_size=1, batch_format="pyarrow",
                            num_cpus=DATA_TASK_CPUS,
                            compute=ray.data.TaskPoolStrategy(size=min(concurrency, len(items))))
    else:
        ds = src.dataset().map_batches(_TableUDF(proc, rule, record), batch_size=PIECE_ROWS,
                                       batch_format="pyarrow", num_cpus=DATA_TASK_CPUS,
                                       compute=ray.data.TaskPoolStrategy(size=concurrency))
    if limit is not None:
        ds = ds.limit(limit)
    return ds


@dataclass
class PreparedData:
    """What build_datasets returns. ``train``/``eval`` are lazy Ray datasets of tokenized rows."""

    train: Any  # ray.data.Dataset
    eval: Any  # ray.data.Dataset | None
    stats: DataStats
    num_train_rows_estimate: int
    num_eval_rows_estimate: int = 0
    train_source: str = ""
    eval_source: str = ""
    preview_rows: list = field(default_factory=list)  # the first raw training rows, as read
    inputs: dict[str, Any] = field(default_factory=dict)  # describe_inputs(...): tokenizer, files, eval use
    groups: bool = False  # prompt groups (completions + scores/ranking): a row is a group, not a pair

    def summary(self) -> str:
        """Which tokenizer and which data the run uses (printed by `dpo-ray train` before any worker
        starts)."""
        i = self.inputs
        lines = [f"dpo-ray data: tokenizer {i['tokenizer']}", f"  train: {i['train']}",
                 f"  eval:  {i['eval']}"]
        lines += [f"  not used: {x}" for x in i["not_used"]]
        lines += [f"  warning: {x}" for x in i["notes"]]
        return "\n".join(lines)


def _listing(files: list[str], label: str, limit: int = 10) -> str:
    if not files:
        return label
    shown = ", ".join(files[:limit]) + (f", ... and {len(files) - limit} more" if len(files) > limit else "")
    return f"{len(files)} file(s): {shown}" if len(files) > 1 else shown


def _bundled_default(cfg, tokenizer) -> str:
    """The bundled task's file, only for the embedded default: no model_name_or_path and the bundled
    tokenizer."""
    if cfg.model_name_or_path is not None or (tokenizer is not None and not is_bundled_tokenizer(tokenizer)):
        whose = (f"model_name_or_path={cfg.model_name_or_path!r}" if cfg.model_name_or_path is not None
                 else f"the tokenizer {describe_tokenizer(tokenizer)}")
        raise DataSourceError(
            f"dataset_name is not set. The bundled toy task (sorting digits) is the default data only of the "
            f"bundled tiny model, not of {whose}: give your preference data with --dataset_name "
            "FILE|DIR|GLOB (dataset_name: in YAML, train_dataset= in Python). To train on the toy task on "
            f"purpose, pass --dataset_name {bundled.TRAIN_FILE}")
    return str(bundled.TRAIN_FILE)


def _sources(cfg, train_dataset, eval_dataset, tokenizer=None) -> tuple[_Source, _Source | None, float]:
    """(train source, eval source or None, held-out fraction to apply to the train source).

    No file is in both: an eval file that is also a training file is an error."""
    frac = cfg.eval_fraction
    if train_dataset is not None:
        train = _plan(train_dataset, None if frac else cfg.max_train_samples)
        beside = None
    else:
        name = cfg.dataset_name or _bundled_default(cfg, tokenizer)
        resolved = resolve(name, cfg.dataset_train_split, cfg.dataset_config, cfg.dataset_test_split)
        train = _from_resolved(resolved, None if frac else cfg.max_train_samples)
        beside = eval_files_beside(resolved, name, cfg.dataset_train_split, cfg.dataset_test_split,
                                   cfg.dataset_config)
    if eval_dataset is not None:
        ev = _plan(eval_dataset, cfg.max_eval_samples)
    elif cfg.eval_dataset_name:
        r = resolve(cfg.eval_dataset_name, cfg.dataset_test_split or "test", cfg.dataset_config,
                    cfg.dataset_train_split)
        ev = _from_resolved(r, cfg.max_eval_samples)
    elif beside is not None and (beside.files or beside.table is not None) and not frac:
        ev = _from_resolved(beside, cfg.max_eval_samples)
    else:
        return train, (train if frac else None), frac
    both = sorted({str(Path(f).resolve()) for f in train.files} & {str(Path(f).resolve()) for f in ev.files})
    if both:
        raise DataSourceError(f"{', '.join(both)} would be both training and eval data; give "
                              "eval_dataset_name a file that is not in the training data, or set "
                              "dataset_test_split: null")
    return train, ev, 0.0


def describe_inputs(cfg, tokenizer, train_src: _Source, eval_src: _Source | None, frac: float,
                    n_train: int) -> dict[str, Any]:
    """Which tokenizer, training files and eval rows a run uses, and the data files beside them it leaves out:
    what `dpo-ray train` prints and `dpo-ray inspect-data` reports (``inputs``)."""
    seed = cfg.data_order_seed
    if eval_src is None:
        ev = "none"
    elif frac:
        ev = f"{frac:g} of the training rows held out (eval_fraction, by a hash of row_id and seed {seed})"
    else:
        ev = f"{_listing(eval_src.files, eval_src.label)} (~{eval_src.num_rows} rows)"
    if eval_src is not None and cfg.eval_strategy == "no":
        ev += "; not used: eval_strategy is 'no'"
    eval_files = eval_src.files if eval_src is not None and eval_src is not train_src else []
    used = {str(Path(f).resolve()) for f in eval_files}
    not_used = [x for x in train_src.ignored if str(Path(x.rsplit(" (", 1)[0]).resolve()) not in used]
    if len(not_used) > 10:
        not_used = not_used[:10] + [f"... and {len(not_used) - 10} more"]
    return {"tokenizer": describe_tokenizer(tokenizer),
            "train": f"{_listing(train_src.files, train_src.label)} (~{n_train} rows)",
            "train_files": list(train_src.files), "eval": ev, "eval_files": list(eval_files),
            "not_used": not_used, "notes": list(train_src.notes)}


def build_datasets(cfg, tokenizer, train_dataset: Any = None, eval_dataset: Any = None,
                   mode: str = "dpo") -> PreparedData:
    """Tokenized train (and eval) Ray datasets for ``cfg`` (docs/data.md).

    train_dataset / eval_dataset: a datasets.Dataset, ray.data.Dataset, list of dicts, path, or None
    (then ``cfg.dataset_name``; None = the bundled task, only for the bundled model and tokenizer). Eval:
    ``eval_dataset``, else ``eval_dataset_name``, else a ``dataset_test_split`` file the training file's name
    pairs with (or split files in the directory), else ``eval_fraction`` of the training rows (by a hash of
    row_id and data_seed), else none. Eval rows are checked on the driver only when eval_strategy uses them.
    """
    if mode not in ("dpo", "sft"):
        raise ValueError(f"mode must be 'dpo' or 'sft', got {mode!r}")
    train_src, eval_src, frac = _sources(cfg, train_dataset, eval_dataset, tokenizer)
    seed = cfg.data_order_seed
    mode = detect_mode(train_src, cfg, mode)  # "groups" when the rows are prompt groups
    opts = TokenizeOptions.from_config(cfg, mode)
    limit = cfg.max_dropped_fraction
    preview = _preflight(train_src, RowProcessor(tokenizer, opts), "train", limit)
    stats = DataStats()
    train_rule = SplitRule("train", frac, seed)
    n_train = train_src.num_rows - (round(train_src.num_rows * frac) if frac else 0)
    if cfg.max_train_samples is not None:
        n_train = min(n_train, cfg.max_train_samples)
    train = _dataset(train_src, RowProcessor(tokenizer, opts, train_src.label), train_rule,
                     stats.recorder("train", limit, n_train), cfg.max_train_samples, _concurrency(cfg))
    ev, n_eval = None, 0
    if eval_src is not None:
        n_eval = round(eval_src.num_rows * frac) if frac else eval_src.num_rows
        if cfg.max_eval_samples is not None:
            n_eval = min(n_eval, cfg.max_eval_samples)
        if eval_src is not train_src and cfg.eval_strategy != "no":
            _preflight(eval_src, RowProcessor(tokenizer, opts), "eval", limit)
        ev = _dataset(eval_src, RowProcessor(tokenizer, opts, eval_src.label), SplitRule("eval", frac, seed),
                      stats.recorder("eval", limit, n_eval), cfg.max_eval_samples, _concurrency(cfg))
    for ds in (train, ev):
        if ds is not None:
            _preserve_order(ds)
    return PreparedData(train, ev, stats, int(n_train), int(n_eval), train_src.label,
                        eval_src.label if eval_src is not None else "", preview,
                        describe_inputs(cfg, tokenizer, train_src, eval_src, frac, int(n_train)),
                        mode == "groups")


def ingest_config():
    """Ray Train's ``DataConfig``: the training rows split among the workers (equal shares); the eval rows not
    split: every worker reads them all, in order, and scores its share (``batching.EvalShare``), so every eval
    row counts exactly once whatever the number of workers and the eval batch size."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.data.context import DataContext

    # DataConfig.default_ingest_options(), built here for both datasets because Ray's own copies the
    # deprecated exclude_resources through its warning setter (a RayDeprecationWarning on every run's console)
    current = DataContext.get_current().execution_options

    def options(preserve_order: bool) -> ExecutionOptions:
        return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=preserve_order,
                                verbose_progress=current.verbose_progress)

    # every worker's reading of the eval rows has one order: the shares are disjoint
    return ray.train.DataConfig(
        datasets_to_split=["train"],
        execution_options={"train": options(current.preserve_order), "eval": options(True)})


def _preserve_order(ds) -> None:
    """Deterministic block order (and so deterministic streaming_split contents) for this dataset only."""
    ctx = ds.context.copy() if hasattr(ds.context, "copy") else ds.context
    ctx.execution_options.preserve_order = True
    ctx.target_max_block_size = BLOCK_BYTES
    ray_private.set_dataset_context(ds, ctx)  # the public setter would change every dataset in the process
