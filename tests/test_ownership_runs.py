"""A run touches only its own files, on real runs: a resume with a changed batch size, a checkpoint
emptied after it was written, a URI storage_path, a LoRA run then a full run into one folder, and two
`dpo-ray train` processes into one output_dir at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import make_rows as rows  # the synthetic pairs every run test uses

from dpo_ray import DPOConfig, DPOTrainer
from dpo_ray.errors import ConfigError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

BASE = dict(learning_rate=5e-3, beta=0.5, per_device_train_batch_size=4, logging_steps=1, max_length=64,
            report_to=[], seed=7, ray={"num_workers": 1}, reference={"source": "local"})


def run(out: Path, data, **overrides):
    cfg = DPOConfig(**{**BASE, **overrides, "output_dir": str(out)})
    return DPOTrainer(args=cfg, train_dataset=data).train()


@pytest.mark.timeout(900)
def test_uri_storage_manifests_and_a_resume_that_cannot_continue(ray_local, tmp_path, monkeypatch):
    from dpo_ray.train.checkpoint import checkpoint_problems

    monkeypatch.chdir(tmp_path)  # a URI made into a local path would land under the working directory
    storage = tmp_path / "bucket"
    data = rows(32)
    out = tmp_path / "out"
    run(out, data, max_steps=2, save_strategy="steps", save_steps=1, run_name="geo",
        ray={"num_workers": 1, "storage_path": f"file://{storage}"})
    # the URI went to Ray Train unchanged: the checkpoints are in the bucket, nothing under <cwd>/file:
    ckpts = sorted((storage / "geo").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-000001", "checkpoint-000002"], (
        list(storage.rglob("*"))[:20])
    assert not (tmp_path / "file:").exists() and not (out / "ray_results").exists()
    state = json.loads((ckpts[0] / "checkpoint_state.json").read_text())
    assert state["per_device_train_batch_size"] == 4 and state["gradient_accumulation_steps"] == 1
    assert state["world_size"] == 1 and state["data_seed"] == 7 and state["data_fingerprint"]
    assert (ckpts[0] / "manifest_rank0.json").exists() and checkpoint_problems(ckpts[0]) == ""

    # a DeepSpeed state file emptied after the write (a torn upload): the checkpoint is not complete
    torn = next((ckpts[1] / "engine").glob("*model_states.pt"))
    torn.write_bytes(b"")
    assert f"{torn.name} has 0 bytes" in checkpoint_problems(ckpts[1])
    with pytest.raises(FileNotFoundError, match="half-written"):
        run(out, data, max_steps=2, resume_from_checkpoint=str(ckpts[1]))

    # resuming with another batch size, gradient accumulation, seed or dataset: refused, naming the key
    for change, key in (({"per_device_train_batch_size": 2}, "per_device_train_batch_size"),
                        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
                        ({"data_seed": 8}, "data_seed"), ({"ray": {"num_workers": 2}}, "ray.num_workers")):
        with pytest.raises(ConfigError) as e:
            run(out, data, max_steps=3, resume_from_checkpoint=str(ckpts[0]), **change)
        assert [k for k, _ in e.value.problems] == [key] and "would skip other rows" in str(e.value)
    with pytest.raises(ConfigError) as e:
        run(out, rows(32, seed=1), max_steps=3, resume_from_checkpoint=str(ckpts[0]))
    assert [k for k, _ in e.value.problems] == ["dataset_name"] and "other data" in str(e.value)
    # the same settings resume
    resumed = run(out, data, max_steps=3, resume_from_checkpoint=str(ckpts[0]))
    assert [r["step"] for r in resumed.history if "loss" in r] == [1, 2, 3]


@pytest.mark.timeout(900)
def test_a_full_run_over_a_lora_run_replaces_the_whole_model(ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("the user's notes")
    data = rows(16)
    run(out, data, max_steps=1, save_strategy="no", use_peft=True, lora_target_modules=["q_proj", "v_proj"],
        merge_adapter=True)
    assert (out / "adapter_config.json").exists() and (out / "merged").is_dir()
    run(out, data, max_steps=1, save_strategy="no", overwrite_output_dir=True)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith("adapter_") or n == "merged"], names
    assert (out / "README.md").read_text() == "the user's notes"  # no model card over the user's file
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(model, "peft_config")


_TRAIN_CFG = """output_dir: {out}
max_steps: 500
save_strategy: "no"
report_to: []
ray:
  num_workers: 1
  num_cpus: 4
reference:
  source: local
"""


@pytest.mark.timeout(600)
def test_two_train_processes_into_one_output_dir(tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(_TRAIN_CFG.format(out=out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "dpo_ray", "train", "--config", str(cfg)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        lock = out / ".dpo_ray_run.lock"
        for _ in range(600):  # the lock is the run's first act; wait for it (no timing is asserted)
            if lock.exists() and f'"pid": {first.pid}' in lock.read_text():
                break
            assert first.poll() is None, "the first run ended before taking the lock"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "dpo_ray", "train", "--config", str(cfg)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert (f"is in use by another run (pid {first.pid} on host" in second.stderr
                and "started" in second.stderr)
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the run and the Ray it started
        first.wait()
    from dpo_ray.owned import RunLock

    with RunLock(out, "output_dir"):  # the killed run's lock is taken over
        pass
