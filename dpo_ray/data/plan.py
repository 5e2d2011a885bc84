"""The source plan: what a run's data is before anything is tokenized. ``plan_sources`` turns the config
and the datasets given into a training ``Source`` and an eval ``Source`` (files cut into chunks, or an
in-memory table); ``detect_mode`` tells pairs from prompt groups by the first row; ``describe_inputs`` says
which files a run uses and which it leaves out. Training (``pipeline.build_datasets``) and ``dpo-ray
inspect-data`` both read sources through these."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

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
from dpo_ray.data.tokenize import RawRow
from dpo_ray.data.tokenizers import describe_tokenizer, is_bundled_tokenizer
from dpo_ray.errors import DataSourceError

PIECE_ROWS = 1024  # rows tokenized per call (and per output block)
PREFLIGHT_ROWS = 32


@dataclass
class Source:
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


def from_table(table, label: str, max_rows: int | None) -> Source:
    """A datasets.Dataset / pyarrow.Table -> in-memory Ray dataset with a row_id column (made when read)."""
    if not isinstance(table, pa.Table):
        table = table.with_format("arrow")[:]  # respects select/shuffle index mappings
    check_columns(table.column_names, label)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    table = table.append_column("row_id", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    blocks = [table.slice(i, PIECE_ROWS * 4) for i in range(0, max(table.num_rows, 1), PIECE_ROWS * 4)]
    preview = [RawRow(r.pop("row_id"), None, r) for r in table.slice(0, PREFLIGHT_ROWS).to_pylist()]
    return Source(label, table.num_rows, table_blocks=blocks, preview=preview)


def from_ray(ds, max_rows: int | None) -> Source:
    """A user's ray.data.Dataset: materialised once to give every row a stable row_id (block order)."""
    import ray

    if max_rows is not None:
        ds = ds.limit(max_rows)
    check_columns(ds.schema().names if ds.schema() is not None else [], "ray.data.Dataset")
    if "row_id" in (ds.schema().names if ds.schema() is not None else []):
        return Source("ray.data.Dataset", ds.count(), ray_ds=ds)
    refs = ds.to_arrow_refs()
    counts = ray.get([_num_rows.remote(r) for r in refs])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int) if counts else []
    with_ids = [_add_row_ids.remote(r, int(o)) for r, o in zip(refs, offsets)]
    return Source("ray.data.Dataset", int(sum(counts)), ray_ds=ray.data.from_arrow_refs(with_ids))


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


def from_resolved(r: Resolved, max_rows: int | None) -> Source:
    if r.table is not None:
        src = from_table(r.table, r.label, max_rows)
    else:
        chunks, n = plan_files(r.files, max_rows)
        src = Source(r.label, n, chunks=chunks, files=list(r.files))
    src.ignored, src.notes = list(r.ignored), list(r.notes)
    return src


def plan_source(data: Any, max_rows: int | None) -> Source:
    """Any accepted dataset (a path, rows, a datasets / Ray / Arrow table) -> its Source."""
    import ray

    if isinstance(data, list):
        rows = data[:max_rows] if max_rows is not None else data
        return Source("in-memory rows", len(rows), chunks=plan_rows(rows))
    if isinstance(data, ray.data.Dataset):
        return from_ray(data, max_rows)
    if isinstance(data, (str, Path)):
        return from_resolved(resolve(str(data), "train", None), max_rows)
    try:
        import datasets

        if isinstance(data, datasets.DatasetDict):
            raise DataSourceError("got a DatasetDict; pass one split (ds['train']) as train_dataset and "
                                  "another as eval_dataset")
        if isinstance(data, datasets.Dataset):
            return from_table(data, "datasets.Dataset", max_rows)
    except ImportError:
        pass
    if isinstance(data, pa.Table):
        return from_table(data, "pyarrow.Table", max_rows)
    raise DataSourceError(f"unsupported dataset type {type(data).__name__}; pass a datasets.Dataset, a "
                          "ray.data.Dataset, a list of dicts, or a path")


def first_rows(src: Source) -> list:
    """The first raw rows of a source, as read (the format detection's sample)."""
    if src.preview is not None:
        return [r.value for r in src.preview]
    if src.chunks:
        return [r.value for _, r in zip(range(PREFLIGHT_ROWS), iter_chunk(src.chunks[0]))]
    return []


def has_group_column(src: Source) -> bool:
    """A Ray dataset source (no rows read on the driver): its schema names a ``completions`` column."""
    ds = src.ray_ds if src.chunks is None and src.preview is None else None
    schema = ds.schema() if ds is not None else None
    return schema is not None and "completions" in schema.names


def detect_mode(src: Source, cfg, mode: str) -> str:
    """``"groups"`` when a DPO source's first row is a prompt group (``completions``: dpo_ray.data.groups),
    else ``mode``. The first row decides for the whole dataset, eval included; a row of the other format is a
    bad row."""
    from dpo_ray.data.groups import is_group_row

    if mode != "dpo":
        return mode
    rows = first_rows(src)
    if not (is_group_row(rows[0]) if rows else has_group_column(src)):
        return mode
    if cfg.ld_alpha is not None:
        from dpo_ray.errors import ConfigError

        raise ConfigError([("ld_alpha",
                            f"{src.label} holds prompt groups (completions + scores/ranking); LD-DPO splits "
                            "each pair at its shorter completion, which a response shared by several pairs "
                            "does not have: unset ld_alpha")])
    return "groups"


def listing(files: list[str], label: str, limit: int = 10) -> str:
    if not files:
        return label
    shown = ", ".join(files[:limit]) + (f", ... and {len(files) - limit} more" if len(files) > limit else "")
    return f"{len(files)} file(s): {shown}" if len(files) > 1 else shown


def bundled_default(cfg, tokenizer) -> str:
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


def plan_sources(cfg, train_dataset, eval_dataset, tokenizer=None) -> tuple[Source, Source | None, float]:
    """(train source, eval source or None, held-out fraction to apply to the train source).

    No file is in both: an eval file that is also a training file is an error."""
    frac = cfg.eval_fraction
    if train_dataset is not None:
        train = plan_source(train_dataset, None if frac else cfg.max_train_samples)
        beside = None
    else:
        name = cfg.dataset_name or bundled_default(cfg, tokenizer)
        resolved = resolve(name, cfg.dataset_train_split, cfg.dataset_config, cfg.dataset_test_split)
        train = from_resolved(resolved, None if frac else cfg.max_train_samples)
        beside = eval_files_beside(resolved, name, cfg.dataset_train_split, cfg.dataset_test_split,
                                   cfg.dataset_config)
    if eval_dataset is not None:
        ev = plan_source(eval_dataset, cfg.max_eval_samples)
    elif cfg.eval_dataset_name:
        r = resolve(cfg.eval_dataset_name, cfg.dataset_test_split or "test", cfg.dataset_config,
                    cfg.dataset_train_split)
        ev = from_resolved(r, cfg.max_eval_samples)
    elif beside is not None and (beside.files or beside.table is not None) and not frac:
        ev = from_resolved(beside, cfg.max_eval_samples)
    else:
        return train, (train if frac else None), frac
    both = sorted({str(Path(f).resolve()) for f in train.files} & {str(Path(f).resolve()) for f in ev.files})
    if both:
        raise DataSourceError(f"{', '.join(both)} would be both training and eval data; give "
                              "eval_dataset_name a file that is not in the training data, or set "
                              "dataset_test_split: null")
    return train, ev, 0.0


def describe_inputs(cfg, tokenizer, train_src: Source, eval_src: Source | None, frac: float,
                    n_train: int) -> dict[str, Any]:
    """Which tokenizer, training files and eval rows a run uses, and the data files beside them it leaves out:
    what `dpo-ray train` prints and `dpo-ray inspect-data` reports (``inputs``)."""
    seed = cfg.data_order_seed
    if eval_src is None:
        ev = "none"
    elif frac:
        ev = f"{frac:g} of the training rows held out (eval_fraction, by a hash of row_id and seed {seed})"
    else:
        ev = f"{listing(eval_src.files, eval_src.label)} (~{eval_src.num_rows} rows)"
    if eval_src is not None and cfg.eval_strategy == "no":
        ev += "; not used: eval_strategy is 'no'"
    eval_files = eval_src.files if eval_src is not None and eval_src is not train_src else []
    used = {str(Path(f).resolve()) for f in eval_files}
    not_used = [x for x in train_src.ignored if str(Path(x.rsplit(" (", 1)[0]).resolve()) not in used]
    if len(not_used) > 10:
        not_used = not_used[:10] + [f"... and {len(not_used) - 10} more"]
    return {"tokenizer": describe_tokenizer(tokenizer),
            "train": f"{listing(train_src.files, train_src.label)} (~{n_train} rows)",
            "train_files": list(train_src.files), "eval": ev, "eval_files": list(eval_files),
            "not_used": not_used, "notes": list(train_src.notes)}
