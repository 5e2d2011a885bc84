"""Shared fixtures. ``ray_local``: a local Ray for the test modules that ask for one (yields its GCS address),
started once and handed from module to module while it is clean.

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

RAY_CPUS = 8
_shared: dict[str, str] = {}  # the address of the Ray ray_local started, while this process holds it


def _clean(address: str) -> bool:
    """The Ray this process holds is the one ray_local started and nothing a module left behind holds any of
    its resources (actors, placement groups, tasks): every logical CPU is free again."""
    import ray

    if not ray.is_initialized() or _shared.get("address") != address:
        return False
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
    except Exception:  # noqa: BLE001 - a Ray that cannot answer is not one to hand on
        return False
    all_free = abs(free.get("CPU", 0.0) - RAY_CPUS) < 1e-6
    return total.get("CPU") == RAY_CPUS and all_free and len(ray.nodes()) == 1


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the module (yields its GCS address). Started once per test run (a start and a
    shutdown cost ~6 s, and its idle task workers keep their imports for the next module's Ray Data tasks)
    and handed to the next module that asks only while it is clean (``_clean``: the Ray this fixture
    started, every CPU free again); otherwise whatever Ray this process holds is shut down and a fresh one
    started, so no module depends on what another left behind. A module that does not ask for it never sees
    it (``_no_ray_unless_asked``)."""
    import ray

    address = _shared.get("address")
    if address is None or not _clean(address):
        if ray.is_initialized():
            ray.shutdown()
        # address "local": a private Ray even when a `ray start` head runs on this machine (another test's
        # cluster)
        offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}
        ctx = ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
                       runtime_env={"env_vars": offline})
        _shared["address"] = address = ctx.address_info["address"]
    yield address


@pytest.fixture(scope="module", autouse=True)
def _no_ray_unless_asked(request):
    """Before a module none of whose tests uses ``ray_local``: the Ray an earlier module left running is shut
    down, so the module's own code starts (or joins) its Ray exactly as it would alone."""
    mine = [i for i in request.session.items if i.path == request.node.path]
    if not any("ray_local" in getattr(i, "fixturenames", ()) for i in mine):
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _shared.pop("address", None)
    yield


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
