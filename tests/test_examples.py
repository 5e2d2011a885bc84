"""examples/: every YAML validates through the CLI, each says what it promises, the Python driver runs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
YAMLS = sorted(EXAMPLES.glob("*.yaml"))
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_the_examples_exist():
    names = {p.name for p in YAMLS}
    assert ({"tiny_demo.yaml", "qwen2_0.5b_ultrafeedback.yaml", "lora.yaml", "separate_reference_pool.yaml"}
            <= names)
    assert (EXAMPLES / "train_dpo.py").exists()


# Recipes whose model is not on this machine (a GPU cluster, a hub download, the tiny VLM its header builds
# first): validated without path checks here;
# tests/test_docs_commands.py runs vlm_tiny.yaml after building it.
ELSEWHERE = {"qwen2_0.5b_ultrafeedback.yaml", "separate_reference_pool.yaml", "vlm_tiny.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_validates_through_the_cli(path):
    extra = ["--no_path_check"] if path.name in ELSEWHERE else []
    proc = subprocess.run([sys.executable, "-m", "dpo_ray", "validate", "--config", str(path), *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"dpo-ray validate --config {path.name} exited {proc.returncode}:\n{proc.stderr}")
    assert "# DeepSpeed config" in proc.stdout


@pytest.mark.parametrize("name", sorted(ELSEWHERE))
def test_validate_names_a_model_directory_this_machine_lacks(name):
    proc = subprocess.run([sys.executable, "-m", "dpo_ray", "validate", "--config", str(EXAMPLES / name)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 2 and "model_name_or_path" in proc.stderr
            and "is not a directory" in proc.stderr)


def test_tiny_demo_is_cpu_friendly():
    cfg = load_config(EXAMPLES / "tiny_demo.yaml")
    assert cfg.model_name_or_path is None and cfg.dataset_name is None  # bundled model and data
    assert cfg.ray.num_workers == 2 and cfg.ray.use_gpu is False
    # fractional CPUs: 2 workers + reference actor + Ray Data must
    # fit a 2-core box (else Ray Data starves and the run hangs)
    assert cfg.ray.resources_per_worker.get("CPU", 1) <= 0.5
    assert cfg.reference.source in ("local", "actor")
    if cfg.reference.source == "actor":
        assert cfg.reference.num_cpus <= 0.5 and cfg.reference.num_gpus == 0
    assert 0 < cfg.max_steps <= 50 and cfg.per_device_train_batch_size <= 16
    assert cfg.bf16 is False and not cfg.gradient_checkpointing


def test_qwen_recipe_follows_the_trl_doc():
    cfg = load_config(EXAMPLES / "qwen2_0.5b_ultrafeedback.yaml")
    assert cfg.model_name_or_path.endswith("Qwen2-0.5B-Instruct")
    assert cfg.dataset_name.endswith("ultrafeedback_binarized")
    assert cfg.learning_rate == 5e-7 and cfg.logging_steps == 25 and cfg.num_train_epochs == 1
    assert cfg.bf16 and cfg.gradient_checkpointing and cfg.ray.use_gpu
    assert cfg.deepspeed.zero_stage in (2, 3)
    text = (EXAMPLES / "qwen2_0.5b_ultrafeedback.yaml").read_text().lower()
    assert "hub" in text and "local" in text  # says it needs the hub or a local copy


def test_lora_uses_the_adapter_off_reference():
    cfg = load_config(EXAMPLES / "lora.yaml")
    assert cfg.use_peft and cfg.lora_target_modules and cfg.lora_r > 0 and 0 <= cfg.lora_dropout < 1
    assert cfg.reference.source == "adapter_off"


def test_separate_reference_pool_targets_custom_resources():
    cfg = load_config(EXAMPLES / "separate_reference_pool.yaml")
    assert cfg.ray.use_gpu is True
    assert (cfg.ray.resources_per_worker.get("policy_gpu") == 1
            and cfg.ray.resources_per_worker.get("CPU") == 4)
    assert cfg.reference.source == "actor" and cfg.reference.num_actors == 2
    assert cfg.reference.num_gpus == 1 and cfg.reference.resources == {"reference_gpu": 1}


def test_train_dpo_py_has_the_trl_quick_start_shape():
    tree = ast.parse((EXAMPLES / "train_dpo.py").read_text())
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {("dpo_ray", "DPOConfig"), ("dpo_ray", "DPOTrainer")} <= imports
    assert not any(mod and mod.startswith("trl") for mod, _ in imports)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "DPOTrainer"]
    assert (calls
            and {"model", "args", "train_dataset", "processing_class"} <= {k.arg for k in calls[0].keywords})
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_dpo.py"), "--help"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
