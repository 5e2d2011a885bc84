"""One micro-batch of each training mode. A step object owns its mode's batching, forward and metrics, so
the loop never asks which mode it runs: ``DPOStep`` (pairs, a reference, the DPO-family loss) and
``SFTStep`` (completions, token-mean NLL), both ``TrainingStep``s."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpo_ray.config import DPOConfig
from dpo_ray.data import iter_eval_batches, iter_train_batches
from dpo_ray.forward import pair_layout, sequence_forward
from dpo_ray.losses import PairLogps, batch_metrics, dpo_loss, moe_aux_loss, sequence_metrics
from dpo_ray.models import ActivationCheckpointing
from dpo_ray.reference.base import ReferenceClient, prefetched
from dpo_ray.sharing import PrefixSharing


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _across_workers(flag: bool, op, device) -> bool:
    """``flag`` reduced over every worker with ``op`` (MIN: all of them, MAX: any); every worker must call
    it."""
    t = torch.tensor([int(flag)], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return bool(t.item())


class UnequalShardsError(RuntimeError):
    """Workers' epochs had different numbers of micro-batches (the data split broke its promise)."""


def counted(batches: Iterable, device) -> Iterator:
    """This worker's micro-batches, with no collective between them; one check when the epoch ends.

    Every worker yields the same number: ``streaming_split(equal=True)`` gives each worker the same number of
    rows, and ``BatchIterator`` cuts R rows into exactly ``R // batch_size`` batches whatever the block sizes
    (tests/test_data.py). So the loop issues no per-micro-batch all-reduce or host read. At the epoch's end
    the counts are compared once (MIN against MAX) and a difference is named (``UnequalShardsError``). That
    check is a witness, not the guarantee: in a training epoch the worker with more batches would first meet
    it with a gradient all-reduce; equal counts come from the split and the batching above.
    """
    n = 0
    for batch in batches:
        n += 1
        yield batch
    if dist.is_initialized():
        t = torch.tensor([n, -n], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        fewest, most = int(t[0]), -int(t[1])
        if fewest != most:
            raise UnequalShardsError(
                f"the workers' epochs had {fewest} to {most} micro-batches; the training rows must split "
                "into equal shares (ray.train.DataConfig with equal splits)")


def synced_eval(share, device, real: list[bool]) -> Iterator:
    """Every worker runs the same number of eval forwards (ZeRO-3 and the collectives need it): while any
    worker has a batch of its share left, one that has none scores ``share.filler`` instead. ``real`` gets,
    in order, whether each yielded batch is a real one (weight 1) or a filler (weight 0)."""
    it = iter(share)
    while True:
        batch = next(it, None)
        if not _across_workers(batch is not None, dist.ReduceOp.MAX, device):  # no worker has one left
            return
        real.append(batch is not None)
        yield batch if batch is not None else share.filler


def dpo_step(model, cfg: DPOConfig, batch, ref_chosen, ref_rejected, share_prefix: bool | str = False
             ) -> tuple[Tensor, dict]:
    """Forward one micro-batch of pairs; return (loss, detached metrics)."""
    fwd = sequence_forward(model, batch, ld_alpha=cfg.ld_alpha, want_wpo=cfg.use_weighting,
                           router_aux=cfg.output_router_logits, share_prefix=share_prefix)
    stats = pair_layout(fwd.stats, batch)  # prompt groups: per-response statistics gathered for the pairs
    pairs = PairLogps.from_stats(stats, ref_chosen, ref_rejected)
    loss = dpo_loss(pairs, cfg.loss_params(), cfg.loss_type, cfg.loss_weights, cfg.use_weighting,
                    cfg.rpo_alpha).mean()
    metrics = batch_metrics(pairs, stats, cfg.beta, attention_mask=batch["attention_mask"])
    if fwd.aux_loss is not None:
        metrics["aux_loss"] = fwd.aux_loss.detach()
        loss = moe_aux_loss(loss, fwd.aux_loss, cfg.router_aux_loss_coef)
    metrics["num_pairs"] = torch.tensor(float(pairs.chosen_logps.shape[0]), device=loss.device)
    metrics["loss"] = loss.detach()
    return loss, metrics


def sft_step(model, cfg: DPOConfig, batch) -> tuple[Tensor, dict]:
    """Token-mean NLL over completion tokens (the SFT stage)."""
    s = sequence_forward(model, batch).stats
    loss = -s.logps.sum() / s.num_tokens.sum().clamp(min=1)
    metrics = {"loss": loss.detach(), **sequence_metrics(s),
               "num_tokens": batch["attention_mask"].sum().float(),
               "num_pairs": torch.tensor(float(s.logps.shape[0]), device=s.logps.device)}
    return loss, metrics


def decide_sharing(sharing: PrefixSharing, model, cfg: DPOConfig, batch, device,
                   announce: bool = False) -> bool:
    """The policy's prefix-sharing decision on its first batch, the same on every worker (the minimum);
    ``announce`` (rank 0) prints the decision and its reason once."""
    if sharing.enabled is None:
        on = sharing(model, batch, ld_alpha=cfg.ld_alpha)
        if dist.is_initialized():
            flag = torch.tensor([int(on)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            sharing.enabled = bool(flag.item())
            if on and not sharing.enabled:
                sharing.why = "another worker's check said no"
        if announce and cfg.prefix_sharing != "off":
            sys.stdout.write(f"prefix sharing {'on' if sharing.enabled else 'off'} for the policy "
                             f"(prefix_sharing: {cfg.prefix_sharing}; {sharing.why})"
                             f"{' through ' + sharing.kernel + ' attention' if sharing.enabled else ''}\n")
    return bool(sharing.enabled)


class TrainingStep(ABC):
    """One micro-batch of a training mode, as the loop uses it: ``batches`` (this worker's collated batches of
    a shard), ``stream`` (what one loop iteration consumes), ``eval_stream`` and the call (loss, metrics). The
    modes below share the batching; each says what an item is and how it is scored."""

    mode = ""

    def __init__(self, cfg: DPOConfig, device: torch.device, pad_id: int,
                 checkpointing: ActivationCheckpointing | None = None, announce: bool = False):
        self.cfg, self.device, self.pad_id = cfg, device, pad_id
        self.checkpointing, self.announce = checkpointing, announce

    def checkpoint(self, batch: dict) -> None:
        """Gradient checkpointing on or off for this micro-batch's forward; rank 0 says the rule once."""
        if self.checkpointing is None:
            return
        if self.announce and self.checkpointing.auto:
            sys.stdout.write(self.checkpointing.describe() + "\n")
            self.announce = False
        self.checkpointing(batch)

    def batches(self, shard, *, epoch: int, train: bool = True) -> Iterator:
        """This worker's collated batches of ``shard``: as many on every worker (``counted``)."""
        cfg = self.cfg
        seed = cfg.data_order_seed if train else cfg.seed
        size = cfg.per_device_train_batch_size if train else cfg.per_device_eval_batch_size
        return iter_train_batches(shard, cfg, self.pad_id, batch_size=size, epoch=epoch, seed=seed,
                                  mode=self.mode, shuffle=train)

    def stream(self, batches: Iterable) -> Iterator:
        """What one iteration of the loop consumes, in order."""
        return counted(batches, self.device)

    def eval_stream(self, shard, real: list[bool]) -> Iterator:
        """This worker's share of the eval rows, each row once (``EvalShare``), padded with weight-0 fillers
        to the longest share; ``real`` says which items are real (``synced_eval``)."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        share = iter_eval_batches(shard, self.cfg, self.pad_id,
                                  batch_size=self.cfg.per_device_eval_batch_size,
                                  rank=rank, world=world, mode=self.mode)
        return self._wrap(synced_eval(share, self.device, real))

    def _wrap(self, batches: Iterator) -> Iterator:
        return batches

    @abstractmethod
    def __call__(self, model: nn.Module, item) -> tuple[Tensor, dict]:
        """(loss, detached metrics) of one item of ``stream``."""


class SFTStep(TrainingStep):
    """Supervised fine-tuning on completions (the stage before DPO): no reference."""

    mode = "sft"

    def __call__(self, model: nn.Module, item) -> tuple[Tensor, dict]:
        self.checkpoint(item)
        return sft_step(model, self.cfg, to_device(item, self.device))


class DPOStep(TrainingStep):
    """Pairs: the policy's forward on [chosen; rejected], reference log-probs (prefetched ``depth`` ahead),
    and the DPO-family loss. The policy's prefix-sharing decision is made on its first batch."""

    mode = "dpo"

    def __init__(self, cfg: DPOConfig, device: torch.device, pad_id: int, reference: ReferenceClient,
                 checkpointing: ActivationCheckpointing | None = None, announce: bool = False):
        super().__init__(cfg, device, pad_id, checkpointing, announce)
        self.reference = reference
        self.sharing = PrefixSharing(cfg.prefix_sharing, "policy", cfg.prefix_attention)

    def stream(self, batches: Iterable) -> Iterator:
        return self._wrap(counted(batches, self.device))

    def _wrap(self, batches: Iterator) -> Iterator:
        return prefetched(batches, self.reference, self.cfg.reference.prefetch_depth)

    def __call__(self, model: nn.Module, item) -> tuple[Tensor, dict]:
        batch, ref_chosen, ref_rejected = to_device(item[0], self.device), item[1], item[2]
        share = decide_sharing(self.sharing, model, self.cfg, batch, self.device, announce=self.announce)
        self.checkpoint(batch)
        return dpo_step(model, self.cfg, batch, ref_chosen, ref_rejected,
                        self.sharing.layout if share else False)
