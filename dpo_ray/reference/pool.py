"""The reference model as a pool of Ray actors on their own resources (reference.source: actor).

Driver side: ``ReferencePool.create(cfg, ref_source, tokenizer)`` checks that the cluster can place the
actors (failing fast with the short resource named), starts them and waits until each has loaded its
model; ``handles()`` goes to the workers through the train-loop config; ``shutdown()`` ends them.

Worker side: ``ActorPoolReference(handles, cfg)`` is the ``ReferenceClient`` the training loop uses.
``submit`` sends a micro-batch's ids to an actor and returns at once; ``result`` waits for that
request's answer, checks it is that batch's answer at the current weights version, and survives actor
deaths (retry on the restarted actor or a peer). ``sync_from`` applies a TR-DPO mix on every actor.

Which batches see TR-DPO's new weights (see docs/reference.md): the sync after optimizer step s
happens on every rank before any micro-batch of step s+1 is consumed; a request's answer is used only
when it was computed at the client's current version, so every micro-batch of steps ≤ s used the old
weights and every micro-batch consumed after the sync uses the mixed ones, whatever was in flight.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from torch import Tensor, nn

from dpo_ray.config import DPOConfig
from dpo_ray.reference.actor import ReferenceActor, request_keys

# Seconds to wait for one answer / for the actors to load. A request normally takes well under a
# second; the limit only turns a wedged actor into an error instead of a hang.
REQUEST_TIMEOUT_S = float(os.environ.get("DPO_RAY_REF_TIMEOUT_S", "600"))
READY_TIMEOUT_S = float(os.environ.get("DPO_RAY_REF_READY_TIMEOUT_S", "900"))
SKIP_PLACEMENT_CHECK = os.environ.get("DPO_RAY_SKIP_PLACEMENT_CHECK", "0") == "1"


class ReferencePlacementError(RuntimeError):
    """The cluster cannot place the reference actors as configured."""


# ============================================================================ placement (driver)

def actor_request(cfg: DPOConfig) -> dict[str, float]:
    """One actor's Ray resource request, as ``options`` will ask for it (zeros dropped)."""
    rc = cfg.reference
    req = {"CPU": rc.num_cpus, "GPU": rc.num_gpus, **rc.resources}
    return {k: float(v) for k, v in req.items() if v > 0}


def _key_name(resource: str) -> str:
    return {"CPU": "reference.num_cpus", "GPU": "reference.num_gpus"}.get(resource, f"reference.resources.{resource}")


def _eligible_nodes(node_label: Mapping[str, str]) -> list[dict]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return [n for n in nodes if all(n.get("Labels", {}).get(k) == v for k, v in node_label.items())]


def placement_problem(cfg: DPOConfig, nodes: Sequence[Mapping[str, Any]] | None = None) -> str | None:
    """Why the cluster's nodes (their total resources) cannot hold the pool; None when they can.

    Checks the totals per resource, then that each actor fits on one node (Ray never splits an actor).
    Totals, not what is free now: resources in use are released, missing ones never appear (unless an
    autoscaler adds nodes: set DPO_RAY_SKIP_PLACEMENT_CHECK=1 there).
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
        return (f"one reference actor asks for {req} and must fit on a single node, but the nodes of {where} can "
                f"hold only {fits} of the {n} actor(s); lower the per-actor request or reference.num_actors")
    return None


def _short_now(cfg: DPOConfig) -> str | None:
    """Resources that exist but are taken right now (the actors will wait for them)."""
    req, n = actor_request(cfg), cfg.reference.num_actors
    free = ray.available_resources()
    short = [f"{r} (need {a * n:g}, free {free.get(r, 0.0):g})" for r, a in req.items() if a * n > free.get(r, 0.0)]
    return ", ".join(short) or None


# ============================================================================ the pool (driver)

class ReferencePool:
    """The reference actors of one run, owned by the driver."""

    def __init__(self, actors: list, cfg: DPOConfig, source: Any = None):
        self.actors, self.cfg = actors, cfg
        # Restarted actors re-run their constructor with this argument: keep an ObjectRef source in scope
        # for as long as the pool lives (ray-project/ray#53727).
        self._source = source

    @classmethod
    def create(cls, cfg: DPOConfig, ref_source: str | ray.ObjectRef | None, tokenizer, *,
               ready_timeout_s: float | None = None, delay_s: tuple[float, float] | None = None) -> ReferencePool:
        """Start ``reference.num_actors`` actors and wait until every one has its model loaded.

        Raises ``ReferencePlacementError`` at once when the cluster cannot hold them, and when they are
        not all up within ``ready_timeout_s``. ``delay_s`` is a test knob (random delay per request).
        """
        rc = cfg.reference
        if not SKIP_PLACEMENT_CHECK:
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
        actors = [ReferenceActor.options(**options).remote(cfg_dict, ref_source, tokenizer, delay_s=delay_s,
                                                           delay_seed=i)
                  for i in range(rc.num_actors)]
        pool = cls(actors, cfg, ref_source)
        try:
            pool._wait_ready(ready_timeout_s if ready_timeout_s is not None else READY_TIMEOUT_S)
        except BaseException:
            pool.shutdown()
            raise
        return pool

    def _wait_ready(self, timeout_s: float) -> None:
        pings = {a.ping.remote(): i for i, a in enumerate(self.actors)}
        ready, pending = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref, timeout=timeout_s)
            except RayActorError as e:
                raise RuntimeError(f"reference actor {pings[ref]} failed to load its model: {e}") from e
        if pending:
            idle = sorted(pings[r] for r in pending)
            busy = _short_now(self.cfg)
            hint = f"; resources taken: {busy}" if busy else " (model still loading? raise DPO_RAY_REF_READY_TIMEOUT_S)"
            raise ReferencePlacementError(
                f"reference actor(s) {idle} of {len(self.actors)} not ready after {timeout_s:g}s{hint}")

    def handles(self) -> list:
        """The actor handles, picklable into the train-loop config for ``ActorPoolReference``."""
        return list(self.actors)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors, self._source = [], None


# ============================================================================ the client (workers)

@dataclass
class RefRequest:
    """A reference request in flight: what ``submit`` returns and ``result`` redeems."""

    request_id: tuple[int, int]  # (rank, sequence number): unique per client
    actor: int
    ref: ray.ObjectRef
    version: int  # the client's weights version when submitted
    payload: dict[str, Tensor]


def _worker_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:
        return 0


class ActorPoolReference:
    """``ReferenceClient`` over the pool's actors, one per training worker."""

    def __init__(self, handles: Sequence, cfg: DPOConfig, *, rank: int | None = None,
                 timeout_s: float | None = None):
        if not handles:
            raise ValueError("ActorPoolReference needs at least one reference actor handle")
        self.actors = list(handles)
        self.rank = _worker_rank() if rank is None else rank
        self.ld_alpha = cfg.ld_alpha
        self.retries = cfg.reference.max_task_retries
        self.timeout_s = REQUEST_TIMEOUT_S if timeout_s is None else timeout_s
        self.version = 0
        self._seq = 0
        self._dead: set[int] = set()
        self._inflight: dict[tuple[int, int], RefRequest] = {}

    # ------------------------------------------------------------------------------------ requests
    def _pick(self, after: int | None = None) -> int:
        """Round-robin over live actors, offset by rank so workers start on different actors."""
        n = len(self.actors)
        start = (self.rank + self._seq) % n if after is None else (after + 1) % n
        for k in range(n):
            i = (start + k) % n
            if i not in self._dead:
                return i
        raise RuntimeError(f"all {n} reference actor(s) are dead (restart budget reference.max_restarts spent)")

    def _send(self, request_id, actor: int, payload: dict[str, Tensor], version: int) -> RefRequest:
        ref = self.actors[actor].logps.remote(request_id, payload, self.ld_alpha)
        req = RefRequest(request_id, actor, ref, version, payload)
        self._inflight[request_id] = req
        return req

    def submit(self, batch: Mapping[str, Tensor]) -> RefRequest:
        """Send the batch's ids (CPU) to an actor; returns at once."""
        payload = {k: batch[k].detach().cpu() for k in request_keys(batch)}
        request_id = (self.rank, self._seq)
        actor = self._pick()
        self._seq += 1
        return self._send(request_id, actor, payload, self.version)

    def result(self, handle: RefRequest, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(ref_chosen, ref_rejected) for ``batch``, each (B,) float32 on CPU; blocks up to the timeout."""
        if not torch.equal(handle.payload["input_ids"], batch["input_ids"].detach().cpu()):
            raise RuntimeError(f"reference request {handle.request_id} was submitted for another batch than the "
                               "one being trained; answers are matched by request, never by arrival order")
        if handle.version != self.version:
            raise RuntimeError(f"reference request {handle.request_id} was computed at weights version "
                               f"{handle.version} but the reference is at {self.version}; submit it again")
        req, failures = handle, 0
        while True:
            try:
                request_id, version, chosen, rejected = ray.get(req.ref, timeout=self.timeout_s)
            except GetTimeoutError:
                raise RuntimeError(
                    f"reference actor {req.actor} gave no answer to request {req.request_id} within "
                    f"{self.timeout_s:g}s (DPO_RAY_REF_TIMEOUT_S); it may be wedged or starved of resources"
                ) from None
            except RayActorError as e:
                failures += 1
                if not isinstance(e, ActorUnavailableError):  # died for good (restarts spent)
                    self._dead.add(req.actor)
                if failures > self.retries:
                    raise RuntimeError(
                        f"reference request {req.request_id} failed {failures} time(s); the last on reference actor "
                        f"{req.actor} ({type(e).__name__}); retry budget reference.max_task_retries={self.retries} "
                        "spent. Check the actor logs (out of memory?) or raise reference.max_restarts / "
                        "max_task_retries") from e
                req = self._retry(req, unavailable=isinstance(e, ActorUnavailableError))
                continue
            if version < req.version:  # the actor restarted and reloaded the initial weights
                failures += 1
                if failures > self.retries:
                    raise RuntimeError(f"reference actor {req.actor} keeps answering at weights version {version}, "
                                       f"expected {req.version}")
                self._restore(req.actor, req.version)
                req = self._send(req.request_id, req.actor, req.payload, req.version)
                continue
            break
        self._inflight.pop(handle.request_id, None)
        if request_id != handle.request_id:
            raise RuntimeError(f"reference actor answered request {request_id} when asked for {handle.request_id}")
        if version != handle.version:
            raise RuntimeError(
                f"reference request {handle.request_id} was answered at weights version {version}, not {handle.version}: "
                "a TR-DPO sync reached the actors before the batches of its step were consumed")
        b = batch["input_ids"].shape[0] // 2
        if chosen.shape != (b,) or rejected.shape != (b,):
            raise RuntimeError(f"reference answer shapes {tuple(chosen.shape)}/{tuple(rejected.shape)} do not match "
                               f"the batch's {b} pairs")
        return chosen, rejected

    def _retry(self, req: RefRequest, unavailable: bool) -> RefRequest:
        """Send the same request again: to the same actor when it is restarting, else to the next live one."""
        if unavailable:
            time.sleep(0.5)  # restarting: give it a moment
            actor = req.actor
        else:
            actor = self._pick(after=req.actor)
        return self._send(req.request_id, actor, req.payload, req.version)

    def _restore(self, actor: int, version: int) -> None:
        """Give a restarted actor the weights of a live peer at ``version`` (TR-DPO mixes it lost)."""
        for j, peer in enumerate(self.actors):
            if j == actor or j in self._dead:
                continue
            try:
                if ray.get(peer.weights_version.remote(), timeout=self.timeout_s) != version:
                    continue
                ray.get(self.actors[actor].load_state.remote(peer.state_dict.remote(), version),
                        timeout=self.timeout_s)
                return
            except RayActorError:
                continue
        raise RuntimeError(
            f"reference actor {actor} restarted and lost the TR-DPO weights of version {version}, and no live peer "
            "holds them; with sync_ref_model, run reference.num_actors >= 2 so a peer can restore it")

    # ------------------------------------------------------------------------------------ TR-DPO
    def sync_from(self, policy: nn.Module, alpha: float) -> None:
        """π_ref ← α·π_θ + (1-α)·π_ref on every actor; every rank must call it at the same step.

        Rank 0 gathers the policy (ZeRO-3: parameter by parameter, a collective all ranks join), puts it
        in the object store once and mixes every actor at version+1; then all ranks learn the outcome
        and bump ``version`` together, so ``prefetched`` re-submits requests sent before the sync.
        """
        state = gather_policy_state(policy)
        new_version = self.version + 1
        error = None
        if self.rank == 0:
            try:
                self._mix_all(state, alpha, new_version)
            except Exception as e:  # reported to every rank below, so none waits forever
                error = f"{type(e).__name__}: {e}"
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise RuntimeError(f"TR-DPO reference sync to weights version {new_version} failed: {error}")
        self.version = new_version
        self._cancel_stale()

    def _mix_all(self, state: dict[str, Tensor], alpha: float, version: int) -> None:
        state_ref = ray.put(state)
        live = [i for i in range(len(self.actors)) if i not in self._dead]
        calls = {i: self.actors[i].mix.remote(state_ref, alpha, version) for i in live}
        behind = []
        for i, ref in calls.items():
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ActorUnavailableError:  # restarting: restore it from a peer below
                behind.append(i)
            except RayActorError:
                self._dead.add(i)
            except ray.exceptions.RayTaskError:
                # restarted since an earlier sync (back at version 0): restore from a peer; else a real error
                if ray.get(self.actors[i].weights_version.remote(), timeout=self.timeout_s) >= version - 1:
                    raise
                behind.append(i)
        for i in behind:
            self._restore(i, version)
        if all(i in self._dead for i in live):
            raise RuntimeError("every reference actor died during the TR-DPO sync")

    def _cancel_stale(self) -> None:
        """Drop requests sent before a sync: their answers will never be used."""
        for rid, req in list(self._inflight.items()):
            if req.version != self.version:
                self._inflight.pop(rid)
                try:
                    ray.cancel(req.ref)
                except Exception:  # finished already, or cancellation unsupported: harmless
                    pass

    def close(self) -> None:
        self._cancel_stale()
        self._inflight.clear()


@torch.no_grad()
def gather_policy_state(policy: nn.Module) -> dict[str, Tensor] | None:
    """The policy's parameters on CPU on rank 0 (None elsewhere), named without a ``module.`` prefix.

    Under ZeRO-3 each parameter is gathered in turn (a collective: every rank must call this), so the
    full model never sits on one GPU at once.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out: dict[str, Tensor] | None = {} if rank == 0 else None
    for name, p in policy.named_parameters():
        key = name.removeprefix("module.")
        if getattr(p, "ds_id", None) is not None:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if out is not None:
                    out[key] = p.detach().cpu().clone()
        elif out is not None:
            out[key] = p.detach().cpu().clone()
    return out
