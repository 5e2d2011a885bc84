"""bench/gpu_check.py's dry mode (what runs on a GPU machine, rehearsed on the CPU so it cannot rot): a part
of both stages, with no Ray (the tests stage's pure-torch tests, the throughput stage's TRL configuration);
the whole dry run is ``python bench/gpu_check.py --dry`` (docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_gpu_check_dry_runs_both_stages_and_writes_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry", "--tests_k", "bf16 or nccl",
                        "--configs", "trl", "--steps", "3", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "DRY RUN on the CPU" in r.stdout and "not GPU numbers" in r.stdout
    res = json.loads(out.read_text())
    assert res["dry"] is True and res["ok"] is True
    tests = {t["test"]: t["outcome"] for t in res["stages"]["tests"]["tests"]}
    assert tests == {"test_bf16_forward_backward_matches_fp32": "passed", "test_nccl_collectives": "passed"}
    thr = res["stages"]["throughput"]
    trl = thr["summary"]["trl"]
    assert trl["pairs_s"] > 0 and trl["steps"] == 3 and trl["mfu"] is None  # no peak for a CPU: MFU n/a
    assert thr["tokens_per_pair"] > 0 and thr["n_flop_params"] > 0


def test_peak_table_prefers_the_most_specific_name():
    from gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("Some Future GPU") is None


@pytest.mark.parametrize("name,ref,share", [("dpo_ray", "actor", 0.5), ("dpo_ray+local", "local", None),
                                             ("dpo_ray+local+noshare", "local", None)])
def test_configurations_fit_one_gpu(name, ref, share):
    """On one GPU the actor and the policy each take half of it (a whole GPU each with two or more)."""
    from gpu_check import dpo_ray_extra

    extra = dpo_ray_extra(name, gpus=1, dry=False)
    assert extra["reference"]["source"] == ref
    if share is not None:
        assert extra["reference"]["num_gpus"] + extra["ray"]["resources_per_worker"]["GPU"] <= 1
        assert dpo_ray_extra(name, gpus=2, dry=False)["reference"]["num_gpus"] == 1
    assert ("prefix_sharing" in extra) == name.endswith("noshare")
