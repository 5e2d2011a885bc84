"""Driver side: joining or starting Ray, and what every worker process gets (resources, environment).

Used by the trainer, the reference pool and `dpo-ray inspect-data`: none of them starts Ray another way.
"""

from __future__ import annotations

import json
import os

from dpo_ray.config import DPOConfig

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def init_ray(cfg: DPOConfig) -> None:
    """Join ``ray.address`` / RAY_ADDRESS when given; otherwise start an in-process local Ray.

    A local Ray gets more logical CPUs than cores (2× cores, at least 8): workers, reference actors and
    Ray Data tasks request fractions, and on a 2-core box exact accounting starves Ray Data (FACTS).
    """
    import ray
    import ray.data

    # Ray Data's per-operator progress bars drown the metrics table in a terminal; the table is the UI.
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = os.environ.get("DPO_RAY_DATA_PROGRESS", "0") == "1"
    data_ctx.print_on_execution_start = False
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {**WORKER_ENV, **cfg.ray.runtime_env.get("env_vars", {})}
    runtime_env = {**cfg.ray.runtime_env, "env_vars": env}
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        # Under `ray job submit` Ray merges the job's runtime_env with ours and refuses any key set twice:
        # the job's settings win, ours fill only what it leaves open.
        job_env = (json.loads(job_config).get("runtime_env") or {})
        job_vars = job_env.get("env_vars") or {}
        runtime_env = {k: v for k, v in runtime_env.items() if k not in job_env or k == "env_vars"}
        runtime_env["env_vars"] = {k: v for k, v in env.items() if k not in job_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = cfg.ray.num_cpus or max(8, 2 * (os.cpu_count() or 1))
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def worker_resources(cfg: DPOConfig, use_gpu: bool) -> dict[str, float]:
    if cfg.ray.resources_per_worker:
        return dict(cfg.ray.resources_per_worker)
    return {"CPU": 2, "GPU": 1} if use_gpu else {"CPU": 0.5}


def worker_env(use_gpu: bool) -> dict[str, str]:
    env = dict(WORKER_ENV)
    # DPO_RAY_* knobs (thread counts, test hooks) follow the driver to the workers
    env.update({k: v for k, v in os.environ.items() if k.startswith("DPO_RAY_")})
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env
