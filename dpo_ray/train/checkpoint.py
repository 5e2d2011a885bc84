"""Checkpoints (every rank's DeepSpeed shard + RNG, through ``ray.train.report``) and the final saved model.

Two state files, two names: ``checkpoint_state.json`` sits in each checkpoint (where to resume: step, epoch,
data position); ``train_state.json`` is written to ``output_dir`` at the end (what the run did, for the
driver's report).
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dpo_ray.config import DPOConfig

CHECKPOINT_STATE_FILE = "checkpoint_state.json"
FINAL_STATE_FILE = "train_state.json"
CKPT_TAG = "engine"


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed (the data position)
    pairs_seen: int = 0
    tokens_seen: int = 0
    micro_per_epoch: int | None = None  # micro-batches the first full epoch gave (kept rows size the plan)
    planned_steps: int | None = None  # the run's optimizer steps, after that resizing


def save_checkpoint(engine, state: TrainerState, rank: int, metrics: dict[str, float] | None = None) -> None:
    """Every rank writes its DeepSpeed shard (+ RNG) and reports it; Ray Train merges them in storage.

    Metrics go to metrics.jsonl / TensorBoard, so Ray Train sees only the step and ``metrics`` (the eval metric
    load_best_model_at_end ranks checkpoints by).
    """
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG)
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                   Path(d) / f"rng_rank{rank}.pt")
        if rank == 0:
            (Path(d) / CHECKPOINT_STATE_FILE).write_text(json.dumps(asdict(state)))
        ray.train.report({"step": state.global_step, **(metrics or {})}, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint-{state.global_step:06d}")


def load_checkpoint(engine, d: str, rank: int) -> TrainerState:
    engine.load_checkpoint(d, tag=CKPT_TAG)
    state = TrainerState(**json.loads((Path(d) / CHECKPOINT_STATE_FILE).read_text()))
    rng_file = Path(d) / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)  # numpy's RNG state is not a tensor
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
    if rank == 0:
        write_model(engine.module, cfg, tokenizer, out, state_dict)


def write_model(module, cfg: DPOConfig, tokenizer, out: Path, state_dict=None) -> None:
    """``module`` (or ``state_dict`` in its layout) in save_pretrained's layout, the adapter for PEFT."""
    if cfg.uses_peft:
        from dpo_ray.adapters import save_peft

        save_peft(module, cfg, out, state_dict)
    else:
        module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)


def checkpoint_weights(d: Path, cfg: DPOConfig) -> dict[str, torch.Tensor]:
    """The full fp32 weights in checkpoint ``d``: every rank's ZeRO shard gathered, or ZeRO-0's whole copy."""
    tag = Path(d) / CKPT_TAG
    if cfg.deepspeed.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(d), tag=CKPT_TAG)
    return torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def export_checkpoint(d: Path, cfg: DPOConfig, model_source, tokenizer, out: Path) -> None:
    """Write checkpoint ``d`` to ``out`` as the run's model: the policy rebuilt as the workers built it (PEFT
    wrapped), the checkpoint's weights loaded, saved like the final model."""
    import ray

    from dpo_ray.models import load_causal_lm

    source = ray.get(model_source) if isinstance(model_source, ray.ObjectRef) else model_source
    model = load_causal_lm(source, cfg, tokenizer)
    if cfg.uses_peft:
        from dpo_ray.adapters import wrap_peft

        model = wrap_peft(model, cfg)
    missing, unexpected = model.load_state_dict(checkpoint_weights(d, cfg), strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise RuntimeError(f"checkpoint {d} does not match the policy: missing {sorted(trainable & set(missing))[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    write_model(model, cfg, tokenizer, out)


def save_final_state(cfg: DPOConfig, state: TrainerState) -> None:
    (Path(cfg.output_dir) / FINAL_STATE_FILE).write_text(json.dumps(asdict(state)))
