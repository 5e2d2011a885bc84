"""The DeepSpeed dict a run hands to ``deepspeed.initialize``, derived from the config."""

from __future__ import annotations

from typing import Any

from dpo_ray.config.schema import DPOConfig
from dpo_ray.dicts import merged


def deepspeed_config(cfg: DPOConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed dict, derived from the config (batch sizes from ``global_batch_size``, written once)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.global_batch_size(world_size),
        "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
    }
    zero = ds["zero_optimization"]
    if cfg.deepspeed.zero_stage >= 1 and cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.deepspeed.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True,
                     "stage3_param_persistence_threshold": 1e4})
        if cfg.deepspeed.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.use_bf16(on_gpu):
        ds["bf16"] = {"enabled": True}
    elif cfg.fp16:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return merged(ds, cfg.deepspeed.overrides)
