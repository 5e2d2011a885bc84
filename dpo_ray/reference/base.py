"""The reference interface the worker loop uses, and the sources that live on the worker.

A ``ReferenceClient`` turns a collated batch into (ref_chosen, ref_rejected) log-probs, each (B,)
float32 on CPU. ``submit`` may start work ahead of use (the actor pool does); ``result`` blocks.

TR-DPO and prefetch: each client has a ``version`` that a weight sync bumps. A request submitted under
an older version is discarded and submitted again, so every micro-batch consumed after the sync at
optimizer step s sees the mixed weights, whatever was in flight. The outcome is deterministic and the
same for every source.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dpo_ray.forward import GROUP_KEYS, is_group_batch, num_pairs, reference_logps
from dpo_ray.sharing import PrefixSharing
from dpo_ray.vision import PIXEL_KEYS


class ReferenceClient(Protocol):
    version: int

    def submit(self, batch: dict[str, Tensor]) -> Any: ...

    def result(self, handle: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]: ...

    def sync_from(self, policy: nn.Module, alpha: float) -> None: ...

    def close(self) -> None: ...

    # TR-DPO sources also implement save_state(d, rank) / load_state(d, rank, version): the mixed weights
    # travel with each checkpoint so a resume continues at the same reference (dpo_ray.train.checkpoint).


def prefetched(batches: Iterable[dict[str, Tensor]], client: ReferenceClient, depth: int
               ) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
    """Yield (batch, ref_chosen, ref_rejected), keeping ``depth`` reference requests in flight ahead."""
    pending: deque[tuple[dict, Any, int]] = deque()
    it = iter(batches)
    exhausted = False
    while True:
        while not exhausted and len(pending) <= depth:
            batch = next(it, None)
            if batch is None:
                exhausted = True
                break
            pending.append((batch, client.submit(batch), client.version))
        if not pending:
            return
        batch, handle, version = pending.popleft()
        if version != client.version:  # weights changed since this request left: ask again
            handle = client.submit(batch)
        ref_chosen, ref_rejected = client.result(handle, batch)
        yield batch, ref_chosen, ref_rejected
        # re-submit stale in-flight requests early so the new weights' work overlaps the step
        for i, (b, _, v) in enumerate(pending):
            if v != client.version:
                pending[i] = (b, client.submit(b), client.version)


class NoReference:
    """Reference-free: log-ratios are the policy log-probs themselves (ref log-probs = 0)."""

    version = 0

    def submit(self, batch):
        return None

    def result(self, handle, batch):
        b = num_pairs(batch)
        return torch.zeros(b), torch.zeros(b)

    def sync_from(self, policy, alpha):
        raise RuntimeError("sync_ref_model needs a reference model; reference.source is 'none'")

    def close(self):
        pass


class PrecomputedReference(NoReference):
    """Reference log-probs that the data pipeline attached as columns (reference.source: precomputed)."""

    def result(self, handle, batch):
        if is_group_batch(batch):  # prompt groups: per-response columns, gathered for the pairs
            if "ref_logps" not in batch:
                raise RuntimeError("reference.source is 'precomputed' but the group batch carries no "
                                   "ref_logps column")
            logps = batch["ref_logps"].float().cpu()
            return logps[batch["pair_chosen"].cpu()], logps[batch["pair_rejected"].cpu()]
        if "ref_chosen_logps" not in batch:
            raise RuntimeError("reference.source is 'precomputed' but the batch carries no ref_chosen_logps "
                               "column")
        return batch["ref_chosen_logps"].float().cpu(), batch["ref_rejected_logps"].float().cpu()

    def sync_from(self, policy, alpha):
        raise RuntimeError("sync_ref_model cannot update precomputed reference log-probs")


class LocalReference:
    """A frozen copy of the model on the worker, run synchronously (reference.source: local).

    Under ZeRO-3 ``model`` is a DeepSpeed inference engine sharded like the policy, so its forward
    gathers parameters the same way and the TR-DPO mix works shard by shard.
    """

    version = 0

    def __init__(self, model: nn.Module, device: torch.device, ld_alpha: float | None = None,
                 sharing: PrefixSharing | None = None):
        self.model, self.device, self.ld_alpha = model, device, ld_alpha
        self.sharing = sharing

    def submit(self, batch):
        return None  # computed when asked: nothing to overlap on the same device

    def result(self, handle, batch):
        on_device = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                               "completion_mask", *PIXEL_KEYS,
                                                                               *GROUP_KEYS)}
        # the collate's packed width: prefix sharing reads no shape from the device
        if "packed_width" in batch:
            on_device["packed_width"] = batch["packed_width"]
        chosen, rejected = reference_logps(self.model, on_device, ld_alpha=self.ld_alpha,
                                           sharing=self.sharing)
        return chosen.cpu(), rejected.cpu()

    @torch.no_grad()
    def sync_from(self, policy: nn.Module, alpha: float) -> None:
        mix_into(self.model, policy, alpha)
        self.version += 1

    def save_state(self, d, rank: int) -> None:
        """The mixed weights into checkpoint folder ``d``: each rank's shards under ZeRO-3
        (``ref_rank{r}.pt``), else rank 0's whole copy (``ref_model.pt``, the same on every rank)."""
        params = dict(self.model.named_parameters())
        if any(getattr(p, "ds_tensor", None) is not None for p in params.values()):
            torch.save({n: p.ds_tensor.detach().cpu() for n, p in params.items()}, d / f"ref_rank{rank}.pt")
        elif rank == 0:
            torch.save({n: p.detach().cpu() for n, p in params.items()}, d / "ref_model.pt")

    @torch.no_grad()
    def load_state(self, d, rank: int, version: int) -> None:
        """The checkpoint's mixed weights back into the reference, at weights version ``version``."""
        path = d / f"ref_rank{rank}.pt"
        state = torch.load(path if path.exists() else d / "ref_model.pt", map_location="cpu",
                           weights_only=True)
        for n, p in self.model.named_parameters():
            dst = p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p.data
            dst.copy_(state[n].to(dtype=dst.dtype))
        self.version = version

    def close(self):
        pass


# ------------------------------------------------------------------------------------- TR-DPO's weights

def param_name(name: str) -> str:
    """A parameter's name as the bare model names it: without the ``module.`` a DeepSpeed or DDP wrapper
    adds."""
    return name.removeprefix("module.")


def params_by_name(model: nn.Module, expected: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """``model``'s parameters keyed by ``param_name``. With ``expected`` (names, prefixed or not), the two
    sets must be equal: a KeyError names what is missing on either side (another architecture)."""
    params = {param_name(n): p for n, p in model.named_parameters()}
    if expected is not None:
        given = {param_name(n) for n in expected}
        missing, extra = sorted(given - set(params)), sorted(set(params) - given)
        if missing or extra:
            raise KeyError(
                f"TR-DPO sync: policy and reference parameters differ (only in the policy: {missing[:5]}, "
                f"only in the reference: {extra[:5]}); is the reference the same architecture?")
    return params


@torch.no_grad()
def mix_tensor(dst: Tensor, src: Tensor, alpha: float) -> None:
    """``dst`` ← α·``src`` + (1-α)·``dst`` in place (``src`` brought to ``dst``'s device and dtype): TR-DPO's
    update (arXiv 2404.09656) of one tensor, the only place it is written."""
    dst.mul_(1 - alpha).add_(src.to(device=dst.device, dtype=dst.dtype), alpha=alpha)


@torch.no_grad()
def mix_into(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """π_ref ← α·π_θ + (1-α)·π_ref, parameter by parameter, between two modules of one process.

    ZeRO-3 parameters are mixed on their local shards (``ds_tensor``): policy and reference are
    partitioned identically, so no gather is needed.
    """
    policy_params = params_by_name(policy)
    for name, r in params_by_name(reference, policy_params).items():
        p = policy_params[name]
        src, dst = getattr(p, "ds_tensor", None), getattr(r, "ds_tensor", None)
        if src is not None and dst is not None:
            mix_tensor(dst, src, alpha)
        else:
            mix_tensor(r.data, p.data, alpha)
