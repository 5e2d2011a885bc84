"""`ray job submit` against a real Ray head: the path docs/deploy.md gives for an existing cluster.

Starts a private Ray head (own temp dir, every port picked free, dashboard on 127.0.0.1 only), submits
`python -m dpo_ray train --config examples/tiny_demo.yaml` through the Jobs API with --working-dir and
--runtime-env-json, waits for SUCCEEDED, and loads the saved model. Teardown stops only what this test
started: the `ray start --block` process group, then every process carrying this test's marker variable
(workers and the job's driver inherit the head's environment). Never `ray stop`: it would take down
every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
MARKER = "DPO_RAY_JOB_SUBMIT_TEST"
STARTUP_TIMEOUT_S = 120
JOB_TIMEOUT_S = 900

pytestmark = [pytest.mark.slow, pytest.mark.timeout(JOB_TIMEOUT_S + 300)]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _marked_pids(token: str) -> list[int]:
    """Processes of this user whose environment carries MARKER=token: the ones this test started."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
    return found


def _terminate(pids: list[int], grace_s: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class PrivateRayHead:
    """`ray start --head --block` in its own session, torn down by process group and marker."""

    def __init__(self, num_cpus: int = 8):
        # A short temp dir: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="dporay-", dir="/tmp")
        self.token = uuid.uuid4().hex
        # Ray 2.60 turns on token auth when ~/.ray/auth_token exists; give this head a token of its own
        # (inherited by the CLI calls below, the workers and the job's driver) instead of the user's.
        self.auth_token = uuid.uuid4().hex + uuid.uuid4().hex
        # Ray Client is not started (it needs ray[client]); every other port is picked free so this head
        # never collides with another Ray on the machine (their defaults, e.g. the agent's 52365).
        (self.gcs, self.dashboard, self.node_manager, self.object_manager, self.agent_http,
         self.agent_grpc, self.metrics, self.runtime_env_agent) = _free_ports(8)
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({
            MARKER: self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token,
            # `python` inside a job resolves through the head's PATH: put this interpreter's bin first.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # Offline, set on the head rather than in the job's runtime_env: dpo_ray's driver sets these
            # in its own ray.init runtime_env, and Ray refuses to merge two that set the same variable.
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        })
        cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--port", str(self.gcs),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard),
               "--node-manager-port", str(self.node_manager), "--object-manager-port",
               str(self.object_manager), "--dashboard-agent-listen-port", str(self.agent_http),
               "--dashboard-agent-grpc-port", str(self.agent_grpc), "--metrics-export-port",
               str(self.metrics), "--runtime-env-agent-port", str(self.runtime_env_agent),
               "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(1 << 30),
               "--temp-dir", self.temp_dir]
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.start_log()}")
            request = urllib.request.Request(f"{self.address}/api/jobs/",
                                             headers={"Authorization": f"Bearer {self.auth_token}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray dashboard not up after {STARTUP_TIMEOUT_S}s:\n{self.start_log()}")

    def start_log(self) -> str:
        self.log.flush()
        return (Path(self.temp_dir) / "ray_start.log").read_text()[-4000:]

    def stop(self) -> None:
        # 1. the process group `ray start` leads (gcs, raylet, dashboard, ... started in its session)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)  # `ray start --block` rarely exits on TERM alone
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        # 2. anything of ours that left the group (workers, the job's driver in its own session)
        _terminate(_marked_pids(self.token))
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _job_api(head: PrivateRayHead, path: str) -> dict:
    """GET the Jobs REST API of this head (the CLI's status output is prose; the API is JSON)."""
    request = urllib.request.Request(f"{head.address}/api/jobs/{path}",
                                     headers={"Authorization": f"Bearer {head.auth_token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _wait_for_job(head: PrivateRayHead, job_id: str, timeout_s: float) -> str:
    """Poll the job until it ends; stop it (on this head only) if it outlives timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _job_api(head, job_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)  # a job ends within a second of its last step; a slower poll only adds to the wait
    _ray("job", "stop", "--address", head.address, job_id, env=head.env)
    return f"TIMEOUT after {timeout_s}s"


def _job_logs(head: PrivateRayHead, job_id: str) -> str:
    return _job_api(head, f"{job_id}/logs").get("logs", "")


@pytest.fixture(scope="module")
def ray_head():
    # The Jobs API is served by the dashboard, which needs ray[default] (ray[train,data] lacks aiohttp & co).
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        pytest.skip(
            f"`ray job submit` needs the Ray dashboard: pip install 'ray[default]==2.60.0' ({missing})")
    head = PrivateRayHead()
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


RUNTIME_ENV = {
    # Only variables dpo_ray's driver does not set itself (see deploy/submit.sh).
    "env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    "excludes": [".git", ".venv", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                 "demo_output", "dpo_output", "*_output", "bench/results", "*.safetensors", "*.bin"],
}


def test_ray_job_submit_runs_tiny_demo(ray_head, tmp_path):
    env = ray_head.env

    # 1. What `python` is inside a job on this head: this interpreter, with dpo_ray importable.
    probe_id = f"probe-{uuid.uuid4().hex[:8]}"
    probe = _ray("job", "submit", "--address", ray_head.address, "--submission-id", probe_id,
                 "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
                 "python", "-c", "import sys, dpo_ray; print('PROBE', sys.prefix)", env=env, timeout=300)
    assert probe.returncode == 0, f"probe job failed:\n{probe.stdout[-3000:]}\n{probe.stderr[-3000:]}"
    assert f"PROBE {sys.prefix}" in probe.stdout + _job_logs(ray_head, probe_id), probe.stdout[-3000:]

    # 2. The documented line, with this interpreter spelled out (the job must not pick another python).
    out = tmp_path / "out"
    job_id = f"dpo-ray-tiny-{uuid.uuid4().hex[:8]}"
    submit = _ray("job", "submit", "--address", ray_head.address, "--submission-id", job_id, "--no-wait",
                  "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
                  sys.executable, "-m", "dpo_ray", "train", "--config", "examples/tiny_demo.yaml",
                  "--output_dir", str(out), "--max_steps", "4", env=env, timeout=300)
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}"

    status = _wait_for_job(ray_head, job_id, JOB_TIMEOUT_S)
    logs = _job_logs(ray_head, job_id)
    assert status == "SUCCEEDED", f"job {job_id} ended {status}; last log lines:\n{logs[-12000:]}"

    # 3. The outputs, written by the job on this (single-node) cluster.
    assert (out / "config.json").exists(), sorted(p.name for p in out.iterdir())
    assert any(out.glob("*.safetensors")) or (out / "pytorch_model.bin").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4, report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows and any("loss" in r for r in rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_ray.config import load_config
    from dpo_ray.models import load_causal_lm

    # the job trained the bundled tiny model: the saved weights are not its (seeded) initial ones
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    tok = AutoTokenizer.from_pretrained(out)
    initial = load_causal_lm(None, load_config(ROOT / "examples" / "tiny_demo.yaml"), tok).state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial), (
        "the job saved the untrained weights")


# ----------------------------------------------------------------------- stop, killed driver, shared outputs

def _state(head: PrivateRayHead, resource: str, **filters: str) -> list[dict]:
    """The state API (``/api/v0/<resource>``, what ``ray list`` reads) with equality filters."""
    query = urllib.parse.urlencode([("limit", "10000"), ("detail", "1")]
                                   + [(k, v) for key, value in filters.items()
                                      for k, v in (("filter_keys", key), ("filter_predicates", "="),
                                                   ("filter_values", value))], doseq=True)
    request = urllib.request.Request(f"{head.address}/api/v0/{resource}?{query}",
                                     headers={"Authorization": f"Bearer {head.auth_token}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())["data"]["result"]["result"]


def _held(head: PrivateRayHead, job_id: str) -> list[str]:
    """What a job still holds: actors not DEAD, placement groups not REMOVED. Ray Data's detached per-cluster
    singletons (_StatsActor, ActorLocationTracker, _AutoscalingCoordinatorActor: zero resources, shared by
    every later job) outlive the job that first created them by design and hold no resources. A detached actor
    that holds some (Ray Train's PlacementGroupCleaner: it frees a killed controller's group, then ends) is
    held until it ends."""
    actors = []
    for a in _state(head, "actors", job_id=job_id):
        if a["state"] == "DEAD":
            continue
        if a.get("is_detached") and not any((a.get("required_resources") or {}).values()):
            continue
        actors.append(f"actor {a['class_name']} {a['state']}")
    groups = [f"placement group {g['placement_group_id'][:8]} {g['state']}"
              for g in _state(head, "placement_groups")
              if g.get("creator_job_id") == job_id and g["state"] != "REMOVED"]
    return actors + groups


def _wait_training(head: PrivateRayHead, submission_id: str, classes: set[str],
                   timeout_s: float = 400) -> str:
    """Wait until the job's actors of ``classes`` are alive (training has started); returns the Ray job id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = _job_api(head, submission_id)
        assert info["status"] in ("PENDING", "RUNNING"), \
            f"job {submission_id} ended {info['status']} before training:\n" \
            f"{_job_logs(head, submission_id)[-8000:]}"
        if info.get("job_id"):
            alive = {a["class_name"] for a in _state(head, "actors", job_id=info["job_id"], state="ALIVE")}
            if classes <= alive:
                return info["job_id"]
        time.sleep(2)
    raise AssertionError(
        f"job {submission_id}: {classes} never alive:\n{_job_logs(head, submission_id)[-8000:]}")


def _wait_freed(head: PrivateRayHead, job_id: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while (held := _held(head, job_id)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not held, f"job {job_id} still holds {held} {timeout_s}s after it ended"


@pytest.fixture
def another_ray_on_this_machine():
    """A second Ray instance on the machine (another user's local run, a suite beside the cluster): Ray code
    that looks for "the" Ray of this machine instead of using its address finds two. Ray Train's
    placement-group cleaner did, and stayed alive after its run (dpo_ray.cluster.joined_cluster_env)."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_job_stop_and_killed_driver_free_everything_and_outputs_land_in_shared_storage(
        ray_head, tmp_path, another_ray_on_this_machine):
    """Two jobs at once on the head (token authentication on), with another Ray instance running on the
    machine: one sent by deploy/submit.sh (the CLI, precomputed reference, a relative output_dir) and stopped
    with `ray job stop`; one running examples/train_dpo.py (the reference actor pool, its default relative
    output_dir) whose driver is SIGKILLed. Afterwards neither holds an actor or a placement group (state API)
    and every CPU is free again (the same accounting holds GPUs); the relative output_dirs and the
    precomputed-reference cache are under DPO_RAY_SHARED_DIR (this test's temp dir standing in for the shared
    volume), not in the jobs' node-local working directories."""
    # token authentication is on: the Jobs API refuses a request without the token
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    shared = tmp_path / "shared"
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address, "DPO_RAY_SHARED_DIR": str(shared)}
    stop_id, kill_id = (f"dpo-ray-{what}-{uuid.uuid4().hex[:8]}" for what in ("stop", "kill"))

    submit = subprocess.run(
        ["bash", "deploy/submit.sh", "examples/tiny_demo.yaml", "--max_steps", "5000", "--output_dir",
         "stopped", "--reference.source", "precomputed"],
        cwd=ROOT, env={**env, "SUBMIT_ARGS": f"--no-wait --submission-id {stop_id}"}, capture_output=True,
        text=True, timeout=300)
    assert submit.returncode == 0, (
        f"deploy/submit.sh failed:\n{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}")
    runtime_env = {**RUNTIME_ENV, "env_vars": {**RUNTIME_ENV["env_vars"], "DPO_RAY_SHARED_DIR": str(shared)}}
    example = _ray("job", "submit", "--address", ray_head.address, "--submission-id", kill_id, "--no-wait",
                   "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
                   sys.executable, "examples/train_dpo.py", "--max_steps", "5000", env=env, timeout=300)
    assert example.returncode == 0, (
        f"ray job submit failed:\n{example.stdout[-3000:]}\n{example.stderr[-3000:]}")

    t0 = time.monotonic()
    stop_job = _wait_training(ray_head, stop_id, {"RayTrainWorker"})
    kill_job = _wait_training(ray_head, kill_id, {"RayTrainWorker", "ReferenceModelHost"})

    stopped = _ray("job", "stop", "--address", ray_head.address, stop_id, env=env)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    driver_pid = int(_job_api(ray_head, kill_id)["driver_info"]["pid"])
    os.kill(driver_pid, signal.SIGKILL)

    assert _wait_for_job(ray_head, stop_id, 120) == "STOPPED"
    assert _wait_for_job(ray_head, kill_id, 120) in ("FAILED", "STOPPED")
    t1 = time.monotonic()
    _wait_freed(ray_head, stop_job)
    _wait_freed(ray_head, kill_job)
    print(f"both training after {t1 - t0:.0f}s; freed after {time.monotonic() - t1:.0f}s more")
    deadline = time.monotonic() + 60
    while (usage := _cpu_usage(ray_head)) > 0.0 and time.monotonic() < deadline:
        time.sleep(1)
    assert usage == 0.0, f"{usage} CPU still held after both jobs ended"

    # the relative output_dirs went to DPO_RAY_SHARED_DIR, and so did the precomputed reference's cache
    assert (yaml.safe_load((shared / "stopped" / "dpo_config.yaml").read_text())["output_dir"]
            == str(shared / "stopped"))
    assert (shared / "tiny-dpo" / "dpo_config.yaml").exists(), sorted(p.name for p in shared.iterdir())
    assert list((shared / "ref_logps_cache").glob("*/train/_SUCCESS")), (
        "the precomputed cache is not on the volume")


def _cpu_usage(head: PrivateRayHead) -> float:
    """CPUs in use on the cluster (`ray status`, through the GCS with the token in the environment)."""
    out = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{head.gcs}"], env=head.env,
                         capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"([0-9.]+)/([0-9.]+) CPU", out)
    assert m, out[-2000:]
    return float(m.group(1))
