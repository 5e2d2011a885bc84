"""A TRL user's configuration: TRL 1.x / TrainingArguments keys are translated, accepted as no-ops or refused
with the reason (dpo_ray/trl_keys.py); misspelt keys get a suggestion; PEFT keys need use_peft; and the
reference defaults to TRL's under PEFT."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dpo_ray.config import ConfigError, DPOConfig, add_config_arguments, load_config, overrides_from_args
from dpo_ray.trl_keys import TRL_KEYS


def problems(**kwargs) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        DPOConfig(**kwargs)
    return dict(info.value.problems)


def parse(argv: list[str]) -> DPOConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    ns = parser.parse_args(argv)
    return load_config(ns.config, overrides_from_args(ns))


# ------------------------------------------------------------------ the table

def test_the_table_is_consistent():
    fields = set(DPOConfig.model_fields)
    for key, entry in TRL_KEYS.items():
        assert entry.treatment in ("same", "maps", "ignored", "default_only"), key
        assert (key in fields) == (entry.treatment == "same"), key  # same: a field; the rest: translated
        assert entry.note or entry.treatment == "same", key


def test_every_trl_key_is_in_the_table():
    trl = pytest.importorskip("trl", minversion="1.16")
    for cls in (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments):
        missing = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")
                   and f.name not in TRL_KEYS]
        assert not missing, (cls.__name__, missing)


def test_a_dumped_trl_config_loads_with_its_meaning(tmp_path):
    """TrainingArguments.to_dict() of TRL's DPOConfig (every key, at TRL's values) is a valid dpo_ray
    config."""
    trl = pytest.importorskip("trl", minversion="1.16")
    dumped = trl.DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, beta=0.3,
                           loss_type=["sigmoid", "sft"],
                           loss_weights=[1.0, 0.5], lr_scheduler_type="cosine", warmup_steps=3).to_dict()
    cfg = DPOConfig(**dumped)
    assert cfg.beta == 0.3 and cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    assert cfg.lr_scheduler_type == "cosine" and cfg.warmup_steps == 3 and cfg.optim == "adamw_torch_fused"
    assert cfg.ray.use_gpu is False and cfg.pad_to_multiple_of is None and cfg.f_alpha_divergence_coef == 0.5
    assert cfg.gradient_checkpointing is True  # TRL's default, carried by the dump


# ------------------------------------------------------------------ translations and refusals

@pytest.mark.parametrize("kwargs,check", [
    ({"padding_free": True}, lambda c: c.prefix_sharing == "on"),
    ({"padding_free": False}, lambda c: c.prefix_sharing == "auto"),
    ({"precompute_ref_log_probs": True, "precompute_ref_batch_size": 64},
     lambda c: c.reference.batch_size == 64 and c.reference.source == "precomputed"),
    ({"use_cpu": True}, lambda c: c.ray.use_gpu is False),
    ({"activation_checkpointing": True}, lambda c: c.gradient_checkpointing),
    ({"dtype": "bfloat16"}, lambda c: c.torch_dtype == "bfloat16"),
    ({"train_sampling_strategy": "group_by_length"}, lambda c: c.length_bucketing),
    ({"optim": "adamw_hf"}, lambda c: c.optim == "adamw_torch"),
    ({"optim": "sgd", "optim_args": "momentum=0.9"}, lambda c: c.optim_args == "momentum=0.9"),
    ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
     lambda c: c.lr_scheduler_kwargs == {"min_lr_rate": 0.1}),
    ({"lr_scheduler_kwargs": None, "model_init_kwargs": None, "router_aux_loss_coef": None, "deepspeed": None,
      "pad_to_multiple_of": "auto"},
     lambda c: c.lr_scheduler_kwargs == {} and c.router_aux_loss_coef == 0.001),
    ({"push_to_hub": False, "hub_model_id": None, "dataloader_num_workers": 8, "remove_unused_columns": False,
      "logging_first_step": True, "eval_on_start": True}, lambda c: c.logging_first_step and c.eval_on_start),
    ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 10, "save_steps": 20},
     lambda c: c.best_model_metric() == ("eval_loss", False)),
    ({"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "epoch",
      "metric_for_best_model": "rewards/accuracies"},
     lambda c: c.best_model_metric() == ("eval_rewards/accuracies", True)),
])
def test_trl_keys_take_their_meaning(kwargs, check):
    assert check(DPOConfig(**kwargs))


@pytest.mark.parametrize("kwargs,key,phrase", [
    ({"push_to_hub": True}, "push_to_hub", "nothing is pushed to a hub"),
    ({"hub_model_id": "me/model"}, "hub_model_id", "nothing is pushed"),
    ({"fsdp": "full_shard"}, "fsdp", "deepspeed.zero_stage 3"),
    ({"torch_compile": True}, "torch_compile", "eagerly"),
    ({"use_liger_kernel": True}, "use_liger_kernel", "chunked LM head"),
    ({"save_only_model": True}, "save_only_model", "resume is exact"),
    ({"deepspeed": "ds_config.json"}, "deepspeed", "derived from the config"),
    ({"padding_free": True, "prefix_sharing": "off"}, "padding_free", "prefix_sharing"),
    ({"train_sampling_strategy": "sequential"}, "train_sampling_strategy", "shuffled"),
    ({"optim": "paged_adamw_8bit"}, "optim", "bitsandbytes"),
    ({"optim": "adamm"}, "optim", "not an optimizer"),
    ({"optim": "adamw_torch", "optim_args": "momentum=0.9"}, "optim_args", "reads no optim_args"),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "lr_scheduler_type", "eval metrics"),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"min_lr": 0.0}}, "lr_scheduler_kwargs",
     "num_cycles"),
    ({"lr_scheduler_type": "cosine_with_min_lr"}, "lr_scheduler_kwargs", "exactly one of min_lr"),
    ({"load_best_model_at_end": True}, "load_best_model_at_end", "eval_strategy"),
    ({"load_best_model_at_end": True, "eval_strategy": "epoch"}, "load_best_model_at_end", "save_strategy"),
    ({"metric_for_best_model": "eval_rewards/acuracies"}, "metric_for_best_model",
     "did you mean rewards/accuracies"),
    ({"lora_r": 32}, "lora_r", "use_peft is false"),
    ({"lora_target_modules": ["q_proj"]}, "lora_target_modules", "use_peft"),
    ({"merge_adapter": True}, "merge_adapter", "use_peft"),
])
def test_what_dpo_ray_cannot_do_is_refused_with_the_reason(kwargs, key, phrase):
    found = problems(**kwargs)
    assert key in found and phrase in found[key], found


def test_peft_keys_at_their_defaults_need_no_use_peft():
    assert DPOConfig(lora_r=16, lora_alpha=32).lora_r == 16  # a dumped TRL ModelConfig carries these


def test_unknown_keys_get_a_suggestion():
    found = problems(ray={"num_worker": 2}, learnin_rate=1e-6, zero_stage=2, pading_free=True, betta=0.1,
                     colour="red")
    assert found["ray.num_worker"].endswith("did you mean ray.num_workers?")
    assert found["learnin_rate"].endswith("did you mean learning_rate?")
    assert found["zero_stage"].endswith("did you mean deepspeed.zero_stage?")
    assert found["pading_free"].endswith("did you mean padding_free?")
    assert found["betta"].endswith("did you mean beta?")
    assert "did you mean" not in found["colour"] and "unknown key" in found["colour"]


def test_trl_flags_on_the_command_line():
    cfg = parse(["--padding_free", "--push_to_hub", "false", "--optim", "sgd", "--optim_args", "momentum=0.9",
                 "--lr_scheduler_kwargs", '{"num_cycles": 1}', "--lr_scheduler_type", "cosine",
                 "--dataloader_num_workers", "4", "--logging_first_step"])
    assert cfg.prefix_sharing == "on" and cfg.optim == "sgd" and cfg.lr_scheduler_kwargs == {"num_cycles": 1}
    assert cfg.logging_first_step
    with pytest.raises(ConfigError, match="nothing is pushed"):
        parse(["--push_to_hub"])


# ------------------------------------------------------------------ the reference under PEFT

def test_peft_defaults_to_the_adapter_disabled_as_trl():
    cfg = DPOConfig(use_peft=True)
    assert cfg.reference.source == "adapter_off" and cfg.reference_source_defaulted
    assert "default under PEFT" in cfg.describe_reference()
    assert "source" not in cfg.model_dump(exclude_unset=True).get("reference", {})
    again = DPOConfig(**cfg.model_dump(mode="json"))  # what the workers rebuild
    assert again.reference.source == "adapter_off" and not again.reference_source_defaulted
    # a config rebuilt from what was given (a sweep trial without PEFT) resolves the default again for itself
    trial = DPOConfig(**{**cfg.model_dump(mode="json", exclude_unset=True), "use_peft": False})
    assert trial.reference.source == "auto" and trial.reference_source_defaulted
    # auto decided for one node: the run's copy says local, and still that the user gave no source
    decided = trial.resolve_auto_reference(nodes=1)
    assert decided.reference.source == "local" and decided.reference_source_defaulted
    assert trial.reference.source == "auto"  # a copy: the config itself is unchanged


@pytest.mark.parametrize("kwargs,source", [
    ({}, "auto"),  # actor or local, decided when Ray is up (tests/test_config.py)
    ({"use_peft": True, "reference": {"source": "actor"}}, "actor"),  # the pool, one key away
    ({"use_peft": True, "reference": {"model_name_or_path": "/ref"}}, "auto"),  # TRL: an explicit ref_model
    ({"use_peft": True, "ref_model_name_or_path": "/ref"}, "auto"),
    ({"use_peft": True, "reference_free": True}, "none"),
    ({"use_peft": True, "precompute_ref_log_probs": True}, "precomputed"),
    ({"use_peft": True, "sync_ref_model": True, "reference": {"source": "local"}}, "local"),
])
def test_the_reference_default_only_applies_when_nothing_is_said(kwargs, source):
    assert DPOConfig(**kwargs).reference.source == source


def test_an_existing_adapter_defaults_to_a_frozen_copy_named_ref(tmp_path):
    """TRL 1.x with a PeftModel and no ref_model adds a frozen copy of the adapter named "ref"."""
    (tmp_path / "adapter_config.json").write_text("{}")
    cfg = DPOConfig(peft_adapter_path=str(tmp_path))
    assert ((cfg.reference.source, cfg.model_adapter_name, cfg.ref_adapter_name)
            == ("ref_adapter", "default", "ref"))
    assert "'ref'" in cfg.describe_reference()


def test_tr_dpo_under_peft_asks_for_a_model_reference():
    found = problems(use_peft=True, sync_ref_model=True)
    assert "default under PEFT" in found["sync_ref_model"] and "local" in found["sync_ref_model"]


def test_every_trl_field_type_is_accepted_with_its_meaning(tmp_path):
    """For each TRL DPOConfig / TrainingArguments key dpo_ray takes as it is ("same"), a value of every type
    TRL's annotation allows loads here too (a Literal's misspelt value aside: that is a value, not a type, and
    gets a did-you-mean). Caught before: warmup_steps / logging_steps / eval_steps / save_steps fractions,
    report_to and output_dir None, lr_scheduler_kwargs as a JSON string."""
    import typing

    trl = pytest.importorskip("trl", minversion="1.16")
    hints = typing.get_type_hints(trl.DPOConfig)
    samples = {float: 0.25, int: 2, bool: True, type(None): None}
    refused = []
    for f in dataclasses.fields(trl.DPOConfig):
        entry = TRL_KEYS.get(f.name)
        if f.name.startswith("_") or entry is None or entry.treatment != "same":
            continue
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        values = [samples[k] for k in kinds if k in samples]
        if str in kinds and dict in kinds:  # a dict key given as a JSON string
            values.append('{"num_cycles": 1}' if f.name == "lr_scheduler_kwargs" else "{}")
        for value in values:
            try:
                DPOConfig(**{f.name: value})
            except ConfigError as e:
                type_errors = [m for k, m in e.problems if k.split(".")[0] == f.name
                               and "Input should be a valid" in m]
                refused += [(f.name, value, m) for m in type_errors]
    assert not refused, refused


@pytest.mark.parametrize("kwargs,check", [
    ({"warmup_steps": 0.1, "max_steps": 50}, lambda c: c.warmup_steps == 0.1),
    ({"logging_steps": 0.25, "save_steps": 0.5, "eval_steps": 0.1}, lambda c: c.logging_steps == 0.25),
    ({"report_to": None, "output_dir": None}, lambda c: c.report_to == [] and c.output_dir == "dpo_output"),
    ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": '{"min_lr_rate": 0.1}'},
     lambda c: c.lr_scheduler_kwargs == {"min_lr_rate": 0.1}),
])
def test_transformers_5_spellings_load(kwargs, check):
    assert check(DPOConfig(**kwargs))


def test_fractions_of_the_run_mean_what_transformers_means():
    from dpo_ray.schedule import interval_steps, warmup_steps

    assert (warmup_steps(50, 0.0, 0.1) == 5 and warmup_steps(50, 0.2, 0) == 10
            and warmup_steps(50, 0.2, 3) == 3)
    assert interval_steps(0.25, 10) == 3 and interval_steps(0.001, 10) == 1 and interval_steps(4, 10) == 4
    assert "neither a whole number" in problems(save_steps=2.5)["save_steps"]


@pytest.mark.parametrize("kwargs,key,suggestion", [
    ({"loss_type": ["sigmod"]}, "loss_type", "'sigmoid'"),
    ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type", "'cosine'"),
    ({"eval_strategy": "step"}, "eval_strategy", "'steps'"),
    ({"ray": {"placement_strategy": "pack"}}, "ray.placement_strategy", "'PACK'"),
])
def test_misspelt_values_get_a_did_you_mean(kwargs, key, suggestion):
    assert f"did you mean {suggestion}?" in problems(**kwargs)[key]


def test_flow_style_dicts_on_the_command_line():
    """The YAML flow style the example files use ({CPU: 0.5}), and JSON, both as a flag's value."""
    assert parse(["--ray.resources_per_worker", "{CPU: 0.5}"]).ray.resources_per_worker == {"CPU": 0.5}
    assert parse(["--ray.resources_per_worker", '{"CPU": 0.5}']).ray.resources_per_worker == {"CPU": 0.5}
    with pytest.raises(ConfigError, match="expects a mapping"):
        parse(["--ray.resources_per_worker", "[1, 2]"])
