"""dpo_ray/ray_private.py: every private name of Ray dpo_ray uses exists in the Ray the tests run (pinned in
pyproject.toml), does what dpo_ray relies on, and each one's fallback works when a Ray release takes it away
(the name removed here with monkeypatch: no part of dpo_ray is replaced)."""

from __future__ import annotations

import logging
import sys

import pytest

from dpo_ray import ray_private


@pytest.fixture(autouse=True)
def _fresh_warnings():
    ray_private._warned.clear()
    yield
    ray_private._warned.clear()


def _block_import(monkeypatch, module: str) -> None:
    """Make ``import module`` raise ImportError, as on a Ray that no longer has it."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_the_pinned_ray_is_the_tested_minor_release():
    import re
    from pathlib import Path

    import ray

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pin = re.search(r'"(ray\[train,data\][^"]*)"', text).group(1)
    # widen it only with this module's tests passing on the new Ray
    assert ">=2.60" in pin and "<2.61" in pin, pin
    assert ray.__version__.startswith("2.60."), ray.__version__


# --------------------------------------------------------------------------- the console's printer


def test_the_log_printer_is_wrapped_once_and_forwards(monkeypatch):
    from ray._private import worker as ray_worker

    seen = []

    def show(data, ignore_prefix=False):
        seen.append((data["lines"], ignore_prefix))

    monkeypatch.setattr(ray_worker, "print_to_stdstream", show)
    made = []

    def make(original):
        made.append(original)

        def wrapped(data, ignore_prefix=False):
            original({**data, "lines": [x.upper() for x in data["lines"]]}, ignore_prefix)

        return wrapped

    assert ray_private.wrap_log_printer(make)
    assert ray_private.wrap_log_printer(make)  # idempotent: already wrapped
    assert made == [show]
    ray_worker.print_to_stdstream({"lines": ["a line"]}, True)
    assert seen == [(["A LINE"], True)]


def test_without_the_log_printer_lines_stay_unfiltered(monkeypatch, caplog):
    from ray._private import worker as ray_worker

    monkeypatch.delattr(ray_worker, "print_to_stdstream")
    with caplog.at_level(logging.WARNING, logger="dpo_ray.ray_private"):
        assert not ray_private.wrap_log_printer(lambda show: show)
        assert not ray_private.wrap_log_printer(lambda show: show)
    assert not hasattr(ray_worker, "print_to_stdstream")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "unfiltered" in warnings[0], warnings  # said once per process


def test_without_ray_logging_lines_stay_unfiltered(monkeypatch):
    _block_import(monkeypatch, "ray._private.ray_logging")
    assert not ray_private.wrap_log_printer(lambda show: show)


# --------------------------------------------------------------------------- Ray Train's hooks


def test_ray_train_hooks_exist_and_their_fallbacks(monkeypatch):
    from ray.train.torch import TorchTrainer

    assert ray_private.trainer_hooks_present(TorchTrainer)
    cleaner = ray_private.placement_group_cleaner_callback()
    assert cleaner is not None and cleaner.__name__ == "PlacementGroupCleanerCallback"

    class Renamed:  # a TorchTrainer whose methods Ray renamed
        pass

    assert not ray_private.trainer_hooks_present(Renamed)
    _block_import(monkeypatch, "ray.train.v2._internal.callbacks.placement_group_callback")
    assert ray_private.placement_group_cleaner_callback() is None


def test_without_the_hooks_the_trainer_class_keeps_rays_behaviour(monkeypatch, ray_local):
    """cluster.torch_trainer_class on a Ray this process started drops Ray Train's placement-group cleaner;
    without the hook it keeps Ray's default callbacks, the cleaner included."""
    from ray.train import ScalingConfig

    from dpo_ray.cluster import torch_trainer_class

    def callbacks() -> list[str]:
        trainer = torch_trainer_class()(train_loop_per_worker=lambda: None,
                                        scaling_config=ScalingConfig(num_workers=1))
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    assert ray_private.started_this_ray()
    kept = callbacks()
    assert "PlacementGroupCleanerCallback" not in kept and "BackendSetupCallback" in kept, kept
    _block_import(monkeypatch, "ray.train.v2._internal.callbacks.placement_group_callback")
    assert set(callbacks()) == set(kept) | {"PlacementGroupCleanerCallback"}


# --------------------------------------------------------------------------- the node, the GCS, Ray Data


def test_started_this_ray_and_its_fallback(monkeypatch, ray_local):
    import ray._private.worker as worker

    assert ray_private.started_this_ray()  # the module's local Ray
    monkeypatch.setattr(worker, "_global_node", None)
    assert not ray_private.started_this_ray()  # no node handle: a joined cluster is assumed
    monkeypatch.undo()
    _block_import(monkeypatch, "ray._private.worker")
    assert not ray_private.started_this_ray()


def test_actor_state_from_the_gcs_and_unknown_without_it(monkeypatch, ray_local):
    import ray

    @ray.remote(num_cpus=0.1)
    class Probe:
        def ping(self):
            return 1

    probe = Probe.remote()
    assert ray.get(probe.ping.remote()) == 1
    assert ray_private.actor_state(probe) == "ALIVE"
    ray.kill(probe, no_restart=True)
    for _ in range(100):
        if ray_private.actor_state(probe) == "DEAD":
            break
        __import__("time").sleep(0.1)
    assert ray_private.actor_state(probe) == "DEAD"

    from dpo_ray.reference.client import actor_state

    with monkeypatch.context() as m:
        import ray._private.state as state_module

        m.setattr(state_module.state, "actor_table", lambda actor_id: 1 / 0)  # a GCS that fails to answer
        with pytest.raises(ray_private.StateUnknown, match="did not answer: ZeroDivisionError"):
            ray_private.actor_state(probe)
        assert actor_state(probe) is None  # the client: unknown, not "waiting for a node"
    with monkeypatch.context() as m:
        _block_import(m, "ray._private.state")
        with pytest.raises(ray_private.StateUnknown, match="no GCS actor table"):
            ray_private.actor_state(probe)


def test_data_stats_actor_and_dataset_context(monkeypatch, ray_local):
    import ray
    import ray.data

    assert ray_private.create_data_stats_actor()
    with monkeypatch.context() as m:
        _block_import(m, "ray.data._internal.stats")
        assert not ray_private.create_data_stats_actor()

    # one dataset's own context: the process's current one is untouched
    current = ray.data.DataContext.get_current()
    before = current.execution_options.preserve_order
    ds = ray.data.range(40, override_num_blocks=4)
    ctx = ds.context.copy()
    ctx.execution_options.preserve_order = not before
    ray_private.set_dataset_context(ds, ctx)
    assert ds.context is ctx and ds._logical_plan.context is ctx
    assert current.execution_options.preserve_order == before
    assert sorted(r["id"] for r in ds.take_all()) == list(range(40))

    # a Dataset without the private attributes: the settings go on the current context instead
    class Renamed:
        pass

    fallback = ray.data.DataContext.get_current().copy()
    fallback.execution_options.preserve_order = True
    fallback.target_max_block_size = 12345
    with monkeypatch.context() as m:
        m.setattr(current.execution_options, "preserve_order", before)
        m.setattr(current, "target_max_block_size", current.target_max_block_size)
        ray_private.set_dataset_context(Renamed(), fallback)
        assert current.execution_options.preserve_order is True and current.target_max_block_size == 12345
    assert current.execution_options.preserve_order == before


def test_a_joined_cluster_hands_its_address_to_the_runs_actors():
    """The actors of a run that joins a cluster at host:port get RAY_ADDRESS (Ray Train's placement-group
    cleaner then finds its own cluster with another Ray on the machine: tests/test_job_submit.py runs that);
    a local run, "auto" and Ray Client URLs add nothing."""
    from dpo_ray.cluster import joined_cluster_env

    assert joined_cluster_env("10.0.0.1:6379") == {"RAY_ADDRESS": "10.0.0.1:6379"}
    assert joined_cluster_env("raycluster-head-svc:6379") == {"RAY_ADDRESS": "raycluster-head-svc:6379"}
    for address in (None, "", "auto", "local", "ray://head:10001", "http://head:8265"):
        assert joined_cluster_env(address) == {}, address
