"""Everything a worker builds before its first step: process settings, the DeepSpeed engine around the
policy, the reference client, the data shards. ``setup(lc)`` returns it as one ``Worker``."""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_ray.config import DPOConfig, deepspeed_config
from dpo_ray.extensions import set_aside_killed_builds
from dpo_ray.models import ActivationCheckpointing, load_causal_lm, prepare_policy
from dpo_ray.optim import build_optimizer
from dpo_ray.reference.base import ReferenceClient
from dpo_ray.reference.build import build_reference
from dpo_ray.schedule import build_scheduler
from dpo_ray.vision import text_tokenizer


@dataclass
class LoopConfig:
    """What the driver hands every worker (pickled into ``train_loop_config["loop"]``)."""

    cfg: DPOConfig
    mode: str  # "dpo" | "sft"
    tokenizer: Any  # a tokenizer, or a vision processor holding one
    total_steps: int  # optimizer steps of the whole run
    num_epochs: int
    micro_per_epoch: int  # micro-batches per worker per epoch (for the logged fractional epoch)
    model: Any = None  # a model directory, an ObjectRef of a shipped {config, state_dict}, or None (tiny)
    ref_model: Any = None  # a separate reference for source local (a path or an ObjectRef), else None
    reference_pool: list | None = None  # the actor handles for source actor
    resume_checkpoint: str | None = None  # a checkpoint of an earlier run (Ray Train resumes its own)
    progress: Any = None  # the driver's progress board (an actor handle): rank 0 posts every optimizer step
    # the training rows' identity (trainer.data_fingerprint), kept in checkpoints
    data_fingerprint: str | None = None
    callbacks: tuple = ()  # dpo_ray.train.callbacks.Callback objects, called on every rank


@dataclass
class Worker:
    """One rank's training state, built once by ``setup``."""

    lc: LoopConfig
    engine: Any  # deepspeed.DeepSpeedEngine around the policy
    scheduler: torch.optim.lr_scheduler.LambdaLR
    reference: ReferenceClient | None  # None in SFT
    device: torch.device
    rank: int
    world: int
    pad_id: int
    train_shard: Any
    eval_shard: Any  # None without an eval set
    checkpointing: ActivationCheckpointing | None = None
    # transformers' HfDeepSpeedConfig under ZeRO-3: its integration is on while this lives
    keepalive: Any = None

    @property
    def cfg(self) -> DPOConfig:
        return self.lc.cfg

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    def resize_schedule(self, total_steps: int, done: int) -> None:
        """The LR schedule over ``total_steps`` instead, continuing at optimizer step ``done``."""
        # the torch optimizer DeepSpeed built its scheduler around (under ZeRO, .optimizer is a wrapper)
        self.scheduler = build_scheduler(self.engine.basic_optimizer, self.cfg, total_steps, last_step=done)
        self.engine.lr_scheduler = self.scheduler


def process_settings(local_world_size: int, torch_threads: int | None = None) -> None:
    """Per-process settings: DeepSpeed's op cache per venv, and intra-op threads per local worker on CPU
    (``torch_threads``, ray.torch_threads; default the node's cores ÷ its workers)."""
    # DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR; torch's default is one directory per user that
    # every venv shares, and each switch of venv rebuilds it (25-77 s and 3 GB on CPU, docs/BENCHMARKS.md).
    prefix_key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(Path.home() / ".cache" / "dpo_ray" / "torch_extensions" / prefix_key))
    # a build an earlier run's worker was killed in leaves its lock: DeepSpeed would wait on it for ever
    for op in set_aside_killed_builds(Path(os.environ["TORCH_EXTENSIONS_DIR"])):
        print(f"dpo-ray: {op}: a killed earlier build of this DeepSpeed op was removed; it is built again",
              flush=True)
    if not torch.cuda.is_available():
        # The node's cores split between its workers: 2 workers on 2 cores get one intra-op thread each (no
        # oversubscription), a single worker gets both.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(torch_threads or max(1, cores // max(local_world_size, 1)))


_MARKED: set[str] = set()


def mark(lc: LoopConfig, rank: int, stage: str) -> None:
    """Rank 0 marks the end of a start-up stage on the driver's progress board (``dpo_ray.timeline``), once
    per stage and process: the loop calls it on every micro-batch and only the first is sent."""
    if lc.progress is not None and rank == 0 and stage not in _MARKED:
        _MARKED.add(stage)
        lc.progress.mark.remote(stage, time.time())  # fire and forget


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "norm" not in name.lower() else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(cfg: DPOConfig, model, total_steps: int, world: int, on_gpu: bool):
    """(DeepSpeed engine, LR scheduler) around ``model``: ``optim`` (default torch's fused AdamW) over decayed
    / not-decayed groups, the ``lr_scheduler_type`` schedule."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, world, on_gpu)
    if cfg.deepspeed.offload_optimizer:
        ds_cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    optimizer = build_optimizer(cfg.optim, _param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                optim_args=cfg.optim_args)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_cfg, dist_init_required=False,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg, total_steps))
    return engine, scheduler


def _optional_shard(name: str):
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, ValueError):
        return None


def setup(lc: LoopConfig) -> Worker:
    """Load the policy (sharded under ZeRO-3), wrap it (PEFT) and engine it; build the reference client."""
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    process_settings(ctx.get_local_world_size(), lc.cfg.ray.torch_threads)
    cfg, rank, world = lc.cfg, ctx.get_world_rank(), ctx.get_world_size()
    mark(lc, rank, "worker")
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    model_source = ray.get(lc.model) if isinstance(lc.model, ray.ObjectRef) else lc.model

    # Ray Train already made the process group; DeepSpeed adopts it (zero.Init needs the world size).
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    seed_everything(cfg.seed)
    hf_ds_keepalive = None
    if cfg.deepspeed.zero_stage == 3:
        # Keeps transformers' ZeRO-3 integration on, so from_pretrained loads weights sharded.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_keepalive = HfDeepSpeedConfig(deepspeed_config(cfg, world, on_gpu))
    model = load_causal_lm(model_source, cfg, lc.tokenizer)
    if cfg.uses_peft:
        from dpo_ray.adapters import wrap_peft

        model = wrap_peft(model, cfg)
    prepare_policy(model, cfg)
    half = on_gpu and (cfg.use_bf16(on_gpu) or cfg.fp16)  # DeepSpeed casts the module: its activations too
    checkpointing = ActivationCheckpointing(model, cfg,
                                            elem_bytes=2 if half else next(model.parameters()).element_size(),
                                            host_activations=not on_gpu)
    mark(lc, rank, "policy")
    reference = None
    if lc.mode == "dpo":
        reference = build_reference(cfg, policy=model, tokenizer=lc.tokenizer, device=device, world=world,
                                    policy_source=model_source, ref_model=lc.ref_model,
                                    pool_handles=lc.reference_pool)
    engine, scheduler = build_engine(cfg, model, lc.total_steps, world, on_gpu)
    mark(lc, rank, "engine")
    seed_everything(cfg.seed + rank)
    return Worker(lc=lc, engine=engine, scheduler=scheduler, reference=reference, device=device, rank=rank,
                  # a processor holds its tokenizer
                  world=world, pad_id=text_tokenizer(lc.tokenizer).pad_token_id,
                  checkpointing=checkpointing,
                  train_shard=ray.train.get_dataset_shard("train"), eval_shard=_optional_shard("eval"),
                  keepalive=hf_ds_keepalive)
