"""Bad-row and row counts gathered from distributed Ray Data tasks.

Each processed piece reports its ``PartStats`` under a stable key (split, chunk, piece) to one small
actor (``num_cpus=0``). Keys make the counts idempotent: a dataset re-executed every epoch, or a retried
task, overwrites its own entry instead of counting twice. The actor answers each report with the split's
running totals, so a task stops the run once more than ``max_dropped_fraction`` of the rows read so far
were dropped (after ``DROP_CHECK_MIN_ROWS`` rows, or the whole split when it is smaller).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray

from dpo_ray.data.rows import BAD_ROW_KINDS
from dpo_ray.errors import TooFewRowsError
from dpo_ray.ledger import DataCounts, on_driver_node

DROP_CHECK_MIN_ROWS = 2000  # rows read before the running dropped fraction may stop a run
_FIX = ("run `dpo-ray inspect-data` with the same flags to list the bad rows; fix the data, or raise "
        "max_dropped_fraction (1.0 turns this check off)")


def too_many_dropped(split: str, seen: int, dropped: dict[str, int], limit: float) -> str | None:
    """The problem when every row read was dropped, or more than ``limit`` of them; else None."""
    n = sum(dropped.values())
    if seen == 0 or n == 0:
        return None
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]) if v)
    if n >= seen:
        return f"all {seen} {split} rows read were dropped ({kinds}): nothing to train on; {_FIX}"
    if n / seen > limit:
        return (f"{n} of {seen} {split} rows read were dropped ({n / seen:.0%}, above max_dropped_fraction="
                f"{limit:g}; {kinds}): the data is mostly unusable for this run; {_FIX}")
    return None


def summarize(parts: list[tuple[tuple, dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, part in parts:
        split = key[0]
        s = out.setdefault(split, {"rows_seen": 0, "rows_kept": 0, "rows_truncated": 0,
                                   "dropped": Counter(), "examples": []})
        s["rows_seen"] += part["seen"]
        s["rows_kept"] += part["kept"]
        s["rows_truncated"] += part["truncated"]
        s["dropped"].update(part["dropped"])
        s["examples"] += part["examples"][: max(0, 10 - len(s["examples"]))]
    for s in out.values():
        s["dropped"] = {k: s["dropped"].get(k, 0) for k in BAD_ROW_KINDS if s["dropped"].get(k)}
        s["rows_dropped"] = sum(s["dropped"].values())
    return out


class DataStats:
    """Handle to the run's data counts. ``report()`` (on the driver, after the run) returns::

        {"train": {"rows_seen", "rows_kept", "rows_dropped", "rows_truncated", "dropped": {kind: n},
                   "examples": [first messages]}, "eval": {...}, "rows_dropped": total}

    Counts cover the rows the pipeline has processed so far (a split never read is absent).
    """

    def __init__(self):
        self.actor = DataCounts.options(scheduling_strategy=on_driver_node()).remote()

    def recorder(self, split: str, max_dropped_fraction: float = 1.0,
                 expected_rows: int = 0) -> StatsRecorder:
        return StatsRecorder(self.actor, split, max_dropped_fraction, expected_rows)

    def report(self) -> dict[str, Any]:
        out = summarize(ray.get(self.actor.parts_list.remote()))
        out["rows_dropped"] = sum(s["rows_dropped"] for s in out.values())
        return out


class StatsRecorder:
    """Shipped into the map tasks: records one part per key (blocking, one small RPC per piece), and raises
    TooFewRowsError when the split's running dropped fraction passes ``max_dropped_fraction``."""

    def __init__(self, actor, split: str, max_dropped_fraction: float = 1.0, expected_rows: int = 0):
        self.actor, self.split = actor, split
        self.limit = max_dropped_fraction
        self.min_rows = min(DROP_CHECK_MIN_ROWS, expected_rows) if expected_rows > 0 else DROP_CHECK_MIN_ROWS

    def __call__(self, key: tuple, part: dict) -> None:
        totals = ray.get(self.actor.record.remote((self.split, *key), part))
        if totals["seen"] >= self.min_rows:
            problem = too_many_dropped(self.split, totals["seen"], totals["dropped"], self.limit)
            if problem:
                raise TooFewRowsError(problem)


def check_trained(steps: int | None, planned_steps: int, report: dict[str, Any], rows_estimate: int,
                  limit: float) -> str | None:
    """After a run, on the driver: raise TooFewRowsError when it trained 0 optimizer steps or dropped more
    than ``limit`` of a split's rows; else a plain note when it ended before its planned steps (None when
    not).

    ``report``: ``DataStats.report()``; ``rows_estimate``: the raw row count the steps were planned from."""
    for split in ("train", "eval"):
        s = report.get(split)
        problem = s and too_many_dropped(split, s["rows_seen"], s["dropped"], limit)
        if problem:
            raise TooFewRowsError(problem)
    train = report.get("train") or {}
    kept, seen = train.get("rows_kept", 0), train.get("rows_seen", 0)
    why = (f"{kept} of the {seen} training rows read were kept ({train.get('rows_dropped', 0)} dropped: "
           f"{train.get('dropped') or {}}), against the ~{rows_estimate} rows counted to plan the steps")
    if steps == 0:
        raise TooFewRowsError(
            f"the run trained 0 optimizer steps: {why}, too few for one batch on every worker. The weights "
            "in output_dir are the untouched input weights. Give more rows, or lower "
            "per_device_train_batch_size / gradient_accumulation_steps / ray.num_workers")
    if steps is not None and steps < planned_steps:
        return (f"the run trained {steps} optimizer steps, not the {planned_steps} first planned: {why}. "
                "After its first epoch the run sized its steps and learning-rate schedule by the rows kept")
    return None
