"""The inspect-data run: the training source planned as training plans it, analysed by Ray Data tasks.

    source chunks --map_batches(read + Analyzer.analyze, fractional CPU)--> pickled Pieces --> driver merge

Same sources, chunking and row steps as ``dpo_ray.data.build_datasets``; the tasks return counts instead
of token ids, so only a few bytes per row reach the driver (about 28 bytes of lengths per row).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpo_ray.data.analyze import Analyzer, Piece
from dpo_ray.data.pipeline import DATA_TASK_CPUS, chunk_pieces, table_rows
from dpo_ray.data.plan import PIECE_ROWS, PREFLIGHT_ROWS, Source, describe_inputs, plan_sources
from dpo_ray.data.sources import iter_chunk
from dpo_ray.errors import DataSourceError
from dpo_ray.preflight.report import build_report, format_console, parameter_count, write_report
from dpo_ray.progress import Progress


def _encode(piece: Piece) -> pa.Table:
    return pa.table({"piece": pa.array([pickle.dumps(piece, protocol=5)], type=pa.binary())})


class _ChunkUDF:
    """One chunk spec in, one pickled Piece per PIECE_ROWS rows out."""

    def __init__(self, analyzer: Analyzer):
        self.analyzer = analyzer

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for chunk, _, rows in chunk_pieces(batch):
            if rows:
                yield _encode(self.analyzer.analyze(rows, chunk.source))


class _TableUDF:
    """In-memory tables (datasets.Dataset, ray.data.Dataset) whose rows carry ``row_id``."""

    def __init__(self, analyzer: Analyzer, label: str):
        self.analyzer, self.label = analyzer, label

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _encode(self.analyzer.analyze(table_rows(batch), self.label))


def _plan(cfg, dataset: Any, max_rows: int | None, tokenizer=None) -> Source:
    """The training source exactly as build_datasets plans it: every row (no held-out split), capped."""
    cap = max_rows if max_rows is not None else cfg.max_train_samples
    whole = cfg.model_copy(update={"eval_fraction": 0.0, "max_train_samples": cap, "eval_dataset_name": None,
                                   "dataset_test_split": None})
    src, _, _ = plan_sources(whole, dataset, None, tokenizer)
    return src


def _inputs(cfg, dataset: Any, tokenizer, src: Source) -> dict[str, Any]:
    """The tokenizer, train and eval files as `dpo-ray train` would use them (planning only, no rows read;
    an in-memory ``dataset`` is the training data as given, ``src``, with no eval split)."""
    if dataset is not None:
        return describe_inputs(cfg, tokenizer, src, None, 0.0, src.num_rows)
    train, ev, frac = plan_sources(cfg, None, None, tokenizer)
    n = train.num_rows - (round(train.num_rows * frac) if frac else 0)
    return describe_inputs(cfg, tokenizer, train, ev, frac, min(n, cfg.max_train_samples or n))


def _preflight(src: Source, analyzer: Analyzer) -> None:
    """The first rows on the driver: a source or template error surfaces here, not inside a Ray task."""
    if src.preview is not None:
        analyzer.analyze(src.preview, src.label)
    elif src.chunks:
        analyzer.analyze([r for _, r in zip(range(PREFLIGHT_ROWS), iter_chunk(src.chunks[0]))],
                         src.chunks[0].source)
    elif src.chunks is not None:
        raise DataSourceError(f"{src.label}: no rows")


def _pieces(src: Source, analyzer: Analyzer) -> Iterator[Piece]:
    import ray

    if src.chunks is not None:
        items = [c.to_item() for c in src.chunks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_ChunkUDF(analyzer), batch_size=1, batch_format="pyarrow",
                            num_cpus=DATA_TASK_CPUS)
    else:
        ds = src.dataset().map_batches(_TableUDF(analyzer, src.label), batch_size=PIECE_ROWS,
                                    batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for blob in batch.column("piece").to_pylist():
            yield pickle.loads(blob)


def _parameters(cfg, tokenizer) -> dict[str, Any]:
    try:
        n, source = parameter_count(cfg.model_name_or_path, tokenizer, cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - an unknown architecture only costs the FLOPs estimate
        n, source = None, f"could not build the model config ({type(e).__name__}: {str(e)[:120]})"
    ref = cfg.reference.model_name_or_path
    n_ref = None
    if ref and ref != cfg.model_name_or_path:
        try:
            n_ref = parameter_count(ref, tokenizer, cfg.trust_remote_code)[0]
        except Exception:  # noqa: BLE001
            n_ref = None
    return {"policy": n, "reference": n_ref, "source": source}


def inspect_data(cfg, *, dataset: Any = None, tokenizer=None, max_rows: int | None = None,
                 progress: bool = True) -> tuple[dict[str, Any], Piece]:
    """(report dict, merged Piece) for the training data of ``cfg`` (or ``dataset``). Needs Ray
    initialised."""
    from dpo_ray.data import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    keep = cfg.inspect.example_rows
    analyzer = Analyzer(tok, cfg, keep=keep)
    src = _plan(cfg, dataset, max_rows, tok)
    inputs = _inputs(cfg, dataset, tok, src)
    _preflight(src, analyzer)
    bar = Progress("inspect-data", src.num_rows or None, "rows", form=None if progress else "off")
    total = Piece()
    for piece in _pieces(src, analyzer):
        total.merge(piece, keep)
        bar.update(total.rows)
    bar.close()
    name = cfg.model_name_or_path or ("bundled" if tokenizer is None
                                      else getattr(tok, "name_or_path", "") or "given")
    report = build_report(total, cfg, dataset=src.label, tokenizer_name=name, params=_parameters(cfg, tok),
                          keep=keep, rows_counted=src.num_rows, inputs=inputs)
    return report, total


def _data_error(e: BaseException) -> tuple[str, int] | None:
    """(the user-facing message, exit status) of a data/source/template failure (also inside a Ray task
    error): a DataError exits 3, another ValueError (a tokenizer with no chat template) 1; else None."""
    from dpo_ray.data import unwrap_data_error

    data = unwrap_data_error(e)
    if data is not None:
        return str(data), data.exit_code
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is s for s in seen):
            continue
        seen.append(x)
        if isinstance(x, (ValueError, FileNotFoundError)):
            return (str(x).strip().splitlines()[-1] if "Traceback" in str(x) else str(x)), 1
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    return None


def run_inspect(cfg, report_dir: str | Path | None = None, max_rows: int | None = None, *,
                dataset: Any = None, tokenizer=None) -> int:
    """``dpo-ray inspect-data``: print the report, write JSON + PNGs to ``report_dir`` (default
    ``<output_dir>/data_report``), return 0 when clean, 1 when an error-level check fires, 3 when the data
    (or the model directory's tokenizer) cannot be read at all (``DataError.exit_code``)."""
    from dpo_ray.cluster import init_ray

    init_ray(cfg)
    try:
        report, piece = inspect_data(cfg, dataset=dataset, tokenizer=tokenizer, max_rows=max_rows)
    except Exception as e:
        found = _data_error(e)
        if found is None:
            raise
        print(f"dpo-ray inspect-data: the training pipeline cannot read this data: {found[0]}",
              file=sys.stderr)
        return found[1]
    out_dir = Path(report_dir) if report_dir is not None else Path(cfg.output_dir) / "data_report"
    write_report(report, piece, cfg, out_dir)
    print(format_console(report))
    return int(report["exit_status"])
