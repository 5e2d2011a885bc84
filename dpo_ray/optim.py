"""The optimizer by TRL's / TrainingArguments' ``optim`` name (and ``optim_args``), torch only.

``OPTIMIZERS`` is the one table of the names dpo_ray builds; ``UNSUPPORTED`` says why each other
TrainingArguments name is refused (the config reports that reason under the key ``optim``). Each optimizer is
built as transformers' ``Trainer`` builds it for that name, from the same arguments: ``learning_rate``,
``adam_beta1/2``, ``adam_epsilon``, and ``optim_args`` (a "k=v,k2=v2" string) for the ones that read it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# name -> the optim_args keys it reads (transformers' handlers read these; the others ignore optim_args)
OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "adamw_torch": (),
    "adamw_torch_fused": (),  # torch's fused kernel; the default AdamW where fused is unavailable
    "adafactor": (),  # transformers' Adafactor with scale_parameter=False, relative_step=False
    "sgd": ("momentum", "dampening", "weight_decay", "nesterov"),
    "adagrad": ("lr_decay", "weight_decay", "eps"),
    "rmsprop": ("momentum", "alpha", "eps", "weight_decay", "centered"),
}
# older or other spellings of the same optimizer
OPTIMIZER_ALIASES = {"adamw_hf": "adamw_torch", "adamw": "adamw_torch",
                     "adamw_apex_fused": "adamw_torch_fused"}

_BNB = "8-bit, paged and Lion optimizers need bitsandbytes on a GPU, which dpo_ray does not wire"
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit",
                     "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
                     "paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit",
                     "rmsprop_bnb_32bit", "ademamix"), _BNB),
    **dict.fromkeys(("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
                     "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "apollo_adamw",
                     "apollo_adamw_layerwise"),
                    "low-rank (GaLore/APOLLO) optimizers need per-module target lists and layer-wise hooks "
                    "the DeepSpeed engine does not run"),
    **dict.fromkeys(("lomo", "adalomo"),
                    "LOMO fuses the update into backward, which the DeepSpeed engine owns"),
    **dict.fromkeys(("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"),
                    "schedule-free optimizers need the schedulefree package and train/eval switches the loop "
                    "does not make"),
    **dict.fromkeys(("adamw_torch_xla", "adamw_torch_npu_fused"),
                    "for TPU/NPU devices; dpo_ray runs on CUDA or CPU"),
    **dict.fromkeys(("adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "grokadamw",
                     "stable_adamw"),
                    "needs an extra optimizer package (torchdistx, torchao, grokadamw or optimi) dpo_ray "
                    "does not install"),
}


def canonical_optimizer(name: str) -> str:
    return OPTIMIZER_ALIASES.get(name, name)


def parse_optim_args(text: str | None) -> dict[str, str]:
    """TrainingArguments' optim_args: "momentum=0.9,nesterov=true" ->
    {"momentum": "0.9", "nesterov": "true"}."""
    out: dict[str, str] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"optim_args item {item!r} is not key=value")
        out[key] = value
    return out


def optimizer_problems(name: str, optim_args: str | None) -> list[str]:
    """What is wrong with ``optim`` / ``optim_args`` (empty: nothing), for the config's one error."""
    name = canonical_optimizer(name)
    if name not in OPTIMIZERS:
        why = UNSUPPORTED.get(name, "not an optimizer name")
        return [f"optim {name!r}: {why}; choose one of {', '.join(OPTIMIZERS)}"]
    try:
        args = parse_optim_args(optim_args)
    except ValueError as e:
        return [str(e)]
    reads = OPTIMIZERS[name]
    unread = [k for k in args if k not in reads]
    if unread:
        return [f"optim_args {', '.join(unread)}: {name} reads "
                + (", ".join(reads) if reads else "no optim_args") + " (transformers' meaning)"]
    return []


def _flag(value: str) -> bool:
    return value.lower() in ("true", "1", "yes")


def build_optimizer(name: str, param_groups: Iterable[dict], *, lr: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    optim_args: str | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``param_groups`` (each may carry its own weight_decay), as transformers
    builds it."""
    name = canonical_optimizer(name)
    problems = optimizer_problems(name, optim_args)
    if problems:
        raise ValueError(problems[0])
    groups = list(param_groups)
    args = parse_optim_args(optim_args)
    if name in ("adamw_torch", "adamw_torch_fused"):
        if name == "adamw_torch_fused":
            # fused: one kernel for all parameters, on CPU as on GPU (AdamW steps 3.5-6.4x faster on CPU,
            # bench/bench_optimizer.py); the default implementation where fused is not available
            try:
                return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
            except (RuntimeError, TypeError, ValueError):
                pass
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False)
    floats = {k: float(v) for k, v in args.items() if k not in ("nesterov", "centered")}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, nesterov=_flag(args.get("nesterov", "false")), **floats)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, **floats)
    return torch.optim.RMSprop(groups, lr=lr, centered=_flag(args.get("centered", "false")), **floats)
