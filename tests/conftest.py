"""Shared fixtures. ``ray_local``: one local Ray per test module (yields its GCS address).

More logical CPUs than cores: training workers, reference actors and Ray Data tasks all request
fractions, and exact accounting on a 2-core box starves Ray Data: the run hangs.
"""

from __future__ import annotations

import os

import pytest

# No hub at test time; quiet tokenizers' fork warnings; the Ray Train V2 API the trainer is written for.
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1",
               # each test fit is short: no spot-instance preemption watcher actor per run
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}.items():
    os.environ.setdefault(_k, _v)
# DeepSpeed's accelerator: the GPU where there is one (tests/test_gpu.py), else its CPU accelerator (gloo).
os.environ.setdefault("DS_ACCELERATOR", "cuda" if __import__("torch").cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray for each test module that asks for one (yields its GCS address). Whatever Ray an
    earlier module started or left busy (actors, placement groups, worker processes) is shut down first, so no
    module depends on what another left behind."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # address "local": a private Ray even when a `ray start`
    # head runs on this machine (another test's cluster)
    ctx = ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                   runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                             "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ctx.address_info["address"]
    ray.shutdown()
