"""The run's bookkeeping actors: the progress board (rank 0's steps and start-up marks, read by the driver's
display) and the data counts (dpo_ray.data.stats). Zero-CPU actors pinned to the driver's node. This module
imports only the standard library and Ray, and ``dpo_ray/__init__`` imports nothing eagerly, so each actor is
a small process: no torch, transformers or pydantic (was ~190 MiB PSS and a torch import each on every run).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import ray


def on_driver_node():
    """Scheduling strategy for the bookkeeping actors: the driver's node, which lives as long as the run does;
    a 0-CPU actor left to Ray's default may land on a worker node and be lost with it. Hard affinity: a soft
    one spilled to another node 3 times in 4 on a fresh head whose worker pool was still starting (ray 2.60,
    cluster_utils, 2026-11-30)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where rank 0 posts its start and each optimizer step (a zero-CPU actor); the driver's progress display
    reads it. Times are taken here, on the board, so rates do not depend on when the driver happens to
    poll."""

    def __init__(self):
        self.state: dict = {"step": None}
        self.stages: dict[str, float] = {}  # rank 0's start-up marks (dpo_ray.timeline), wall clock

    def mark(self, name: str, at: float) -> None:
        self.stages.setdefault(name, at)

    def marks(self) -> dict[str, float]:
        return dict(self.stages)

    def post(self, step: int, fields: dict) -> None:
        now = time.time()
        self.state.update(fields)
        self.state.update(step=step, t=now)
        self.state.setdefault("first", (step, now))  # the loop's start (or resume) step and time

    def read(self) -> dict:
        return dict(self.state)


@ray.remote(num_cpus=0, max_restarts=0)
class DataCounts:
    """The data counts of a run's splits (dpo_ray.data.stats): one entry per processed piece, kept by key."""

    def __init__(self):
        self.parts: dict[tuple, dict] = {}
        self.totals: dict[str, dict[str, Any]] = {}  # split -> {"seen", "dropped": Counter}, kept current

    def record(self, key: tuple, part: dict) -> dict[str, Any]:
        """Store one piece's counts; return its split's totals {"seen", "dropped": {kind: n}}."""
        t = self.totals.setdefault(key[0], {"seen": 0, "dropped": Counter()})
        old = self.parts.get(key)
        if old is not None:  # the same piece read again (next epoch, retried task): replace, not add
            t["seen"] -= old["seen"]
            t["dropped"].subtract(old["dropped"])
        self.parts[key] = part
        t["seen"] += part["seen"]
        t["dropped"].update(part["dropped"])
        return {"seen": t["seen"], "dropped": {k: v for k, v in t["dropped"].items() if v}}

    def parts_list(self) -> list[tuple[tuple, dict]]:
        return list(self.parts.items())
