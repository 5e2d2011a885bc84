"""Torch extension builds (DeepSpeed's JIT-built ops) that a killed process left behind.

DeepSpeed builds an op (on the CPU accelerator: ``deepspeed_shm_comm``) the first time a process needs it,
with ``torch.utils.cpp_extension.load``, in place: ``$TORCH_EXTENSIONS_DIR/<op>/``, guarded by a ``lock`` file
(``torch.utils.file_baton.FileBaton``: created with O_EXCL and held open for the whole build, removed when it
ends). A build that is killed (Ctrl-C twice, an OOM kill, a CI timeout) leaves the ``lock`` behind, and every
later process then waits on it for ever. ``set_aside_killed_builds`` (every training worker, before DeepSpeed
starts) removes such a build directory so the op is built again; ``bench/ds_ops.py`` builds ops atomically for
gpu_check. Standard library only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# what a torch extension build directory holds; anything else in a directory means it is not one we may remove
_BUILD_FILES = ("lock", "build.ninja", ".ninja_log", ".ninja_deps", ".ninja_lock")
_BUILD_SUFFIXES = (".o", ".so", ".d", ".tmp")


def held_open(path: Path) -> bool:
    """Whether any process (that this user can see) has ``path`` open."""
    target = str(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        return True
                except OSError:
                    continue
        except OSError:
            continue
    return False


def op_state(build_dir: Path, name: str) -> str:
    """``missing``, ``ready`` (the .so and no lock), ``building`` (a live process holds the lock) or
    ``broken``."""
    if not build_dir.exists():
        return "missing"
    lock = build_dir / "lock"
    if lock.exists():
        return "building" if held_open(lock) else "broken"
    return "ready" if (build_dir / f"{name}.so").is_file() else "broken"


def is_build_dir(path: Path) -> bool:
    """Only a directory of torch-build files (ours to remove): never a folder a user pointed us at by
    mistake."""
    return path.is_dir() and all(p.is_file() and (p.name in _BUILD_FILES or p.name.endswith(_BUILD_SUFFIXES))
                                 for p in path.iterdir())


def set_aside_killed_builds(root: Path) -> list[str]:
    """Remove each build directory under ``root`` whose ``lock`` no live process holds (a killed build), so
    the next load builds the op again instead of waiting for ever. A directory holding anything but torch
    build files is left alone. Safe when several workers call it at once (rename, then remove). Returns the
    ops removed."""
    removed = []
    if not root.is_dir() or not any(root.glob("*/lock")):  # the common case: nothing to look at
        return removed
    for lock in root.glob("*/lock"):
        build = lock.parent
        if held_open(lock) or not is_build_dir(build):
            continue
        aside = root / f".killed-{build.name}-{os.getpid()}"
        try:
            os.rename(build, aside)
        except OSError:  # another worker set it aside first, or a build just finished
            continue
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(build.name)
    return removed
