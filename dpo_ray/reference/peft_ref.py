"""Reference log-probs from the policy's own PEFT model, on the worker: the base with the adapter
disabled (reference.source adapter_off) or a frozen second adapter (ref_adapter)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dpo_ray.config import DPOConfig
from dpo_ray.forward import GROUP_KEYS, eval_mode, reference_logps
from dpo_ray.sharing import PrefixSharing


class AdapterReference:
    version = 0

    def __init__(self, policy: nn.Module, cfg: DPOConfig, device: torch.device):
        self.model, self.cfg, self.device = policy, cfg, device
        self.active = cfg.model_adapter_name or "default"
        self.sharing = PrefixSharing(cfg.prefix_sharing, "reference", cfg.prefix_attention)

    @contextlib.contextmanager
    def _reference_weights(self):
        if self.cfg.reference.source == "adapter_off":
            with self.model.disable_adapter():
                yield
            return
        # set_adapter flips requires_grad to the active adapter; restore before anything trains
        self.model.set_adapter(self.cfg.ref_adapter_name)
        try:
            yield
        finally:
            self.model.set_adapter(self.active)

    def submit(self, batch):
        return None

    def result(self, handle, batch):
        on_device = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "completion_mask",
                                                             *GROUP_KEYS) if k in batch}
        if "packed_width" in batch:  # the collate's packed width: no shape read from the device
            on_device["packed_width"] = batch["packed_width"]
        with eval_mode(self.model), torch.no_grad(), self._reference_weights():  # no LoRA dropout here
            chosen, rejected = reference_logps(self.model, on_device, ld_alpha=self.cfg.ld_alpha,
                                               sharing=self.sharing)
        return chosen.cpu(), rejected.cpu()

    def sync_from(self, policy, alpha):
        raise RuntimeError("sync_ref_model is not available with adapter references")

    def close(self):
        pass
