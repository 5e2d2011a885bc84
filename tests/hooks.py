"""Training-loop callbacks the tests use (import as ``from hooks import ...``): fault injection, a pause at a
known step, a recorder of every hook call; and a reference host that answers late. They travel to the Ray
Train workers and actors pickled by value: those processes cannot import this test folder."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import ray
import ray.cloudpickle

from dpo_ray.reference.actor import ReferenceModelHost
from dpo_ray.train.callbacks import Callback

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillOnce(Callback):
    """Fault injection: the last rank exits hard at the end of optimizer step ``step``, as a lost worker
    would, once per ``marker`` file (the worker group Ray Train restarts finds it and trains on)."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, Path(marker)

    def on_step_end(self, ctx) -> None:
        if ctx.global_step == self.step and ctx.rank == ctx.world_size - 1 and not self.marker.exists():
            self.marker.write_text("killed once")
            os._exit(1)


class PauseOnce(Callback):
    """Rank 0 stops after optimizer step ``step`` (and its checkpoint), writes ``folder/paused`` and waits (at
    most 300 s) for ``folder/go``, so a test acts at a known point; a restarted worker group finds ``paused``
    and goes on."""

    def __init__(self, step: int, folder: Path):
        self.step, self.folder = step, Path(folder)

    def on_step_end(self, ctx) -> None:
        if ctx.global_step != self.step or ctx.rank != 0 or (self.folder / "paused").exists():
            return
        (self.folder / "paused").write_text(str(ctx.global_step))
        deadline = time.monotonic() + 300
        while not (self.folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


class Recorder(Callback):
    """Appends one JSON line per hook call to ``folder/rank<r>.jsonl``: the hook, the step, the metric names,
    whether the policy is in training mode, the Ray node."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _note(self, hook: str, ctx) -> None:
        with open(self.folder / f"rank{ctx.rank}.jsonl", "a") as f:
            f.write(json.dumps({"hook": hook, "step": ctx.global_step, "total": ctx.total_steps,
                                "world": ctx.world_size, "metrics": sorted(ctx.metrics),
                                "params": sum(p.numel() for p in ctx.model.parameters()),
                                "training": ctx.model.training,
                                "node": ray.get_runtime_context().get_node_id(),
                                "out": str(ctx.output_dir)}) + "\n")

    def on_train_begin(self, ctx) -> None:
        self._note("on_train_begin", ctx)

    def on_log(self, ctx) -> None:
        self._note("on_log", ctx)

    def on_evaluate(self, ctx) -> None:
        self._note("on_evaluate", ctx)

    def on_save(self, ctx) -> None:
        self._note("on_save", ctx)

    def on_step_end(self, ctx) -> None:
        self._note("on_step_end", ctx)

    def on_train_end(self, ctx) -> None:
        self._note("on_train_end", ctx)


def slow_reference(low_s: float, high_s: float) -> type:
    """A ``ReferenceModelHost`` (for ``ReferencePool.create(host_class=...)``) that sleeps a random
    ``low_s``..``high_s`` seconds before each answer, seeded by its process id: the actors of a pool answer
    out of order."""

    class SlowReferenceHost(ReferenceModelHost):
        def logps(self, *args, **kwargs):
            if not hasattr(self, "_delays"):
                self._delays = random.Random(os.getpid())
            time.sleep(self._delays.uniform(low_s, high_s))
            return super().logps(*args, **kwargs)

    return SlowReferenceHost


def word_count(prompt, response: str) -> float:
    """An iterate scorer for a random tiny model: how many words its response has (its samples differ in that:
    they end at a random EOS)."""
    return float(len(response.split()))


def dying_rollout_host(marker: Path) -> type:
    """A ``RolloutHost`` whose first ``generate`` (across every actor of the pool, once per ``marker`` file)
    exits the actor's process hard, as a lost node would."""
    from dpo_ray.iterate.pools import RolloutHost

    class DyingRolloutHost(RolloutHost):
        def generate(self, prompts, params):
            try:  # O_EXCL: of two actors that ask at once, exactly one claims the death
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().generate(prompts, params)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(1)

    return DyingRolloutHost


def nan_scorer(prompt, response: str) -> float:
    return float("nan") if "7" in response.split() else 1.0


def constant_scorer(prompt, response: str) -> float:
    return 0.5


def raising_scorer(prompt, response: str) -> float:
    raise KeyError("no verifier for this prompt")
