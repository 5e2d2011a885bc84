"""What a run may delete or overwrite: only what dpo_ray made, inside the folder that owns it
(docs/training.md, "What a run may delete").

Every folder dpo_ray writes into as a whole (an output_dir, a run's Ray Train folder, a reference store and
its entries) carries ``.dpo_ray_owned``, written by the writer when it creates or first writes the folder. A
delete goes through ``remove_owned``: the owner folder must carry the marker, the resolved path (symlinks
followed) must lie strictly inside it, and the owner must not be a root a user keeps other things in (``/``, a
home directory, a repository's root). ``RunLock`` is the exclusive lock a run holds on its output folder for
its whole length.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

OWNER_FILE = ".dpo_ray_owned"
LOCK_FILE = ".dpo_ray_run.lock"


class OwnershipError(PermissionError):
    """A delete or overwrite dpo_ray refused: the path is not one it made, or lies outside the folder it
    owns."""


def root_problem(path: str | os.PathLike | None, what: str) -> str:
    """Why ``path`` may not be a folder dpo_ray deletes in ("" when it may): empty, ``/``, a home directory, a
    repository's root, or the working directory itself."""
    if path is None or not str(path).strip():
        return f"{what} is empty (an unset shell variable?); give the folder explicitly"
    p = Path(path).expanduser().resolve()
    homes = {Path.home().resolve(), Path(os.environ.get("HOME", "/")).resolve()}
    if p == Path(p.anchor):
        return f"{what} {p} is the file system root; give the folder dpo_ray made"
    if p in homes:
        return f"{what} {p} is a home directory; give the folder dpo_ray made inside it"
    if (p / ".git").exists():
        return f"{what} {p} is a repository's root (it holds .git); give a folder of its own"
    return ""


def is_owned(folder: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether dpo_ray made ``folder`` (its marker is there, of ``kind`` when given)."""
    marker = Path(folder) / OWNER_FILE
    if not marker.is_file():
        return False
    if kind is None:
        return True
    return read_marker(folder).get("kind") == kind


def read_marker(folder: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / OWNER_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def mark_owned(folder: str | os.PathLike, kind: str, **extra: Any) -> Path:
    """Create ``folder`` if needed and write its marker (kept when there, ``extra`` merged in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **read_marker(folder), **extra}
    tmp = folder / f"{OWNER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(folder / OWNER_FILE)
    return folder


def check_inside(path: str | os.PathLike, owner: str | os.PathLike) -> Path:
    """``path`` resolved (symlinks followed), checked to lie strictly inside ``owner``; raises
    OwnershipError."""
    owner_r = Path(owner).resolve()
    target = Path(path)
    # a symlink itself is removed as a link: resolve its parent, not where it points
    resolved = target.parent.resolve() / target.name if target.is_symlink() else target.resolve()
    if resolved == owner_r or owner_r not in resolved.parents:
        raise OwnershipError(f"refusing to delete {path}: it resolves to {resolved}, outside the folder "
                             f"{owner_r} that dpo_ray owns")
    return resolved


def remove_owned(path: str | os.PathLike, owner: str | os.PathLike, *, need_marker: bool = False) -> bool:
    """Delete ``path`` (a file, link or folder) inside ``owner``, which must carry dpo_ray's marker and not be
    a root (``root_problem``); with ``need_marker`` the folder ``path`` itself must carry one too. Returns
    False when nothing was there; raises OwnershipError when refused and OSError when the removal failed."""
    problem = root_problem(owner, "the folder")
    if problem:
        raise OwnershipError(f"refusing to delete {path}: {problem}")
    if not is_owned(owner):
        raise OwnershipError(f"refusing to delete {path}: {Path(owner).resolve()} has no {OWNER_FILE} "
                             "marker, so dpo_ray did not make it; remove it yourself if it should go")
    resolved = check_inside(path, owner)
    if not os.path.lexists(resolved):
        return False
    if resolved.is_dir() and not resolved.is_symlink():
        if need_marker and not is_owned(resolved):
            raise OwnershipError(f"refusing to delete {resolved}: it has no {OWNER_FILE} marker, so dpo_ray "
                                 "did not make it")
        failed: list[str] = []
        shutil.rmtree(resolved, onerror=lambda fn, p, exc: failed.append(f"{p}: {exc[1]}"))
        if failed or resolved.exists():
            raise OSError(f"could not remove {resolved} completely: "
                          f"{'; '.join(failed[:3]) or 'it is still there'}")
    else:
        resolved.unlink()
    return True


def replace_owned(src: Path, dst: Path, owner: Path) -> None:
    """Move ``src`` onto ``dst`` inside ``owner`` (a folder at ``dst`` dpo_ray wrote is removed first)."""
    check_inside(dst, owner)
    if dst.is_dir() and not dst.is_symlink():
        remove_owned(dst, owner)
    src.replace(dst)


class RunLock:
    """An exclusive lock on a folder for a whole run (``fcntl.flock`` on ``<folder>/.dpo_ray_run.lock``): a
    second run into it stops at once, naming the holder. The kernel drops the lock when its process dies, so
    the lock of a crashed or killed run is taken over by the next one."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder, self.what = Path(folder), what
        self._f = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _holder(f.read())
            f.close()
            raise OwnershipError(f"{self.what} {self.folder} is in use by another run ({holder}); wait for "
                                 f"it to end, or choose another {self.what}") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
