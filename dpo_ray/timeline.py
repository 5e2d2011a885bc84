"""The start-up timeline: where the time goes between the command and the first optimizer step.

Stages are marked with wall-clock times (``time.time()``), on the driver and on rank 0, and measured from
the start of the command's process, so the interpreter's start and the imports are counted too. The
driver merges rank 0's marks (posted to the progress board) and prints one line with the run report::

    start-up 31.2 s to the first step: imports 2.9 | ray 2.4 | data plan 1.6 | ... | first step 2.3
"""

from __future__ import annotations

import os
import time

# The stages in the order they normally happen; a mark is a stage's end. Driver: up to "fit";
# rank 0: the rest ("worker" is when the train function starts running in the worker process).
STAGES = (
    ("imports", "interpreter start and imports"),
    ("ray", "Ray started or joined"),
    ("data plan", "data read planned and rows counted"),
    ("model", "model built or loaded on the driver"),
    ("reference pool", "reference actors started (loading runs in the background)"),
    ("fit", "Ray Train asked to start the worker group"),
    ("worker", "the worker group running the train function"),
    ("policy", "policy model loaded on the worker"),
    ("engine", "DeepSpeed engine built"),
    ("reference ready", "reference actors loaded (checked by the driver in the background)"),
    ("first batch", "first micro-batch read from the Ray Data stream"),
    ("first step", "first optimizer step done (incl. the prefix-sharing check)"),
)
ORDER = {name: i for i, (name, _) in enumerate(STAGES)}


def process_start() -> float:
    """When this process started (wall clock); ``time.time()`` if that cannot be read."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # no psutil (it comes with Ray) or no /proc: count from the first call
        return time.time()


class Timeline:
    """Marks (stage name -> wall-clock time of its end), the first mark of each stage wins."""

    _process_start_claimed = False  # by the first run of this process (Timeline.for_run)

    def __init__(self, t0: float | None = None):
        self.t0 = process_start() if t0 is None else t0
        self.marks: dict[str, float] = {}

    @classmethod
    def for_run(cls) -> Timeline:
        """The timeline of a training run: the process's first run counts from the process start (imports and
        config parsing count); a later run in the same process (the demo's DPO stage after its SFT stage)
        counts from now."""
        first = not cls._process_start_claimed
        cls._process_start_claimed = True
        return cls(None if first else time.time())

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.setdefault(name, time.time() if at is None else at)

    def merge(self, marks: dict[str, float] | None) -> None:
        for name, at in (marks or {}).items():
            self.mark(name, at)

    def seconds(self) -> dict[str, float]:
        """Each stage's end, in seconds since the command started, in time order."""
        ordered = sorted(self.marks.items(), key=lambda kv: (kv[1], ORDER.get(kv[0], len(ORDER))))
        return {name: round(at - self.t0, 3) for name, at in ordered}

    def render(self) -> str:
        ends = self.seconds()
        if not ends:
            return "start-up: no stages recorded"
        parts, last = [], 0.0
        for name, end in ends.items():
            parts.append(f"{name} {max(end - last, 0.0):.1f}")
            last = max(last, end)
        head = (f"start-up {ends['first step']:.1f} s from the command to the first optimizer step"
                if "first step" in ends else f"start-up ({last:.1f} s recorded, no optimizer step)")
        return f"{head}: " + " | ".join(parts) + " (seconds per stage; docs/training.md#start-up)"
