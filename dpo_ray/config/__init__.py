"""DPOConfig: one validated configuration for the whole run, in four parts: ``schema`` (the fields),
``rules`` (every cross-field rule and the policies that resolve a setting from others), ``loading`` (YAML and
flags), ``deepspeed`` (the DeepSpeed dict); ``messages`` words the errors. Import from here."""

from dpo_ray.config.deepspeed import deepspeed_config
from dpo_ray.config.loading import add_config_arguments, load_config, overrides_from_args
from dpo_ray.config.messages import value_did_you_mean
from dpo_ray.config.rules import METRIC_NAMES, PEFT_KEYS, choose_reference_source
from dpo_ray.config.schema import (
    REDACTED,
    DeepSpeedConfig,
    DPOConfig,
    InspectConfig,
    IterateConfig,
    RayConfig,
    ReferenceConfig,
    ReferenceSource,
    TruncationMode,
    _Section,
    flag_fields,
    redact_secrets,
)
from dpo_ray.errors import ConfigError

__all__ = ["METRIC_NAMES", "PEFT_KEYS", "REDACTED", "ConfigError", "DPOConfig", "DeepSpeedConfig",
           "InspectConfig", "IterateConfig", "RayConfig", "ReferenceConfig", "ReferenceSource",
           "TruncationMode", "_Section", "add_config_arguments", "choose_reference_source",
           "deepspeed_config", "flag_fields", "load_config", "overrides_from_args", "redact_secrets",
           "value_did_you_mean"]
