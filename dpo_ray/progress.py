"""Progress a person can follow, for every long job (training, SFT, the reference precompute pass,
`dpo-ray inspect-data`): done / total, the rate, elapsed and time left, and a few job-specific fields.

One display, three forms, chosen by where the output goes:
- a terminal: one tqdm bar on stderr, redrawn in place;
- a notebook: tqdm's widget form (``tqdm.auto``);
- anything else (``ray job logs``, CI, KubeRay pod logs, a file): a plain line every ``interval_s`` seconds
  and a final line at the end, no carriage returns.
``DPO_RAY_PROGRESS=plain|bar|off`` forces a form (``off``: nothing); ``DPO_RAY_PROGRESS_INTERVAL_S`` sets the
plain form's period (default 10 s).

Ray Data's own progress bars stay off (``dpo_ray.cluster.init_ray``; ``DPO_RAY_DATA_PROGRESS=1`` turns them
on), so two kinds of bars never fight over one terminal.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def choose_form(stream: TextIO) -> str:
    forced = os.environ.get("DPO_RAY_PROGRESS", "").strip().lower()
    if forced in ("plain", "bar", "off"):
        return forced
    if _in_notebook():
        return "notebook"
    return "bar" if stream.isatty() else "plain"


def bar_width(stream: TextIO) -> dict[str, Any]:
    """tqdm's width arguments for ``stream``: follow the terminal's width, or, where the terminal reports no
    size (a pseudo-terminal nobody sized: ``docker exec -t``, ``script``, CI runners; tqdm then draws nothing
    at all), a fixed size from COLUMNS and LINES, or 100 × 24."""
    import shutil

    try:
        sized = os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        sized = False
    if sized:
        return {"dynamic_ncols": True}
    size = shutil.get_terminal_size((100, 24))
    return {"ncols": size.columns, "nrows": size.lines}


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """``update(done, **fields)`` as work advances; ``close()`` once (prints the final line).

    ``total`` None: no percentage or time left, a rate only. ``unit``: what ``done`` counts (steps, rows).
    ``own_rate=True`` with ``update(..., seconds_per_unit=x)``: the caller's own measure of the rate
    (training: ``seconds_per_step``, dpo_ray.train.logger.Throughput); the time left and the bar use it, never
    a second rate of the bar's own.
    """

    def __init__(self, desc: str, total: int | None, unit: str, *, initial: int = 0,
                 stream: TextIO | None = None, form: str | None = None, interval_s: float | None = None,
                 own_rate: bool = False):
        self.desc, self.total, self.unit, self.initial = desc, total, unit, initial
        self.stream = stream or sys.stderr
        self.form = form or choose_form(self.stream)
        self.interval_s = (float(os.environ.get("DPO_RAY_PROGRESS_INTERVAL_S", 10)) if interval_s is None
                           else interval_s)
        self.start = time.monotonic()
        self.done, self.fields = initial, {}  # a resumed job starts at ``initial``; rates count from there
        self.seconds_per_unit: float | None = None
        self._last_line = float("-inf")
        self._written: int | None = None  # the ``done`` of the last plain line written
        self._bar = None
        if self.form in ("bar", "notebook"):
            if self.form == "notebook":
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            # no tqdm rate or time left: its smoothed rate over irregular updates disagrees with ours
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}", file=self.stream,
                             mininterval=0.5, **bar_width(self.stream),
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + unit
                             + " [{elapsed}{postfix}]" if total and own_rate else None)

    # --------------------------------------------------------------------------------------------- state
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def rate(self) -> float | None:
        if self.seconds_per_unit:
            return 1.0 / self.seconds_per_unit
        done = self.done - self.initial
        return done / self.elapsed if done > 0 and self.elapsed > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or not rate:
            return None
        return max(self.total - self.done, 0) / rate

    def line(self) -> str:
        """The plain form's line: ``desc: done/total unit (pct) | fields | elapsed, left``."""
        if self.total:
            head = (f"{self.desc}: {self.done}/{self.total} {self.unit} "
                    f"({100.0 * self.done / self.total:.0f}%)")
        else:
            rate = self.rate()
            head = f"{self.desc}: {self.done} {self.unit}" + (f" ({rate:.3g} {self.unit}/s)" if rate else "")
        cells = [f"{k} {_fmt(v)}" for k, v in self._cells().items()]
        tail = f"elapsed {fmt_duration(self.elapsed)}"
        if self.total:
            tail += f", left {fmt_duration(self.eta())}"
        return " | ".join([head, *cells, tail])

    def _cells(self) -> dict[str, Any]:
        cells = {k: v for k, v in self.fields.items() if v is not None}
        if self.seconds_per_unit:
            cells[f"s/{self.unit.rstrip('s')}"] = self.seconds_per_unit
        return cells

    # --------------------------------------------------------------------------------------------- output
    def update(self, done: int, seconds_per_unit: float | None = None, **fields: Any) -> None:
        self.fields.update(fields)
        if seconds_per_unit:
            self.seconds_per_unit = seconds_per_unit
        if self.form == "off":
            self.done = done
            return
        if self._bar is not None:
            self._bar.update(max(done - self.done, 0))
            self.done = done
            cells = {k: _fmt(v) for k, v in self._cells().items()}
            if self.total and self.seconds_per_unit:
                cells["left"] = fmt_duration(self.eta())
            self._bar.set_postfix(cells, refresh=False)
            return
        self.done = done
        now = time.monotonic()
        if now - self._last_line >= self.interval_s:
            self._last_line, self._written = now, done
            self._write(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.form == "plain" and self.done != self._written:  # each final line once
            self._write(self.line())

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
