"""DeepSpeed's JIT-built ops, built once per extensions directory and never left half-built.

DeepSpeed builds an op (on the CPU accelerator: ``deepspeed_shm_comm``) the first time a process needs it,
with ``torch.utils.cpp_extension.load``, in place: ``$TORCH_EXTENSIONS_DIR/<op>/``, guarded by a ``lock`` file
(``torch.utils.file_baton.FileBaton``: created with O_EXCL, removed when the build ends). A build that is
killed (Ctrl-C twice, an OOM kill, a CI timeout) leaves the ``lock`` file behind, and every later process then
waits on it for ever; a build killed while linking can leave a partial ``.so``.

(``dpo_ray.extensions``: how a killed build is recognised; training workers remove one before DeepSpeed
starts.)

``ensure_op`` builds instead into a fresh directory beside the target (``<root>/.build-<op>-<pid>``) in a
child process and, once the op loads there, moves it into place with one ``rename``: the target either does
not exist or is complete. A target that is not complete (no ``.so``, or a ``lock`` that no live process holds
open: torch keeps the lock file's descriptor open for the whole build) is moved aside first and removed after
the new one is in place. Builds of the same root are serialized by an ``flock`` on
``<root>/.dpo_ray_ops.lock``, which the kernel releases when its holder dies, so a killed ``ensure_op`` never
blocks the next.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dpo_ray.extensions import is_build_dir, op_state

# the ops a DeepSpeed run JIT-builds, per accelerator (dpo_ray hands DeepSpeed a torch AdamW: no fused_adam)
OPS = {"cpu": ("ShareMemCommBuilder",), "cuda": ()}


def default_extensions_dir() -> Path:
    """Where dpo_ray's workers build DeepSpeed's ops unless TORCH_EXTENSIONS_DIR is set (per venv; the same
    rule as dpo_ray.train.setup.process_settings)."""
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "dpo_ray" / "torch_extensions" / key


def _builder_name(builder: str, env: dict[str, str]) -> str:
    code = (f"from deepspeed.ops.op_builder.{env.get('DS_ACCELERATOR', 'cpu')} import {builder} as B; "
            "print(B().NAME)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip().splitlines()[-1]


def ensure_op(builder: str, root: Path, env: dict[str, str] | None = None, timeout: float = 900.0,
              wait_building: float = 900.0) -> dict:
    """Make ``root/<op>`` a complete build of DeepSpeed's ``builder`` op (see the module docstring). Returns
    {"op", "state_before", "built", "seconds"}; raises RuntimeError (with the compiler's output) if the build
    fails."""
    env = {**os.environ, **(env or {})}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = _builder_name(builder, env)
    final = root / name
    with open(root / ".dpo_ray_ops.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
        state = before = op_state(final, name)
        deadline = time.monotonic() + wait_building
        while state == "building" and time.monotonic() < deadline:  # a DeepSpeed process building in place
            time.sleep(1.0)
            state = op_state(final, name)
        if state == "ready":
            return {"op": name, "state_before": before, "built": False, "seconds": time.perf_counter() - t0}
        # what a killed ensure_op left (we hold the guard: not live)
        for old in root.glob(f".build-{name}-*"):
            shutil.rmtree(old)
        tmp_root = root / f".build-{name}-{os.getpid()}"
        tmp_root.mkdir()
        code = (f"from deepspeed.ops.op_builder.{env.get('DS_ACCELERATOR', 'cpu')} import {builder} as B; "
                "B().load(verbose=False)")
        r = subprocess.run([sys.executable, "-c", code], env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_root)},
                           capture_output=True, text=True, timeout=timeout)
        built = tmp_root / name
        if r.returncode != 0 or op_state(built, name) != "ready":
            raise RuntimeError(f"building DeepSpeed's {name} op failed (exit {r.returncode}; is a C++ "
                               f"compiler on PATH?):\n{(r.stdout + r.stderr)[-3000:]}")
        aside = None
        if final.exists():  # broken (or a stuck in-place build): set it aside, put the new one in its place
            if not is_build_dir(final):
                raise RuntimeError(
                    f"{final} is not a torch extension build directory: move it away and rerun")
            aside = root / f".broken-{name}-{os.getpid()}"
            os.rename(final, aside)
        os.rename(built, final)
        shutil.rmtree(tmp_root)
        if aside is not None:
            shutil.rmtree(aside)
    return {"op": name, "state_before": before, "built": True, "seconds": time.perf_counter() - t0}


def ensure_ops(accelerator: str, root: Path, env: dict[str, str] | None = None) -> list[dict]:
    return [ensure_op(b, root, env) for b in OPS.get(accelerator, ())]


if __name__ == "__main__":  # python bench/ds_ops.py [root]: build the CPU ops where dpo_ray's workers look
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                          default_extensions_dir()))
    print(ensure_ops(os.environ.get("DS_ACCELERATOR", "cpu"), out))
