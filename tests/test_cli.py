"""The CLI surface: validate's exit codes and messages, every loss reachable by name, docs in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpo_ray.cli import main
from dpo_ray.losses import LOSS_ALIASES, LOSSES

ROOT = Path(__file__).resolve().parents[1]


def test_validate_exo_pair_without_smoothing_exits_2_naming_the_key(capsys):
    assert main(["validate", "--loss_type", "exo_pair"]) == 2
    err = capsys.readouterr().err
    assert "label_smoothing" in err and "exo_pair" in err


@pytest.mark.parametrize("name", sorted(set(LOSSES) | set(LOSS_ALIASES)))
def test_every_loss_is_reachable_from_the_cli(name, capsys):
    extra = ["--label_smoothing", "0.001"] if name == "exo_pair" else []
    assert main(["validate", "--loss_type", name, *extra]) == 0
    assert "loss_type" in capsys.readouterr().out


def test_validate_prints_config_and_deepspeed_dict(capsys):
    assert main(["validate", "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5",
                 "--deepspeed.zero_stage", "2", "--ray.num_workers", "4",
                 "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"]) == 0
    out = capsys.readouterr().out
    assert '"train_batch_size": 24' in out and '"stage": 2' in out
    assert "- sft" in out


def test_unknown_flag_value_errors_name_the_key(capsys):
    assert main(["validate", "--ray.num_workers", "0", "--beta", "-1"]) == 2
    err = capsys.readouterr().err
    assert "ray.num_workers" in err and "beta" in err


def test_python_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "dpo_ray", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for cmd in ("train", "sft", "validate", "demo", "inspect-data"):
        assert cmd in res.stdout


@pytest.mark.parametrize("command", ["train", "sft", "validate", "demo", "inspect-data", "sweep", "ref-store"])
def test_every_command_prints_its_help(command, capsys):
    """--help of each command, as a user types it (a config description with a '%' once crashed argparse)."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--help" in out
    if command in ("train", "sft"):
        assert "--length_bucketing" in out and "10% of the pool" in out


def test_config_reference_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_config_doc import render

    assert (ROOT / "docs" / "config.md").read_text() == render(), \
        "docs/config.md is stale: run python scripts/gen_config_doc.py"
