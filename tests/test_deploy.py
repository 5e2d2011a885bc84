"""deploy/: the KubeRay manifests, the Dockerfile and the submit script, checked without a cluster.

What KubeRay needs to accept the objects, that the Ray custom resources the worker groups advertise are
the ones the referenced example config requests (so the job is schedulable and policy/reference land
on different GPUs), that every path the run writes is on the shared volume, and that nothing secret
or exposed is committed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from dpo_ray.config import DPOConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
SHARED = "/mnt/shared"
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.I)
HF_TOKEN_LITERAL = re.compile(r"\bhf_[A-Za-z0-9]{16,}")


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


DOCS = _docs()
RAY_DOCS = [(p, d) for p, d in DOCS if d.get("apiVersion") == "ray.io/v1"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _ray_resources(group: dict) -> dict[str, float]:
    """Custom resources from rayStartParams.resources, parsed as the KubeRay operator parses them: JSON, as is. (The
    old shell-quoted form '"{\\"x\\": 1}"' is a JSON *string*: the operator's parse fails, so it never derives
    num-gpus from it.)"""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    value = json.loads(raw)
    assert isinstance(value, dict), f"rayStartParams.resources {raw!r} is not a JSON object (the operator's parse fails)"
    return value


def _pod_spec(group: dict) -> dict:
    return group["template"]["spec"]


def _walk(node, path=""):
    """Yield (path, value) for every scalar in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def _all_containers(doc: dict) -> list[dict]:
    found = []

    def visit(node):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                if isinstance(node.get(key), list):
                    found.extend(node[key])
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(doc)
    return found


CONFIG_MOUNT = "/etc/dpo-ray"  # where the ConfigMap dpo-ray-config (made from the annotated example) is mounted


def _train_argv(entrypoint: str) -> list[str]:
    """The `dpo-ray train ...` command of a RayJob entrypoint (plain, or inside `bash -c '... | tee ...'`)."""
    argv = shlex.split(entrypoint)
    if argv[0] == "bash":
        argv = shlex.split(argv[argv.index("-c") + 1])
        start = argv.index("dpo-ray")
        argv = argv[start:]
        argv = argv[:next((i for i, a in enumerate(argv) if a in ("2>&1", "|", "&&", ";")), len(argv))]
    assert argv[:2] in (["dpo-ray", "train"], ["python", "-m"]), f"unexpected entrypoint {argv}"
    return argv


def _entrypoint_config(doc: dict) -> tuple[Path, dict]:
    """(repo path of --config, other --flags) from a RayJob entrypoint."""
    argv = _train_argv(doc["spec"]["entrypoint"])
    flags = {argv[i][2:]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    config = flags.pop("config")
    if config.startswith(CONFIG_MOUNT + "/"):  # the ConfigMap: made from the example the annotation names
        return ROOT / doc["metadata"]["annotations"]["dpo-ray/example-config"], flags
    return _image_path_to_repo(config), flags


def _image_path_to_repo(path: str) -> Path:
    # The Dockerfile copies examples/ to /app/examples/.
    assert path.startswith("/app/"), f"--config {path} is not a path inside the image (/app/...)"
    return ROOT / path.removeprefix("/app/")


def _referenced_config(path: Path, doc: dict) -> tuple[Path, dict]:
    if doc["kind"] == "RayJob":
        return _entrypoint_config(doc)
    rel = doc["metadata"].get("annotations", {}).get("dpo-ray/example-config")
    assert rel, f"{path.name}: RayCluster should name the config it is sized for (annotation dpo-ray/example-config)"
    return ROOT / rel, {}


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


# ------------------------------------------------------------------------------------ the tests

def test_manifests_present_and_parse():
    names = {p.name for p in MANIFESTS}
    assert {"rayjob.yaml", "raycluster.yaml", "pvc.yaml"} <= names
    kinds = {d["kind"] for _, d in DOCS}
    assert {"RayJob", "RayCluster", "PersistentVolumeClaim"} <= kinds
    for path, doc in DOCS:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion and kind are required"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: metadata.name is required"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), \
            f"{path.name}: metadata.name must be a DNS-1123 label"


@pytest.mark.parametrize("path,doc", RAY_DOCS, ids=[f"{p.name}:{d['kind']}" for p, d in RAY_DOCS])
def test_kuberay_required_fields(path, doc):
    assert doc["kind"] in ("RayJob", "RayCluster")
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        assert spec.get("entrypoint"), "RayJob needs spec.entrypoint"
        assert "rayClusterSpec" in spec, "RayJob should create its cluster (spec.rayClusterSpec)"
        assert spec.get("shutdownAfterJobFinishes") is True, "the job's cluster should go away when it ends"
    cluster = _cluster_spec(doc)
    assert cluster.get("rayVersion") == _constraint("ray"), "rayVersion must match constraints.txt's ray pin"
    assert "headGroupSpec" in cluster and cluster.get("workerGroupSpecs"), "head and worker groups required"
    names = [n for n, _ in _groups(cluster)]
    assert len(set(names)) == len(names), f"duplicate groupName in {names}"
    for name, group in _groups(cluster):
        assert isinstance(group.get("rayStartParams"), dict), f"group {name}: rayStartParams (a map) required"
        for k, v in group["rayStartParams"].items():
            assert isinstance(v, str), f"group {name}: rayStartParams.{k} must be a string (KubeRay's schema)"
        containers = _pod_spec(group).get("containers")
        assert containers, f"group {name}: template.spec.containers required"
        assert containers[0].get("image"), f"group {name}: the Ray container needs an image"
        if name != "head":
            for key in ("groupName", "replicas", "minReplicas", "maxReplicas"):
                assert key in group, f"worker group {name}: {key} required"
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_policy_and_reference_groups_on_distinct_gpus():
    for path, doc in RAY_DOCS:
        groups = dict(_groups(_cluster_spec(doc)))
        assert {"policy", "reference"} <= set(groups), f"{path.name}: needs policy and reference worker groups"
        pol, ref = _ray_resources(groups["policy"]), _ray_resources(groups["reference"])
        assert pol.get("policy_gpu", 0) >= 1 and "reference_gpu" not in pol, path.name
        assert ref.get("reference_gpu", 0) >= 1 and "policy_gpu" not in ref, path.name
        for name in ("policy", "reference"):
            pod = _pod_spec(groups[name])
            limits = pod["containers"][0]["resources"]["limits"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            advertised = _ray_resources(groups[name])[f"{name}_gpu"]
            assert gpus >= 1 and advertised <= gpus, \
                f"{path.name}: group {name} advertises {advertised} {name}_gpu but has {gpus} nvidia.com/gpu"
            assert pod.get("nodeSelector"), f"{path.name}: group {name} should select its GPU nodes"
        assert groups["policy"]["template"]["spec"]["nodeSelector"] != \
            groups["reference"]["template"]["spec"]["nodeSelector"], "policy and reference select the same nodes"
        head = groups["head"]
        assert "policy_gpu" not in _ray_resources(head) and "reference_gpu" not in _ray_resources(head)


def test_custom_resources_match_the_config_they_run():
    for path, doc in RAY_DOCS:
        cfg_path, flags = _referenced_config(path, doc)
        assert cfg_path.exists(), f"{path.name} runs {cfg_path}, which is not in the repo"
        cfg = load_config(cfg_path, flags)
        groups = dict(_groups(_cluster_spec(doc)))
        supply: dict[str, float] = {}  # custom resource -> total over the cluster
        for _, g in groups.items():
            for k, v in _ray_resources(g).items():
                supply[k] = supply.get(k, 0) + v * g.get("replicas", 1)

        worker_custom = {k: v for k, v in cfg.ray.resources_per_worker.items() if k not in BUILTIN_RESOURCES}
        ref_custom = {k: v for k, v in cfg.reference.resources.items() if k not in BUILTIN_RESOURCES}
        assert worker_custom, f"{cfg_path.name}: ray.resources_per_worker should pin workers to a group"
        assert cfg.reference.source == "actor" and ref_custom, \
            f"{cfg_path.name}: reference actors should be pinned with reference.resources"
        advertised = set(supply)
        assert set(worker_custom) | set(ref_custom) == advertised, (
            f"{path.name} advertises {sorted(advertised)}, {cfg_path.name} requests "
            f"{sorted(set(worker_custom) | set(ref_custom))}")
        for k, v in worker_custom.items():
            assert supply[k] >= v * cfg.ray.num_workers, \
                f"{path.name}: {cfg.ray.num_workers} workers × {k}={v} do not fit in {supply[k]}"
        for k, v in ref_custom.items():
            assert supply[k] >= v * cfg.reference.num_actors, \
                f"{path.name}: {cfg.reference.num_actors} reference actors × {k}={v} do not fit in {supply[k]}"
        # GPUs: each policy pod must hold as many GPUs as workers it can host (Ray counts them too).
        pol = groups["policy"]
        per_pod_gpus = int(_pod_spec(pol)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert cfg.ray.use_gpu is True
        assert per_pod_gpus * pol["replicas"] >= cfg.ray.num_workers * cfg.ray.resources_per_worker.get("GPU", 1)
        ref = groups["reference"]
        ref_gpus = int(_pod_spec(ref)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert ref_gpus * ref["replicas"] >= cfg.reference.num_gpus * cfg.reference.num_actors
        # CPUs a worker asks for must exist on a policy pod.
        pod_cpu = float(_pod_spec(pol)["containers"][0]["resources"]["limits"]["cpu"])
        assert cfg.ray.resources_per_worker.get("CPU", 0) <= pod_cpu
        assert cfg.reference.num_cpus <= float(_pod_spec(ref)["containers"][0]["resources"]["limits"]["cpu"])


def test_referenced_config_keys_exist_in_dpoconfig():
    """Every key of the YAML the manifests run is a DPOConfig key (or a key of one of its sections)."""
    sections = {name: f.default_factory for name, f in DPOConfig.model_fields.items()
                if isinstance(f.default_factory, type)}
    for path, doc in RAY_DOCS:
        cfg_path, _ = _referenced_config(path, doc)
        data = yaml.safe_load(cfg_path.read_text())
        for key, value in data.items():
            assert key in DPOConfig.model_fields, f"{cfg_path.name}: {key} is not a DPOConfig key"
            if key in sections:
                unknown = set(value) - set(sections[key].model_fields)
                assert not unknown, f"{cfg_path.name}: {key}.{sorted(unknown)} not in DPOConfig.{key}"
        load_config(cfg_path)  # and the whole file validates


def test_outputs_and_checkpoints_go_to_shared_storage():
    for path, doc in RAY_DOCS:
        cfg_path, flags = _referenced_config(path, doc)
        cfg = load_config(cfg_path, flags)
        assert cfg.output_dir.startswith(SHARED + "/"), f"{path.name}: output_dir {cfg.output_dir} not shared"
        assert (cfg.ray.storage_path or "").startswith(SHARED + "/"), f"{cfg_path.name}: ray.storage_path"
        for attr in ("model_name_or_path", "dataset_name"):
            value = getattr(cfg, attr)
            assert value is None or value.startswith(SHARED + "/"), f"{cfg_path.name}: {attr} not on {SHARED}"
        for name, group in _groups(_cluster_spec(doc)):
            pod = _pod_spec(group)
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
            assert mounts.get(SHARED) in claims, f"{path.name}: group {name} does not mount a PVC at {SHARED}"
    pvcs = {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == "PersistentVolumeClaim"}
    claimed = {value for _, d in DOCS for key, value in _walk(d) if key.endswith(".persistentVolumeClaim.claimName")}
    assert claimed <= set(pvcs), f"claims {claimed - set(pvcs)} have no PersistentVolumeClaim in deploy/"
    for pvc in pvcs.values():
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], "pods on several nodes write the shared volume"


def test_no_literal_secrets():
    for path in MANIFESTS + [DEPLOY / "Dockerfile", DEPLOY / "submit.sh"]:
        assert not HF_TOKEN_LITERAL.search(path.read_text()), f"{path.name} contains what looks like an HF token"
    for path, doc in DOCS:
        assert doc["kind"] != "Secret", f"{path.name}: do not commit Secrets; document `kubectl create secret`"
        for c in _all_containers(doc):
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), \
                        f"{path.name}: env {env['name']} must come from valueFrom.secretKeyRef, not a literal"


def test_dashboard_not_exposed():
    for path, doc in DOCS:
        assert doc["kind"] not in ("Ingress", "Route", "Gateway"), f"{path.name}: no ingress for the dashboard"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: Service must be ClusterIP"
    for path, doc in RAY_DOCS:
        head = _cluster_spec(doc)["headGroupSpec"]
        assert head.get("serviceType") == "ClusterIP", f"{path.name}: head serviceType must be ClusterIP"
        assert not head.get("enableIngress"), f"{path.name}: enableIngress exposes the dashboard"
        for _, value in _walk(doc):
            assert value not in ("LoadBalancer", "NodePort"), f"{path.name}: {value} exposes a port"


def test_one_image_everywhere_built_from_the_dockerfile():
    images = {c["image"] for _, d in DOCS for c in _all_containers(d)}
    assert len(images) == 1, f"every pod should run the same image (Ray versions must match): {images}"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)\s*\nFROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    assert m, "deploy/Dockerfile should build FROM rayproject/ray (ARG BASE_IMAGE, so a digest can pin it)"
    tag = m.group(1)
    assert "BuildKit" in dockerfile and dockerfile.startswith("# syntax=docker/dockerfile:1"), \
        "the per-Dockerfile .dockerignore needs BuildKit: say so"
    assert "@sha256:" in dockerfile, "say how to pin the base image by digest"
    assert tag.startswith(_constraint("ray") + "-py3"), f"base tag {tag} != constraints.txt ray {_constraint('ray')}"
    assert re.search(r"-(gpu|cu\d+)$", tag), f"base tag {tag} should be a GPU build"
    assert "COPY" in dockerfile and "constraints.txt" in dockerfile
    assert re.search(r"pip install[^\n]*-c constraints\.txt[^\n]*\s\.(\s|$)", dockerfile), \
        "the Dockerfile should pip install the package (.) pinned by constraints.txt"
    assert re.search(r"COPY[^\n]*examples\s+\./examples|COPY[^\n]*examples\s+/app/examples", dockerfile), \
        "the manifests read /app/examples/*.yaml: copy examples/ into the image"
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M)
    assert workdir and workdir.group(1) == "/app"


def test_rayjob_and_raycluster_describe_the_same_cluster():
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")
    cluster = next(d for _, d in RAY_DOCS if d["kind"] == "RayCluster")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], \
        "deploy/rayjob.yaml's rayClusterSpec drifted from deploy/raycluster.yaml's spec"


def _submit(tmp_path, *args: str, **env: str):
    """Run deploy/submit.sh with a stand-in `ray` on PATH that prints the argv it was given as JSON."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "ray").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (fake / "ray").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DPO_RAY_SHARED_DIR")}
    return subprocess.run(["bash", str(DEPLOY / "submit.sh"), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**base, "PATH": f"{fake}:{base['PATH']}", **env}, timeout=60)


def test_submit_script_uses_the_jobs_api(tmp_path):
    text = (DEPLOY / "submit.sh").read_text()
    assert "ray job submit" in text and "--working-dir" in text and "--runtime-env-json" in text
    proc = _submit(tmp_path, "examples/lora.yaml", "--max_steps", "5", DPO_RAY_SHARED_DIR="/mnt/shared/outputs",
                   SUBMIT_ARGS="--no-wait --submission-id r1")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)
    assert argv[:4] == ["job", "submit", "--address", "http://127.0.0.1:8265"]
    assert argv[4:7] == ["--no-wait", "--submission-id", "r1"]
    assert argv[argv.index("--"):] == ["--", "python", "-m", "dpo_ray", "train", "--config", "examples/lora.yaml",
                                       "--max_steps", "5"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["DPO_RAY_SHARED_DIR"] == "/mnt/shared/outputs"
    for secret in (".env", "**/.env"):
        assert secret in runtime_env["excludes"], f"submit.sh uploads {secret} files"
    assert ".venv" in runtime_env["excludes"] and ".git" in runtime_env["excludes"]
    assert "DPO_RAY_SHARED_DIR" not in json.loads(json.loads(_submit(tmp_path).stdout)[7])["env_vars"]
    # the GCS address is not the Jobs API: refused, saying which port to use
    wrong = _submit(tmp_path, RAY_ADDRESS="head:6379")
    assert wrong.returncode == 2 and "http://HOST:8265" in wrong.stderr and not wrong.stdout
    # Ray refuses to merge a job's runtime_env with the driver's when both set one variable.
    from dpo_ray.cluster import WORKER_ENV

    clash = set(runtime_env.get("env_vars", {})) & set(WORKER_ENV)
    assert not clash, f"submit.sh sets {clash}, which dpo_ray's driver sets too: ray.init would fail"


# ------------------------------------------------------------------------- what the KubeRay operator meets

def _container(group: dict) -> dict:
    return _pod_spec(group)["containers"][0]


def _quantity(value) -> float:
    """A Kubernetes quantity (16Gi, 4G, 3000000000) in bytes."""
    m = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", str(value))
    assert m, f"cannot read the quantity {value!r}"
    mult = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * mult[m.group(2)]


def test_num_gpus_set_explicitly_and_matching_the_pod():
    """The operator derives --num-gpus from the container's GPU limit only when it parses rayStartParams; set it
    explicitly (head: 0) so GPU detection never depends on that."""
    for path, doc in RAY_DOCS:
        for name, group in _groups(_cluster_spec(doc)):
            params = group["rayStartParams"]
            assert "num-gpus" in params, f"{path.name}: group {name} should set rayStartParams.num-gpus explicitly"
            gpus = int(_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert int(params["num-gpus"]) == gpus, f"{path.name}: group {name} num-gpus != nvidia.com/gpu limit"
            custom = _ray_resources(group)
            for key, amount in custom.items():
                assert amount <= gpus, f"{path.name}: group {name} advertises {amount} {key} on {gpus} GPU(s)"
        assert _cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_object_store_fits_in_dev_shm():
    """Ray sizes its object store from the pod's memory (30 %) and falls back to /tmp (disk, slow) when /dev/shm is
    smaller: every group sets object-store-memory, below its /dev/shm emptyDir and its memory limit."""
    for path, doc in RAY_DOCS:
        for name, group in _groups(_cluster_spec(doc)):
            params, pod = group["rayStartParams"], _pod_spec(group)
            assert "object-store-memory" in params, f"{path.name}: group {name} should set object-store-memory"
            store = _quantity(params["object-store-memory"])
            mounts = {m["mountPath"]: m["name"] for m in _container(group).get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{path.name}: group {name} mounts no /dev/shm volume"
            shm = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])["emptyDir"]
            assert shm.get("medium") == "Memory"
            assert store <= 0.95 * _quantity(shm["sizeLimit"]), \
                f"{path.name}: group {name} object store {params['object-store-memory']} > /dev/shm {shm['sizeLimit']}"
            memory = _quantity(_container(group)["resources"]["limits"]["memory"])
            assert _quantity(shm["sizeLimit"]) < 0.5 * memory, f"{path.name}: /dev/shm counts against the memory limit"


def test_pods_can_write_the_shared_volume():
    """The image runs as uid 1000 (gid 100): fsGroup on every pod, and the asset Job creates the directories
    group-writable for exports that ignore fsGroup; the PVC names a storage class to replace."""
    for path, doc in DOCS:
        if doc["kind"] in ("RayJob", "RayCluster"):
            for name, group in _groups(_cluster_spec(doc)):
                assert _pod_spec(group).get("securityContext", {}).get("fsGroup") == 100, f"{path.name}: {name} fsGroup"
        if doc["kind"] == "Job":
            spec = doc["spec"]["template"]["spec"]
            assert spec.get("securityContext", {}).get("fsGroup") == 100
            init = " ".join(" ".join(c.get("command", [])) for c in spec.get("initContainers", []))
            for d in ("outputs", "ray_results", "ray-logs"):
                assert d in init, f"{path.name}: the init step does not create /mnt/shared/{d}"
            assert "chown 1000:100" in init and "chmod 2775" in init
        if doc["kind"] == "PersistentVolumeClaim":
            assert "REPLACE" in doc["spec"].get("storageClassName", ""), \
                "pvc.yaml: an explicit storageClassName placeholder (an unset class binds the default, often RWO)"
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "kubectl get pvc dpo-ray-shared" in text and "Bound" in text and "fsGroup" in text


def test_token_authentication_and_network_policy():
    """The dashboard binds 0.0.0.0, so any pod could reach the Jobs API: token authentication from a Secret
    (authOptions) and a NetworkPolicy that admits only the Ray pods (and the RayJob submitter on 8265)."""
    for path, doc in RAY_DOCS:
        spec = _cluster_spec(doc)
        assert spec.get("authOptions", {}).get("mode") == "token", f"{path.name}: authOptions.mode: token"
        assert spec["authOptions"].get("secretName"), f"{path.name}: the token from a Secret you create"
        for name, group in _groups(spec):
            labels = group["template"].get("metadata", {}).get("labels", {})
            assert labels.get("app.kubernetes.io/name") == "dpo-ray", f"{path.name}: {name} pods need the label"
    policies = [d for _, d in DOCS if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 1, "deploy/ should hold one NetworkPolicy for the Ray pods"
    pol = policies[0]["spec"]
    assert pol["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "dpo-ray"}
    assert "Ingress" in pol["policyTypes"]
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    seen = []
    for rule in pol["ingress"]:
        assert all("ipBlock" not in p for p in rule["from"]), "no address ranges: pods by label only"
        if rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "dpo-ray"}}}]:
            seen.append("ray pods")
            continue
        # anyone else: the RayJob's submitter and the KubeRay operator, on the Jobs API only
        assert [p["port"] for p in rule["ports"]] == [8265], rule
        if rule["from"] == [operator]:
            seen.append("operator")
        else:
            assert rule["from"] == [{"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name":
                                                                      job["metadata"]["name"]}}}], rule
            seen.append("submitter")
    assert sorted(seen) == ["operator", "ray pods", "submitter"]
    # the asset Job is not a Ray pod, and the only one with the Hugging Face token
    for path, doc in DOCS:
        with_token = [c["name"] for c in _all_containers(doc) if "HF_TOKEN" in {e["name"] for e in c.get("env", [])}]
        assert (with_token == ["prepare"]) if doc["kind"] == "Job" else not with_token, \
            f"{path.name}: HF_TOKEN only in prepare-assets' download container ({with_token})"
        if doc["kind"] == "Job":
            assert doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] != "dpo-ray"


def test_rayjob_gives_up_partial_gpus_and_keeps_its_logs():
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")["spec"]
    assert 0 < job["preRunningDeadlineSeconds"] <= 3600, "a job holding part of its GPUs must give them up"
    assert job["backoffLimit"] == 0
    entry = job["entrypoint"]
    assert "-o pipefail" in entry and re.search(r"tee -a /mnt/shared/\S+/driver\.log", entry), \
        "the driver's log goes to the shared volume, and a failed run still fails the job"
    for name, group in _groups(job["rayClusterSpec"]):
        hook = " ".join(_container(group).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
        assert "/tmp/ray/session_latest/logs" in hook and "/mnt/shared/ray-logs" in hook, \
            f"group {name}: Ray's logs should be copied to the volume when the pod stops"


def test_config_comes_from_a_configmap():
    """Hyper-parameters change without an image rebuild: the entrypoint reads /etc/dpo-ray/config.yaml, the
    ConfigMap dpo-ray-config the docs create from the annotated example, mounted on the head (the driver)."""
    for path, doc in RAY_DOCS:
        head = _pod_spec(_cluster_spec(doc)["headGroupSpec"])
        volumes = {v["name"]: v for v in head["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        assert volumes[mounts[CONFIG_MOUNT]]["configMap"]["name"] == "dpo-ray-config", path.name
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")
    assert "--config /etc/dpo-ray/config.yaml" in job["spec"]["entrypoint"]
    text = (ROOT / "docs" / "deploy.md").read_text()
    source = job["metadata"]["annotations"]["dpo-ray/example-config"]
    assert f"kubectl create configmap dpo-ray-config --from-file=config.yaml={source}" in text


def test_docs_pin_kuberay_and_say_what_to_change():
    text = (ROOT / "docs" / "deploy.md").read_text()
    m = re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version (\d+)\.(\d+)\.(\d+)", text)
    assert m and (int(m.group(1)), int(m.group(2))) >= (1, 6), "pin the operator: authOptions needs KubeRay >= 1.6"
    for needle in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "ray status", "policy_gpu", "reference_gpu",
                   "What to change for your cluster", "Pre-flight", "Re-runs", "NCCL", "DPO_RAY_SHARED_DIR"):
        assert needle in text, f"docs/deploy.md should cover {needle}"
