"""The cross-field rules of a DPOConfig, every one in this module: ``cross_field_problems`` lists what a
config breaks (the schema raises them all at once), and the policies that resolve a setting from others
(``default_reference_source``, ``choose_reference_source`` for ``reference.source: auto``). Rules that need
the data (row formats, lengths, the rows left for a step) live in the data layer; docs/config.md lists
them."""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from dpo_ray.config.messages import value_did_you_mean
from dpo_ray.losses import F_DIVERGENCES, LOSS_ALIASES, LOSSES, canonical_loss_name
from dpo_ray.optim import optimizer_problems
from dpo_ray.schedule import SCHEDULES, scheduler_kwargs_problems

# The logged metric names that metric_for_best_model may name, with or without eval_.
METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
                "mean_token_accuracy", "aux_loss")
# Keys that only mean something for a PEFT policy (use_peft or peft_adapter_path).
PEFT_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
             "merge_adapter", "model_adapter_name")

if TYPE_CHECKING:  # the schema imports these rules; the rules only read a built config
    from dpo_ray.config.schema import DPOConfig

# also raised by the precompute pass for a processor given in Python (no model directory to read it from)
PRECOMPUTED_VISION_PROBLEM = ("reference.source", "precomputed reference log-probs do not carry images yet; "
                                                  "use reference.source actor or local for a vision-language "
                                                  "model")


def default_reference_source(c: DPOConfig) -> str:
    """reference.source when the user gives none: TRL's reference under PEFT without a reference model (the
    adapter disabled for a new adapter; a frozen copy of a loaded adapter, or of the named one), else auto."""
    if (c.use_peft or c.peft_adapter_path) and not (c.reference.model_name_or_path
                                                    or c.ref_model_name_or_path):
        return "ref_adapter" if c.peft_adapter_path or c.ref_adapter_name else "adapter_off"
    return "auto"


def effective_reference_source(c: DPOConfig) -> str:
    """reference.source as the run uses it, before Ray decides ``auto``: TRL's switches first
    (``reference_free`` -> none, ``precompute_ref_log_probs`` -> precomputed), then the source given, else
    ``default_reference_source``. The one place the rules and the config's own resolution read it from."""
    if c.reference_free:
        return "none"
    if c.precompute_ref_log_probs:
        return "precomputed"
    return default_reference_source(c) if c.reference_source_defaulted else c.reference.source


def choose_reference_source(c: DPOConfig, nodes: int) -> tuple[str, str]:
    """What ``reference.source: auto`` means on a cluster of ``nodes`` alive nodes: (actor | local, why).

    The pool pays off where it runs on resources the workers do not use: GPUs of its own, a labelled node,
    custom resources, another node. On one node the workers already fill (their torch threads take every
    core; their GPUs), a frozen copy on each worker is faster (1.2-1.4× on CPU, docs/BENCHMARKS.md) and is
    TRL's layout."""
    rc = c.reference
    if c.sync_ref_model and c.uses_peft:
        return "local", "TR-DPO with a PEFT policy mixes adapter-wrapped weights, which only a local copy has"
    given = [k for k, v in (("num_gpus", rc.num_gpus), ("resources", rc.resources),
                            ("node_label", rc.node_label)) if v]
    if given:
        return "actor", f"reference.{given[0]} gives the pool resources of its own"
    if nodes > 1:
        return "actor", (f"a cluster of {nodes} nodes: the pool runs in its own process "
                         "(place it with reference.node_label or reference.resources)")
    return "local", ("one node, whose cores or GPUs the workers use: a frozen copy on each worker is faster "
                     "there; reference.source: actor for the pool")


def _remote_storage_problems(c: DPOConfig) -> list[tuple[str, str]]:
    """ray.storage_path as a URI (s3://, gs://, file://...) goes to Ray Train unchanged; what dpo_ray itself
    reads from the checkpoints on the driver's disk needs a local (or mounted shared) path."""
    storage = c.ray.storage_path
    if not storage or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", storage):
        return []
    why = (f"reads the checkpoints from the driver's file system, and ray.storage_path {storage!r} is a URI; "
           "use a local or mounted shared path for ray.storage_path")
    p = []
    if str(c.resume_from_checkpoint).lower() in ("latest", "true"):
        p.append(("resume_from_checkpoint", f"latest {why}, or give the checkpoint's local copy"))
    if c.load_best_model_at_end:
        p.append(("load_best_model_at_end", why))
    return p


def _best_model_problems(c: DPOConfig) -> list[tuple[str, str]]:
    """transformers' rules for load_best_model_at_end, and a metric name the run logs."""
    p: list[tuple[str, str]] = []
    name = c.metric_for_best_model
    if name is not None and name.removeprefix("eval_") not in METRIC_NAMES:
        close = difflib.get_close_matches(name.removeprefix("eval_"), METRIC_NAMES, n=1)
        p.append(("metric_for_best_model", f"{name!r} is not a logged metric"
                  + (f"; did you mean {close[0]}?" if close else f"; choose from {', '.join(METRIC_NAMES)}")))
    if not c.load_best_model_at_end:
        return p
    if c.eval_strategy == "no":
        p.append(("load_best_model_at_end", "needs evaluations to rank checkpoints; set eval_strategy steps "
                                            "or epoch"))
    elif c.save_strategy != c.eval_strategy:
        p.append(("load_best_model_at_end", f"needs save_strategy equal to eval_strategy (got save_strategy "
                                            f"{c.save_strategy!r}, eval_strategy {c.eval_strategy!r}), so "
                                            "every checkpoint has an evaluation"))
    elif c.eval_strategy == "steps" and c.save_steps >= 1 and (c.eval_steps or c.logging_steps) >= 1 and \
            c.save_steps % (c.eval_steps or c.logging_steps):
        p.append(("load_best_model_at_end", f"needs save_steps ({c.save_steps}) to be a multiple of "
                                            f"eval_steps ({c.eval_steps or c.logging_steps}), so every "
                                            "checkpoint has an evaluation"))
    return p


def cross_field_problems(c: DPOConfig) -> list[tuple[str, str]]:
    p: list[tuple[str, str]] = []
    known = sorted(set(LOSSES) | set(LOSS_ALIASES))
    names = []
    for raw in c.loss_type:
        name = canonical_loss_name(raw)
        if name not in LOSSES:
            p.append(("loss_type", f"{raw!r} is not a known loss; choose from {', '.join(known)}"
                                   + value_did_you_mean(raw, known)))
        else:
            names.append(name)
    if not c.loss_type:
        p.append(("loss_type", "needs at least one loss; e.g. --loss_type sigmoid"))
    if c.loss_weights is not None and len(c.loss_weights) != len(c.loss_type):
        p.append(("loss_weights", f"has {len(c.loss_weights)} value(s) but loss_type has {len(c.loss_type)}; "
                                  "give one weight per loss, in the same order"))
    eps = c.label_smoothing
    if "exo_pair" in names and eps <= 0:
        p.append(("label_smoothing", "loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses "
                                     "1e-3); e.g. --label_smoothing 0.001"))
    if "exo_pair" in names and eps >= 1:
        p.append(("label_smoothing", "exo_pair needs label_smoothing < 1"))
    if "robust" in names and not 0 <= eps < 0.5:
        p.append(("label_smoothing", f"loss_type robust needs 0 <= label_smoothing < 0.5 (got {eps})"))
    if c.f_divergence_type not in F_DIVERGENCES:
        p.append(("f_divergence_type", f"{c.f_divergence_type!r} is not one of {', '.join(F_DIVERGENCES)}"))
    elif c.f_divergence_type != "reverse_kl":
        bad = [n for n in names if not LOSSES[n].takes_f_divergence]
        if bad:
            ok = sorted(n for n, s in LOSSES.items() if s.takes_f_divergence)
            p.append(("f_divergence_type", f"{c.f_divergence_type} replaces the log-ratios by f-divergence "
                                           f"scores, which has no valid form for {', '.join(bad)} (as in "
                                           f"TRL); use it only with {', '.join(ok)}, or f_divergence_type "
                                           "reverse_kl"))
    if c.use_weighting and {"aot", "aot_unpaired"} & set(names):
        p.append(("use_weighting", "WPO weights are per pair, but aot/aot_unpaired sort pairs across the "
                                   "batch; turn off use_weighting or choose another loss"))
    if c.ld_alpha is not None and not 0 <= c.ld_alpha <= 1:
        p.append(("ld_alpha", f"must be in [0, 1] (got {c.ld_alpha}); the LD-DPO paper uses 0.3-0.7"))
    if c.rpo_alpha is not None and c.rpo_alpha < 0:
        p.append(("rpo_alpha", f"must be >= 0 (got {c.rpo_alpha}); the RPO paper uses 1.0"))
    defaulted = c.reference_source_defaulted
    src = effective_reference_source(c)
    if c.reference_free and c.precompute_ref_log_probs:
        p.append(("precompute_ref_log_probs", "a reference-free run has no reference to precompute; drop one "
                                              "of them"))
    if c.sync_ref_model and src not in ("auto", "actor", "local"):
        p.append(("sync_ref_model", f"TR-DPO updates a reference model, but reference.source is {src!r}"
                                    + (" (the default under PEFT)" if defaulted else "")
                                    + "; use reference.source actor or local (not precomputed/adapter/none)"))
    if c.sync_ref_model and src == "actor" and c.uses_peft:
        p.append(("sync_ref_model", "TR-DPO with a PEFT policy mixes adapter-wrapped weights, which the "
                                    "actor's plain reference model does not have; use reference.source "
                                    "local"))
    if c.sync_ref_model and c.uses_peft and src in ("auto", "local") and (c.reference.model_name_or_path
                                                                          or c.deepspeed.zero_stage == 3):
        why = ("reference.model_name_or_path is a plain model" if c.reference.model_name_or_path else
               "under deepspeed.zero_stage 3 the local reference is rebuilt from the model files")
        p.append(("sync_ref_model", "TR-DPO with a PEFT policy mixes the adapter-wrapped policy into a copy "
                                    f"of itself, but {why}, without the adapter's parameters to mix into; "
                                    "drop reference.model_name_or_path, use deepspeed.zero_stage <= 2, or "
                                    "turn off sync_ref_model"))
    if src in ("adapter_off", "ref_adapter") and not c.uses_peft:
        p.append(("reference.source", f"{src} needs a PEFT model; set use_peft: true (or peft_adapter_path)"))
    if src == "ref_adapter" and not defaulted and not (c.ref_adapter_name and c.model_adapter_name):
        p.append(("ref_adapter_name", "reference.source ref_adapter needs model_adapter_name and "
                                      "ref_adapter_name"))
    if c.ref_adapter_name and src not in ("ref_adapter",):
        p.append(("reference.source", "ref_adapter_name is set; set reference.source: ref_adapter to use it"))
    if c.bf16 and c.fp16:
        p.append(("fp16", "bf16 and fp16 are both on; choose one"))
    if c.deepspeed.offload_param and c.deepspeed.zero_stage != 3:
        p.append(("deepspeed.offload_param", "parameter offload needs deepspeed.zero_stage 3"))
    if c.deepspeed.offload_optimizer and c.deepspeed.zero_stage == 0:
        p.append(("deepspeed.offload_optimizer", "optimizer offload needs deepspeed.zero_stage >= 1"))
    if c.load_in_4bit and not c.use_peft:
        p.append(("load_in_4bit", "a 4-bit base cannot be trained directly; set use_peft: true (QLoRA)"))
    if c.load_in_4bit and c.deepspeed.zero_stage == 3:
        p.append(("load_in_4bit", "4-bit weights cannot be sharded by ZeRO-3; use deepspeed.zero_stage <= 2"))
    if c.max_steps == 0 or c.max_steps < -1:
        p.append(("max_steps", "must be -1 (use num_train_epochs) or a positive step count (got "
                               f"{c.max_steps})"))
    p += [("optim" if msg.startswith("optim ") else "optim_args", msg)
          for msg in optimizer_problems(c.optim, c.optim_args)]
    for msg in scheduler_kwargs_problems(c.lr_scheduler_type, c.lr_scheduler_kwargs, c.learning_rate):
        if msg.startswith("lr_scheduler_type"):
            p.append(("lr_scheduler_type", msg + value_did_you_mean(c.lr_scheduler_type, SCHEDULES)))
        else:
            p.append(("lr_scheduler_kwargs", msg))
    for key in ("warmup_steps", "logging_steps", "eval_steps", "save_steps"):
        value = getattr(c, key)
        if isinstance(value, float) and value >= 1 and not value.is_integer():
            p.append((key, f"{value} is neither a whole number of steps nor a fraction in (0, 1)"))
    p += _best_model_problems(c)
    p += _remote_storage_problems(c)
    if not (c.use_peft or c.peft_adapter_path):
        for key in PEFT_KEYS:
            if key in c.model_fields_set and getattr(c, key) != type(c).model_fields[key].default:
                p.append((key, f"is set but use_peft is false, so the model trains in full and {key} has no "
                               "effect; set use_peft: true or drop it"))
    if c.max_length is not None and c.max_length < 2:
        p.append(("max_length", "must leave room for a prompt and a completion token (>= 2)"))
    from dpo_ray.vision import is_vision_model_dir, keep_end_problem

    if is_vision_model_dir(c.model_name_or_path):  # reads config.json only
        if c.truncation_mode == "keep_end":
            p.append(("truncation_mode", keep_end_problem()))
        if src == "precomputed":
            p.append(PRECOMPUTED_VISION_PROBLEM)
    return p
