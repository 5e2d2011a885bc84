"""Worker side of the reference actor pool: ``ActorPoolReference``, the ``ReferenceClient`` each training
worker uses (the driver side, placement and start-up, is ``dpo_ray.reference.pool``).

``submit`` sends a micro-batch's ids to an actor and returns at once; ``result`` waits for that request's
answer, checks it is that batch's answer at the current weights version, and survives actor deaths (retry
on the restarted actor or a peer). ``sync_from`` applies a TR-DPO mix on every actor.

Which batches see TR-DPO's new weights (see docs/reference.md): the sync after optimizer step s happens on
every rank before any micro-batch of step s+1 is consumed; a request's answer is used only when it was
computed at the client's current version, so every micro-batch of steps ≤ s used the old weights and every
micro-batch consumed after the sync uses the mixed ones, whatever was in flight.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from torch import Tensor, nn

from dpo_ray import ray_private
from dpo_ray.config import DPOConfig
from dpo_ray.forward import num_pairs
from dpo_ray.reference.actor import from_wire, request_keys, to_wire
from dpo_ray.reference.base import param_name
from dpo_ray.reference.pool import actor_request


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
        # the model's reference every call carries: an actor with none yet loads it (pool.ReferenceHandles)
        self.model = getattr(handles, "model", None)
        self.rank = _worker_rank() if rank is None else rank
        self.ld_alpha = cfg.ld_alpha
        self.retries = cfg.reference.max_task_retries
        self.timeout_s = cfg.reference.request_timeout_s if timeout_s is None else timeout_s
        # The first answer also waits for the actor to load its model: the driver starts the pool without
        # waiting (the loading overlaps the worker group's start) and stops it if loading fails or times out.
        self.ready_timeout_s = cfg.reference.ready_timeout_s
        self._answered = False
        # a lost node: how long to wait for a node with room for an actor Ray is restarting
        self.capacity_timeout_s = cfg.reference.capacity_timeout_s
        self.actor_needs = (actor_request(cfg), dict(cfg.reference.node_label))
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
        raise RuntimeError(f"all {n} reference actor(s) are dead (restart budget reference.max_restarts "
                           "spent)")

    def _send(self, request_id, actor: int, payload: dict[str, Tensor], version: int) -> RefRequest:
        ref = self.actors[actor].logps.remote(request_id, payload, self.ld_alpha, self.model)
        req = RefRequest(request_id, actor, ref, version, payload)
        self._inflight[request_id] = req
        return req

    def submit(self, batch: Mapping[str, Tensor]) -> RefRequest:
        """Send the batch's ids (CPU) to an actor; returns at once."""
        payload = {k: to_wire(batch[k]) for k in request_keys(batch)}  # numpy: no pickled tensors
        request_id = (self.rank, self._seq)
        actor = self._pick()
        self._seq += 1
        return self._send(request_id, actor, payload, self.version)

    def result(self, handle: RefRequest, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(ref_chosen, ref_rejected) for ``batch``, each (B,) float32 on CPU; blocks up to the timeout."""
        if not np.array_equal(handle.payload["input_ids"], batch["input_ids"].detach().cpu().numpy()):
            raise RuntimeError(f"reference request {handle.request_id} was submitted for another batch than "
                               "the one being trained; answers are matched by request, never by arrival "
                               "order")
        if handle.version != self.version:
            raise RuntimeError(f"reference request {handle.request_id} was computed at weights version "
                               f"{handle.version} but the reference is at {self.version}; submit it again")
        req, failures = handle, 0
        while True:
            try:
                request_id, version, chosen, rejected = self._await(req)
            except RayActorError as e:
                failures += 1
                if not isinstance(e, ActorUnavailableError):  # died for good (restarts spent)
                    self._dead.add(req.actor)
                if failures > self.retries:
                    raise RuntimeError(
                        f"reference request {req.request_id} failed {failures} time(s); the last on "
                        f"reference actor {req.actor} ({type(e).__name__}); retry budget "
                        f"reference.max_task_retries={self.retries} spent. Check the actor logs (out of "
                        "memory?) or raise reference.max_restarts / max_task_retries") from e
                req = self._retry(req, unavailable=isinstance(e, ActorUnavailableError))
                continue
            if version < req.version:  # the actor restarted and reloaded the initial weights
                failures += 1
                if failures > self.retries:
                    raise RuntimeError(f"reference actor {req.actor} keeps answering at weights version "
                                       f"{version}, expected {req.version}")
                self._restore(req.actor, req.version)
                req = self._send(req.request_id, req.actor, req.payload, req.version)
                continue
            break
        self._answered = True
        self._inflight.pop(handle.request_id, None)
        if request_id != handle.request_id:
            raise RuntimeError(f"reference actor answered request {request_id} when asked for "
                               f"{handle.request_id}")
        if version != handle.version:
            raise RuntimeError(
                f"reference request {handle.request_id} was answered at weights version {version}, not "
                f"{handle.version}: a TR-DPO sync reached the actors before the batches of its step were "
                "consumed")
        chosen, rejected = from_wire(chosen), from_wire(rejected)
        b = num_pairs(batch)
        if chosen.shape != (b,) or rejected.shape != (b,):
            raise RuntimeError(f"reference answer shapes {tuple(chosen.shape)}/{tuple(rejected.shape)} do "
                               f"not match the batch's {b} pairs")
        return chosen, rejected

    # ---------------------------------------------------------------- waiting; node loss (docs/reference.md)
    POLL_S = 5.0  # how often a slow answer's actor is looked up (one GCS call)

    def _await(self, req: RefRequest):
        """``ray.get`` of one answer, in slices. Time while the actor is alive counts against
        request_timeout_s (a wedged actor); time while Ray restarts it and no node has room for it (its node
        was lost) counts against capacity_timeout_s. It goes on as soon as a node with the actor's resources
        (back) lets Ray restart it (Ray re-runs the request there); either bound raises naming what is
        missing: never a hang."""
        alive_s = lost_s = 0.0
        lost_since = None
        # the first answer also waits for the actor to load its model (the pool starts without waiting)
        timeout_s = self.timeout_s if self._answered else self.timeout_s + self.ready_timeout_s
        while True:
            left = min(timeout_s - alive_s, self.capacity_timeout_s - lost_s)
            t = time.monotonic()
            try:
                answer = ray.get(req.ref, timeout=max(0.05, min(self.POLL_S, left)))
            except GetTimeoutError:
                answer = None
            spent = time.monotonic() - t
            if answer is not None:
                if lost_since is not None:
                    print(f"reference actor {req.actor} is back after {time.monotonic() - lost_since:.0f}s; "
                          f"request {req.request_id} answered", flush=True)
                return answer
            if actor_state(self.actors[req.actor]) in _WAITING_FOR_NODE:
                lost_s += spent
                if lost_since is None:
                    lost_since = t
                    # once back, the restarted actor loads its model with this request (actor.FromRequests)
                    timeout_s = max(timeout_s, alive_s + self.timeout_s + self.ready_timeout_s)
                    print(f"reference actor {req.actor} is down (its node or process was lost) and Ray is "
                          f"restarting it; waiting up to {self.capacity_timeout_s:g}s "
                          f"(reference.capacity_timeout_s) for a node with {self._needs()}", flush=True)
                if lost_s >= self.capacity_timeout_s:
                    raise RuntimeError(
                        f"reference actor {req.actor} is down (its node or process was lost) and Ray found "
                        f"no node with room to restart it within {self.capacity_timeout_s:g}s "
                        f"(reference.capacity_timeout_s): it needs {self._needs()}. No batch was trained "
                        "without reference log-probs; add a node with these resources and resume with "
                        "resume_from_checkpoint: latest") from None
            else:
                alive_s += spent
                if alive_s >= timeout_s:
                    raise RuntimeError(
                        f"reference actor {req.actor} gave no answer to request {req.request_id} within "
                        f"{timeout_s:g}s (reference.request_timeout_s"
                        f"{'' if self._answered else ' + ready_timeout_s for the first answer'}); it may be "
                        "wedged or starved of resources") from None

    def _needs(self) -> str:
        req, labels = self.actor_needs
        what = ", ".join(f"{k}: {v:g}" for k, v in req.items()) or "no resources"
        return f"{{{what}}}" + (f" and the labels {labels}" if labels else "") + \
            " (reference.num_cpus / num_gpus / resources / node_label)"

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
                weights = peer.state_dict.remote(self.model)
                ray.get(self.actors[actor].load_state.remote(weights, version, self.model),
                        timeout=self.timeout_s)
                return
            except RayActorError:
                continue
        raise RuntimeError(
            f"reference actor {actor} restarted and lost the TR-DPO weights of version {version}, and no "
            "live peer holds them; with sync_ref_model, run reference.num_actors >= 2 so a peer can restore "
            "it")

    # ------------------------------------------------------------------------------------ TR-DPO
    def sync_from(self, policy: nn.Module, alpha: float) -> None:
        """π_ref ← α·π_θ + (1-α)·π_ref on every actor; every rank must call it at the same step.

        All ranks first meet at a barrier, so none still waits for an answer at the old version. Rank 0
        then gathers the policy (ZeRO-3: parameter by parameter, a collective all ranks join), puts it
        in the object store once and mixes every actor at version+1; then all ranks learn the outcome
        and bump ``version`` together, so ``prefetched`` re-submits requests sent before the sync.
        """
        # Every rank must have its answers for this step's batches (sent at the old version) before any
        # actor moves on: otherwise a slower rank's pending request is computed with the mixed weights.
        if _several_ranks():
            dist.barrier()
        state = gather_policy_state(policy)
        new_version = self.version + 1
        _on_rank0_for_all(self.rank == 0, lambda: self._mix_all(state, alpha, new_version),
                          f"TR-DPO reference sync to weights version {new_version} failed")
        self.version = new_version
        self._cancel_stale()

    def _mix_all(self, state: dict[str, Tensor], alpha: float, version: int) -> None:
        state_ref = ray.put(state)
        live = [i for i in range(len(self.actors)) if i not in self._dead]
        calls = {i: self.actors[i].mix.remote(state_ref, alpha, version, self.model) for i in live}
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

    # ------------------------------------------------------------------------- checkpoint (TR-DPO)
    def save_state(self, d, rank: int) -> None:
        """Rank 0 writes the actors' mixed weights into checkpoint folder ``d`` (``ref_model.pt``)."""
        if rank != 0:
            return
        live = next(i for i in range(len(self.actors)) if i not in self._dead)
        state = ray.get(self.actors[live].state_dict.remote(self.model), timeout=self.timeout_s)
        torch.save(state, d / "ref_model.pt")

    def load_state(self, d, rank: int, version: int) -> None:
        """After a restore: rank 0 loads the checkpoint's mixed weights into every actor at ``version`` (a
        restarted worker group finds them ahead of the checkpoint, a resumed run at version 0); every rank
        adopts ``version`` once that is done, before any request is sent."""
        def load() -> None:
            ref = ray.put(torch.load(d / "ref_model.pt", weights_only=True))
            ray.get([a.load_state.remote(ref, version, self.model) for a in self.actors],
                    timeout=self.timeout_s)

        _on_rank0_for_all(rank == 0, load,
                          f"restoring the TR-DPO reference weights (version {version}) from {d} failed")
        self.version = version

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


# Ray's actor states while it restarts an actor and waits for a node to put it on
_WAITING_FOR_NODE = ("RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY")


def actor_state(handle) -> str | None:
    """The actor's state as the GCS knows it (ALIVE, RESTARTING, DEAD, ...); None when the GCS cannot be asked
    (a hiccup, or a Ray without the hook: ray_private.actor_state). Unknown is not "waiting for a node": the
    wait then counts against the answer timeout, which still bounds it."""
    try:
        return ray_private.actor_state(handle)
    except ray_private.StateUnknown:
        return None


def _several_ranks() -> bool:
    """A process group of more than one rank is up (collectives are needed; with one rank, or none, they are
    not)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _on_rank0_for_all(is_rank0: bool, action, what: str) -> None:
    """Run ``action`` on rank 0 only; every rank then learns whether it failed (a broadcast all ranks join)
    and raises ``what: error`` together, so none waits forever for a rank that gave up."""
    error = None
    if is_rank0:
        try:
            action()
        except Exception as e:  # reported to every rank below
            error = f"{type(e).__name__}: {e}"
    if _several_ranks():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RuntimeError(f"{what}: {error}")


@torch.no_grad()
def gather_policy_state(policy: nn.Module) -> dict[str, Tensor] | None:
    """The policy's parameters on CPU on rank 0 (None elsewhere), named without a ``module.`` prefix.

    Under ZeRO-3 each parameter is gathered in turn (a collective: every rank must call this), so the
    full model never sits on one GPU at once.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out: dict[str, Tensor] | None = {} if rank == 0 else None
    for name, p in policy.named_parameters():
        key = param_name(name)
        if getattr(p, "ds_id", None) is not None:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if out is not None:
                    out[key] = p.detach().cpu().clone()
        elif out is not None:
            out[key] = p.detach().cpu().clone()
    return out
