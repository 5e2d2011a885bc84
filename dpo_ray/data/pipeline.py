"""build_datasets: sources -> Ray Data pipelines of tokenized rows (docs/CONTRACTS.md), lazily.

    source chunks (driver plan) --map_batches(read + normalise + template + tokenize + truncate)--> rows

One fused ``map_batches`` stage per split, fractional CPUs (``DATA_TASK_CPUS``) so it runs beside
training workers on a small Ray. Nothing is tokenized before training asks for the first batch, except
a preflight of the first few rows on the driver, which surfaces format errors before workers start.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dpo_ray import ray_private
from dpo_ray.data.plan import (
    PIECE_ROWS,
    PREFLIGHT_ROWS,
    Source,
    describe_inputs,
    detect_mode,
    plan_sources,
)
from dpo_ray.data.sources import Chunk, iter_chunk
from dpo_ray.data.stats import DataStats, StatsRecorder, too_many_dropped
from dpo_ray.data.tokenize import RawRow, RowProcessor, TokenizeOptions, table_to_columns
from dpo_ray.errors import DataSourceError, TooFewRowsError

DATA_TASK_CPUS = 0.25
BLOCK_BYTES = 1 << 20  # target output block size: small blocks reach the first batch sooner


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


# ------------------------------------------------------------------------------------------- pipeline
def _preflight(src: Source, proc: RowProcessor, split: str = "train", max_dropped: float = 1.0) -> list:
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


def _concurrency(cfg) -> int:
    """Tasks in flight: dataset_num_proc, else the driver's cores (with fractional CPUs Ray would run
    4x more on a small box, time-slicing them so the first block arrives last)."""
    import os

    return cfg.dataset_num_proc or max(2, os.cpu_count() or 2)


def _dataset(src: Source, proc: RowProcessor, rule: SplitRule, record: StatsRecorder, limit: int | None,
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
    train_src, eval_src, frac = plan_sources(cfg, train_dataset, eval_dataset, tokenizer)
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
