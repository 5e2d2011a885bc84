"""The rollout and scorer actor pools of ``dpo-ray iterate``, on resources of their own
(``iterate.rollout_*``, ``iterate.scorer_*``), like the reference pool.

``RolloutPool.sample`` splits the round's prompts into one contiguous share per actor and gathers the answers
in prompt order. An actor that dies mid-round (its process or node lost) is replaced by a new actor holding
the current weights, and its share is sampled again: since each prompt carries its own seed, the re-sampled
responses are the ones the lost actor would have returned. ``sync`` hands every actor the weights of the round
just trained through the object store (one ``ray.put``; on one node the actors read it from shared memory).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from dpo_ray.iterate.engine import HFGenerateEngine, Prompt, SamplingParams
from dpo_ray.iterate.scoring import ScorerHost

LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class RolloutHost:
    """What a rollout actor holds: the policy in a generation engine. ``source`` is a model directory."""

    def __init__(self, source: str, threads: int, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        self.engine = HFGenerateEngine(model, tokenizer, device)
        self.version = 0

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[str]]:
        return self.engine.generate(prompts, params)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> int:
        self.engine.load_weights(state_dict)
        self.version = version
        return version

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _request(cpus: float, gpus: float, resources: Mapping[str, float] | None = None) -> dict[str, Any]:
    return {"num_cpus": cpus, "num_gpus": gpus, **({"resources": dict(resources)} if resources else {})}


class _Pool:
    """What both pools share: their actors' nodes, and ending them."""

    actors: list

    def nodes(self) -> list[str]:
        """The Ray node id of each actor."""
        return ray.get([a.node.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class RolloutPool(_Pool):
    """``n`` rollout actors with the current policy; replaces the ones that die."""

    def __init__(self, source: str, n: int, cpus: float, gpus: float, max_restarts: int,
                 host_class: type = RolloutHost, resources: Mapping[str, float] | None = None):
        self.source, self.n, self.cpus, self.gpus, self.resources = source, n, cpus, gpus, resources
        self.max_restarts, self.restarts = max_restarts, 0
        self.actor_class = ray.remote(host_class)
        self.weights: tuple[Any, int] | None = None  # (ObjectRef of the state dict, version) the actors hold
        self.actors = [self._start() for _ in range(n)]

    def _start(self):
        device = "cuda" if self.gpus > 0 else "cpu"
        actor = self.actor_class.options(**_request(self.cpus, self.gpus, self.resources)).remote(
            self.source, max(1, math.floor(self.cpus)), device)
        if self.weights is not None:  # a replacement: the weights of the round it joins
            ray.get(actor.load_weights.remote(*self.weights))
        return actor

    def _replace(self, i: int, why: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"rollout actors died {self.restarts} times (iterate.max_restarts="
                               f"{self.max_restarts}); the last: {type(why).__name__}: "
                               f"{str(why)[:300]}") from why
        print(f"iterate: rollout actor {i} was lost ({type(why).__name__}); a new one samples its prompts "
              "again", flush=True)
        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._start()

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[str]]:
        """``params.n`` responses per prompt, in order."""
        if not prompts:
            return []
        size = math.ceil(len(prompts) / self.n)
        shares = [list(prompts[i:i + size]) for i in range(0, len(prompts), size)]
        pending = {i: self.actors[i].generate.remote(share, params) for i, share in enumerate(shares)}
        done: dict[int, list[list[str]]] = {}
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1)
            i = next(k for k, ref in pending.items() if ref == ready[0])
            try:
                done[i] = ray.get(pending.pop(i))
            except LOST as e:
                self._replace(i, e)
                pending[i] = self.actors[i].generate.remote(shares[i], params)
        return [r for i in range(len(shares)) for r in done[i]]

    def sync(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Every actor takes these weights (and a replacement started later takes them too)."""
        ref = ray.put({k: v.detach().cpu() for k, v in state_dict.items()})
        self.weights = (ref, version)
        for i in range(self.n):
            try:
                ray.get(self.actors[i].load_weights.remote(ref, version))
            except LOST as e:
                self._replace(i, e)


class ScorerPool(_Pool):
    """``n`` scorer actors; ``score`` splits the responses between them."""

    def __init__(self, spec: str, n: int, cpus: float, gpus: float, max_restarts: int,
                 resources: Mapping[str, float] | None = None, fn: Any = None):
        self.spec, self.max_restarts = spec, max_restarts
        self.actor_class = ray.remote(ScorerHost).options(**_request(cpus, gpus, resources),
                                                          max_restarts=max_restarts,
                                                          max_task_retries=max_restarts)
        self.actors = [self.actor_class.remote(spec, max(1, math.floor(cpus)), fn) for _ in range(n)]
        # a scorer that cannot load fails here, before sampling
        ray.get([a.ping.remote() for a in self.actors])

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        size = max(1, math.ceil(len(responses) / len(self.actors)))
        refs = [self.actors[j].score.remote(list(prompts[i:i + size]), list(responses[i:i + size]))
                for j, i in enumerate(range(0, len(responses), size))]
        return [s for part in ray.get(refs) for s in part]
