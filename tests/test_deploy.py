"""deploy/: the KubeRay manifests, the Dockerfile and the submit script, checked without a Kubernetes cluster.

What KubeRay needs to accept the objects (the CRD schemas of KubeRay 1.6.2 and 1.7.0), what every Ray pod's
container command hands to Ray (the operator's line through bash, into Ray's own `ray start` parser), that the
Ray custom resources the worker groups advertise are the ones the referenced example config requests (so the
job is schedulable and policy/reference land on different GPUs), that every path the run writes is on the
shared volume, and that nothing secret or exposed is committed.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kuberay
import pytest
import yaml

from dpo_ray.config import DPOConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if not p.name.startswith("kustomiz"))
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
    """Custom resources as Ray receives them: rayStartParams.resources goes into the pod's bash line as
    --resources=VALUE (shell text), bash hands Ray what is left after its quoting, and Ray's own parser reads
    that."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    from ray._private.utils import parse_resources_json
    from ray.autoscaler._private.cli_logger import cf, cli_logger

    (arg,) = _bash_words(f"--resources={raw}")
    value = arg.split("=", 1)[1]
    try:
        return parse_resources_json(value, cli_logger, cf)
    except Exception as e:  # cli_logger.abort raises click's ClickException
        raise AssertionError(f"rayStartParams.resources {raw!r} reaches Ray as {value!r}, which Ray "
                             "refuses") from e


def _bash_words(text: str) -> list[str]:
    """The words bash makes of `text` (bash itself, not a Python imitation)."""
    proc = subprocess.run(["bash", "-c", f'printf "%s\\0" {text}'], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\0")[:-1]


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


# where the ConfigMap dpo-ray-config (made from the annotated example) is mounted
CONFIG_MOUNT = "/etc/dpo-ray"


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
    assert rel, (
        f"{path.name}: RayCluster should name the config it is sized for (annotation dpo-ray/example-config)")
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
        assert {"policy", "reference"} <= set(groups), (
            f"{path.name}: needs policy and reference worker groups")
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
            groups["reference"]["template"]["spec"]["nodeSelector"], \
            "policy and reference select the same nodes"
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
                f"{path.name}: {cfg.reference.num_actors} reference actors × {k}={v} do not fit in " \
                f"{supply[k]}"
        # GPUs: each policy pod must hold as many GPUs as workers it can host (Ray counts them too).
        pol = groups["policy"]
        per_pod_gpus = int(_pod_spec(pol)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert cfg.ray.use_gpu is True
        assert (per_pod_gpus * pol["replicas"]
                >= cfg.ray.num_workers * cfg.ray.resources_per_worker.get("GPU", 1))
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
        # checkpoints: output_dir/ray_results/<run_name> (one run's own), or an explicit shared storage_path
        assert cfg.ray.storage_path is None or cfg.ray.storage_path.startswith(SHARED + "/"), cfg_path.name
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
    claimed = {value for _, d in DOCS for key, value in _walk(d)
               if key.endswith(".persistentVolumeClaim.claimName")}
    assert claimed <= set(pvcs), f"claims {claimed - set(pvcs)} have no PersistentVolumeClaim in deploy/"
    for pvc in pvcs.values():
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], "pods on several nodes write the shared volume"


def test_no_literal_secrets():
    for path in MANIFESTS + [DEPLOY / "Dockerfile", DEPLOY / "submit.sh"]:
        assert not HF_TOKEN_LITERAL.search(path.read_text()), (
            f"{path.name} contains what looks like an HF token")
    for path, doc in DOCS:
        assert doc["kind"] != "Secret", (
            f"{path.name}: do not commit Secrets; document `kubectl create secret`")
        for c in _all_containers(doc):
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), \
                        f"{path.name}: env {env['name']} must come from valueFrom.secretKeyRef, not a literal"


def test_dashboard_not_exposed():
    for path, doc in DOCS:
        assert doc["kind"] not in ("Ingress", "Route", "Gateway"), (
            f"{path.name}: no ingress for the dashboard")
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", (
                f"{path.name}: Service must be ClusterIP")
    for path, doc in RAY_DOCS:
        head = _cluster_spec(doc)["headGroupSpec"]
        assert head.get("serviceType") == "ClusterIP", f"{path.name}: head serviceType must be ClusterIP"
        assert not head.get("enableIngress"), f"{path.name}: enableIngress exposes the dashboard"
        for _, value in _walk(doc):
            assert value not in ("LoadBalancer", "NodePort"), f"{path.name}: {value} exposes a port"


def test_one_image_everywhere_built_from_the_dockerfile(tmp_path):
    """Every Ray pod and the asset Job run `image: dpo-ray`, which deploy/kustomization.yaml names once; the
    RayJob's submitter runs Ray's CPU image (the same Ray, no GPU layers)."""
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    images = {c["image"] for _, d in DOCS for c in _all_containers(d) if c not in submitter}
    assert images == {"dpo-ray"}, f"every pod should name the one image kustomize sets: {images}"
    assert [c["image"] for c in submitter] == [f"rayproject/ray:{_constraint('ray')}-py311"], submitter
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert [i["name"] for i in kustomization["images"]] == ["dpo-ray"]
    assert set(kustomization["resources"]) == {p.name for p in MANIFESTS}
    kubectl = shutil.which("kubectl")
    if kubectl:  # kustomize as kubectl runs it: every dpo-ray image rewritten, KubeRay's kinds included
        built = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True,
                               timeout=60)
        assert built.returncode == 0, built.stderr
        want = f"{kustomization['images'][0]['newName']}:{kustomization['images'][0]['newTag']}"
        out = list(yaml.safe_load_all(built.stdout))
        got = {c["image"] for d in out for c in _all_containers(d)}
        assert got == {want, submitter[0]["image"]}, got
        assert {d["kind"] for d in out} == {d["kind"] for _, d in DOCS}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)\s*\nARG BASE_DIGEST=\s*\n"
                     r"FROM \$\{BASE_IMAGE\}\$\{BASE_DIGEST:\+@\}\$\{BASE_DIGEST\}", dockerfile, re.M), \
        "deploy/Dockerfile should build FROM rayproject/ray, by digest (ARG BASE_DIGEST)"
    tag = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)", dockerfile, re.M).group(1)
    assert re.search(r'if \[ -z "\$BASE_DIGEST" \] && \[ "\$ALLOW_UNPINNED_BASE" != "1" \]; then.*?exit 1',
                     dockerfile, re.S), "an unpinned base must stop the build unless ALLOW_UNPINNED_BASE=1"
    assert "BuildKit" in dockerfile and dockerfile.startswith("# syntax=docker/dockerfile:1"), \
        "the per-Dockerfile .dockerignore needs BuildKit: say so"
    assert tag.startswith(_constraint("ray") + "-py3"), (
        f"base tag {tag} != constraints.txt ray {_constraint('ray')}")
    assert re.search(r"-(gpu|cu\d+)$", tag), f"base tag {tag} should be a GPU build"
    # layer caching: the dependencies from pyproject.toml +
    # constraints.txt only, then the package without deps
    lines = [line for line in dockerfile.splitlines() if re.match(r"(COPY|RUN|ENV|USER|WORKDIR)\b", line)]
    first_copy_of_code = next(i for i, line in enumerate(lines) if re.match(r"COPY\b.*\bdpo_ray\b", line))
    deps = next(i for i, line in enumerate(lines) if line.startswith("RUN") and "tomllib" in line)
    assert deps < first_copy_of_code, "dependencies must be installed before the package is copied"
    copied_before = " ".join(line for line in lines[:deps] if line.startswith("COPY"))
    assert set(re.findall(r"\S+\.(?:toml|txt)", copied_before)) == {"pyproject.toml", "constraints.txt"}, (
        copied_before)
    assert re.search(r"pip install --no-cache-dir --no-deps \.", dockerfile)
    # the dependency step's own snippet, run here: it lists exactly pyproject.toml's dependencies
    snippet = re.search(r'python -c "import tomllib;[^"]+"', dockerfile).group(0)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    listed = subprocess.run(["sh", "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ,
                                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert listed.returncode == 0, listed.stderr
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert listed.stdout.split() == project["dependencies"]
    assert re.search(r"COPY[^\n]*examples\s+\./examples", dockerfile), \
        "the manifests read /app/examples/*.yaml: copy examples/ into the image"
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M)
    assert workdir and workdir.group(1) == "/app"
    assert "PYTHONUNBUFFERED=1" in dockerfile


def test_rayjob_and_raycluster_describe_the_same_cluster():
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")
    cluster = next(d for _, d in RAY_DOCS if d["kind"] == "RayCluster")
    spec = json.loads(json.dumps(job["spec"]["rayClusterSpec"]))
    for _, group in _groups(spec):  # the label deploy/networkpolicy.yaml selects the job's pods by
        assert group["template"]["metadata"]["labels"].pop("dpo-ray/job") == job["metadata"]["name"]
    assert spec == cluster["spec"], (
        "deploy/rayjob.yaml's rayClusterSpec drifted from deploy/raycluster.yaml's spec")


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
    return subprocess.run(["bash", str(DEPLOY / "submit.sh"), *args], cwd=ROOT, capture_output=True,
                          text=True, env={**base, "PATH": f"{fake}:{base['PATH']}", **env}, timeout=60)


def test_submit_script_uses_the_jobs_api(tmp_path):
    text = (DEPLOY / "submit.sh").read_text()
    assert "ray job submit" in text and "--working-dir" in text and "--runtime-env-json" in text
    proc = _submit(tmp_path, "examples/lora.yaml", "--max_steps", "5",
                   DPO_RAY_SHARED_DIR="/mnt/shared/outputs", SUBMIT_ARGS="--no-wait --submission-id r1")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)
    assert argv[:4] == ["job", "submit", "--address", "http://127.0.0.1:8265"]
    assert argv[4:7] == ["--no-wait", "--submission-id", "r1"]
    assert argv[argv.index("--"):] == ["--", "python", "-m", "dpo_ray", "train", "--config",
                                       "examples/lora.yaml", "--max_steps", "5"]
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
    mult = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
            "Ti": 2**40}
    return float(m.group(1)) * mult[m.group(2)]


def test_num_gpus_set_explicitly_and_matching_the_pod():
    """The operator derives --num-gpus from the container's GPU limit only when it parses rayStartParams; set
    it explicitly (head: 0) so GPU detection never depends on that."""
    for path, doc in RAY_DOCS:
        for name, group in _groups(_cluster_spec(doc)):
            params = group["rayStartParams"]
            assert "num-gpus" in params, (
                f"{path.name}: group {name} should set rayStartParams.num-gpus explicitly")
            gpus = int(_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert int(params["num-gpus"]) == gpus, (
                f"{path.name}: group {name} num-gpus != nvidia.com/gpu limit")
            custom = _ray_resources(group)
            for key, amount in custom.items():
                assert amount <= gpus, f"{path.name}: group {name} advertises {amount} {key} on {gpus} GPU(s)"
        assert _cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_object_store_fits_in_dev_shm():
    """Ray sizes its object store from the pod's memory (30 %) and falls back to /tmp (disk, slow) when
    /dev/shm is smaller: every group sets object-store-memory, below its /dev/shm emptyDir and its memory
    limit."""
    for path, doc in RAY_DOCS:
        for name, group in _groups(_cluster_spec(doc)):
            params, pod = group["rayStartParams"], _pod_spec(group)
            assert "object-store-memory" in params, (
                f"{path.name}: group {name} should set object-store-memory")
            store = _quantity(params["object-store-memory"])
            mounts = {m["mountPath"]: m["name"] for m in _container(group).get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{path.name}: group {name} mounts no /dev/shm volume"
            shm = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])["emptyDir"]
            assert shm.get("medium") == "Memory"
            assert store <= 0.95 * _quantity(shm["sizeLimit"]), \
                f"{path.name}: group {name} object store {params['object-store-memory']} > " \
                f"/dev/shm {shm['sizeLimit']}"
            memory = _quantity(_container(group)["resources"]["limits"]["memory"])
            assert _quantity(shm["sizeLimit"]) < 0.5 * memory, (
                f"{path.name}: /dev/shm counts against the memory limit")


POD_SECURITY = {"runAsUser": 1000, "runAsGroup": 100, "runAsNonRoot": True, "fsGroup": 100,
                "fsGroupChangePolicy": "OnRootMismatch"}


def test_pods_can_write_the_shared_volume():
    """The image runs as uid 1000 (gid 100), said explicitly in every pod; fsGroup changes ownership only when
    the volume's root does not match (OnRootMismatch: a full volume is not walked at every pod start); the PVC
    names a storage class to replace."""
    for path, doc in DOCS:
        if doc["kind"] in ("RayJob", "RayCluster"):
            for name, group in _groups(_cluster_spec(doc)):
                assert _pod_spec(group).get("securityContext") == POD_SECURITY, (
                    f"{path.name}: {name} securityContext")
        if doc["kind"] == "Job":
            assert doc["spec"]["template"]["spec"].get("securityContext") == POD_SECURITY
        if doc["kind"] == "PersistentVolumeClaim":
            assert "REPLACE" in doc["spec"].get("storageClassName", ""), \
                "pvc.yaml: an explicit storageClassName placeholder (an unset class binds the default, " \
                "often RWO)"
    text = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("kubectl get pvc dpo-ray-shared", "Bound", "fsGroupChangePolicy", "no_root_squash",
                   "anonuid", "uid=1000", "ownerUid"):
        assert needle in text, f"docs/deploy.md should say {needle}"


def _init_script(name: str, shared: Path) -> str:
    job = next(d for _, d in DOCS if d["kind"] == "Job")
    (container,) = [c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == name]
    assert container["command"][:2] == ["sh", "-c"]
    return container["command"][2].replace(SHARED, str(shared))


def _as_user(uid: int, gid: int):
    def demote():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return demote


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the init steps as root and as uid 1000, as the pod does")
def test_asset_job_init_steps_on_a_root_owned_volume():
    """deploy/prepare-assets.yaml's init steps, run as the pod runs them (sh; root, then uid 1000 gid 100) on
    a root-owned folder standing in for the export: the best-effort chown makes it writable; where the chown
    cannot help (a squashed root, a fixed owner: here, the folders left root-owned 0755), the check fails
    naming the fix."""
    import tempfile

    # uid 1000 can reach it (pytest's cannot)
    tmp_path = Path(tempfile.mkdtemp(prefix="dporay-volume-", dir="/tmp"))
    os.chmod(tmp_path, 0o755)
    try:
        _run_init_steps(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_init_steps(tmp_path: Path) -> None:
    job = next(d for _, d in DOCS if d["kind"] == "Job")
    inits = {c["name"]: c for c in job["spec"]["template"]["spec"]["initContainers"]}
    assert list(inits) == ["volume-permissions", "check-writable"]
    assert inits["volume-permissions"]["securityContext"]["runAsUser"] == 0
    assert "securityContext" not in inits["check-writable"], "the check runs as the pod's uid 1000"
    dirs = ["models", "data", "outputs", "ray-logs", "hf-cache"]
    for volume, chown_works in (("exported", True), ("squashed", False)):
        shared = tmp_path / volume
        shared.mkdir(mode=0o755)
        if chown_works:
            fixed = subprocess.run(["sh", "-c", _init_script("volume-permissions", shared)],
                                   capture_output=True, text=True, timeout=60)
            assert fixed.returncode == 0 and "owned by 1000:100" in fixed.stdout, fixed.stdout + fixed.stderr
        else:  # what root_squash leaves: the directories exist, root-owned, and the chown did nothing
            for d in dirs:
                (shared / d).mkdir(mode=0o755)
        check = subprocess.run(["sh", "-c", _init_script("check-writable", shared)], capture_output=True,
                               text=True, timeout=60, preexec_fn=_as_user(1000, 100))
        if chown_works:
            assert check.returncode == 0, check.stderr
            assert all((shared / d).stat().st_uid == 1000 for d in dirs)
            assert not list(shared.rglob(".dpo-ray-write-check-*")), "the probe files are removed"
        else:
            assert check.returncode == 1, check.stdout
            for needle in ("uid 1000 gid 100 cannot write", "no_root_squash", "anonuid=1000",
                           "uid=1000,gid=100", "ownerUid 1000"):
                assert needle in check.stderr, check.stderr
    # as a non-root user (the chown refused), the best-effort step still lets the Job go on to the check
    shared = tmp_path / "nonroot"
    shared.mkdir(mode=0o777)
    refused = subprocess.run(["sh", "-c", _init_script("volume-permissions", shared)], capture_output=True,
                             text=True, timeout=60, preexec_fn=_as_user(1000, 100))
    assert refused.returncode == 0 and "refused" in refused.stdout, refused.stdout + refused.stderr


def test_token_authentication_and_network_policy():
    """The dashboard binds 0.0.0.0, so any pod could reach the Jobs API: token authentication from a Secret
    (authOptions), and per cluster a NetworkPolicy that selects only that cluster's pods (the operator's
    ray.io/cluster label for the RayCluster; the job's own dpo-ray/job label for the RayJob, whose cluster the
    operator names) and admits its own pods, the submitter and the operator on 8265, the scraper on the
    metrics ports."""
    for path, doc in RAY_DOCS:
        spec = _cluster_spec(doc)
        assert spec.get("authOptions", {}).get("mode") == "token", f"{path.name}: authOptions.mode: token"
        assert spec["authOptions"].get("secretName"), f"{path.name}: the token from a Secret you create"
        for name, group in _groups(spec):
            labels = group["template"].get("metadata", {}).get("labels", {})
            assert labels.get("app.kubernetes.io/name") == "dpo-ray", (
                f"{path.name}: {name} pods need the label")
            ports = {p.get("name"): p["containerPort"] for p in _container(group).get("ports", [])}
            assert ports.get("metrics") == 8080, f"{path.name}: {name} should name its metrics port"
    policies = {d["metadata"]["name"]: d["spec"] for _, d in DOCS if d["kind"] == "NetworkPolicy"}
    cluster = next(d for _, d in RAY_DOCS if d["kind"] == "RayCluster")
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")
    job_name = job["metadata"]["name"]
    selectors = {cluster["metadata"]["name"]: {"ray.io/cluster": cluster["metadata"]["name"]},
                 job_name: {"dpo-ray/job": job_name}}
    assert set(policies) == set(selectors), f"one NetworkPolicy per Ray cluster: {sorted(policies)}"
    for _, group in _groups(_cluster_spec(job)):
        assert group["template"]["metadata"]["labels"]["dpo-ray/job"] == job_name
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    for name, pol in policies.items():
        own = selectors[name]
        assert pol["podSelector"] == {"matchLabels": own}, (
            f"policy {name} should select only its cluster's pods")
        assert pol["policyTypes"] == ["Ingress"]
        seen = []
        for rule in pol["ingress"]:
            assert all("ipBlock" not in p for p in rule["from"]), "no address ranges: pods by label only"
            ports = [p["port"] for p in rule.get("ports", [])]
            if rule["from"] == [{"podSelector": {"matchLabels": own}}]:
                assert not ports
                seen.append("own pods")
            elif rule["from"] == [operator]:
                assert ports == [8265], rule
                seen.append("operator")
            elif rule["from"] == [scraper]:
                assert ports == [8080, 44217, 44227], rule
                seen.append("scraper")
            else:
                assert (rule["from"]
                        == [{"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": job_name}}}])
                assert ports == [8265] and name == job_name, rule
                seen.append("submitter")
        want = ["operator", "own pods", "scraper"] + (["submitter"] if name == job_name else [])
        assert sorted(seen) == want, (name, seen)
    assert "--use-kubernetes-proxy" in (DEPLOY / "networkpolicy.yaml").read_text(), "document the proxy mode"
    assert "--use-kubernetes-proxy" in (ROOT / "docs" / "deploy.md").read_text()
    # the asset Job is not a Ray pod, and the only one with the Hugging Face token
    for path, doc in DOCS:
        with_token = [c["name"] for c in _all_containers(doc)
                      if "HF_TOKEN" in {e["name"] for e in c.get("env", [])}]
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


def test_ray_logs_survive_crashes():
    """/tmp/ray on an emptyDir (a restarted container keeps its earlier sessions), ephemeral-storage requested
    for it, a preStop hook that copies every session's logs to the volume with the time to do it, unbuffered
    output."""
    for path, doc in RAY_DOCS:
        for name, group in _groups(_cluster_spec(doc)):
            pod, c = _pod_spec(group), _container(group)
            hook = " ".join(c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
            assert "/tmp/ray/session_2*/" in hook and "/mnt/shared/ray-logs/$HOSTNAME" in hook, \
                f"{path.name}: {name}: every session's logs should be copied to the volume when the pod stops"
            assert pod.get("terminationGracePeriodSeconds", 30) >= 60, (
                f"{path.name}: {name}: time for the copy")
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            volume = next(v for v in pod["volumes"] if v["name"] == mounts.get("/tmp/ray"))
            assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory", (
                f"{path.name}: {name}")
            requested = c["resources"]["requests"].get("ephemeral-storage")
            assert requested and _quantity(requested) >= _quantity(volume["emptyDir"]["sizeLimit"]), \
                f"{path.name}: {name}: request the ephemeral storage /tmp/ray may fill (spilling, logs)"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("PYTHONUNBUFFERED") == "1", f"{path.name}: {name}: the driver's output is piped"
    hooks = {json.dumps(_container(g)["lifecycle"]["preStop"]) for _, d in RAY_DOCS
             for _, g in _groups(_cluster_spec(d))}
    assert len(hooks) == 1, "one preStop hook everywhere (tested below)"


def test_prestop_hook_copies_every_session(tmp_path):
    """The preStop hook itself, run: two sessions (a container restart) both land on the volume."""
    hook = _container(_groups(_cluster_spec(RAY_DOCS[0][1]))[0][1])["lifecycle"]["preStop"]["exec"]["command"]
    tmp_ray, shared = tmp_path / "tmp-ray", tmp_path / "shared"
    for session in ("session_2026-12-03_10-00-00_1_1", "session_2026-12-03_11-00-00_2_2"):
        (tmp_ray / session / "logs").mkdir(parents=True)
        (tmp_ray / session / "logs" / "raylet.out").write_text(session)
    (tmp_ray / "session_latest").symlink_to(tmp_ray / "session_2026-12-03_11-00-00_2_2")
    script = hook[2].replace("/tmp/ray", str(tmp_ray)).replace("/mnt/shared", str(shared))
    proc = subprocess.run(hook[:2] + [script], env={**os.environ, "HOSTNAME": "pod-a"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    copied = sorted(p.relative_to(shared).as_posix() for p in shared.rglob("raylet.out"))
    assert copied == ["ray-logs/pod-a/session_2026-12-03_10-00-00_1_1/raylet.out",
                      "ray-logs/pod-a/session_2026-12-03_11-00-00_2_2/raylet.out"], copied


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
    m = re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version (\d+)\.(\d+)\.(\d+)",
                  text)
    assert m and (int(m.group(1)), int(m.group(2))) >= (1, 6), (
        "pin the operator: authOptions needs KubeRay >= 1.6")
    for needle in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "ray status", "policy_gpu", "reference_gpu",
                   "What to change for your cluster", "Pre-flight", "Re-runs", "NCCL", "DPO_RAY_SHARED_DIR"):
        assert needle in text, f"docs/deploy.md should cover {needle}"


# ------------------------------------------------------------------------- the pods' own lines, through bash

def _start_argv(line: str, tmp_path: Path) -> tuple[list[str], str]:
    """What Ray receives from the pod's container command: the line through /bin/bash -c, as the pod runs it,
    with a stand-in `ray` on PATH that records its arguments."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "ray").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (fake / "ray").chmod(0o755)
    proc = subprocess.run([*kuberay.container_command(), line], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def _ray_start_params(argv: list[str]) -> dict:
    """Ray's own `ray start` command line parser (click), without starting anything; custom resources through
    Ray's parse_resources_json, as `ray start` does."""
    from ray._private.utils import parse_resources_json
    from ray.autoscaler._private.cli_logger import cf, cli_logger
    from ray.scripts.scripts import start

    assert argv[0] == "start"
    params = start.make_context("start", list(argv[1:])).params
    params["resources"] = (parse_resources_json(params["resources"], cli_logger, cf) if params["resources"]
                           else {})
    return params


@pytest.mark.parametrize("version", kuberay.VERSIONS)
def test_every_pod_start_line_reaches_ray_intact(version, tmp_path):
    """Each Ray pod's container command as KubeRay `version` builds it, run by bash, parsed by Ray's own CLI:
    the custom resources, GPUs and object store Ray gets are the manifest's, and the line blocks (the pod's
    process)."""
    for path, doc in RAY_DOCS:
        for name, node_type, group in kuberay.groups(kuberay.cluster_spec(doc)):
            params = kuberay.start_params(group, node_type, "dpo-ray-head-svc.default.svc.cluster.local")
            line = kuberay.ray_start_line(params, node_type, version)
            argv, _ = _start_argv(line, tmp_path)
            try:
                ray = _ray_start_params(argv)
            except Exception as e:
                raise AssertionError(f"{path.name}: {name}'s pod line is refused by `ray start`: "
                                     f"{argv}") from e
            assert ray["head"] is (node_type == "head") and ray["block"] is True
            assert ray["num_gpus"] == int(group["rayStartParams"]["num-gpus"])
            assert ray["object_store_memory"] == int(group["rayStartParams"]["object-store-memory"])
            assert ray["resources"] == _ray_resources(group), (path.name, name, ray["resources"])
            if node_type == "head":
                assert ray["num_cpus"] == 0 and ray["dashboard_host"] == "0.0.0.0"
                assert not ray["resources"]
            else:
                assert ray["address"] == "dpo-ray-head-svc.default.svc.cluster.local:6379"
                assert ray["resources"] == {f"{name}_gpu": ray["num_gpus"]}, "one custom resource per GPU"
                assert ray["num_cpus"] == int(_container(group)["resources"]["limits"]["cpu"])


def test_a_broken_resources_quoting_is_caught(tmp_path):
    """The check above discriminates: the JSON written bare (the form KubeRay's operator parses, bash mangles)
    is refused by Ray's parser at the pod's line, as it was in the pods."""
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")
    group = json.loads(json.dumps(_cluster_spec(job)["workerGroupSpecs"][0]))
    group["rayStartParams"]["resources"] = '{"policy_gpu":4}'
    line = kuberay.ray_start_line(kuberay.start_params(group, "worker", "head"), "worker", "1.7.0")
    argv, _ = _start_argv(line, tmp_path)
    assert "--resources={policy_gpu:4}" in argv, argv
    with pytest.raises(Exception, match=""):
        _ray_start_params(argv)
    with pytest.raises(AssertionError, match="which Ray refuses"):
        _ray_resources(group)


def test_operator_parses_our_resources_too():
    """KubeRay's own parse of rayStartParams.resources (quotes and spaces trimmed, then JSON) reads ours: the
    value it would use if it ever derived accelerators from it."""
    for _, doc in RAY_DOCS:
        for name, _, group in kuberay.groups(kuberay.cluster_spec(doc)):
            raw = group["rayStartParams"].get("resources")
            if raw is not None:
                assert json.loads(raw.strip("'\"` ")) == _ray_resources(group), name


def test_submitter_line_hands_ray_job_submit_the_entrypoint(tmp_path):
    """The RayJob submitter's line (both operator versions) through bash -ce: `ray job submit` gets the
    entrypoint as its words, and Ray's CLI joins them back (shlex.join) into the command its driver runs with
    a shell."""
    job = next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.jsonl"
    (fake / "ray").write_text(f"#!{sys.executable}\nimport json, sys\n"
                              f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                              "sys.exit(1 if sys.argv[1:3] == ['job', 'status'] else 0)\n")
    (fake / "ray").chmod(0o755)
    (fake / "python").write_text("#!/bin/sh\nexit 0\n")  # 1.7's wait for the dashboard: healthy at once
    (fake / "python").chmod(0o755)
    for version in kuberay.VERSIONS:
        log.unlink(missing_ok=True)
        line = kuberay.job_submit_line(job, "dpo-ray-head-svc:8265", "dpo-ray-qwen2-0-5b-abcde", version)
        proc = subprocess.run([*kuberay.submitter_command(), line],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
        assert proc.returncode == 0, proc.stderr
        calls = [json.loads(x) for x in log.read_text().splitlines()]
        assert [c[:2] for c in calls] == [["job", "status"], ["job", "submit"], ["job", "logs"]], calls
        submit = calls[1]
        words = submit[submit.index("--") + 1:]
        entry = shlex.join(words)  # ray job submit's own join (dashboard/modules/job/cli.py)
        argv = _train_argv(entry)
        flags = {argv[i][2:]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        assert flags["output_dir"] == "/mnt/shared/outputs/" + flags["run_name"], flags
        assert flags["config"] == CONFIG_MOUNT + "/config.yaml"


# ------------------------------------------------------------------------------------ KubeRay's CRD schemas

CRDS = ROOT / "tests" / "data" / "kuberay-crds"


@functools.cache
def _crd_schema(version: str, kind: str) -> dict:
    text = gzip.decompress((CRDS / f"v{version}-ray.io_{kind.lower()}s.yaml.gz").read_bytes())
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: libyaml when present
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return served["schema"]["openAPIV3Schema"]


def _unknown_fields(node, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server prunes them silently, or refuses them under strict
    field validation): where it lists properties and neither preserves unknown fields nor allows additional
    ones."""
    out = []
    if isinstance(node, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in node.items():
            if props is not None and key in props:
                out += _unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += _unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields") and not extra:
                if path != ".metadata":
                    out.append(f"{path}.{key}")
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(node):
            out += _unknown_fields(value, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.parametrize("version", kuberay.VERSIONS)
def test_manifests_valid_for_kuberay_crds(version):
    """deploy/raycluster.yaml and deploy/rayjob.yaml against KubeRay `version`'s CRD schemas (vendored in
    tests/data/kuberay-crds): types, required fields, enums; and no field the CRD does not know."""
    import jsonschema

    for path, doc in RAY_DOCS:
        schema = _crd_schema(version, doc["kind"])
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc),
                        key=lambda e: list(e.absolute_path))
        assert not errors, f"{path.name} vs KubeRay {version}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        assert not _unknown_fields(doc, schema), f"{path.name}: fields KubeRay {version} does not know"


def test_crd_check_catches_a_typo():
    import jsonschema

    job = json.loads(json.dumps(next(d for _, d in RAY_DOCS if d["kind"] == "RayJob")))
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["imag"] = "x"
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "1"
    schema = _crd_schema("1.7.0", "RayJob")
    assert _unknown_fields(job, schema) == [".spec.submitterPodTemplate.spec.containers[0].imag"]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(job))


def test_docs_create_the_secret_and_configmap_before_the_cluster():
    """In docs/deploy.md's steps and in each manifest's header: the Secret authOptions names and the ConfigMap
    the head mounts exist before the RayJob or RayCluster is applied (pods would wait on them, or the job
    fail)."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for name, text in [("docs/deploy.md", docs)] + [(p.name, p.read_text()) for p, _ in RAY_DOCS]:
        secret = text.find("kubectl create secret generic dpo-ray-auth")
        configmap = text.find("kubectl create configmap dpo-ray-config --from-file")
        applies = [m.start()
                   for m in re.finditer(r"kubectl apply -k deploy/ -l dpo-ray/part=(job|cluster)", text)]
        assert secret >= 0 and configmap >= 0 and applies, f"{name}: the Secret, the ConfigMap and the apply"
        assert max(secret, configmap) < min(applies), (
            f"{name}: create the Secret and ConfigMap before the cluster")
    assert "1.6.2" in docs and "1.7.0" in docs, "docs/deploy.md should state the KubeRay versions tested"
