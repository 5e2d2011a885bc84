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


def test_validate_says_what_each_auto_setting_will_be(capsys, monkeypatch):
    """validate prints the config as written (auto stays auto) and, below it, what the run will use."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["validate", "--shared_dir", "/mnt/shared"]) == 0
    out = capsys.readouterr().out
    plan = out[out.index("# what the run will use"):out.index("# DeepSpeed config")]
    assert "source: auto" in out and "shared_dir: /mnt/shared" in out
    assert "reference: local = a frozen copy on each worker" in plan and "[a local Ray: one node]" in plan
    assert "workers: 2 × {'CPU': 0.5}" in plan and "length bucketing: off" in plan
    assert "prefix sharing: on where" in plan and "reference actors" not in plan
    # the bundled tiny model: 0.03 MiB of activations per token, so 1 GiB is ~39k tokens per micro-batch
    assert ("gradient checkpointing: auto: on for micro-batches whose activations pass 1 GiB (38,837+ tokens"
            in plan)
    # joining a cluster: a pool with GPUs of its own is an actor pool whatever the cluster's size
    assert main(["validate", "--ray.address", "10.0.0.1:6379", "--reference.num_gpus", "1",
                 "--ray.num_workers", "4", "--length_bucketing", "auto", "--prefix_sharing", "off"]) == 0
    plan = capsys.readouterr().out.split("# what the run will use")[1].split("# DeepSpeed config")[0]
    assert "reference: actor = a Ray actor pool" in plan and "[on the cluster at 10.0.0.1:6379]" in plan
    assert "reference actors: 1 × {'CPU': 0.5, 'GPU': 1.0}" in plan
    assert "workers: 4 × {'CPU': 0.5} or {'CPU': 2, 'GPU': 1}" in plan and "bucketed when" in plan
    assert "prefix sharing: off" in plan
    assert main(["validate", "--deepspeed.zero_stage", "3"]) == 0
    assert "gradient checkpointing: on for every micro-batch (auto under ZeRO-3" in capsys.readouterr().out
    # joining without a reason of its own for the pool: local on one node, the pool on several
    assert main(["validate", "--ray.address", "10.0.0.1:6379"]) == 0
    plan = capsys.readouterr().out.split("# what the run will use")[1]
    assert "reference: actor" in plan and "if it has several nodes" in plan and "reference: local" in plan


def test_unknown_flag_value_errors_name_the_key(capsys):
    assert main(["validate", "--ray.num_workers", "0", "--beta", "-1"]) == 2
    err = capsys.readouterr().err
    assert "ray.num_workers" in err and "beta" in err


def test_python_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "dpo_ray", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    for cmd in ("train", "sft", "validate", "demo", "inspect-data"):
        assert cmd in res.stdout


@pytest.mark.parametrize("command", ["train", "sft", "validate", "demo", "inspect-data", "sweep",
                                     "ref-store"])
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
