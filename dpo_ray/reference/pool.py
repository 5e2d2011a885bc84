"""Driver side of the reference actor pool (reference.source: actor); the workers' side is
``dpo_ray.reference.client``.

``ReferencePool.create(cfg, ref_source, tokenizer)`` checks that the cluster can place the actors (failing
fast with the short resource named), starts them and waits until each has loaded its model; ``handles()``
goes to the workers through the loop config; ``shutdown()`` ends them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from dpo_ray.config import DPOConfig
from dpo_ray.reference.actor import FromRequests, ReferenceActor, ReferenceModelHost


class ReferencePlacementError(RuntimeError):
    """The cluster cannot place the reference actors as configured."""


# ============================================================================ placement (driver)

def actor_request(cfg: DPOConfig) -> dict[str, float]:
    """One actor's Ray resource request, as ``options`` will ask for it (zeros dropped)."""
    rc = cfg.reference
    req = {"CPU": rc.num_cpus, "GPU": rc.num_gpus, **rc.resources}
    return {k: float(v) for k, v in req.items() if v > 0}


def _key_name(resource: str) -> str:
    return {"CPU": "reference.num_cpus", "GPU": "reference.num_gpus"}.get(
        resource, f"reference.resources.{resource}")


def _eligible_nodes(node_label: Mapping[str, str]) -> list[dict]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return [n for n in nodes if all(n.get("Labels", {}).get(k) == v for k, v in node_label.items())]


def placement_problem(cfg: DPOConfig, nodes: Sequence[Mapping[str, Any]] | None = None) -> str | None:
    """Why the cluster's nodes (their total resources) cannot hold the pool; None when they can.

    Checks the totals per resource, then that each actor fits on one node (Ray never splits an actor).
    Totals, not what is free now: resources in use are released, missing ones never appear (unless an
    autoscaler adds nodes: set reference.check_placement: false there).
    """
    rc = cfg.reference
    n, req = rc.num_actors, actor_request(cfg)
    if nodes is None:
        nodes = _eligible_nodes(rc.node_label)
    where = f"the nodes labelled {dict(rc.node_label)}" if rc.node_label else "the cluster"
    if not nodes:
        return (f"no alive node carries the labels reference.node_label={dict(rc.node_label)}; label the "
                "reference nodes (ray start --labels ...) or change reference.node_label")
    for res, amount in req.items():
        have = sum(node["Resources"].get(res, 0.0) for node in nodes)
        if amount * n > have + 1e-9:
            return (f"{_key_name(res)}={amount:g} × {n} actor(s) needs {amount * n:g} {res} but {where} has "
                    f"{have:g}; lower {_key_name(res)} or reference.num_actors, or add {res} to the cluster")
    fits = sum(min(math.floor(node["Resources"].get(r, 0.0) / a + 1e-9) for r, a in req.items()) if req else n
               for node in nodes)
    if fits < n:
        return (f"one reference actor asks for {req} and must fit on a single node, but the nodes of {where} "
                f"can hold only {fits} of the {n} actor(s); lower the per-actor request or "
                "reference.num_actors")
    return None


def _short_now(cfg: DPOConfig) -> str | None:
    """Resources that exist but are taken right now (the actors will wait for them)."""
    req, n = actor_request(cfg), cfg.reference.num_actors
    free = ray.available_resources()
    short = [f"{r} (need {a * n:g}, free {free.get(r, 0.0):g})" for r, a in req.items() if a * n
             > free.get(r, 0.0)]
    return ", ".join(short) or None


# ============================================================================ the pool (driver)

class ReferenceHandles(list):
    """The pool's actor handles (a list) plus ``model``, the reference every request carries so that an actor
    with no model yet (new or restarted) loads it (``actor.FromRequests``)."""

    def __init__(self, actors, model: list | None = None):
        super().__init__(actors)
        self.model = model

    def __reduce__(self):
        return ReferenceHandles, (list(self), self.model)


class ReferencePool:
    """The reference actors of one run, owned by the driver."""

    def __init__(self, actors: list, cfg: DPOConfig, model: list | None = None):
        self.actors, self.cfg = actors, cfg
        # [ObjectRef of {"source", "tokenizer"}]: every request carries it and an actor without a model (a new
        # one, a restarted one) loads from it (actor.FromRequests); the pool keeps it alive while it lives.
        self.model = model

    @classmethod
    def create(cls, cfg: DPOConfig, ref_source: str | ray.ObjectRef | None, tokenizer, *,
               ready_timeout_s: float | None = None, host_class: type = ReferenceModelHost,
               wait: bool = True) -> ReferencePool:
        """Start ``reference.num_actors`` actors and wait until every one has its model loaded.

        Raises ``ReferencePlacementError`` at once when the cluster cannot hold them, and when they are
        not all up within ``ready_timeout_s``. ``host_class``: what each actor runs, ``ReferenceModelHost`` or
        a subclass of it (another way to load or serve the model; the tests add latency to its answers).
        ``wait=False`` returns as soon as the actors are started and checks their loading in a background
        thread (``wait_ready_in_background``): the trainer starts its worker group meanwhile.
        """
        rc = cfg.reference
        if rc.check_placement:
            problem = placement_problem(cfg)
            if problem:
                raise ReferencePlacementError(f"cannot place the reference actor pool: {problem}")
            busy = _short_now(cfg)
            if busy:
                print(f"reference pool: waiting for resources in use: {busy}", flush=True)
        options: dict[str, Any] = {"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus,
                                   "max_restarts": rc.max_restarts, "max_task_retries": rc.max_task_retries}
        if rc.resources:
            options["resources"] = dict(rc.resources)
        if rc.node_label:
            options["label_selector"] = dict(rc.node_label)
        cfg_dict = cfg.model_dump(mode="json")
        # the model travels with the requests, not as a constructor argument (see actor.FromRequests)
        model = [ray.put({"source": ref_source, "tokenizer": tokenizer})]
        if not (isinstance(host_class, type) and issubclass(host_class, ReferenceModelHost)):
            raise TypeError(f"host_class must be ReferenceModelHost or a subclass of it, not {host_class!r}")
        actor_class = ReferenceActor if host_class is ReferenceModelHost else ray.remote(host_class)
        actors = [actor_class.options(**options).remote(cfg_dict, FromRequests(), None)
                  for _ in range(rc.num_actors)]
        pool = cls(actors, cfg, model)
        timeout_s = ready_timeout_s if ready_timeout_s is not None else rc.ready_timeout_s
        if not wait:
            pool.wait_ready_in_background(timeout_s)
            return pool
        try:
            pool._wait_ready(timeout_s)
        except BaseException:
            pool.shutdown()
            raise
        return pool

    def wait_ready_in_background(self, timeout_s: float) -> None:
        """Check the actors' loading on a thread. On failure the error is kept in ``self.error`` and the
        actors are stopped, so the workers' first reference request fails at once instead of waiting; the
        trainer then raises ``self.error`` (which names the actor and the cause) rather than the workers'
        error."""
        import threading
        import time

        self.error: BaseException | None = None
        self.ready_at: float | None = None

        def watch() -> None:
            try:
                self._wait_ready(timeout_s)
                self.ready_at = time.time()
            except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread
                self.error = e
                self.shutdown()

        self._watcher = threading.Thread(target=watch, name="dpo-ray-reference-ready", daemon=True)
        self._watcher.start()

    def _wait_ready(self, timeout_s: float) -> None:
        pings = {a.ping.remote(self.model): i for i, a in enumerate(self.actors)}
        ready, pending = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref, timeout=timeout_s)
            except (RayActorError, RayTaskError) as e:  # the process died, or the load raised
                raise RuntimeError(f"reference actor {pings[ref]} failed to load its model: {e}") from e
        if pending:
            idle = sorted(pings[r] for r in pending)
            busy = _short_now(self.cfg)
            hint = (f"; resources taken: {busy}" if busy
                    else " (model still loading? raise reference.ready_timeout_s)")
            raise ReferencePlacementError(
                f"reference actor(s) {idle} of {len(self.actors)} not ready after {timeout_s:g}s{hint}")

    def handles(self) -> ReferenceHandles:
        """The actor handles with the model's reference, picklable into the loop config for
        ``dpo_ray.reference.client.ActorPoolReference``."""
        return ReferenceHandles(self.actors, self.model)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors, self.model = [], None
