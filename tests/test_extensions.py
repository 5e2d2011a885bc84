"""Torch extension builds a killed process left (dpo_ray.extensions): recognised from real files and a real
lock held open by another process, and set aside by the training workers' start-up, never a folder that is not
one."""

from __future__ import annotations

import subprocess
import sys
import time

from dpo_ray.extensions import is_build_dir, op_state, set_aside_killed_builds


def _build_dir(root, name, *, lock=True, so=False):
    d = root / name
    d.mkdir(parents=True)
    for f in ("build.ninja", ".ninja_log", ".ninja_deps", ".ninja_lock"):  # what ninja leaves in a build
        (d / f).write_text("")
    (d / f"{name}.o").write_bytes(b"\0")
    if so:
        (d / f"{name}.so").write_bytes(b"\0")
    if lock:
        (d / "lock").write_bytes(b"")
    return d


def test_op_state_reads_torch_build_dirs(tmp_path):
    d = tmp_path / "op"
    assert op_state(d, "op") == "missing"
    d.mkdir()
    (d / "build.ninja").write_text("")
    (d / "x.o").write_bytes(b"")
    assert op_state(d, "op") == "broken" and is_build_dir(d)
    (d / "op.so").write_bytes(b"")
    assert op_state(d, "op") == "ready"
    (d / "lock").write_bytes(b"")  # no process holds it open: a killed build's
    assert op_state(d, "op") == "broken"
    with open(d / "lock"):  # held open, as torch's FileBaton holds it while building
        assert op_state(d, "op") == "building"
    (d / "notes.txt").write_text("mine")
    assert not is_build_dir(d), "a directory with other files is never removed"


def test_killed_builds_are_set_aside_live_ones_and_foreign_folders_never(tmp_path):
    root = tmp_path / "torch_extensions"
    killed = _build_dir(root, "deepspeed_shm_comm")  # a lock nobody holds: the build was killed
    live = _build_dir(root, "live_op")
    ready = _build_dir(root, "ready_op", lock=False, so=True)
    foreign = _build_dir(root, "someone_elses")
    (foreign / "notes.txt").write_text("not a build file")
    # another process holds live_op's lock open, as a build in progress does
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import time; f = open({str(live / 'lock')!r}); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert set_aside_killed_builds(root) == ["deepspeed_shm_comm"]
        assert not killed.exists() and not list(root.glob(".killed-*"))
        assert op_state(live, "live_op") == "building" and (live / "lock").exists()
        assert op_state(ready, "ready_op") == "ready"
        assert (foreign / "notes.txt").read_text() == "not a build file" and (foreign / "lock").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert set_aside_killed_builds(root) == ["live_op"], "its holder died mid-build: now a killed build"
    assert set_aside_killed_builds(root) == [] and set_aside_killed_builds(tmp_path / "absent") == []
