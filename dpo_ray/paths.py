"""Path-valued settings, resolved once on the driver (docs/config.md, "Paths").

Rule: a relative path means relative to the working directory of the process that reads the config (the
driver: `dpo-ray ...`, a Python script, `ray job submit`'s entrypoint), as TRL's scripts do, the same for
CLI flags, YAML files and the Python API. Workers and reference actors run in other directories (Ray gives
each its own), so the driver hands them absolute paths and never a relative one.

What is left alone: ``None``; remote URIs (``s3://``, ``gs://``, ``hf://``, ...); ``resume_from_checkpoint:
latest``; and for keys that also take a hub name (model, adapter and dataset names) a value that is neither
path-like (``/``, ``./``, ``../``, ``~``) nor an existing file or directory.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from dpo_ray.config import DPOConfig
from dpo_ray.errors import ConfigError

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# dotted key -> may the value be a hub name rather than a path?
PATH_KEYS: dict[str, bool] = {
    "model_name_or_path": True,
    "ref_model_name_or_path": True,
    "peft_adapter_path": True,
    "dataset_name": True,
    "eval_dataset_name": True,
    "output_dir": False,
    "resume_from_checkpoint": False,
    "ray.storage_path": False,
    "reference.model_name_or_path": True,
    "reference.cache_dir": False,
}
# keys naming a model directory that must exist before anything starts (dpo_ray loads models from disk)
MODEL_DIR_KEYS = ("model_name_or_path", "reference.model_name_or_path")
# keys naming where a run writes; relative ones are taken against shared_dir when it is set
WRITE_KEYS = ("output_dir", "ray.storage_path", "reference.cache_dir")


def job_working_dir() -> str | None:
    """The working directory of the Ray job this driver runs in, when the job uploaded one (`ray job submit
    --working-dir`): a copy on the head node's local disk that Ray deletes after the job. None otherwise."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except ValueError:
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def is_remote(value: str) -> bool:
    return bool(_REMOTE.match(value))


def _path_like(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def resolve_path(value: Any, base: Path, may_be_name: bool = False) -> Any:
    """``value`` as an absolute path under the module's rule; anything that is not a local path unchanged."""
    if not isinstance(value, str) or not value or is_remote(value):
        return value
    if may_be_name and not _path_like(value):
        candidate = base / value
        if not (candidate.exists() or glob.glob(str(candidate))):
            return value  # a hub name (or a path that does not exist: checked separately)
    return str(Path(os.path.normpath(base / Path(value).expanduser())))


def _get(cfg: DPOConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_config_paths(cfg: DPOConfig, base: str | Path | None = None) -> DPOConfig:
    """A copy of ``cfg`` whose local paths are absolute (relative ones taken against ``base``, default the
    working directory). Idempotent: an absolute path stays as it is."""
    base = Path(base or os.getcwd()).resolve()
    shared = cfg.shared_dir
    write_base = Path(shared).expanduser().resolve() if shared else base
    data = cfg.model_dump()
    job_dir = None if shared else job_working_dir()
    blind = []
    for key, may_be_name in PATH_KEYS.items():
        value = _get(cfg, key)
        if key == "resume_from_checkpoint" and str(value).lower() in ("latest", "true"):
            continue
        if key in WRITE_KEYS and job_dir and isinstance(value, str) and value and not is_remote(value) \
                and not value.startswith(("/", "~")):
            blind.append((key, f"{value!r} is relative, and this driver runs in the Ray job's uploaded "
                               f"working directory {job_dir}: a copy on one node's local disk that Ray "
                               "deletes after the job, so the outputs would be lost. Set shared_dir (or "
                               "DPO_RAY_SHARED_DIR in the job's runtime_env env_vars) to a directory on "
                               "shared storage, e.g. /mnt/shared/outputs (relative output paths are taken "
                               "against it), or give an absolute path there"))
            continue
        resolved = resolve_path(value, write_base if key in WRITE_KEYS else base, may_be_name)
        if resolved != value:
            section, _, name = key.rpartition(".")
            (data[section] if section else data)[name] = resolved
    if blind:
        raise ConfigError(blind)
    if shared:
        data["shared_dir"] = str(write_base)
        if not cfg.reference.cache_dir:  # the precomputed-reference cache goes to shared storage too
            data["reference"]["cache_dir"] = str(write_base / "ref_logps_cache")
    return DPOConfig(**data)


def path_problems(cfg: DPOConfig) -> list[tuple[str, str]]:
    """What can be checked about the paths before anything starts: model directories exist and hold a
    config.json. (Datasets are checked by the data pipeline's planning, which names the file.)"""
    problems = []
    for key in (*MODEL_DIR_KEYS, "peft_adapter_path"):
        value = _get(cfg, key)
        if not value or is_remote(value):
            continue
        path = Path(value)
        want = "adapter_config.json" if key == "peft_adapter_path" else "config.json"
        if not path.is_dir():
            hint = (" (dpo_ray loads models from disk and downloads nothing at run time: download it first, "
                    "e.g. `hf download NAME --local-dir DIR`, and give DIR)" if not _path_like(value) else "")
            problems.append((key, f"{value!r} is not a directory{hint}; relative paths are taken against the "
                                  f"working directory {os.getcwd()}"))
        elif not (path / want).is_file():
            problems.append((key, f"{value} has no {want}; give the directory that save_pretrained wrote"))
    return problems


def check_paths(cfg: DPOConfig) -> None:
    problems = path_problems(cfg)
    if problems:
        raise ConfigError(problems)


def local_inputs(cfg: DPOConfig) -> dict[str, str]:
    """Key -> absolute local path of every input a worker, actor or data task reads (for the node check)."""
    out = {}
    for key in ("model_name_or_path", "reference.model_name_or_path", "peft_adapter_path", "dataset_name",
                "eval_dataset_name"):
        value = _get(cfg, key)
        if isinstance(value, str) and value.startswith("/"):
            out[key] = value
    return out
