"""The progress display (dpo_ray/progress.py): the plain form's lines, as `ray job logs` or CI show them.

The terminal form (a tqdm bar) is only checked to draw and close; its timing is not asserted. A real
training run's progress lines are checked in tests/test_train.py (actor pool test).
"""

from __future__ import annotations

import io
import re

from dpo_ray.progress import Progress, fmt_duration

LINE = re.compile(r"^job: (\d+)/(\d+) steps \((\d+)%\)(.*)\| elapsed (\d\d):(\d\d), left (\S+)$")


def test_plain_lines_count_up_to_100_percent_with_fields():
    out = io.StringIO()
    bar = Progress("job", 4, "steps", stream=out, form="plain", interval_s=0)
    for step in range(1, 5):
        bar.update(step, loss=0.5 / step, epoch=step / 4)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()  # the final line once: close() adds no copy of 4/4
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m.group(1)) for m in parsed] == [1, 2, 3, 4]
    assert parsed[-1].group(3) == "100" and "loss 0.125" in lines[-1] and "epoch 1" in lines[-1]
    elapsed = [int(m.group(5)) * 60 + int(m.group(6)) for m in parsed]
    assert elapsed == sorted(elapsed)


def test_plain_lines_are_spaced_by_the_interval():
    out = io.StringIO()
    bar = Progress("job", 1000, "steps", stream=out, form="plain", interval_s=3600)
    for step in range(1, 1001):
        bar.update(step)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("job: 1/1000") and lines[1].startswith("job: 1000/1000")


def test_unknown_total_gives_a_rate_and_no_time_left():
    out = io.StringIO()
    bar = Progress("reference log-probs (train)", None, "rows", stream=out, form="plain", interval_s=0)
    bar.update(512)
    bar.close()
    last = out.getvalue().splitlines()[-1]
    assert (last.startswith("reference log-probs (train): 512 rows (") and "rows/s)" in last
            and "left" not in last)


def test_resumed_job_counts_rates_from_where_it_started():
    bar = Progress("job", 100, "steps", initial=40, stream=io.StringIO(), form="plain", interval_s=0)
    assert bar.rate() is None and bar.eta() is None
    bar.update(50)
    assert bar.line().startswith("job: 50/100 steps (50%)")
    assert bar.eta() is not None and bar.eta() >= 0


def test_off_prints_nothing_and_the_bar_form_closes():
    out = io.StringIO()
    quiet = Progress("job", 3, "steps", stream=out, form="off")
    quiet.update(3)
    quiet.close()
    assert out.getvalue() == ""
    bar = Progress("job", 3, "steps", stream=out, form="bar")
    bar.update(2, loss=0.5)
    bar.update(3)
    bar.close()
    assert "3/3" in out.getvalue()


def test_durations_read_as_clock_times():
    assert fmt_duration(5) == "00:05" and fmt_duration(3725) == "1:02:05" and fmt_duration(None) == "?"


# forwarded to a local run's console by Ray 2.60 before the filter (docs/training.md#start-up)
NOISE_LINES = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing "
    "to monitor.",
    "Requesting resources: {'CPU': 0.5} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 0.5}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=192.0.2.2, pid=12201) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "/x/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
    "`ExecutionOptions.exclude_resources` is deprecated and will be removed",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = "
    "True`.",
    "✔️  Dataset train_0356G4RAmOTdWWikfQGmU6_0 execution finished in 3.72 seconds",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/out/checkpoint-000003)",
    "Reporting training result 1: TrainingReport(checkpoint=..., metrics={'step': 3}, validation=False)",
    "WARNING: 8 PYTHON worker processes have been started on node: 2cf7 with address: 192.0.2.2, which is 4x",
]
KEPT_LINES = [
    "prefix sharing on for the policy (prefix_sharing: auto; the first batch agrees with the standard "
    "layout)",
    "step 3/3 | loss 0.6932 | rewards/accuracies 0.3125",
    "resumed from checkpoint at step 2 (epoch 0, micro-batch 4)",
    "Traceback (most recent call last):",
    "RuntimeError: reference actor 0 failed to load its model",
    "Training failed with error: WorkerGroupError",
]


def test_ray_chatter_is_filtered_and_errors_never_are():
    from dpo_ray.cluster import _is_noise

    assert [ln for ln in NOISE_LINES if not _is_noise(ln)] == []
    assert [ln for ln in KEPT_LINES if _is_noise(ln)] == []


def _read_all(fd: int) -> str:
    """Everything written to a pty so far: one read can return a part of it (the line discipline hands the
    output over in pieces), so read until nothing more arrives for 0.5 s."""
    import os
    import select

    out = b""
    while select.select([fd], [], [], 0.5)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def test_a_terminal_that_reports_no_size_still_shows_the_bar(monkeypatch):
    """A pseudo-terminal nobody sized (docker exec -t, script, CI runners) reports 0 × 0: tqdm's own width
    logic then draws nothing. The bar takes COLUMNS/LINES (or 100 × 24) there and follows a sized terminal."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    from dpo_ray.progress import bar_width

    master, slave = pty.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            monkeypatch.setenv("COLUMNS", "123")
            monkeypatch.setenv("LINES", "30")
            assert bar_width(tty) == {"ncols": 123, "nrows": 30}
            progress = Progress("dpo-ray dpo", 6, "steps", stream=tty, form="bar", own_rate=True)
            progress.update(3, seconds_per_unit=0.5, loss=0.69)
            progress.close()
            tty.flush()
            drawn = _read_all(master)
            assert "3/6 steps" in drawn, drawn
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
            assert bar_width(tty) == {"dynamic_ncols": True}
    finally:
        os.close(master)
        os.close(slave)
