"""deploy/*.yaml executed: a Ray cluster started from the manifests' own `ray start` lines runs the RayJob's
entrypoint.

What a KubeRay operator would do with deploy/rayjob.yaml (and deploy/raycluster.yaml, whose cluster is the
same), done on this machine with real processes:

1. For the head and every worker group, the container's command as the operator builds it (tests/kuberay.py:
   ``/bin/bash -c -- 'ulimit ...; ray start --head  --block  --dashboard-host=0.0.0.0 ...'``), from the
   group's rayStartParams and container resources. Only what one machine cannot be is changed, each change
   printed: ports (every node gets free ones; the GCS is never 6379), addresses (the head Service's DNS name
   -> 127.0.0.1), and the amounts this machine cannot hold (num-cpus, memory, object-store-memory). num-gpus
   and the custom resources (policy_gpu, reference_gpu) stay as written: logical resources, which is all Ray
   schedules by. One node per group (replicas 1). Each line runs through bash as in the pod, so a quoting
   error in the manifest fails here as in the pod.
2. Token authentication as authOptions + the Secret configure it: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (the
   Secret's auth_token) in every node's and the submitter's environment; a submit without the token is
   refused.
3. The ConfigMap: the file docs/deploy.md's `kubectl create configmap` names, written where the head mounts
   it, /mnt/shared -> a temp folder (the PVC), with this machine's overrides (printed): a tiny model and
   dataset where deploy/prepare-assets.yaml would put Qwen2-0.5B and UltraFeedback, CPU instead of CUDA, a few
   steps.
4. The RayJob: the operator's submitter line (``ray job status || ray job submit --no-wait ...
   -- <entrypoint>; ray job logs --follow``) through ``bash -ce``, the entrypoint verbatim but for the mount
   paths. It trains; the state API shows every training worker on the policy node and every reference actor on
   the reference node; outputs, checkpoints and driver.log are in the shared folder.
5. docs/deploy.md's re-run procedure, its sed expressions applied to deploy/rayjob.yaml: a second run
   (renamed), then the first run continued with resume_from_checkpoint latest: it resumes from its own
   checkpoint (step 2), not from the second run's (step 1), which stays untouched.

Teardown stops only this test's processes (the `ray start` process groups, then whatever carries this test's
marker variable); never `ray stop`, which would take down every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import kuberay
import pytest
import yaml
from test_job_submit import _free_ports, _marked_pids, _terminate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "DPO_RAY_DEPLOY_CLUSTER_TEST"
# the submitter line with 1.7's wait for the dashboard; the start lines are the same in 1.6.2
VERSION = "1.7.0"
SHARED, CONFIG_MOUNT = "/mnt/shared", "/etc/dpo-ray"
STARTUP_TIMEOUT_S, JOB_TIMEOUT_S = 180, 900
CPU_CAP, MEMORY_CAP, STORE_CAP = 4, 4 << 30, 300_000_000
# What this machine changes in the config the ConfigMap carries (printed by the test). Everything else runs as
# written: ZeRO-2, the custom resources, the reference actors, gradient checkpointing, the max_length.
CONFIG_OVERRIDES = {
    "bf16": False,                                   # no GPU: fp32 on CPU
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1,
    # checkpoints within a few steps (the re-run resumes from one)
    "save_steps": 1,
    "report_to": [],
    "ray": {"num_workers": 2, "use_gpu": False,      # 2 workers on a 2-core machine, CPU (gloo) not CUDA
            "resources_per_worker": {"CPU": 0.5, "policy_gpu": 1}},
    "reference": {"num_cpus": 0.5, "num_gpus": 0},   # reference_gpu still places them; no CUDA to give them
}
RUN_STEPS = {"first": 2, "second": 1, "resumed": 3}  # max_steps of the three jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(STARTUP_TIMEOUT_S + 3 * JOB_TIMEOUT_S)]


def _docs() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "deploy").glob("ray*.yaml")}


def _map_paths(text: str, shared: Path, config_dir: Path) -> str:
    return text.replace(SHARED, str(shared)).replace(CONFIG_MOUNT, str(config_dir))


def _localize(params: dict, name: str, node_type: str, ports: dict, gcs: int,
              temp_dir: str) -> tuple[dict, list]:
    """The group's full rayStartParams with this machine's substitutions; returns (params, [(key, was, now,
    why)])."""
    out, changes = dict(params), []

    def put(key, value, why):
        changes.append((key, out.get(key, "(unset)"), str(value), why))
        out[key] = str(value)

    put("node-ip-address", "127.0.0.1", "the pod's IP")
    if node_type == "head":
        put("port", gcs,
            f"the GCS port (Ray's default {kuberay.DEFAULT_GCS_PORT}, the manifest's gcs-server port)")
        put("dashboard-port", ports["dashboard"], f"the Jobs API (the manifest's dashboard port "
                                                  f"{kuberay.DEFAULT_DASHBOARD_PORT})")
        put("dashboard-host", "127.0.0.1", "listen on this machine only (token auth stays on)")
    else:
        put("address", f"127.0.0.1:{gcs}", "the head Service's DNS name and port")
    put("temp-dir", f"{temp_dir}/{name}", "/tmp/ray, the pod's emptyDir: a private folder per node")
    for key in ("metrics-export-port", "dashboard-agent-listen-port"):
        put(key, ports[key], "one machine: each node needs its own port")
    for key in ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port",
                "runtime-env-agent-port"):
        put(key, ports[key], "one machine: Ray's defaults would collide between nodes")
    if float(out.get("num-cpus", 0)) > CPU_CAP:
        put("num-cpus", CPU_CAP, "this machine has 2 cores (logical CPUs only)")
    if "memory" in out and int(out["memory"]) > MEMORY_CAP:
        put("memory", MEMORY_CAP, "this machine has 24 GiB")
    if int(out.get("object-store-memory", 0)) > STORE_CAP:
        put("object-store-memory", STORE_CAP, "this machine's /dev/shm and memory")
    return out, changes


class ManifestCluster:
    """The head and one node per worker group of a RayJob's rayClusterSpec, each started from its pod's
    line."""

    def __init__(self, job: dict, shared: Path, config_dir: Path):
        self.temp_dir = tempfile.mkdtemp(prefix="dporay-k8s-", dir="/tmp")  # short: Ray's socket paths
        self.marker = uuid.uuid4().hex
        self.token = uuid.uuid4().hex + uuid.uuid4().hex     # the Secret dpo-ray-auth's auth_token
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        spec = kuberay.cluster_spec(job)
        self.auth = spec.get("authOptions")
        self.gcs, self.dashboard = _free_ports(2)
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.lines: dict[str, str] = {}
        fqdn = f"{job['metadata']['name']}-head-svc.default.svc.cluster.local"
        for name, node_type, group in kuberay.groups(spec):
            keys = ["metrics-export-port", "dashboard-agent-listen-port", "node-manager-port",
                    "object-manager-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"]
            ports = dict(zip(keys, _free_ports(len(keys))), dashboard=self.dashboard)
            params = kuberay.start_params(group, node_type, fqdn)
            local, changes = _localize(params, name, node_type, ports, self.gcs, self.temp_dir)
            print(f"[{name}] the pod's line:   {kuberay.ray_start_line(params, node_type, VERSION)}")
            for key, was, now, why in changes:
                print(f"[{name}]   {key}: {was} -> {now}   ({why})")
            line = kuberay.ray_start_line(local, node_type, VERSION)
            self.lines[name] = line
            container = group["template"]["spec"]["containers"][0]
            env = self._env(container, name, shared, config_dir, line)
            log = Path(self.temp_dir) / f"{name}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen([*kuberay.container_command(), line], env=env, stdout=f,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
            if node_type == "head":
                self._wait(lambda: self._api("/api/jobs/") is not None, "the head's Jobs API")

    def _env(self, container: dict, group: str, shared: Path, config_dir: Path, line: str) -> dict:
        pod = {k: _map_paths(v, shared, config_dir)
               for k, v in kuberay.pod_env(container, self.auth, self.token).items()}
        operator = {"RAY_CLUSTER_NAME": "dpo-ray-qwen2-0-5b-test", "RAY_NODE_TYPE_NAME": group,
                    "RAY_USAGE_STATS_KUBERAY_IN_USE": "1",
                    "KUBERAY_GEN_RAY_START_CMD": line.split("; ", 1)[1],
                    "RAY_ADDRESS": f"127.0.0.1:{self.gcs}"}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KUBERAY"))}
        # the image's PATH
        machine = {MARKER: self.marker, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        return {**base, **machine, **operator, **pod}

    def _api(self, path: str, token: str | None = "own"):
        headers = {"Authorization": f"Bearer {self.token if token == 'own' else token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.address + path, headers=headers),
                                        timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready():
            dead = [(p.args[-1], p.returncode) for p in self.procs if p.poll() is not None]
            assert not dead, f"a pod's line exited: {dead}\n{self.tail()}"
            assert time.monotonic() < deadline, f"{what} not up after {STARTUP_TIMEOUT_S}s\n{self.tail()}"
            time.sleep(1)

    def state(self, resource: str, **filters: str) -> list[dict]:
        query = urllib.parse.urlencode([("limit", "10000"), ("detail", "1")]
                                       + [(k, v) for key, value in filters.items()
                                          for k, v in (("filter_keys", key), ("filter_predicates", "="),
                                                       ("filter_values", value))])
        data = self._api(f"/api/v0/{resource}?{query}")
        assert data is not None, f"state API /api/v0/{resource} did not answer"
        return data["data"]["result"]["result"]

    def wait_nodes(self, n: int) -> list[dict]:
        self._wait(lambda: len([x for x in self.state("nodes") if x["state"] == "ALIVE"]) >= n,
                   f"{n} Ray nodes")
        return [x for x in self.state("nodes") if x["state"] == "ALIVE"]

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs if log.exists())

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5  # one grace period for all of them, not one each in turn
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        _terminate(_marked_pids(self.marker))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _configmap_source() -> Path:
    text = (ROOT / "docs" / "deploy.md").read_text()
    m = re.search(r"kubectl create configmap dpo-ray-config --from-file=config\.yaml=(\S+)", text)
    assert m, "docs/deploy.md should create the ConfigMap dpo-ray-config from an example config"
    return ROOT / m.group(1)


def _write_config(source: Path, config_dir: Path, shared: Path, max_steps: int) -> None:
    """The ConfigMap's file where the head mounts it: the example's text with the mount paths mapped, then
    this machine's overrides."""
    cfg = yaml.safe_load(_map_paths(source.read_text(), shared, config_dir))
    for key, value in {**CONFIG_OVERRIDES, "max_steps": max_steps}.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _prepare_assets(shared: Path, config_dir: Path, source: Path) -> None:
    """What deploy/prepare-assets.yaml puts on the volume, at the paths the config names: a model directory
    (the bundled tiny Llama standing in for Qwen2-0.5B-Instruct) and a save_to_disk dataset with train and
    test."""
    import datasets

    from dpo_ray.config import DPOConfig
    from dpo_ray.data import load_tokenizer
    from dpo_ray.data.bundled import DATA_DIR
    from dpo_ray.models import load_causal_lm

    cfg = yaml.safe_load(_map_paths(source.read_text(), shared, config_dir))
    tok = load_tokenizer(None)
    model = load_causal_lm(None, DPOConfig(), tok)
    model.save_pretrained(cfg["model_name_or_path"])
    tok.save_pretrained(cfg["model_name_or_path"])
    data = datasets.load_dataset("json", data_files={"train": str(DATA_DIR / "train.jsonl"),
                                                     "test": str(DATA_DIR / "test.jsonl")})
    data.save_to_disk(cfg["dataset_name"])
    for d in ("outputs", "ray-logs", "hf-cache"):
        (shared / d).mkdir(parents=True, exist_ok=True)


def _rerun_sed(kind: str) -> str:
    """The sed expression docs/deploy.md's re-run procedure applies to the RayJob ("new" run or "resume")."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    found = re.findall(
        r"kubectl kustomize deploy/ \| sed ('[^']*') \| kubectl apply -l dpo-ray/part=job -f -", text)
    assert len(found) == 2, f"docs/deploy.md's re-run procedure should show two sed lines, found {found}"
    new, resume = (shlex.split(f)[0] for f in found)
    assert "resume_from_checkpoint latest" in resume, resume
    return new if kind == "new" else resume


def _rayjob_after(sed: str) -> dict:
    """The RayJob docs/deploy.md's re-run line applies: `kubectl kustomize deploy/ | sed EXPR` where kubectl
    is installed (the line as written), else the same sed on deploy/rayjob.yaml (kustomize changes only the
    image)."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        text = subprocess.run(["bash", "-o", "pipefail", "-c",
                               f"{kubectl} kustomize deploy/ | sed {shlex.quote(sed)}"],
                              cwd=ROOT, capture_output=True, text=True, check=True, timeout=120).stdout
    else:
        text = subprocess.run(["sed", sed, "deploy/rayjob.yaml"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=60).stdout
    (job,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "RayJob"]
    return job


def _submit(cluster: ManifestCluster, job: dict, shared: Path, config_dir: Path) -> tuple[str, str]:
    """The operator's submitter line for this RayJob, run as the submitter container runs it; returns (the
    job's submission id, its log)."""
    job = json.loads(json.dumps(job))
    job["spec"]["entrypoint"] = _map_paths(job["spec"]["entrypoint"], shared, config_dir)
    job_id = f"{job['metadata']['name']}-{uuid.uuid4().hex[:5]}"
    line = kuberay.job_submit_line(job, f"127.0.0.1:{cluster.dashboard}", job_id, VERSION)
    print(f"submitter: {line}")
    container = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           **kuberay.pod_env(container, cluster.auth, cluster.token),
           "PYTHONUNBUFFERED": "1", "RAY_DASHBOARD_ADDRESS": f"127.0.0.1:{cluster.dashboard}",
           "RAY_JOB_SUBMISSION_ID": job_id, MARKER: cluster.marker,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([*kuberay.submitter_command(), line], env=env, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    info = cluster._api(f"/api/jobs/{job_id}")
    assert info is not None, f"no job {job_id}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    logs = (cluster._api(f"/api/jobs/{job_id}/logs") or {}).get("logs", "")
    assert info["status"] == "SUCCEEDED", \
        f"job {job_id} {info['status']}:\n{logs[-12000:]}\n{proc.stderr[-3000:]}\n{cluster.tail()}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job_id, logs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        pytest.skip("the Jobs API needs ray[default]")
    docs = _docs()
    job, long_lived = docs["rayjob.yaml"], docs["raycluster.yaml"]
    root = tmp_path_factory.mktemp("k8s")
    shared, config_dir = root / "mnt-shared", root / "etc-dpo-ray"
    c = ManifestCluster(job, shared, config_dir)
    c.shared, c.config_dir, c.job = shared, config_dir, job
    try:
        # deploy/raycluster.yaml's pods run the very same lines (its cluster is the RayJob's)
        fqdn = "head-svc"
        for (name, node_type, group), (_, _, same) in zip(kuberay.groups(kuberay.cluster_spec(long_lived)),
                                                          kuberay.groups(kuberay.cluster_spec(job)),
                                                          strict=True):
            assert kuberay.start_params(group, node_type, fqdn) == \
                kuberay.start_params(same, node_type, fqdn), \
                f"raycluster.yaml's {name} pod starts Ray differently from rayjob.yaml's"
        c.nodes = c.wait_nodes(1 + len(kuberay.cluster_spec(job)["workerGroupSpecs"]))
        yield c
    finally:
        c.stop()


def _node_of(nodes: list[dict], resource: str) -> str:
    found = [n["node_id"] for n in nodes if resource in (n.get("resources_total") or {})]
    assert len(found) == 1, (
        f"one node should advertise {resource}: {[(n['node_id'], n.get('resources_total')) for n in nodes]}")
    return found[0]


def test_the_manifests_cluster_runs_the_rayjob(cluster):
    shared, config_dir, job = cluster.shared, cluster.config_dir, cluster.job
    spec = kuberay.cluster_spec(job)
    # every group's logical resources reached Ray as written: num-gpus and the custom resources
    for name, _, group in kuberay.groups(spec):
        params = group["rayStartParams"]
        want = {"GPU": float(params.get("num-gpus", 0))}
        if "resources" in params:
            want.update({k: float(v) for k, v in
                         json.loads(shlex.split(f"--resources={params['resources']}")[0]
                                    .split("=", 1)[1]).items()})
        advertised = [n.get("resources_total") or {} for n in cluster.nodes]
        assert any(all(r.get(k, 0.0) == v for k, v in want.items()) for r in advertised), \
            f"no node advertises group {name}'s {want}: {advertised}"

    # an unauthenticated submit is refused: no token, and a wrong one
    source = _configmap_source()
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    bare.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": cluster.temp_dir,
                 MARKER: cluster.marker})
    for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        refused = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.address,
                                  "--no-wait", "--", "echo", "should-not-run"], env={**bare, **extra},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0, (
            f"submit with {sorted(extra) or 'no token'} accepted:\n{refused.stdout}")
    assert not [j for j in (cluster._api("/api/jobs/") or []) if "should-not-run" in j.get("entrypoint", "")]
    assert cluster._api("/api/jobs/", token=None) is None

    # the ConfigMap, the assets, then the RayJob's entrypoint through the submitter's own line
    _prepare_assets(shared, config_dir, source)
    _write_config(source, config_dir, shared, RUN_STEPS["first"])
    print("config overrides:", json.dumps({**CONFIG_OVERRIDES, "max_steps": RUN_STEPS["first"]}))
    job_id, logs = _submit(cluster, job, shared, config_dir)

    # placement, from the state API: training workers on the
    # policy node, reference actors on the reference node
    ray_job = cluster._api(f"/api/jobs/{job_id}")["job_id"]
    actors = cluster.state("actors", job_id=ray_job)
    policy, reference = _node_of(cluster.nodes, "policy_gpu"), _node_of(cluster.nodes, "reference_gpu")
    where = {}
    for a in actors:
        where.setdefault(a["class_name"], set()).add(a.get("node_id"))
    assert where.get("RayTrainWorker") == {policy}, where
    assert where.get("ReferenceModelHost") == {reference}, where
    assert (len([a for a in actors if a["class_name"] == "RayTrainWorker"])
            >= CONFIG_OVERRIDES["ray"]["num_workers"])

    # the outputs on the shared volume, where the entrypoint put them
    out = shared / "outputs" / "qwen2-0.5b-dpo-refpool"
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == RUN_STEPS["first"], report
    assert (out / "config.json").exists() and any(out.glob("*.safetensors"))
    assert f"outputs: {out} (" in (out / "driver.log").read_text(), "the driver's log, tee'd onto the volume"
    assert sorted(p.name for p in (out / "ray_results" / "qwen2-0.5b-dpo-refpool").glob("checkpoint_*"))


def test_rerun_procedure_resumes_its_own_run(cluster):
    """docs/deploy.md's "Re-runs": a new run under its own name, then the first continued: its own
    checkpoint."""
    shared, config_dir = cluster.shared, cluster.config_dir
    source = _configmap_source()
    first = shared / "outputs" / "qwen2-0.5b-dpo-refpool"
    assert (first / "report.json").exists(), "runs after test_the_manifests_cluster_runs_the_rayjob"

    _write_config(source, config_dir, shared, RUN_STEPS["second"])
    second_job = _rayjob_after(_rerun_sed("new"))
    assert "--run_name run2" in second_job["spec"]["entrypoint"], second_job["spec"]["entrypoint"]
    _submit(cluster, second_job, shared, config_dir)
    second = shared / "outputs" / "run2"
    assert json.loads((second / "report.json").read_text())["steps"] == RUN_STEPS["second"]
    second_ckpts = sorted((second / "ray_results" / "run2").glob("checkpoint_*"))
    assert second_ckpts

    _write_config(source, config_dir, shared, RUN_STEPS["resumed"])
    resumed_job = _rayjob_after(_rerun_sed("resume"))
    assert "--resume_from_checkpoint latest" in resumed_job["spec"]["entrypoint"]
    _, logs = _submit(cluster, resumed_job, shared, config_dir)
    driver = (first / "driver.log").read_text()
    assert f"resumed from checkpoint at step {RUN_STEPS['first']}" in logs + driver, logs[-6000:]
    assert f"resumed from checkpoint at step {RUN_STEPS['second']} " not in logs + driver
    assert json.loads((first / "report.json").read_text())["steps"] == RUN_STEPS["resumed"]
    rows = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert max(r.get("step", 0) for r in rows) == RUN_STEPS["resumed"]
    assert sorted((second / "ray_results" / "run2").glob("checkpoint_*")) == second_ckpts, "run2 was touched"
