"""Multi-node for real: a head, a policy node and a reference node as separate raylets on this machine.

One ``ray.cluster_utils.Cluster`` for the module, shaped like deploy/raycluster.yaml: a head with no
training resources (``num_cpus: 0``), a ``policy`` node advertising ``policy_gpu`` and labelled
``pool=policy``, a ``reference`` node advertising ``reference_gpu`` and labelled ``pool=reference``. Nodes
are removed and added back from the main thread (Ray's node processes need it) while the run goes on in
another. Runs pause once at a known step (the ``PauseOnce`` callback of tests/hooks.py: rank 0 after that
step's checkpoint) so a node is lost mid-run at a known point.

1. placement: every training worker on the policy node, every reference actor on the reference node, with
   ``reference.node_label`` (run A) and with ``reference.resources`` (run B);
2. run A loses the reference node after step 1 and gets a new one: the actor restarts there and the run
   finishes; without a node coming back, the client fails within ``reference.capacity_timeout_s`` naming the
   resources (test_reference_node_that_never_returns_fails_naming_the_resources);
3. run B loses the policy node after step 1's checkpoint: Ray Train restarts the worker group there when the
   node is back, from the checkpoint, and the curve is run A's (the same rows and weights; the reference
   answers are the same values);
4. a round of iterative DPO (``dpo_ray.iterate``) with its rollout actors on the reference node, its scorer on
   the head (``scorer_slot``) and its training on the policy node, one rollout actor lost mid-round.

`ray job submit`, `ray job stop` and a killed driver are tests/test_job_submit.py's (a real head with the Jobs
API and token authentication).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

POLICY = dict(num_cpus=4, resources={"policy_gpu": 2}, labels={"pool": "policy"})
REFERENCE = dict(num_cpus=2, resources={"reference_gpu": 1}, labels={"pool": "reference"})
BASE = dict(
    learning_rate=5e-3, beta=0.5, per_device_train_batch_size=4, logging_steps=1, max_length=64,
    report_to=[], seed=7, max_steps=4, save_strategy="steps", save_steps=1,
    ray={"num_workers": 2, "resources_per_worker": {"CPU": 0.5, "policy_gpu": 1}, "max_failures": 2},
)
_CURVES: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"scorer_slot": 1}})
    c.add_node(**POLICY)
    c.add_node(**REFERENCE)
    ray.init(address=c.address)  # workers' lines reach this process: the restart test reads them
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _node(cluster, labels: dict):
    """The cluster_utils node whose raylet carries ``labels``."""
    import ray

    ids = {n["NodeID"] for n in ray.nodes() if n["Alive"] and all(n.get("Labels", {}).get(k) == v
                                                                  for k, v in labels.items())}
    found = [n for n in cluster.worker_nodes if n.node_id in ids]
    assert len(found) == 1, (labels, ids)
    return found[0]


def _placement() -> dict[str, set[str]]:
    """Alive actors by class name -> the node ids they run on (the GCS actor table)."""
    from ray._private.state import state

    out: dict[str, set[str]] = {}
    for info in state.actor_table(None).values():
        if info.get("State") == "ALIVE":
            out.setdefault(info["ActorClassName"], set()).add(info["Address"]["NodeID"])
    return out


def _rows(n: int = 64) -> list[dict]:
    from test_train import make_rows

    return make_rows(n)


class Paused:
    """Runs ``DPOTrainer.train`` in a thread with the pause callback; the test acts while rank 0 waits."""

    def __init__(self, tmp_path: Path, name: str, **overrides):
        from hooks import PauseOnce

        from dpo_ray import DPOConfig, DPOTrainer

        self.dir = tmp_path / f"{name}_pause"
        self.dir.mkdir()
        cfg = DPOConfig(**{**BASE, **overrides, "output_dir": str(tmp_path / name)})
        self.trainer = DPOTrainer(args=cfg, train_dataset=_rows(), callbacks=[PauseOnce(1, self.dir)])
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.result = self.trainer.train()
        except BaseException as e:  # re-raised in join()
            self.error = e

    def wait_paused(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.dir / "paused").exists():
            assert self.thread.is_alive(), f"the run ended before pausing: {self.error!r}"
            assert time.monotonic() < deadline, "the run never reached the pause"
            time.sleep(0.2)

    def go(self) -> None:
        (self.dir / "go").write_text("")

    def join(self, timeout_s: float = 300):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the run did not finish within {timeout_s}s after the node loss"
        if self.error is not None:
            raise self.error
        return self.result


def _losses(out) -> list[float]:
    return [r["loss"] for r in out.history if "loss" in r]


def test_reference_node_lost_mid_run_and_replaced(cluster, tmp_path):
    """Run A: reference actors placed by node_label. After step 1 the reference node goes; the workers'
    requests wait (never a batch without reference log-probs) until a new node with the label lets Ray restart
    the actor there, then the run finishes all its steps (step 4's request is sent after the loss)."""
    run = Paused(tmp_path, "a", reference={"source": "actor", "num_cpus": 0.5,
                                           "node_label": {"pool": "reference"}})
    run.wait_paused()
    policy, reference = _node(cluster, POLICY["labels"]), _node(cluster, REFERENCE["labels"])
    placed = _placement()
    assert placed["RayTrainWorker"] == {policy.node_id}, placed
    assert placed["ReferenceModelHost"] == {reference.node_id}, placed
    # the run's bookkeeping (data counts, progress board) lives on the driver's node, not one that can be lost
    assert placed["DataCounts"] == placed["ProgressBoard"] == {cluster.head_node.node_id}, placed
    assert "PlacementGroupCleaner" in placed, placed  # a joined cluster keeps Ray Train's cleaner
    cluster.remove_node(reference)
    run.go()
    time.sleep(6)  # the workers ask the lost actor for step 2's answers and wait
    replacement = cluster.add_node(**REFERENCE)
    moved = False
    while run.thread.is_alive() and not moved:  # Ray restarts the actor on the new node; the run goes on
        moved = _placement().get("ReferenceModelHost") == {replacement.node_id}
        time.sleep(0.1)
    out = run.join()
    assert moved, "the reference actor was never seen on the replacement node"
    # steps 2 and 3 were answered ahead (prefetch_depth 2)
    # before the loss; step 4's request waited for the new node
    assert out.report["steps"] == 4 and [r["step"] for r in out.history if "loss" in r] == [1, 2, 3, 4]
    assert "ReferenceModelHost" not in _placement()  # the pool was shut down at the end
    _CURVES["a"] = _losses(out)


def test_reference_node_that_never_returns_fails_naming_the_resources(cluster):
    """The client side of a lost reference node with no replacement: a bounded wait, then an error naming what
    the actor needs. The actor comes back (and answers the same values) once a node with the resource
    returns."""
    import ray
    from test_reference_pool import make_batch, tiny_source

    from dpo_ray.config import DPOConfig
    from dpo_ray.reference.client import ActorPoolReference
    from dpo_ray.reference.pool import ReferencePool

    cfg = DPOConfig(reference={"num_cpus": 0.5, "resources": {"reference_gpu": 1}, "capacity_timeout_s": 6})
    pool = ReferencePool.create(cfg, ray.put(tiny_source()), None, ready_timeout_s=120)
    try:
        client = ActorPoolReference(pool.handles(), cfg, rank=0, timeout_s=120)
        batch = make_batch(2, 1)
        before = client.result(client.submit(batch), batch)
        cluster.remove_node(_node(cluster, REFERENCE["labels"]))
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"Ray found no node with room.*capacity_timeout_s.*needs "
                           r"\{CPU: 0.5, reference_gpu: 1\}"):
            client.result(client.submit(batch), batch)
        assert time.monotonic() - t0 < 60
        cluster.add_node(**REFERENCE)
        # the restart on the new node loads the model again
        # (14 s seen on a loaded CI machine): the bound under test
        # was the one above, this request only checks that the actor comes back with the same values
        client.capacity_timeout_s = 300
        after = client.result(client.submit(batch), batch)
        for a, b in zip(before, after):
            assert a.tolist() == b.tolist()
    finally:
        pool.shutdown()


def test_policy_node_lost_restarts_from_checkpoint(cluster, tmp_path, capfd):
    """Run B: reference actors placed by custom resource. After step 1's checkpoint the policy node goes (both
    workers die); Ray Train restarts the worker group when a policy node is back, from that checkpoint, and
    the loss curve is run A's."""
    run = Paused(tmp_path, "b", reference={"source": "actor", "num_cpus": 0.5,
                                           "resources": {"reference_gpu": 1}})
    run.wait_paused()
    policy, reference = _node(cluster, POLICY["labels"]), _node(cluster, REFERENCE["labels"])
    placed = _placement()
    assert placed["RayTrainWorker"] == {policy.node_id}, placed
    assert placed["ReferenceModelHost"] == {reference.node_id}, placed
    # the run's bookkeeping (data counts, progress board) lives on the driver's node, not one that can be lost
    assert placed["DataCounts"] == placed["ProgressBoard"] == {cluster.head_node.node_id}, placed
    time.sleep(2)  # Ray Train's controller registers step 1's checkpoint (it polls every 0.5 s)
    cluster.remove_node(policy)
    time.sleep(3)
    replacement = cluster.add_node(**POLICY)
    out = run.join()
    assert out.report["steps"] == 4
    # step 1 restored, not trained twice
    assert [r["step"] for r in out.history if "loss" in r] == [1, 2, 3, 4]
    assert replacement.node_id != policy.node_id
    time.sleep(1)  # the workers' last lines reach the driver
    assert "resumed from checkpoint at step 1" in "".join(capfd.readouterr()), "restarted from scratch?"
    if "a" in _CURVES:
        for a, b in zip(_CURVES["a"], _losses(out), strict=True):
            assert a == pytest.approx(b, abs=1e-5)


def test_iterate_places_rollout_scorer_and_training_on_their_nodes(cluster, tmp_path):
    """One round: rollout actors (``iterate.rollout_resources``) on the reference node, the scorer
    (``iterate.scorer_resources``) on the head, the training workers on the policy node; one rollout actor
    exits in its first generate and is replaced, its prompts sampled again."""
    import json

    import ray
    from hooks import Recorder, dying_rollout_host, word_count
    from test_iterate import tiny

    from dpo_ray import DPOConfig
    from dpo_ray.iterate import run_iterate

    calls = tmp_path / "calls"
    calls.mkdir()
    cfg = DPOConfig(**{**BASE, "save_strategy": "no", "max_steps": 1}, output_dir=str(tmp_path / "it"),
                    model_name_or_path=str(tiny(tmp_path)),
                    iterate={"rounds": 1, "samples": 4, "prompts_per_round": 16, "max_new_tokens": 6,
                             "eval_limit": 0, "rollout_actors": 2, "rollout_cpus": 0.5,
                             "rollout_resources": {"reference_gpu": 0.1}, "scorer_cpus": 0,
                             "scorer_resources": {"scorer_slot": 1}})
    summary = run_iterate(cfg, scorer=word_count, rollout_host=dying_rollout_host(tmp_path / "died"),
                          callbacks=[Recorder(calls)])
    policy, reference = _node(cluster, POLICY["labels"]), _node(cluster, REFERENCE["labels"])
    round1 = summary["rounds"][1]
    assert set(round1["nodes"]["rollout"]) == {reference.node_id}, round1["nodes"]
    assert set(round1["nodes"]["scorer"]) == {cluster.head_node.node_id}, round1["nodes"]
    assert round1["restarts"] == 1 and (tmp_path / "died").exists()
    ranks = [json.loads(x) for f in calls.glob("rank*.jsonl") for x in f.read_text().splitlines()]
    assert {r["node"] for r in ranks} == {policy.node_id}
    assert round1["groups"] > 0 and ray.is_initialized()
