"""The reference client a training worker uses, by ``reference.source`` (runs in the worker process).

``actor``: the pool's actors through ``ActorPoolReference``; ``local``: a frozen copy of the initial policy
(or of ``reference.model_name_or_path``) on the worker; ``precomputed``: the columns the data carries;
``adapter_off`` / ``ref_adapter``: the PEFT policy with its adapter off or swapped; ``none`` (or a
reference-free loss): zeros.
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from torch import nn

from dpo_ray.config import DPOConfig, deepspeed_config
from dpo_ray.models import frozen_copy, load_causal_lm, reference_dtype
from dpo_ray.reference.base import LocalReference, NoReference, PrecomputedReference, ReferenceClient
from dpo_ray.sharing import PrefixSharing


def build_reference(cfg: DPOConfig, *, policy: nn.Module, tokenizer, device: torch.device, world: int,
                    policy_source: Any, ref_model: Any = None,
                    pool_handles: list | None = None) -> ReferenceClient:
    """``policy_source`` is what the policy was loaded from (a path, a shipped state dict or None);
    ``ref_model`` a separate reference (a path or an ObjectRef of a shipped model), ``pool_handles`` the actor
    pool's."""
    source = cfg.reference.source
    if not cfg.needs_reference or source == "none":
        return NoReference()
    if source == "precomputed":
        return PrecomputedReference()
    if source == "actor":
        from dpo_ray.reference.client import ActorPoolReference

        return ActorPoolReference(pool_handles, cfg)
    if source in ("adapter_off", "ref_adapter"):
        from dpo_ray.reference.peft_ref import AdapterReference

        return AdapterReference(policy, cfg, device)
    return LocalReference(_local_model(cfg, policy, tokenizer, device, world, policy_source, ref_model),
                          device, cfg.ld_alpha,
                          sharing=PrefixSharing(cfg.prefix_sharing, "reference", cfg.prefix_attention))


def _local_model(cfg: DPOConfig, policy: nn.Module, tokenizer, device: torch.device, world: int,
                 policy_source: Any, ref_model: Any) -> nn.Module:
    """A frozen copy of the initial policy, or the given reference model, placed like the policy."""
    ref_source = ref_model or cfg.reference.model_name_or_path
    zero3 = cfg.deepspeed.zero_stage == 3
    if ref_source is not None:
        if isinstance(ref_source, ray.ObjectRef):
            ref_source = ray.get(ref_source)
        ref = load_causal_lm(ref_source, cfg, tokenizer)
    elif zero3:
        # ZeRO-3 parameters are already partitioned: a deepcopy would copy empty shards. Rebuild the
        # initial weights from their source instead (zero.Init shards them as they load).
        ref = load_causal_lm(policy_source, cfg, tokenizer)
    else:
        ref = frozen_copy(policy)
    ref.requires_grad_(False).eval()
    if not zero3:
        return ref.to(device=device, dtype=reference_dtype(cfg, device))
    import deepspeed

    ds_cfg = deepspeed_config(cfg, world, device.type == "cuda")
    ds_cfg.pop("gradient_clipping", None)
    engine = deepspeed.initialize(model=ref, config=ds_cfg, dist_init_required=False)[0]
    engine.eval()
    return engine.module
