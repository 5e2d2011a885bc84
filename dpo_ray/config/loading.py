"""Loading a DPOConfig: a YAML file plus TRL-style command-line flags (``--key value``, sections as
``--ray.num_workers``)."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dpo_ray.config.schema import DPOConfig, flag_fields
from dpo_ray.dicts import set_dotted
from dpo_ray.errors import ConfigError
from dpo_ray.trl_keys import TRL_KEYS


def _is_list(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))
    return origin is list


def _is_bool(annotation) -> bool:
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return bool in typing.get_args(annotation)
    return False


def _is_dict(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_dict(a) for a in typing.get_args(annotation) if a is not type(None))
    return origin is dict


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with DPOConfig keys; flags override it")
    group = parser.add_argument_group("DPOConfig (TRL spelling; sections as --ray.num_workers)")
    for flag, (key, ann, help_) in flag_fields().items():
        # argparse %-formats help
        kwargs: dict[str, Any] = {"dest": "cfg::" + key, "default": argparse.SUPPRESS,
                                  "help": help_.replace("%", "%%") if help_ else None}
        if _is_list(ann):
            kwargs["nargs"] = "+"
        elif _is_bool(ann):
            kwargs.update(nargs="?", const="true")
        group.add_argument(f"--{flag}", **kwargs)
    # TRL / TrainingArguments flags dpo_ray translates or refuses with a reason (docs/config.md lists them);
    # hidden from --help, values parsed as YAML ("true", "4", '{"a": 1}')
    for key in TRL_KEYS:
        if key not in DPOConfig.model_fields:
            group.add_argument(f"--{key}", dest="cfg::" + key, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS, nargs="?", const="true")


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    fields = flag_fields()
    out: dict[str, Any] = {}
    for dest, value in vars(ns).items():
        if not dest.startswith("cfg::"):
            continue
        key = dest[5:]
        if key not in fields:  # a TRL-only key: dpo_ray.trl_keys.translate reads its YAML value
            out[key] = value
            continue
        if _is_dict(fields[key][1]) and isinstance(value, str):
            # YAML's flow style, as the example files write it ({CPU: 0.5}); JSON is a part of YAML
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                value = None
            if not isinstance(value, dict):
                raise ConfigError([(key, f"expects a mapping, e.g. '{{CPU: 0.5}}' or '{{\"CPU\": 0.5}}' "
                                         f"(got {vars(ns)[dest]!r})")]) from None
        if isinstance(value, str) and value.lower() in ("none", "null") and key not in ("loss_type",):
            value = None
        set_dotted(out, key, value)
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DPOConfig:
    """YAML file (optional) + overrides (flags win) -> validated DPOConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError([("config", f"file {path} not found")]) from None
        except yaml.YAMLError as e:
            raise ConfigError([("config", f"{path} is not valid YAML: {e}")]) from None
        if not isinstance(loaded, dict):
            raise ConfigError([("config", f"{path} must hold a mapping of DPOConfig keys")])
        data = loaded
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return DPOConfig(**data)
