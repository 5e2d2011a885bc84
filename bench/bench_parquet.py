"""Peak memory of reading a Parquet file written as one large row group, as the JSONL planning
measurement does it (tracemalloc: Python objects) plus Arrow's own pool peak (decoded columns).

    python bench/bench_parquet.py [--rows 200000]

Side by side, in one process each (fresh pools): the baseline, the whole row group read and converted
(``read_row_group(g).to_pylist()``, what ``iter_chunk`` did), and ``iter_chunk`` now (bounded batches of
``PARQUET_BATCH_ROWS``), each for the driver's preview (the first 32 rows) and for a full pass over the rows.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(path: str, how: str, rows: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_ray.data import sources

    pool = pa.default_memory_pool()
    tracemalloc.start()
    t0 = time.perf_counter()
    if how == "whole_group":  # the baseline: the old reader, row for row as iter_chunk yielded them
        from dpo_ray.data.tokenize import RawRow

        got = 0
        for i, r in enumerate(pq.ParquetFile(path).read_row_group(0).to_pylist()[:rows]):
            RawRow(i, i + 1, r)
            got += 1
    else:
        [chunk] = sources.plan_files([path])[0]
        got = 0
        for _ in zip(range(rows), sources.iter_chunk(chunk)):
            got += 1
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"how": how, "rows_read": got, "python_peak_mib": round(peak / 2**20, 1),
            "arrow_pool_peak_mib": round(pool.max_memory() / 2**20, 1), "seconds": round(seconds, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: PATH HOW ROWS in a fresh process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]))))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "one_group.parquet")
        text = "sort: 3 1 4 1 5 9 2 6 = " * 8
        table = pa.table({"prompt": [f"{i} {text}" for i in range(args.rows)],
                          "chosen": [f" {i} 1 1 2 3 4 5 6 9" for i in range(args.rows)],
                          "rejected": [f" {i} 9 6 5 4 3 2 1 1" for i in range(args.rows)]})
        pq.write_table(table, path, row_group_size=args.rows)  # one row group
        assert pq.ParquetFile(path).metadata.num_row_groups == 1
        del table
        print(json.dumps({"file_mib": round(Path(path).stat().st_size / 2**20, 1), "rows": args.rows}))
        for rows in (32, args.rows):
            for how in ("whole_group", "iter_chunk"):
                out = subprocess.run([sys.executable, __file__, "--one", path, how, str(rows)], check=True,
                                     capture_output=True, text=True).stdout
                print(json.dumps({"preview" if rows == 32 else "full_pass": True, **json.loads(out)}),
                      flush=True)


if __name__ == "__main__":
    main()
