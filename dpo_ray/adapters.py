"""PEFT (LoRA / QLoRA) for the policy, and how adapters are saved. Mirrors the seed's three reference
options: (1) a separate reference model (reference.source actor|local with its own directory),
(2) the policy with its adapter disabled (adapter_off), (3) a second, frozen copy of the adapter under
``ref_adapter_name`` swapped in with ``set_adapter`` (ref_adapter)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpo_ray.config import DPOConfig


def wrap_peft(model: nn.Module, cfg: DPOConfig) -> nn.Module:
    """Add (or load) the trainable LoRA adapter; with reference.source ref_adapter also a frozen copy."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    name = cfg.model_adapter_name or "default"
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model,
                                                use_gradient_checkpointing=bool(cfg.gradient_checkpointing))
    if cfg.peft_adapter_path:
        model = PeftModel.from_pretrained(model, cfg.peft_adapter_path, adapter_name=name, is_trainable=True)
        if cfg.reference.source == "ref_adapter":
            model.load_adapter(cfg.peft_adapter_path, adapter_name=cfg.ref_adapter_name, is_trainable=False)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules or "all-linear",
                          modules_to_save=cfg.lora_modules_to_save, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora, adapter_name=name)
        if cfg.reference.source == "ref_adapter":
            # No adapter to start from: the reference adapter is a frozen copy of the fresh one.
            model.add_adapter(cfg.ref_adapter_name, lora)
            _copy_adapter(model, name, cfg.ref_adapter_name)
    model.set_adapter(name)
    return model


def _copy_adapter(model: nn.Module, src: str, dst: str) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, p in params.items():
            if f".{src}." in key:
                twin = params.get(key.replace(f".{src}.", f".{dst}."))
                if twin is not None:
                    twin.copy_(p)
                    twin.requires_grad_(False)


def save_peft(module: nn.Module, cfg: DPOConfig, out: Path, state_dict=None) -> None:
    """The trained adapter (adapter_config.json + adapter_model.safetensors) in output_dir; with
    merge_adapter also a merged full model in output_dir/merged, rebuilt from disk so it works under any
    ZeRO stage."""
    name = cfg.model_adapter_name or "default"
    module.save_pretrained(out, state_dict=state_dict, selected_adapters=[name], safe_serialization=True)
    if name != "default":  # peft writes non-default adapters to a subfolder; keep the top level loadable
        sub = out / name
        for f in sub.iterdir() if sub.is_dir() else []:
            f.replace(out / f.name)
        if sub.is_dir():
            from dpo_ray.owned import check_inside

            check_inside(sub, out).rmdir()  # the subfolder peft made, now empty
    if cfg.merge_adapter:
        merged_model(cfg, out).save_pretrained(out / "merged", safe_serialization=True)


def merged_model(cfg: DPOConfig, adapter_dir: Path) -> nn.Module:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from dpo_ray.models import load_causal_lm

    tokenizer = (AutoTokenizer.from_pretrained(adapter_dir)
                 if (adapter_dir / "tokenizer_config.json").exists() else None)
    if tokenizer is None:
        from dpo_ray.data import load_tokenizer

        tokenizer = load_tokenizer(cfg)
    base = load_causal_lm(cfg.model_name_or_path, cfg.model_copy(update={"load_in_4bit": False}), tokenizer)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
