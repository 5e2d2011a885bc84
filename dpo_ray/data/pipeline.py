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

from dpo_ray.data import bundled
from dpo_ray.data.sources import (
    Chunk,
    DataSourceError,
    Resolved,
    eval_files_beside,
    iter_chunk,
    plan_files,
    plan_rows,
    resolve,
)
from dpo_ray.data.stats import DataStats, StatsRecorder
from dpo_ray.data.tokenize import RawRow, RowProcessor, TokenizeOptions, table_to_columns

DATA_TASK_CPUS = 0.25
PIECE_ROWS = 1024  # rows tokenized per call (and per output block)
PREFLIGHT_ROWS = 32
BLOCK_BYTES = 1 << 20  # target output block size: small blocks reach the first batch sooner
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ------------------------------------------------------------------------------------------ tokenizer
def load_tokenizer(cfg_or_path: Any = None):
    """The model's tokenizer (AutoTokenizer from its directory), else the bundled one; pad falls back to EOS."""
    from transformers import AutoTokenizer

    path = getattr(cfg_or_path, "model_name_or_path", cfg_or_path)
    if path is not None and Path(path).is_dir() and any((Path(path) / f).exists() for f in _TOKENIZER_FILES):
        tok = AutoTokenizer.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(bundled.TOKENIZER_DIR))
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer from {path or bundled.TOKENIZER_DIR} has neither a pad nor an EOS "
                             "token; set tokenizer.pad_token before training")
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


# ------------------------------------------------------------------------------------------- in-process
def tokenize_rows(rows: list[dict], tokenizer, cfg, mode: str = "dpo") -> dict[str, Any]:
    """Tokenize a list of raw rows in this process (no Ray): the columns ``collate_pairs`` takes.

    Applies ``cfg.on_bad_row`` exactly as the pipeline does (raise, or skip and drop).
    """
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
    h = _splitmix(np.asarray(row_ids, dtype=np.int64).astype(np.uint64) ^ np.uint64(seed * 0x632BE59BD9B4E019 % 2**64))
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
class _ChunkUDF:
    """Ray Data UDF: one chunk spec in, tokenized tables out (a generator: the first piece is ready early)."""

    def __init__(self, proc: RowProcessor, rule: SplitRule, record: StatsRecorder):
        self.proc, self.rule, self.record = proc, rule, record

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for spec in batch.to_pylist():
            chunk = Chunk(**spec)
            self.proc.source = chunk.source
            piece, k = [], 0
            for row in iter_chunk(chunk):
                piece.append(row)
                if len(piece) == PIECE_ROWS:
                    yield self._process(chunk, k, piece)
                    piece, k = [], k + 1
            if piece or k == 0:
                yield self._process(chunk, k, piece)

    def _process(self, chunk: Chunk, k: int, rows: list[RawRow]) -> pa.Table:
        table, stats = self.proc.process(self.rule.keep(rows))
        self.record((chunk.source, chunk.first_row_id, k), stats.to_dict())
        return table


class _TableUDF:
    """Ray Data UDF for in-memory tables (datasets.Dataset, ray.data.Dataset): rows carry ``row_id``."""

    def __init__(self, proc: RowProcessor, rule: SplitRule, record: StatsRecorder):
        self.proc, self.rule, self.record = proc, rule, record

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        raw = [RawRow(int(r.pop("row_id")), None, r) for r in rows]
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


def _from_table(table, label: str, max_rows: int | None) -> _Source:
    """A datasets.Dataset / pyarrow.Table -> in-memory Ray dataset with a row_id column."""
    import ray

    if not isinstance(table, pa.Table):
        table = table.with_format("arrow")[:]  # respects select/shuffle index mappings
    if max_rows is not None:
        table = table.slice(0, max_rows)
    table = table.append_column("row_id", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    blocks = [table.slice(i, PIECE_ROWS * 4) for i in range(0, max(table.num_rows, 1), PIECE_ROWS * 4)]
    preview = [RawRow(r.pop("row_id"), None, r) for r in table.slice(0, PREFLIGHT_ROWS).to_pylist()]
    return _Source(label, table.num_rows, ray_ds=ray.data.from_arrow(blocks), preview=preview)


def _from_ray(ds, max_rows: int | None) -> _Source:
    """A user's ray.data.Dataset: materialised once to give every row a stable row_id (block order)."""
    import ray

    if max_rows is not None:
        ds = ds.limit(max_rows)
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
        return _from_table(r.table, r.label, max_rows)
    chunks, n = plan_files(r.files, max_rows)
    return _Source(r.label, n, chunks=chunks)


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
            raise DataSourceError("got a DatasetDict; pass one split (ds['train']) as train_dataset and another "
                                  "as eval_dataset")
        if isinstance(data, datasets.Dataset):
            return _from_table(data, "datasets.Dataset", max_rows)
    except ImportError:
        pass
    if isinstance(data, pa.Table):
        return _from_table(data, "pyarrow.Table", max_rows)
    raise DataSourceError(f"unsupported dataset type {type(data).__name__}; pass a datasets.Dataset, a "
                          "ray.data.Dataset, a list of dicts, or a path")


# ------------------------------------------------------------------------------------------- pipeline
def _preflight(src: _Source, proc: RowProcessor) -> list:
    """Tokenize the first rows on the driver: a format error (wrong columns, no chat template) surfaces here,
    before any worker starts. Counts nothing (the pipeline counts these rows when it reads them).
    Returns those raw rows (the trainer's quick data checks read them)."""
    rows = src.preview
    if rows is None and src.chunks:
        it = iter_chunk(src.chunks[0])
        rows = [r for _, r in zip(range(PREFLIGHT_ROWS), it)]
        proc.source = src.chunks[0].source
    if rows:
        proc.process(rows)
    return [r.value for r in rows or [] if isinstance(r.value, dict)]


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
                            num_cpus=DATA_TASK_CPUS, concurrency=concurrency)
    else:
        ds = src.ray_ds.map_batches(_TableUDF(proc, rule, record), batch_size=PIECE_ROWS, batch_format="pyarrow",
                                    num_cpus=DATA_TASK_CPUS, concurrency=concurrency)
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


def _sources(cfg, train_dataset, eval_dataset) -> tuple[_Source, _Source | None, float]:
    """(train source, eval source or None, held-out fraction to apply to the train source)."""
    frac = cfg.eval_fraction
    if train_dataset is not None:
        train = _plan(train_dataset, None if frac else cfg.max_train_samples)
        beside = None
    else:
        name = cfg.dataset_name or str(bundled.TRAIN_FILE)
        resolved = resolve(name, cfg.dataset_train_split, cfg.dataset_config)
        train = _from_resolved(resolved, None if frac else cfg.max_train_samples)
        beside = eval_files_beside(resolved, name, cfg.dataset_test_split, cfg.dataset_config)
    if eval_dataset is not None:
        return train, _plan(eval_dataset, cfg.max_eval_samples), 0.0
    if cfg.eval_dataset_name:
        r = resolve(cfg.eval_dataset_name, cfg.dataset_test_split or "test", cfg.dataset_config)
        return train, _from_resolved(r, cfg.max_eval_samples), 0.0
    if beside is not None and (beside.files or beside.table is not None) and not frac:
        return train, _from_resolved(beside, cfg.max_eval_samples), 0.0
    return train, (train if frac else None), frac


def build_datasets(cfg, tokenizer, train_dataset: Any = None, eval_dataset: Any = None,
                   mode: str = "dpo") -> PreparedData:
    """Tokenized train (and eval) Ray datasets for ``cfg`` (docs/data.md).

    train_dataset / eval_dataset: a datasets.Dataset, ray.data.Dataset, list of dicts, path, or None
    (then ``cfg.dataset_name``; None = the bundled task). Eval: ``eval_dataset``, else
    ``eval_dataset_name``, else a ``dataset_test_split`` beside the training data, else ``eval_fraction``
    of the training rows (by a hash of row_id and data_seed), else none.
    """
    if mode not in ("dpo", "sft"):
        raise ValueError(f"mode must be 'dpo' or 'sft', got {mode!r}")
    train_src, eval_src, frac = _sources(cfg, train_dataset, eval_dataset)
    seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
    opts = TokenizeOptions.from_config(cfg, mode)
    preview = _preflight(train_src, RowProcessor(tokenizer, opts))
    stats = DataStats()
    train_rule = SplitRule("train", frac, seed)
    train = _dataset(train_src, RowProcessor(tokenizer, opts, train_src.label), train_rule,
                     stats.recorder("train"), cfg.max_train_samples, _concurrency(cfg))
    n_train = train_src.num_rows - (round(train_src.num_rows * frac) if frac else 0)
    if cfg.max_train_samples is not None:
        n_train = min(n_train, cfg.max_train_samples)
    ev, n_eval = None, 0
    if eval_src is not None:
        if eval_src is not train_src:
            _preflight(eval_src, RowProcessor(tokenizer, opts))
        ev = _dataset(eval_src, RowProcessor(tokenizer, opts, eval_src.label), SplitRule("eval", frac, seed),
                      stats.recorder("eval"), cfg.max_eval_samples, _concurrency(cfg))
        n_eval = round(eval_src.num_rows * frac) if frac else eval_src.num_rows
        if cfg.max_eval_samples is not None:
            n_eval = min(n_eval, cfg.max_eval_samples)
    for ds in (train, ev):
        if ds is not None:
            _preserve_order(ds)
    return PreparedData(train, ev, stats, int(n_train), int(n_eval), train_src.label,
                        eval_src.label if eval_src is not None else "", preview)


def _preserve_order(ds) -> None:
    """Deterministic block order (and so deterministic streaming_split contents) for this dataset only."""
    ctx = ds.context.copy() if hasattr(ds.context, "copy") else ds.context
    ctx.execution_options.preserve_order = True
    ctx.target_max_block_size = BLOCK_BYTES
    ds._context = ctx  # the public setter would change every dataset in the process
    ds._logical_plan.context = ctx
