"""What dpo_ray does with each TRL 1.x configuration key (``DPOConfig`` with its ``TrainingArguments``, and
the ``ModelConfig`` / ``ScriptArguments`` keys of TRL's scripts), so a TRL user's YAML loads with the same
meaning.

One table, ``TRL_KEYS``: the config translates the keys before validation (``translate``) and
``scripts/gen_config_doc.py`` renders it into docs/config.md. Treatments:

- ``same``: a dpo_ray key of the same name and meaning (the note says where it differs in detail);
- ``maps``: accepted and turned into dpo_ray's own key (the note says which);
- ``ignored``: accepted, with no effect: what it tunes does not exist here (the note says why);
- ``default_only``: accepted at TRL's default, which is what dpo_ray always does; any other value is refused
  with the note as the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from dpo_ray.redact import redact_value


@dataclass(frozen=True)
class TrlKey:
    treatment: str  # same | maps | ignored | default_only
    note: str = ""
    default: Any = None  # TRL's default: the value default_only accepts
    source: str = "DPOConfig"  # the TRL class that declares it


def _same(note: str = "", source: str = "DPOConfig") -> TrlKey:
    return TrlKey("same", note, source=source)


def _maps(note: str, source: str = "DPOConfig") -> TrlKey:
    return TrlKey("maps", note, source=source)


def _ignored(note: str, source: str = "DPOConfig") -> TrlKey:
    return TrlKey("ignored", note, source=source)


def _only(default: Any, note: str, source: str = "DPOConfig") -> TrlKey:
    return TrlKey("default_only", note, default, source)


_RAY_DATA = "Ray Data runs the input pipeline (no torch DataLoader)"
_DEEPSPEED_DP = "Ray Train + DeepSpeed run data parallelism (no DDP wrapper)"
_HUB = "nothing is pushed to a hub from here: output_dir holds the model; upload it yourself"
_NO_PRED = "eval reports the DPO metrics only (no predictions are kept)"
_LOGS = "console, metrics.jsonl and TensorBoard lines are written by rank 0 only"

TRL_KEYS: dict[str, TrlKey] = {
    # --- DPOConfig: TrainingArguments ---
    "output_dir": _same(),
    "per_device_train_batch_size": _same("pairs per worker per micro-batch"),
    "num_train_epochs": _same(),
    "max_steps": _same(),
    "learning_rate": _same("default 1e-6, as TRL's DPOConfig"),
    "lr_scheduler_type": _same("linear, cosine, cosine_with_restarts, cosine_with_min_lr, polynomial, "
                               "constant, constant_with_warmup, inverse_sqrt, as transformers computes them; "
                               "reduce_lr_on_plateau and warmup_stable_decay are refused"),
    "lr_scheduler_kwargs": _same("transformers' names per schedule (num_cycles, min_lr, min_lr_rate, lr_end, "
                                 "power, timescale); unknown ones are refused"),
    "warmup_steps": _same("warmup_ratio is also accepted (transformers 4.x)"),
    "optim": _same("adamw_torch_fused (default), adamw_torch (alias adamw_hf), adafactor, sgd, adagrad, "
                   "rmsprop; bitsandbytes, GaLore, LOMO, schedule-free and TPU/NPU optimizers are refused "
                   "with the reason"),
    "optim_args": _same("\"k=v,...\" for sgd, adagrad, rmsprop, as transformers reads it"),
    "optim_target_modules": _only(None, "only GaLore/APOLLO optimizers read it, and they are not supported"),
    "weight_decay": _same("not on biases and norm weights"),
    "adam_beta1": _same(),
    "adam_beta2": _same(),
    "adam_epsilon": _same(),
    "gradient_accumulation_steps": _same(),
    "average_tokens_across_devices": _ignored("the DPO loss is a mean over pairs per micro-batch (TRL's DPO "
                                              "loss does not read it either)"),
    "max_grad_norm": _same(),
    "label_smoothing_factor": _only(0.0, "token-level label smoothing of the LM loss; DPO's ε is "
                                         "label_smoothing"),
    "bf16": _same("None (default) = bf16 on GPU, fp32 on CPU"),
    "fp16": _same(),
    "bf16_full_eval": _only(False, "eval runs in the training precision"),
    "fp16_full_eval": _only(False, "eval runs in the training precision"),
    "tf32": _only(None, "TF32 matmuls are left at torch's default"),
    "activation_checkpointing": _maps("gradient_checkpointing (transformers 5 spelling)"),
    "activation_checkpointing_kwargs": _ignored("checkpointing is always non-reentrant here"),
    "gradient_checkpointing": _same("default auto (TRL: on): on for micro-batches whose activations pass "
                                     "gradient_checkpointing_gib, so long rows get TRL's memory and short "
                                     "ones skip the recompute; true/false as in TRL"),
    "gradient_checkpointing_kwargs": _ignored("checkpointing is always non-reentrant here"),
    "torch_compile": _only(False, "models run eagerly"),
    "torch_compile_backend": _only(None, "models run eagerly"),
    "torch_compile_mode": _only(None, "models run eagerly"),
    "use_liger_kernel": _only(False, "log-probs come from dpo_ray's own chunked LM head "
                                     "(dpo_ray/logprobs.py)"),
    "liger_kernel_config": _only(None, "log-probs come from dpo_ray's own chunked LM head "
                                       "(dpo_ray/logprobs.py)"),
    "use_cache": _ignored("training forwards never use the KV cache"),
    "neftune_noise_alpha": _only(None, "NEFTune embedding noise is not implemented"),
    "torch_empty_cache_steps": _ignored("the CUDA cache is left to torch"),
    "auto_find_batch_size": _only(False, "batch sizes are fixed by the config (DeepSpeed's dict is derived "
                                         "from them)"),
    "logging_strategy": _only("steps", "dpo_ray logs every logging_steps optimizer steps"),
    "logging_steps": _same(),
    "logging_first_step": _same("also log after the first optimizer step"),
    "log_on_each_node": _ignored(_LOGS),
    "logging_nan_inf_filter": _ignored("a non-finite loss or gradient norm stops the run, naming the step"),
    "include_num_input_tokens_seen": _ignored("num_tokens (input tokens seen) is always logged"),
    "log_level": _ignored("worker logs go through Ray"),
    "log_level_replica": _ignored("worker logs go through Ray"),
    "disable_tqdm": _ignored("the console shows one progress line per log step, no tqdm bar"),
    "report_to": _same("tensorboard or none"),
    "run_name": _same("the Ray Train run name"),
    "project": _ignored("report_to is tensorboard or none (no trackio)"),
    "trackio_space_id": _ignored("report_to is tensorboard or none (no trackio)"),
    "trackio_bucket_id": _ignored("report_to is tensorboard or none (no trackio)"),
    "trackio_static_space_id": _ignored("report_to is tensorboard or none (no trackio)"),
    "eval_strategy": _same(),
    "eval_steps": _same("default logging_steps"),
    "eval_delay": _only(0, "eval follows eval_strategy from the first step"),
    "per_device_eval_batch_size": _same(),
    "prediction_loss_only": _ignored(_NO_PRED),
    "eval_on_start": _same("evaluate once before the first step"),
    "eval_do_concat_batches": _ignored(_NO_PRED),
    "eval_use_gather_object": _ignored(_NO_PRED),
    "eval_accumulation_steps": _ignored(_NO_PRED),
    "include_for_metrics": _ignored(_NO_PRED),
    "batch_eval_metrics": _ignored(_NO_PRED),
    "save_only_model": _only(False, "checkpoints keep the optimizer, scheduler and RNG states so a resume is "
                                    "exact"),
    "save_strategy": _same("no, steps or epoch (best is not supported; use load_best_model_at_end)"),
    "save_steps": _same(),
    "save_on_each_node": _ignored("checkpoints go to Ray Train storage (ray.storage_path), shared by the "
                                  "nodes"),
    "save_total_limit": _same(),
    "enable_jit_checkpoint": _only(False, "checkpoints are written at save_steps / epochs only"),
    "push_to_hub": _only(False, _HUB),
    "hub_token": _only(None, _HUB),
    "hub_private_repo": _only(None, _HUB),
    "hub_model_id": _only(None, _HUB),
    "hub_strategy": _only("every_save", _HUB),
    "hub_always_push": _only(False, _HUB),
    "hub_revision": _only(None, _HUB),
    "load_best_model_at_end": _same("output_dir gets the checkpoint with the best metric_for_best_model; "
                                    "needs save_strategy equal to eval_strategy"),
    "metric_for_best_model": _same("an eval metric name, with or without eval_ (default loss)"),
    "greater_is_better": _same("default: false for names ending in loss, else true"),
    "ignore_data_skip": _only(False, "a resume always restores the data position"),
    "restore_callback_states_from_checkpoint": _only(False, "there are no trainer callbacks"),
    "full_determinism": _only(False, "seeds are set per worker (seed, data_seed); deterministic kernels are "
                                     "not forced"),
    "seed": _same(),
    "data_seed": _same(),
    "use_cpu": _maps("true: ray.use_gpu false"),
    "accelerator_config": _ignored("accelerate is not used; Ray Train places the workers"),
    "parallelism_config": _only(None, "tensor/context parallelism is not supported; DeepSpeed ZeRO shards"),
    "dataloader_drop_last": _only(False, "every row trains; the last batch may be short"),
    "dataloader_num_workers": _ignored(_RAY_DATA),
    "dataloader_pin_memory": _ignored(_RAY_DATA),
    "dataloader_persistent_workers": _ignored(_RAY_DATA),
    "dataloader_prefetch_factor": _ignored(_RAY_DATA),
    "dataloader_multiprocessing_context": _ignored(_RAY_DATA),
    "dataloader_in_order": _ignored(_RAY_DATA),
    "remove_unused_columns": _ignored("the pipeline keeps the columns it needs (prompt, chosen, rejected, "
                                      "images, tools, chat_template_kwargs)"),
    "label_names": _ignored("DPO batches have no label columns"),
    "train_sampling_strategy": _maps("random (default): shuffled; group_by_length: length_bucketing true; "
                                     "sequential is refused (rows are shuffled per epoch with data_seed)"),
    "length_column_name": _ignored("length_bucketing measures the tokenized rows itself"),
    "ddp_find_unused_parameters": _ignored(_DEEPSPEED_DP),
    "ddp_bucket_cap_mb": _ignored(_DEEPSPEED_DP),
    "ddp_broadcast_buffers": _ignored(_DEEPSPEED_DP),
    "ddp_static_graph": _ignored(_DEEPSPEED_DP),
    "ddp_backend": _ignored("nccl on GPU, gloo on CPU, chosen by Ray Train"),
    "ddp_timeout": _ignored(_DEEPSPEED_DP),
    "fsdp": _only(None, "DeepSpeed ZeRO shards instead: deepspeed.zero_stage 3 is FSDP's full sharding"),
    "fsdp_config": _only(None, "DeepSpeed ZeRO shards instead: deepspeed.zero_stage 3 is FSDP's full "
                               "sharding"),
    "deepspeed": _same("a section here (zero_stage, offload_optimizer, offload_param, overrides); TRL's path "
                       "to a DeepSpeed JSON is refused: the dict is derived from the config"),
    "debug": _only("", "no debug modes"),
    "skip_memory_metrics": _ignored("memory is not profiled"),
    "do_train": _ignored("the command decides: dpo-ray train trains"),
    "do_eval": _ignored("eval follows eval_strategy"),
    "do_predict": _ignored(_NO_PRED),
    "resume_from_checkpoint": _same("also 'latest'"),
    "overwrite_output_dir": _same("TrainingArguments' key of transformers 4.x: a new run into an output_dir "
                                  "holding an earlier run's outputs is refused unless this is true or the "
                                  "run resumes"),
    "local_rank": _ignored("Ray Train assigns ranks"),
    # --- DPOConfig: TRL's own ---
    "model_init_kwargs": _same(),
    "trust_remote_code": _same(),
    "router_aux_loss_coef": _same("a number (default 0.001); TRL's None (the model's own coefficient) keeps "
                                  "0.001, the usual MoE configs' value; the loss needs output_router_logits: "
                                  "true"),
    "disable_dropout": _same(),
    "dataset_num_proc": _same("tokenization tasks in flight"),
    "max_length": _same(),
    "truncation_mode": _same("keep_end is kept (TRL deprecates it)"),
    "padding_free": _maps("true: prefix_sharing on (each pair packed into one row, the prompt computed "
                          "once); false: prefix_sharing stays as set (default auto)"),
    "pad_to_multiple_of": _same("TRL's auto is None here (no padding off Neuron)"),
    "precompute_ref_log_probs": _same("reference.source precomputed"),
    "precompute_ref_batch_size": _maps("reference.batch_size"),
    "loss_type": _same("docs/losses.md compares each with TRL"),
    "loss_weights": _same(),
    "ld_alpha": _same(),
    "f_divergence_type": _same(),
    "f_alpha_divergence_coef": _same("TRL 1.x's α (default 0.5)"),
    "label_smoothing": _same("also cDPO on sigmoid (the seed's meaning; TRL 1.x ignores it there)"),
    "beta": _same(),
    "use_weighting": _same(),
    "discopop_tau": _same(),
    "activation_offloading": _only(False, "activations stay on the device (deepspeed.offload_* moves states "
                                          "instead)"),
    "sync_ref_model": _same("also with a PEFT policy (reference.source local, the policy's own copy: not "
                            "with a separate reference model or ZeRO-3)"),
    "ref_model_mixup_alpha": _same(),
    "ref_model_sync_steps": _same(),
    "pad_token": _only(None, "deprecated in TRL: the tokenizer's pad token is used (EOS when it has none)"),
    # --- ModelConfig (trl scripts) ---
    "model_name_or_path": _same("a local directory (no hub at run time)", "ModelConfig"),
    "model_revision": _only("main", "model_name_or_path is a directory; no hub revision", "ModelConfig"),
    "dtype": _maps("torch_dtype", "ModelConfig"),
    "attn_implementation": _same("", "ModelConfig"),
    "use_peft": _same("", "ModelConfig"),
    "lora_r": _same("needs use_peft", "ModelConfig"),
    "lora_alpha": _same("needs use_peft", "ModelConfig"),
    "lora_dropout": _same("needs use_peft", "ModelConfig"),
    "lora_target_modules": _same("needs use_peft; default all linear layers", "ModelConfig"),
    "lora_target_parameters": _only(None, "LoRA on parameters (MoE experts) is not wired", "ModelConfig"),
    "lora_modules_to_save": _same("needs use_peft", "ModelConfig"),
    "lora_task_type": _only("CAUSAL_LM", "adapters are causal-LM LoRA", "ModelConfig"),
    "use_rslora": _only(False, "rank-stabilised LoRA is not wired", "ModelConfig"),
    "use_dora": _only(False, "DoRA is not wired", "ModelConfig"),
    "load_in_8bit": _only(False, "8-bit bases are not wired; load_in_4bit (QLoRA) is", "ModelConfig"),
    "load_in_4bit": _same("QLoRA; needs use_peft and a GPU", "ModelConfig"),
    "bnb_4bit_quant_type": _only("nf4", "QLoRA uses nf4", "ModelConfig"),
    "use_bnb_nested_quant": _only(False, "QLoRA uses single quantization", "ModelConfig"),
    "bnb_4bit_quant_storage": _only(None, "QLoRA stores 4-bit weights as uint8", "ModelConfig"),
    # --- ScriptArguments (trl scripts) ---
    "dataset_name": _same("also a file, glob or directory", "ScriptArguments"),
    "dataset_config": _same("", "ScriptArguments"),
    "dataset_train_split": _same("", "ScriptArguments"),
    "dataset_test_split": _same("", "ScriptArguments"),
    "dataset_streaming": _ignored("Ray Data always streams", "ScriptArguments"),
    "ignore_bias_buffers": _ignored("no DDP buffers to broadcast", "ScriptArguments"),
}


def _as_value(value: Any) -> Any:
    # flags arrive as strings: "true", "4", "null", '{"a": 1}'
    return yaml.safe_load(value) if isinstance(value, str) else value


def translate(data: dict[str, Any], fields: set[str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A config mapping with TRL-only keys turned into dpo_ray's (``fields``: DPOConfig's own keys), and the
    problems found: TRL keys with a value dpo_ray cannot honour, each with the reason. Unknown keys are left
    in place for the validator to report."""
    out = dict(data)
    problems: list[tuple[str, str]] = []

    def setdefault(key: str, value: Any, why: str) -> None:
        given = data.get(key)
        if key == "prefix_sharing" and isinstance(given, bool):
            given = "on" if given else "off"
        if key in data and given != value:
            problems.append((why, f"asks for {key}: {value!r}, but {key} is set to {data[key]!r}; drop one"))
        out.setdefault(key, value)

    # TRL values of shared keys that dpo_ray spells differently
    if out.get("model_init_kwargs", {}) is None:
        out["model_init_kwargs"] = {}
    if out.get("lr_scheduler_kwargs", {}) is None:
        out["lr_scheduler_kwargs"] = {}
    if "router_aux_loss_coef" in out and out["router_aux_loss_coef"] is None:
        del out["router_aux_loss_coef"]
    if out.get("pad_to_multiple_of") == "auto":
        out["pad_to_multiple_of"] = None
    if "deepspeed" in out and out["deepspeed"] is None:  # TRL: no DeepSpeed config file
        del out["deepspeed"]
    if isinstance(out.get("deepspeed"), str):
        problems.append(("deepspeed",
                         f"a DeepSpeed JSON path ({out.pop('deepspeed')!r}) is not read: the DeepSpeed dict "
                         "is derived from the config; set deepspeed.zero_stage, offload_optimizer, "
                         "offload_param, and deepspeed.overrides for anything else"))
    for key in [k for k in data if k not in fields and k in TRL_KEYS]:
        entry, value = TRL_KEYS[key], _as_value(out.pop(key))
        # TrainingArguments.to_dict() masks tokens as "<HUB_TOKEN>": a dumped config carries no token
        unset = value in (None, False, "", [], {}) or value == f"<{key.upper()}>"
        if entry.treatment == "default_only" and value != entry.default and not unset:
            problems.append((key, f"{entry.note} (got {redact_value(key, value)!r}); remove the key or set "
                                  f"it to {entry.default!r}"))
        elif entry.treatment == "maps":
            if key == "padding_free" and value:
                setdefault("prefix_sharing", "on", key)
            elif key in ("activation_checkpointing", "dtype") and value is not None:
                setdefault({"dtype": "torch_dtype"}.get(key, "gradient_checkpointing"), value, key)
            elif key == "precompute_ref_batch_size" and value is not None:
                ref = dict(out.get("reference") or {})
                ref.setdefault("batch_size", value)
                out["reference"] = ref
            elif key == "use_cpu" and value:
                ray = dict(out.get("ray") or {})
                if ray.get("use_gpu"):
                    problems.append((key, "use_cpu: true but ray.use_gpu: true; drop one"))
                ray["use_gpu"] = False
                out["ray"] = ray
            elif key == "train_sampling_strategy" and value not in (None, "random"):
                if value == "group_by_length":
                    setdefault("length_bucketing", True, key)
                else:
                    problems.append((key, f"{value!r} is not supported: rows are shuffled per epoch "
                                          "(data_seed); use random, or group_by_length (length_bucketing)"))
    return out, problems
