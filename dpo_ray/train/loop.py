"""The per-worker training loop, run by Ray Train's TorchTrainer on every rank.

One optimizer step = ``gradient_accumulation_steps`` micro-batches; each micro-batch is one forward over
[chosen; rejected] (2B sequences). Metrics stay on device until a logging step, then one all-reduce.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dpo_ray.config import DPOConfig, deepspeed_config
from dpo_ray.forward import PrefixSharing, sequence_forward
from dpo_ray.losses import PairLogps, batch_metrics, dpo_loss, moe_aux_loss
from dpo_ray.models import frozen_copy, load_causal_lm, prepare_policy
from dpo_ray.train.metrics import MetricAccumulator
from dpo_ray.train.schedule import lr_lambda, warmup_steps
from dpo_ray.vision import text_tokenizer

STATE_FILE = "trainer_state.json"
CKPT_TAG = "engine"


class NonFiniteError(RuntimeError):
    pass


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed (the data position)
    pairs_seen: int = 0
    tokens_seen: int = 0


# ------------------------------------------------------------------------------------------ setup

def _worker_env(local_world_size: int = 1) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR; torch's default is one directory per user that
    # every venv shares, and each switch of venv rebuilds it (25-77 s and 3 GB on CPU, docs/BENCHMARKS.md).
    prefix_key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(Path.home() / ".cache" / "dpo_ray" / "torch_extensions" / prefix_key))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # The node's cores split between its workers: 2 workers on 2 cores get one intra-op thread each (no
        # oversubscription), a single worker gets both. DPO_RAY_TORCH_THREADS overrides.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        default = max(1, cores // max(local_world_size, 1))
        torch.set_num_threads(int(os.environ.get("DPO_RAY_TORCH_THREADS", default)))


def _seed_everything(seed: int) -> None:
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


def _adamw(groups: list[dict], **kw) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel for all parameters, on CPU as on GPU: AdamW steps 3.5-6.4x faster
    than the default on this CPU, bench/bench_optimizer.py), or the default where fused is not available."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kw)


def build_engine(cfg: DPOConfig, model, total_steps: int, world: int, on_gpu: bool):
    import deepspeed

    ds_cfg = deepspeed_config(cfg, world, on_gpu)
    if cfg.deepspeed.offload_optimizer:
        ds_cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    optimizer = _adamw(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                       betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    warm = warmup_steps(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_cfg, dist_init_required=False,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_scheduler_type,
                                                                                  total_steps, warm)),
    )
    return engine, optimizer, scheduler


def build_reference(cfg: DPOConfig, spec: dict, policy, tokenizer, device, world: int, on_gpu: bool,
                    policy_source=None):
    """The reference client for this worker, by ``reference.source`` (see dpo_ray.reference)."""
    from dpo_ray.reference import LocalReference, NoReference, PrecomputedReference

    source = cfg.reference.source
    if not cfg.needs_reference or source == "none":
        return NoReference()
    if source == "precomputed":
        return PrecomputedReference()
    if source == "actor":
        from dpo_ray.reference.pool import ActorPoolReference

        return ActorPoolReference(spec["reference_pool"], cfg)
    if source in ("adapter_off", "ref_adapter"):
        from dpo_ray.reference.peft_ref import AdapterReference

        return AdapterReference(policy, cfg, device)
    # local: a frozen copy of the initial policy, or the given reference model
    ref_source = spec.get("ref_model") or cfg.reference.model_name_or_path
    if ref_source is not None:
        import ray

        if isinstance(ref_source, ray.ObjectRef):
            ref_source = ray.get(ref_source)
        ref = load_causal_lm(ref_source, cfg, tokenizer, on_gpu=on_gpu)
    elif cfg.deepspeed.zero_stage == 3:
        # ZeRO-3 parameters are already partitioned: a deepcopy would copy empty shards. Rebuild the
        # initial weights from their source instead (zero.Init shards them as they load).
        ref = load_causal_lm(policy_source, cfg, tokenizer, on_gpu=on_gpu)
    else:
        ref = frozen_copy(policy)
    ref.requires_grad_(False).eval()
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        ds_cfg = deepspeed_config(cfg, world, on_gpu)
        ds_cfg.pop("gradient_clipping", None)
        ref = deepspeed.initialize(model=ref, config=ds_cfg, dist_init_required=False)[0]
        ref.eval()
        ref = ref.module
    else:
        ref = ref.to(device)
        if cfg.use_bf16(on_gpu):
            ref = ref.to(torch.bfloat16)
    return LocalReference(ref, device, cfg.ld_alpha, sharing=PrefixSharing(cfg.prefix_sharing, "reference"))


# ------------------------------------------------------------------------------------------ steps

def _synced(batches, device):
    """Stop every worker at the same micro-batch: the first worker to run dry ends the epoch for all."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if batch is None or flag.item() == 0:
            return
        yield batch


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def dpo_step(model, cfg: DPOConfig, batch, ref_chosen, ref_rejected, share_prefix: bool = False
             ) -> tuple[torch.Tensor, dict]:
    """Forward one micro-batch of pairs; return (loss, detached metrics)."""
    fwd = sequence_forward(model, batch, ld_alpha=cfg.ld_alpha, want_wpo=cfg.use_weighting,
                           router_aux=cfg.output_router_logits, share_prefix=share_prefix)
    pairs = PairLogps.from_stats(fwd.stats, ref_chosen, ref_rejected)
    loss = dpo_loss(pairs, cfg.loss_params(), cfg.loss_type, cfg.loss_weights, cfg.use_weighting,
                    cfg.rpo_alpha).mean()
    metrics = batch_metrics(pairs, fwd.stats, cfg.beta, attention_mask=batch["attention_mask"])
    if fwd.aux_loss is not None:
        metrics["aux_loss"] = fwd.aux_loss.detach()
        loss = moe_aux_loss(loss, fwd.aux_loss, cfg.router_aux_loss_coef)
    metrics["num_pairs"] = torch.tensor(float(pairs.chosen_logps.shape[0]), device=loss.device)
    metrics["loss"] = loss.detach()
    return loss, metrics


def decide_sharing(sharing: PrefixSharing, model, cfg: DPOConfig, batch, device, announce: bool = False) -> bool:
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
                             f"(prefix_sharing: {cfg.prefix_sharing}; {sharing.why})\n")
    return bool(sharing.enabled)


def sft_step(model, cfg: DPOConfig, batch) -> tuple[torch.Tensor, dict]:
    """Token-mean NLL over completion tokens (the SFT stage)."""
    s = sequence_forward(model, batch).stats
    loss = -s.logps.sum() / s.num_tokens.sum().clamp(min=1)
    metrics = {"loss": loss.detach(), "entropy": s.entropy.mean(),
               "num_tokens": batch["attention_mask"].sum().float(),
               "num_pairs": torch.tensor(float(s.logps.shape[0]), device=s.logps.device)}
    return loss, metrics


# ------------------------------------------------------------------------------------------ the loop

class Logger:
    """Rank 0's sinks: metrics.jsonl, TensorBoard events, and the console table."""

    COLUMNS = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm")

    def __init__(self, cfg: DPOConfig, rank: int, total_steps: int, prefix: str = ""):
        self.active = rank == 0
        self.total = total_steps
        self.t0 = time.perf_counter()
        self.out = Path(cfg.output_dir)
        self.tb = None
        if self.active:
            self.out.mkdir(parents=True, exist_ok=True)
            if "tensorboard" in cfg.report_to:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "runs"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        row = {"step": step, **metrics}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        elapsed = time.perf_counter() - self.t0
        pct = 100.0 * step / max(self.total, 1)
        eta = elapsed / max(step, 1) * (self.total - step)
        cols = [(k, metrics[k]) for k in metrics if k in self.COLUMNS or k.startswith("eval_")]
        cells = " | ".join(f"{k} {v:.4g}" for k, v in cols if isinstance(v, (int, float)))
        # sys.stdout directly: Ray Train patches print() into a logger that would echo every line twice
        sys.stdout.write(f"[{'#' * int(pct // 5):<20}] step {step}/{self.total} ({pct:.0f}%, eta {eta:.0f}s) "
                         f"| {cells}\n")
        sys.stdout.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: cfg (dict), mode, tokenizer, model (path | ObjectRef | None),
    total_steps, steps_per_epoch, num_epochs, and the reference pool handle when source is actor."""
    import ray
    import ray.train
    import ray.train.torch

    _worker_env(ray.train.get_context().get_local_world_size())

    cfg = DPOConfig(**config["cfg"])
    mode = config.get("mode", "dpo")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    tokenizer = config["tokenizer"]
    total_steps, num_epochs = config["total_steps"], config["num_epochs"]

    model_source = config.get("model")
    if isinstance(model_source, ray.ObjectRef):
        model_source = ray.get(model_source)
    import deepspeed

    # Ray Train already made the process group; DeepSpeed adopts it (zero.Init needs the world size).
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    _seed_everything(cfg.seed)
    hf_ds_keepalive = None
    if cfg.deepspeed.zero_stage == 3:
        # Keeps transformers' ZeRO-3 integration on, so from_pretrained loads weights sharded.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_keepalive = HfDeepSpeedConfig(deepspeed_config(cfg, world, on_gpu))  # noqa: F841
    model = load_causal_lm(model_source, cfg, tokenizer, on_gpu=on_gpu)
    if cfg.use_peft or cfg.peft_adapter_path:
        from dpo_ray.adapters import wrap_peft

        model = wrap_peft(model, cfg)
    prepare_policy(model, cfg)
    reference = (build_reference(cfg, config, model, tokenizer, device, world, on_gpu, model_source)
                 if mode == "dpo" else None)
    engine, _, scheduler = build_engine(cfg, model, total_steps, world, on_gpu)
    _seed_everything(cfg.seed + rank)

    state = TrainerState()
    checkpoint = ray.train.get_checkpoint()  # this run's latest (after a worker-group restart)
    if checkpoint is None and config.get("resume_checkpoint"):
        checkpoint = ray.train.Checkpoint.from_directory(config["resume_checkpoint"])
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = _load_checkpoint(engine, d, rank)
        if rank == 0:
            sys.stdout.write(f"resumed from checkpoint at step {state.global_step} (epoch {state.epoch}, "
                             f"micro-batch {state.micro_in_epoch})\n")

    from dpo_ray.data import iter_train_batches
    from dpo_ray.reference import prefetched

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = _optional_shard("eval")
    logger = Logger(cfg, rank, total_steps)
    acc = MetricAccumulator()
    pad_id = text_tokenizer(tokenizer).pad_token_id  # a vision processor holds its tokenizer
    micro = cfg.per_device_train_batch_size
    eval_every = cfg.eval_steps or cfg.logging_steps
    last_log_t, last_log_tokens, last_log_pairs = time.perf_counter(), state.tokens_seen, state.pairs_seen
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    sharing = PrefixSharing(cfg.prefix_sharing if mode == "dpo" else "off", "policy")
    kill_at = int(os.environ.get("DPO_RAY_TEST_KILL_AT_STEP", "0"))

    done = state.global_step >= total_steps
    while not done and state.epoch < num_epochs:
        batches = iter_train_batches(train_shard, cfg, pad_id, batch_size=micro, epoch=state.epoch,
                                     seed=cfg.data_seed if cfg.data_seed is not None else cfg.seed, mode=mode)
        batches = _skip(batches, state.micro_in_epoch)
        stream = _synced(batches, device)
        if mode == "dpo":
            stream = prefetched(stream, reference, cfg.reference.prefetch_depth)
        for item in stream:
            if mode == "dpo":
                batch, ref_c, ref_r = _to(item[0], device), item[1], item[2]
                share = decide_sharing(sharing, engine.module, cfg, batch, device, announce=rank == 0)
                loss, metrics = dpo_step(engine.module, cfg, batch, ref_c, ref_r, share)
            else:
                loss, metrics = sft_step(engine.module, cfg, _to(item, device))
            nonfinite |= ~torch.isfinite(loss.detach())
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)  # at a boundary this also all-reduces the gradients
            stage0_norm = _stage0_grad_norm(engine) if boundary and cfg.deepspeed.zero_stage == 0 else None
            engine.step()
            acc.add(metrics)
            state.micro_in_epoch += 1
            if not boundary:
                continue
            state.global_step += 1
            step = state.global_step
            grad_norm = stage0_norm if stage0_norm is not None else _grad_norm(engine)
            if bool(nonfinite) or (grad_norm is not None and not math.isfinite(grad_norm)):
                raise NonFiniteError(
                    f"loss or gradient norm is not finite at step {step} (grad_norm={grad_norm}); lower "
                    "learning_rate, check the data of this step, or set max_grad_norm")
            if kill_at and step == kill_at and rank == world - 1:
                _maybe_die_for_test()
            if reference is not None and cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
                reference.sync_from(engine.module, cfg.ref_model_mixup_alpha)
            log_due = step % cfg.logging_steps == 0 or step == total_steps
            if log_due:
                reduced = acc.reduce()
                now = time.perf_counter()
                state.pairs_seen += int(reduced.pop("num_pairs", 0))
                state.tokens_seen += int(reduced.get("num_tokens", 0))
                dt = max(now - last_log_t, 1e-9)
                reduced.update({
                    "num_tokens": state.tokens_seen,  # as TRL logs it: input tokens seen so far
                    "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                    "epoch": state.epoch + state.micro_in_epoch / max(config["micro_per_epoch"], 1),
                    "samples_per_second": (state.pairs_seen - last_log_pairs) / dt,
                    "tokens_per_second": (state.tokens_seen - last_log_tokens) / dt,
                })
                reduced.pop("_micro_batches", None)
                last_log_t, last_log_tokens, last_log_pairs = now, state.tokens_seen, state.pairs_seen
                logger.log(step, reduced)
            if eval_shard is not None and cfg.eval_strategy == "steps" and step % eval_every == 0:
                logger.log(step, evaluate(engine.module, cfg, eval_shard, reference, tokenizer, device, mode,
                                          sharing))
            if cfg.save_strategy == "steps" and step % cfg.save_steps == 0 and step < total_steps:
                save_checkpoint(engine, state, rank)
            if step >= total_steps:
                done = True
                break
        else:
            state.epoch += 1
            state.micro_in_epoch = 0
            if eval_shard is not None and cfg.eval_strategy == "epoch":
                logger.log(state.global_step, evaluate(engine.module, cfg, eval_shard, reference, tokenizer,
                                                       device, mode, sharing))
            if cfg.save_strategy == "epoch" and state.epoch < num_epochs:
                save_checkpoint(engine, state, rank)

    if eval_shard is not None and cfg.eval_strategy != "no":
        logger.log(state.global_step, evaluate(engine.module, cfg, eval_shard, reference, tokenizer, device, mode,
                                               sharing))
    save_model(engine, cfg, tokenizer, rank)
    if rank == 0:
        (Path(cfg.output_dir) / "train_state.json").write_text(json.dumps(asdict(state)))
    logger.close()
    if reference is not None:
        reference.close()


def _optional_shard(name: str):
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, ValueError):
        return None


def _skip(batches, n: int):
    it = iter(batches)
    for _ in range(n):
        if next(it, None) is None:
            break
    return it


def _stage0_grad_norm(engine) -> float | None:
    """ZeRO-0 engines with a client optimizer don't record the global norm; the grads are already reduced."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


@torch.no_grad()
def evaluate(model, cfg: DPOConfig, shard, reference, tokenizer, device, mode: str,
             sharing: PrefixSharing | None = None) -> dict[str, float]:
    """One pass over this worker's eval shard; metrics reduced over all workers, prefixed eval_."""
    from dpo_ray.data import iter_train_batches
    from dpo_ray.reference import prefetched

    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    batches = _synced(iter_train_batches(shard, cfg, text_tokenizer(tokenizer).pad_token_id,
                                         batch_size=cfg.per_device_eval_batch_size, epoch=0, seed=cfg.seed,
                                         mode=mode, shuffle=False), device)
    if mode == "dpo":
        sharing = sharing or PrefixSharing(cfg.prefix_sharing, "policy")
        for batch, ref_c, ref_r in prefetched(batches, reference, cfg.reference.prefetch_depth):
            batch = _to(batch, device)
            share = decide_sharing(sharing, model, cfg, batch, device)
            acc.add(dpo_step(model, cfg, batch, ref_c, ref_r, share)[1])
    else:
        for batch in batches:
            acc.add(sft_step(model, cfg, _to(batch, device))[1])
    if was_training:
        model.train()
    reduced = acc.reduce()
    reduced.pop("_micro_batches", None)
    return {f"eval_{k}": v for k, v in reduced.items()}


def save_checkpoint(engine, state: TrainerState, rank: int) -> None:
    """Every rank writes its DeepSpeed shard (+ RNG) and reports it; Ray Train merges them in storage.

    Metrics go to metrics.jsonl / TensorBoard, so Ray Train only ever sees checkpoints.
    """
    import ray.train

    metrics = {"step": state.global_step}
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG)
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                   Path(d) / f"rng_rank{rank}.pt")
        if rank == 0:
            (Path(d) / STATE_FILE).write_text(json.dumps(asdict(state)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint-{state.global_step:06d}")


def _load_checkpoint(engine, d: str, rank: int) -> TrainerState:
    engine.load_checkpoint(d, tag=CKPT_TAG)
    state = TrainerState(**json.loads((Path(d) / STATE_FILE).read_text()))
    rng_file = Path(d) / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return state


def save_model(engine, cfg: DPOConfig, tokenizer, rank: int) -> None:
    """Write a from_pretrained-loadable model (consolidated from ZeRO-3) and the tokenizer to output_dir."""
    out = Path(cfg.output_dir)
    if cfg.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    else:
        state_dict = None
    if rank != 0:
        return
    module = engine.module
    if cfg.use_peft or cfg.peft_adapter_path:
        from dpo_ray.adapters import save_peft

        save_peft(module, cfg, out, state_dict)
    else:
        module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _maybe_die_for_test() -> None:
    """Test hook (DPO_RAY_TEST_KILL_AT_STEP + DPO_RAY_TEST_KILL_MARKER): die once, to exercise FailureConfig."""
    marker = Path(os.environ.get("DPO_RAY_TEST_KILL_MARKER", "/tmp/dpo_ray_kill_marker"))
    if not marker.exists():
        marker.write_text("killed once")
        os._exit(1)
