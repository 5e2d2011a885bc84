"""bench/gpu_check.py's dry mode (what runs on a GPU machine, rehearsed on the CPU so it cannot rot): a part
of both stages, with no Ray (the tests stage's pure-torch tests, the throughput stage's TRL configuration);
the whole dry run is ``python bench/gpu_check.py --dry`` (docs/BENCHMARKS.md)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_gpu_check_dry_runs_both_stages_and_writes_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry", "--tests_k",
                        "bf16 or nccl", "--configs", "trl", "--steps", "3", "--workdir",
                        str(tmp_path / "work"), "--out", str(out)],
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


# ------------------------------------------------------------------------------------- a fresh machine

def _fresh_env(home: Path) -> dict[str, str]:
    """What a fresh login on a new box has: a PATH, an empty HOME; no torch extensions built, no caches."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the build ended (exit {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _kill_group(proc: subprocess.Popen) -> None:
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_make_gpu_check_from_a_fresh_home_after_killed_builds(tmp_path):
    """The command a first GPU run uses, from scratch: a fresh HOME (no DeepSpeed op built, no cache), a
    minimal environment (PATH, HOME). Before it, two first builds are killed half-way: DeepSpeed's own
    in-place build (it leaves torch's ``lock`` file behind, on which every later load would wait for ever) and
    gpu_check's atomic one. ``make gpu-check`` then repairs the op, builds it once, and its ZeRO tests pass
    (the tests that need the op; the throughput stage for TRL only, to keep CI short)."""
    from dpo_ray.extensions import op_state

    home = tmp_path / "home"
    home.mkdir()
    env = _fresh_env(home)
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]  # dpo_ray's per-venv extensions dir under HOME
    ext = home / ".cache" / "dpo_ray" / "torch_extensions" / key
    op = ext / "deepspeed_shm_comm"
    load = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"

    # 1. DeepSpeed's in-place JIT build, killed while compiling
    p = subprocess.Popen([sys.executable, "-c", load], env={**env, "DS_ACCELERATOR": "cpu",
                         "TORCH_EXTENSIONS_DIR": str(ext)}, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(op / "lock", p)
    _kill_group(p)
    assert op_state(op, "deepspeed_shm_comm") == "broken", "a killed build leaves its lock (the trap)"

    # 2. gpu_check's own build (bench/ds_ops.py, into a temp dir), killed while compiling
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "ds_ops.py")],
                         env={**env, "DS_ACCELERATOR": "cpu"}, cwd=ROOT, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(ext / f".build-deepspeed_shm_comm-{p.pid}" / "deepspeed_shm_comm" / "lock", p)
    _kill_group(p)
    assert op_state(op, "deepspeed_shm_comm") == "broken", "the killed atomic build did not touch the target"

    # 3. make gpu-check, exactly as a first run types it (with a narrower selection)
    out = tmp_path / "gpu_check.json"
    args = f"--tests_k zero_stage --configs trl --steps 2 --workdir {tmp_path / 'work'} --out {out}"
    r = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_ARGS={args}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert f"DeepSpeed op deepspeed_shm_comm: built in {ext}" in r.stdout and "was broken" in r.stdout
    res = json.loads(out.read_text())
    tests = {t["test"]: t["outcome"] for t in res["stages"]["tests"]["tests"]}
    assert tests == {"test_zero_stage_trains_on_the_device[2]": "passed",
                     "test_zero_stage_trains_on_the_device[3]": "passed"}, tests
    assert op_state(op, "deepspeed_shm_comm") == "ready"
    assert sorted(x.name for x in ext.iterdir()) == [".dpo_ray_ops.lock", "deepspeed_shm_comm"], (
        "no leftovers")
    # a second run finds the op built and loads it (no rebuild)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "ds_ops.py")],
                       env={**env, "DS_ACCELERATOR": "cpu"},
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "'built': False" in r.stdout, r.stdout + r.stderr
