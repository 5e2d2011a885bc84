"""Building policy and reference models: from a directory, from a config (the tiny default), or from a
state shipped through the Ray object store. No Ray, no DeepSpeed here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpo_ray.allocator import return_freed_memory
from dpo_ray.config import DPOConfig
from dpo_ray.errors import ModelFilesError

# The embedded default: a Llama small enough to train in CPU minutes (≈1.2 M parameters + embeddings).
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    params = {**TINY_LLAMA, **overrides}
    return LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **params)


def model_dtype(cfg: DPOConfig) -> torch.dtype | str:
    """Weights dtype: explicit torch_dtype wins; else fp32 master weights (DeepSpeed casts for bf16/fp16)."""
    if cfg.torch_dtype in _DTYPES:
        return _DTYPES[cfg.torch_dtype]
    if cfg.torch_dtype == "auto":
        return "auto"
    return torch.float32


def reference_dtype(cfg: DPOConfig, device: torch.device) -> torch.dtype:
    """bf16 (or fp16) on GPU following the run's precision flags; fp32 on CPU (no bf16 matrix units)."""
    on_gpu = device.type == "cuda"
    if cfg.torch_dtype in ("float32", "bfloat16", "float16"):
        return getattr(torch, cfg.torch_dtype)
    if on_gpu and cfg.use_bf16(on_gpu):
        return torch.bfloat16
    if on_gpu and cfg.fp16:
        return torch.float16
    return torch.float32


def quantization_config(cfg: DPOConfig):
    """QLoRA's 4-bit base (bitsandbytes NF4, bf16 compute). GPU only: a clear error elsewhere."""
    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on "
                           "CPU. Drop load_in_4bit, or run on GPU workers (ray.use_gpu: true).")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise RuntimeError("load_in_4bit needs bitsandbytes: pip install bitsandbytes") from e
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def from_pretrained_kwargs(cfg: DPOConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": model_dtype(cfg), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(cfg)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    kwargs.update(cfg.model_init_kwargs)
    return kwargs


def _auto_class(config_or_dir):
    """AutoModelForImageTextToText for vision-language configs (LLaVA, Qwen2-VL, ...), else
    AutoModelForCausalLM."""
    from dpo_ray.vision import is_vision_config, is_vision_model_dir

    vision = is_vision_model_dir(config_or_dir) if isinstance(config_or_dir, (str, Path)) \
        else is_vision_config(config_or_dir)
    if vision:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def load_causal_lm(source: str | dict | None, cfg: DPOConfig, tokenizer) -> nn.Module:
    """A causal LM from a directory path, a shipped ``{"config", "state_dict"}`` dict, or None (tiny default).

    Vision-language models (a config with a ``vision_config``) load through AutoModelForImageTextToText.
    The tiny default is initialised from ``cfg.seed`` so every worker (and the reference) starts identical.
    """
    from transformers import AutoModelForCausalLM

    if source is None:
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(tiny_llama_config(tokenizer), dtype=torch.float32)
    elif isinstance(source, dict):
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            # zero.Init partitions parameters as they are built; only from_pretrained knows how to load
            # a full state dict into those shards, so go through a directory.
            import tempfile

            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory() as d:
                source["config"].save_pretrained(d)
                # clone: tied weights share storage, which safetensors refuses to write
                save_file({k: v.contiguous().clone() for k, v in source["state_dict"].items()},
                          str(Path(d) / "model.safetensors"), metadata={"format": "pt"})
                return _finish(
                    _auto_class(source["config"]).from_pretrained(d, **from_pretrained_kwargs(cfg)), cfg)
        model = _auto_class(source["config"]).from_config(source["config"], dtype=torch.float32)
        model.load_state_dict(source["state_dict"])
    else:
        if not Path(source).is_dir():
            raise FileNotFoundError(
                f"model_name_or_path={source!r} is not a directory. dpo_ray loads models from disk only "
                "(no hub access at run time): download or save_pretrained the model and pass its directory."
            )
        _check_model_dir(Path(source))
        if (Path(source) / "adapter_config.json").exists() and not (Path(source) / "config.json").exists():
            # an adapter directory: its base model with the adapter merged in (e.g. a PEFT reference model)
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(source, **from_pretrained_kwargs(cfg))
            model = model.merge_and_unload()
        else:
            model = _auto_class(source).from_pretrained(source, **from_pretrained_kwargs(cfg))
    return _finish(model, cfg)


_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _check_model_dir(d: Path) -> None:
    """A directory save_pretrained wrote: config.json and weights (or an adapter: adapter_config.json and its
    weights). Named here, not as transformers' OSError from inside a worker."""
    if (d / "adapter_config.json").exists() and not (d / "config.json").exists():
        return  # a PEFT adapter directory: peft checks its own files and names the base model
    if not (d / "config.json").is_file():
        raise ModelFilesError(f"model directory {d} has no config.json; give the directory that "
                              "save_pretrained wrote (model.save_pretrained(DIR) writes config.json and the "
                              "weights)")
    if not any(next(d.glob(p), None) for p in _WEIGHTS):
        raise ModelFilesError(f"model directory {d} has a config.json but no weights (*.safetensors or "
                              "pytorch_model*.bin): the copy is incomplete, or only the config was saved")


def _finish(model: nn.Module, cfg: DPOConfig) -> nn.Module:
    if cfg.output_router_logits:
        if not hasattr(model.config, "router_aux_loss_coef") \
                and not hasattr(model.config, "output_router_logits"):
            raise ValueError(
                f"output_router_logits=true needs a mixture-of-experts model, but {type(model).__name__} has "
                "no router; turn output_router_logits off for dense models."
            )
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
    return model


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)


def prepare_policy(model: nn.Module, cfg: DPOConfig) -> nn.Module:
    """The policy in training mode, as the optimizer will see it. ``from_pretrained`` hands back a model in
    eval mode, and transformers applies gradient checkpointing (and dropout) only to a module in training
    mode: left in eval mode, ``gradient_checkpointing: true`` saved no memory and ``disable_dropout: false``
    trained without dropout. Checkpointing itself is ``ActivationCheckpointing``'s."""
    model.train()
    if cfg.disable_dropout:
        disable_dropout(model)
    return model


def activation_bytes_per_token(config, elem_bytes: int) -> int | None:
    """An estimate of what one token's forward keeps for the backward across the decoder layers: per layer
    about 10 hidden-wide tensors (norms, q/k/v/o, residuals, attention output) and 4 MLP-wide ones (gate, up,
    their product, the activation). SmolLM2-135M in fp32: 1.36 MiB per token, against 1.41 MiB measured
    (docs/BENCHMARKS.md, memory at long context). ``None`` where the config does not say its widths."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, hidden = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if not layers or not hidden:
        return None
    mlp = getattr(text, "intermediate_size", None) or 4 * hidden
    if getattr(text, "moe_intermediate_size", None):  # a token goes through its top-k experts
        mlp = text.moe_intermediate_size * max(1, getattr(text, "num_experts_per_tok", 1) or 1)
    return int(layers * (10 * hidden + 4 * mlp) * elem_bytes)


def checkpoint_min_tokens(gib: float, per_token: int) -> int:
    """``gradient_checkpointing: auto``'s switch: the fewest tokens per micro-batch whose activations pass
    ``gib``."""
    return -(-int(gib * 2**30) // per_token)


class ActivationCheckpointing:
    """``gradient_checkpointing`` on a prepared policy, decided per micro-batch: ``True`` always, ``False``
    never, ``auto`` for a micro-batch whose estimated activations (its tokens ×
    ``activation_bytes_per_token``) pass ``gradient_checkpointing_gib``: long rows get TRL's memory, short
    ones keep their speed. Under ZeRO-3 ``auto`` is on for every micro-batch: a recompute gathers the layer's
    parameter shards again, and ranks that decided differently would issue different collectives.

    Where the activations live in host memory (``host_activations``: a CPU run), the first micro-batch past
    that bound, whatever the setting, also makes the process return freed activation blocks to the system from
    then on (``allocator.return_freed_memory``): glibc's heap would otherwise keep the longest row's peak.
    Short rows never pay for it (a step is a few % slower with it)."""

    def __init__(self, model: nn.Module, cfg: DPOConfig, elem_bytes: int, host_activations: bool = True):
        setting = cfg.gradient_checkpointing
        self.auto = setting == "auto" and cfg.deepspeed.zero_stage != 3
        # "auto" included: the layers get their checkpoint function; __call__ toggles them
        self.on = bool(setting)
        self.flags: list[nn.Module] = []
        self.min_tokens: int | None = None
        self.checkpointed = 0
        self.per_token = activation_bytes_per_token(model.config, elem_bytes)
        # the micro-batch size from which memory, not speed, is what counts (unknown widths: never)
        self.long_tokens = (checkpoint_min_tokens(cfg.gradient_checkpointing_gib, self.per_token)
                            if self.per_token else None)
        self.host_activations = host_activations
        if not self.on:
            return
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        self.flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
        if self.auto:  # a config that does not say its widths: checkpoint everything, the safe side
            self.min_tokens = self.long_tokens or 0

    def __call__(self, batch: dict) -> bool:
        """Whether this micro-batch's forward is checkpointed (set on the model's layers)."""
        if (self.host_activations and self.long_tokens is not None
                and batch["input_ids"].numel() >= self.long_tokens):
            return_freed_memory()  # once per process; later calls return at once
        if not self.auto:
            on = self.on
        else:
            on = batch["input_ids"].numel() >= self.min_tokens
            for m in self.flags:
                m.gradient_checkpointing = on
        self.checkpointed += on
        return on

    def describe(self) -> str:
        if not self.on:
            return "gradient checkpointing off"
        if not self.auto:
            return "gradient checkpointing on for every micro-batch"
        size = f" (~{self.per_token / 2**20:.2f} MiB of activations per token)" if self.per_token else ""
        return (f"gradient checkpointing auto: on for micro-batches of {self.min_tokens:,}+ tokens{size}, "
                "gradient_checkpointing_gib to change it")


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def shippable(model: nn.Module) -> dict:
    """A model as {config, state_dict} on CPU, for ray.put to workers and reference actors."""
    return {"config": model.config,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
