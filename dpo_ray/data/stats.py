"""Bad-row and row counts gathered from distributed Ray Data tasks.

Each processed piece reports its ``PartStats`` under a stable key (split, chunk, piece) to one small
actor (``num_cpus=0``). Keys make the counts idempotent: a dataset re-executed every epoch, or a retried
task, overwrites its own entry instead of counting twice.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray

from dpo_ray.data.rows import BAD_ROW_KINDS


@ray.remote(num_cpus=0, max_restarts=0)
class _StatsActor:
    def __init__(self):
        self.parts: dict[tuple, dict] = {}

    def record(self, key: tuple, part: dict) -> None:
        self.parts[key] = part

    def parts_list(self) -> list[tuple[tuple, dict]]:
        return list(self.parts.items())


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
        self.actor = _StatsActor.remote()

    def recorder(self, split: str) -> StatsRecorder:
        return StatsRecorder(self.actor, split)

    def report(self) -> dict[str, Any]:
        out = summarize(ray.get(self.actor.parts_list.remote()))
        out["rows_dropped"] = sum(s["rows_dropped"] for s in out.values())
        return out


class StatsRecorder:
    """Shipped into the map tasks: records one part per key (blocking, one small RPC per piece)."""

    def __init__(self, actor, split: str):
        self.actor, self.split = actor, split

    def __call__(self, key: tuple, part: dict) -> None:
        ray.get(self.actor.record.remote((self.split, *key), part))
