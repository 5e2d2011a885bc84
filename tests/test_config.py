"""DPOConfig validation, YAML/flag loading and the derived DeepSpeed dict."""

from __future__ import annotations

import argparse

import pytest
import yaml

from dpo_ray.config import (
    ConfigError,
    DPOConfig,
    add_config_arguments,
    deepspeed_config,
    load_config,
    overrides_from_args,
)
from dpo_ray.losses import LOSS_ALIASES, LOSSES


def problems(**kwargs) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        DPOConfig(**kwargs)
    return info.value.problems


def keys(**kwargs) -> list[str]:
    return [key for key, _ in problems(**kwargs)]


# ------------------------------------------------------------------ cross-field rules

# (config, the key the error must name, a phrase the message must contain)
RULES = [
    ({"loss_type": "exo_pair"}, "label_smoothing", "label_smoothing > 0"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing", "< 0.5"),
    ({"loss_type": ["sigmoid", "robust"], "label_smoothing": 0.7}, "label_smoothing", "robust"),
    ({"loss_type": "aot", "f_divergence_type": "js_divergence"}, "f_divergence_type", "aot"),
    ({"loss_type": ["ipo", "nca_pair"], "f_divergence_type": "alpha_divergence"}, "f_divergence_type",
     "nca_pair"),
    ({"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, "f_divergence_type", "bco_pair"),
    ({"f_divergence_type": "hellinger"}, "f_divergence_type", "hellinger"),
    ({"loss_type": "aot", "use_weighting": True}, "use_weighting", "aot"),
    ({"loss_type": "aot_pair", "use_weighting": True}, "use_weighting", "aot"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights", "has 1 value"),
    ({"loss_weights": [1.0, 2.0]}, "loss_weights", "loss_type has 1"),
    ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "sync_ref_model", "precomputed"),
    ({"sync_ref_model": True, "reference": {"source": "none"}}, "sync_ref_model", "'none'"),
    ({"sync_ref_model": True, "use_peft": True, "reference": {"source": "actor"}}, "sync_ref_model", "PEFT"),
    # These validated, then raised KeyError at the first sync
    ({"sync_ref_model": True, "use_peft": True, "reference": {"source": "local", "model_name_or_path": "/m"}},
     "sync_ref_model", "reference.model_name_or_path is a plain model"),
    ({"sync_ref_model": True, "use_peft": True, "reference": {"source": "auto", "model_name_or_path": "/m"}},
     "sync_ref_model", "without the adapter's parameters"),
    ({"sync_ref_model": True, "use_peft": True, "reference": {"source": "local"},
      "deepspeed": {"zero_stage": 3}},
     "sync_ref_model", "under deepspeed.zero_stage 3"),
    ({"ld_alpha": 1.5}, "ld_alpha", "[0, 1]"),
    ({"ld_alpha": -0.1}, "ld_alpha", "[0, 1]"),
    ({"rpo_alpha": -1.0}, "rpo_alpha", ">= 0"),
    ({"loss_type": "nonsense"}, "loss_type", "not a known loss"),
    ({"loss_type": []}, "loss_type", "at least one"),
    ({"reference_free": True, "precompute_ref_log_probs": True}, "precompute_ref_log_probs",
     "reference-free"),
    ({"reference": {"source": "adapter_off"}}, "reference.source", "use_peft"),
    ({"use_peft": True, "reference": {"source": "ref_adapter"}}, "ref_adapter_name", "model_adapter_name"),
    ({"bf16": True, "fp16": True}, "fp16", "choose one"),
    ({"deepspeed": {"offload_param": True, "zero_stage": 2}}, "deepspeed.offload_param", "zero_stage 3"),
    ({"deepspeed": {"offload_optimizer": True}}, "deepspeed.offload_optimizer", "zero_stage >= 1"),
    ({"load_in_4bit": True}, "load_in_4bit", "use_peft"),
    ({"max_steps": 0}, "max_steps", "positive"),
]


@pytest.mark.parametrize("kwargs,key,phrase", RULES, ids=[f"{r[1]}-{i}" for i, r in enumerate(RULES)])
def test_cross_field_rule_names_the_key(kwargs, key, phrase):
    found = problems(**kwargs)
    assert [k for k, _ in found] == [key], found
    assert phrase in found[0][1]
    assert key in str(ConfigError(found))


def test_exo_pair_and_robust_accept_their_ranges():
    assert DPOConfig(loss_type="exo_pair", label_smoothing=1e-3).loss_type == ["exo_pair"]
    assert DPOConfig(loss_type="robust", label_smoothing=0.49).label_smoothing == 0.49
    for name, spec in LOSSES.items():
        if spec.takes_f_divergence:  # f-divergences are fine on these losses, also next to sft
            DPOConfig(loss_type=[name, "sft"], f_divergence_type="alpha_divergence", label_smoothing=0.01)


def test_the_losses_that_take_an_f_divergence_are_trls():
    """Exactly TRL 1.x's set (ipo and sigmoid_norm length-average the scores)."""
    assert {n for n, s in LOSSES.items() if s.takes_f_divergence} == {
        "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    assert (DPOConfig(loss_type=["ipo", "sigmoid_norm"], f_divergence_type="forward_kl").loss_type
            == ["ipo", "sigmoid_norm"])
    assert DPOConfig().f_alpha_divergence_coef == 0.5  # TRL 1.x's default


def test_unknown_keys_top_level_and_in_sections():
    found = problems(betta=0.1, ray={"num_worker": 2}, deepspeed={"stage": 2})
    assert {k for k, _ in found} == {"betta", "ray.num_worker", "deepspeed.stage"}
    assert all("unknown key" in msg for _, msg in found)


def test_field_errors_name_the_key_and_value():
    found = problems(beta=0, ray={"num_workers": 0}, truncation_mode="middle")
    assert {k for k, _ in found} == {"beta", "ray.num_workers", "truncation_mode"}
    assert "(got 0)" in dict(found)["beta"]


def test_several_problems_reported_together():
    """Field errors and cross-field rules land in one ConfigError (the rules run on the valid fields)."""
    found = problems(beta=-1, lerning_rate=1e-5, loss_type=["exo_pair", "sigmoid"], loss_weights=[1.0],
                     ld_alpha=3.0, ray={"num_workers": 0, "colour": "red"},
                     sync_ref_model=True, precompute_ref_log_probs=True)
    assert {k for k, _ in found} == {"beta", "lerning_rate", "ray.num_workers", "ray.colour",
                                     "label_smoothing", "loss_weights", "ld_alpha", "sync_ref_model"}


def test_a_rule_is_not_repeated_for_a_key_with_a_field_error():
    found = problems(loss_type="exo_pair", label_smoothing=-1)
    assert [k for k, _ in found] == ["label_smoothing"]
    assert "greater than or equal to 0" in found[0][1]


@pytest.mark.parametrize("name", sorted(set(LOSSES) | set(LOSS_ALIASES)))
def test_every_registered_loss_name_is_accepted(name):
    cfg = DPOConfig(loss_type=name, label_smoothing=0.001)
    assert cfg.loss_type == [LOSS_ALIASES.get(name, name)]
    assert cfg.loss_type[0] in LOSSES


def test_trl_reference_spellings_resolve_into_the_section():
    assert DPOConfig(reference_free=True).reference.source == "none"
    assert DPOConfig(precompute_ref_log_probs=True).reference.source == "precomputed"
    assert DPOConfig(ref_model_name_or_path="/m").reference.model_name_or_path == "/m"
    assert not DPOConfig(loss_type="sft").needs_reference
    assert DPOConfig().needs_reference and not DPOConfig(reference_free=True).needs_reference


def test_yaml_round_trip():
    cfg = DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], reference_free=True,
                    ray={"num_workers": 3, "resources_per_worker": {"CPU": 0.5}})
    assert DPOConfig(**yaml.safe_load(cfg.to_yaml())) == cfg


# ------------------------------------------------------------------ YAML file + flags

def parse(argv: list[str]) -> DPOConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    ns = parser.parse_args(argv)
    return load_config(ns.config, overrides_from_args(ns))


def test_yaml_and_flags_resolve_to_the_same_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "beta: 0.25\n"
        "loss_type: [sigmoid, sft]\n"
        "loss_weights: [1.0, 0.5]\n"
        "bf16: false\n"
        "gradient_checkpointing: true\n"
        "max_length: null\n"
        "per_device_train_batch_size: 4\n"
        "ray: {num_workers: 3, resources_per_worker: {CPU: 0.5}}\n"
        "deepspeed: {zero_stage: 2}\n"
    )
    from_file = parse(["--config", str(path)])
    from_flags = parse(["--beta", "0.25", "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5",
                        "--bf16", "false", "--gradient_checkpointing", "--max_length", "none",
                        "--per_device_train_batch_size", "4", "--ray.num_workers", "3",
                        "--ray.resources_per_worker", '{"CPU": 0.5}', "--deepspeed.zero_stage", "2"])
    assert from_file == from_flags == load_config(path)
    assert (from_flags.loss_weights == [1.0, 0.5] and from_flags.bf16 is False
            and from_flags.max_length is None)
    assert from_flags.ray.resources_per_worker == {"CPU": 0.5}


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.25\nlearning_rate: 5.0e-7\nray: {num_workers: 3, num_cpus: 8}\n")
    cfg = parse(["--config", str(path), "--beta", "0.5", "--ray.num_workers", "1"])
    assert cfg.beta == 0.5 and cfg.learning_rate == 5e-7
    assert cfg.ray.num_workers == 1 and cfg.ray.num_cpus == 8  # the section merges key by key


@pytest.mark.parametrize("argv,expected", [([], None), (["--bf16"], True), (["--bf16", "true"], True),
                                           (["--bf16", "false"], False), (["--bf16", "none"], None)])
def test_bool_flags(argv, expected):
    assert parse(argv).bf16 is expected


def test_bad_flag_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="ray.resources_per_worker"):
        parse(["--ray.resources_per_worker", "CPU=1"])
    with pytest.raises(ConfigError, match="beta"):
        parse(["--beta", "big"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


# ------------------------------------------------------------------ the DeepSpeed dict

def test_deepspeed_batch_arithmetic():
    cfg = DPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3)
    ds = deepspeed_config(cfg, world_size=2, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 == cfg.global_batch_size(2)
    assert ds["zero_optimization"] == {"stage": 0}
    assert "bf16" not in ds and "fp16" not in ds  # fp32 on CPU by default


def test_deepspeed_zero3_offload_precision_and_overrides():
    cfg = DPOConfig(deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_param": True,
                               "overrides": {"zero_optimization": {"reduce_bucket_size": 5e7},
                                             "train_micro_batch_size_per_gpu": 8}})
    ds = deepspeed_config(cfg, world_size=4, on_gpu=True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["reduce_bucket_size"] == 5e7 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert ds["bf16"] == {"enabled": True}  # auto precision: bf16 on GPU


def test_fp16_on_gpu_is_not_silently_replaced_by_bf16():
    ds = deepspeed_config(DPOConfig(fp16=True), world_size=1, on_gpu=True)
    assert ds["fp16"]["enabled"] and "bf16" not in ds
    ds = deepspeed_config(DPOConfig(bf16=True), world_size=1, on_gpu=False)
    assert ds["bf16"] == {"enabled": True}


@pytest.mark.parametrize("overrides, nodes, expected", [
    ({}, 1, "local"),  # one node the workers fill: a frozen copy on each worker
    ({}, 3, "actor"),  # a cluster: the pool in its own process
    ({"reference": {"num_gpus": 0.5}}, 1, "actor"),
    ({"reference": {"resources": {"ref_pool": 1}}}, 1, "actor"),
    ({"reference": {"node_label": {"pool": "reference"}}}, 1, "actor"),
    ({"reference": {"source": "auto"}, "use_peft": True, "sync_ref_model": True}, 3, "local"),
])
def test_reference_source_auto_is_decided_by_the_cluster(overrides, nodes, expected):
    cfg = DPOConfig(**overrides)
    assert cfg.reference.source == "auto"
    resolved = cfg.resolve_auto_reference(nodes=nodes)
    assert resolved.reference.source == expected and cfg.reference.source == "auto"
    header = resolved.describe_reference()
    assert header.startswith(f"reference: {expected} = ") and "reference.source auto: " in header
    # the decision travels with the config to the workers (pickled) and is final there
    import pickle

    again = pickle.loads(pickle.dumps(resolved))
    assert again.reference.source == expected and again.describe_reference() == header
    assert resolved.resolve_auto_reference(nodes=1) is resolved


def test_explicit_and_peft_sources_are_not_touched_by_auto():
    assert (DPOConfig(reference={"source": "actor"}).resolve_auto_reference(nodes=1).reference.source
            == "actor")
    assert DPOConfig(use_peft=True).resolve_auto_reference(nodes=1).reference.source == "adapter_off"


def test_tr_dpo_with_peft_and_an_in_memory_reference_model_is_refused_before_training(tmp_path):
    # Validated, then KeyError at the first sync (the plain reference has no adapter parameters)
    from torch import nn

    from dpo_ray import DPOTrainer

    cfg = DPOConfig(output_dir=str(tmp_path), use_peft=True, sync_ref_model=True,
                    reference={"source": "local"})
    with pytest.raises(ConfigError, match=r"sync_ref_model.*a separate ref_model= has no adapter parameters"):
        DPOTrainer(ref_model=nn.Linear(2, 2), args=cfg)


def test_callbacks_are_checked_when_the_trainer_is_built(tmp_path):
    """A callback that is not a dpo_ray.Callback, a transformers TrainerCallback, or one that cannot travel to
    the workers is refused at DPOTrainer(), naming its index and the fix; a good one is kept."""
    import threading

    from transformers import TrainerCallback

    from dpo_ray import Callback, DPOTrainer

    class Holds(Callback):
        def __init__(self):
            self.lock = threading.Lock()  # cannot be pickled

    cfg = DPOConfig(output_dir=str(tmp_path))
    with pytest.raises(TypeError, match=r"callbacks\[1\] is a object, not a dpo_ray.Callback"):
        DPOTrainer(args=cfg, callbacks=[Callback(), object()])
    with pytest.raises(TypeError, match=r"callbacks\[0\].*TrainerCallback.*port it to dpo_ray.Callback"):
        DPOTrainer(args=cfg, callbacks=[TrainerCallback()])
    with pytest.raises(TypeError,
                       match=r"callbacks\[0\] \(Holds\) cannot be pickled to the training workers"):
        DPOTrainer(args=cfg, callbacks=[Holds()])
    assert len(DPOTrainer(args=cfg, callbacks=[Callback()]).callbacks) == 1


def test_the_data_order_seed_is_data_seed_else_seed():
    """One home for transformers' fallback (data order, prompt groups' pairing, resume keys): 0 is a seed
    too."""
    assert DPOConfig(seed=7).data_order_seed == 7
    assert DPOConfig(seed=7, data_seed=0).data_order_seed == 0


def test_the_nested_dict_helpers_merge_without_changing_their_inputs():
    from dpo_ray.dicts import merged, nest, set_dotted

    base = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    extra = {"a": {"c": {"d": 20, "f": 4}}, "e": {"g": 5}}
    assert merged(base, extra) == {"a": {"b": 1, "c": {"d": 20, "f": 4}}, "e": {"g": 5}}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": 3} and extra["a"]["c"] == {"d": 20, "f": 4}
    assert nest({"reference.source": "actor", "beta": 0.1, "reference.num_actors": 2}) == {
        "reference": {"source": "actor", "num_actors": 2}, "beta": 0.1}
    d: dict = {}
    set_dotted(d, "x.y.z", 1)
    assert d == {"x": {"y": {"z": 1}}}
    # the DeepSpeed dict takes the overrides last, nested keys merged into the built sections
    from dpo_ray.config import deepspeed_config

    cfg = DPOConfig(deepspeed={"overrides": {"zero_optimization": {"reduce_bucket_size": 123}}})
    ds = deepspeed_config(cfg, world_size=2, on_gpu=False)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123 and "stage" in ds["zero_optimization"]
