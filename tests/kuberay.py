"""What the KubeRay operator makes of deploy/*.yaml: each Ray pod's container command and the RayJob
submitter's.

A transcription of ray-operator/controllers/ray/common/pod.go (``BuildPod``, ``setMissingRayStartParams``,
``generateRayStartCommand``, ``addWellKnownAcceleratorResources``, ``convertParamMap``), common/job.go
(``BuildJobSubmitCommand``), rayjob_controller.go (``configureSubmitterContainer``) and utils/util.go
(``GetContainerCommand``) at the tags v1.6.2 and v1.7.0, read from the KubeRay repository. The differences
between the two that matter here: the ``ulimit`` prefix (1.7 reads ``RAY_START_ULIMIT_OPEN_FILES``),
``include-log-monitor`` among the flags that keep an explicit ``false`` (1.7), and the submitter's wait for
the dashboard (1.7).

Nothing here runs anything: tests/test_deploy.py hands the lines to bash and Ray's own CLI parser,
tests/test_deploy_cluster.py starts a Ray cluster from them.
"""

from __future__ import annotations

import json
import re

VERSIONS = ("1.6.2", "1.7.0")
DEFAULT_METRICS_PORT = 8080          # utils.DefaultMetricsPort
DEFAULT_AGENT_LISTEN_PORT = 52365    # utils.DefaultDashboardAgentListenPort
DEFAULT_GCS_PORT = 6379              # GetHeadPort: rayStartParams["port"], else 6379
DEFAULT_DASHBOARD_PORT = 8265        # utils.DefaultDashboardPort
GPU_RESOURCE = re.compile(r"(gpu|nvidia\.com/mig-\d+g\.\d+gb)$")  # utils.IsGPUResourceKey
# customAccelerator...Map
CUSTOM_ACCELERATORS = {"aws.amazon.com/neuroncore": "neuron_cores", "google.com/tpu": "TPU"}


def container_command() -> list[str]:
    """utils.GetContainerCommand([]): the Ray container's command (the login-shell flag only when the operator
    runs with ENABLE_LOGIN_SHELL=true)."""
    return ["/bin/bash", "-c", "--"]


def submitter_command() -> list[str]:
    """utils.GetContainerCommand(["e"]): the RayJob submitter's command."""
    return ["/bin/bash", "-ce", "--"]


def _quantity(value) -> float:
    """A Kubernetes quantity as resource.Quantity.Value() reads it (rounded up to an integer)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|[KMGTPE]i?)?", str(value))
    if not m:
        raise ValueError(f"cannot read the Kubernetes quantity {value!r}")
    mult = {None: 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    return float(m.group(1)) * mult[m.group(2)]


def _int_value(value) -> str:
    q = _quantity(value)
    return str(int(q) if q == int(q) else int(q) + 1)


def start_params(group: dict, node_type: str, head_fqdn: str = "",
                 head_port: str = str(DEFAULT_GCS_PORT)) -> dict:
    """The complete rayStartParams of one group's pod: the manifest's, plus what the operator adds."""
    for field in ("resources", "labels"):  # 1.5+: group-level fields the operator folds into rayStartParams
        if field in group:
            raise NotImplementedError(f"group-level {field}: not transcribed here (deploy/ does not use it)")
    params = dict(group.get("rayStartParams") or {})
    resources = group["template"]["spec"]["containers"][0].get("resources", {})
    # setMissingRayStartParams
    if node_type == "worker":
        params.setdefault("address", f"{head_fqdn}:{head_port}")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", str(DEFAULT_METRICS_PORT))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(DEFAULT_AGENT_LISTEN_PORT))
    # generateRayStartCommand
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu and _quantity(cpu):
            params["num-cpus"] = _int_value(cpu)
    if "memory" not in params and limits.get("memory") and _quantity(limits["memory"]):
        params["memory"] = _int_value(limits["memory"])
    _add_accelerators(params, limits)
    return params


def _add_accelerators(params: dict, limits: dict) -> None:
    """addWellKnownAcceleratorResources: num-gpus from the GPU limit when absent. Its first step parses
    rayStartParams.resources (quotes and spaces trimmed, then JSON); when that fails it logs and returns,
    adding nothing (the pod still starts with the manifest's own flags)."""
    if not limits:
        return
    raw = params.get("resources")
    try:
        resources = json.loads(raw.strip("'\"` ")) if raw is not None else {}
    except json.JSONDecodeError:
        return
    has_custom = any(v in resources for v in CUSTOM_ACCELERATORS.values())
    for key in sorted(limits):
        value = _quantity(limits[key])
        if "num-gpus" not in params and GPU_RESOURCE.search(key) and value:
            params["num-gpus"] = _int_value(limits[key])
        if not has_custom and key in CUSTOM_ACCELERATORS and value:
            if CUSTOM_ACCELERATORS[key] not in resources:
                resources[CUSTOM_ACCELERATORS[key]] = value
                params["resources"] = "'" + json.dumps(resources, separators=(",", ":")) + "'"
            has_custom = True


def convert_param_map(params: dict, version: str) -> str:
    """convertParamMap: keys sorted; "true" -> a bare --flag, "false" -> dropped, except for the flags that
    take an explicit boolean; everything else --key=value, spaced exactly as the Go code spaces it."""
    special = ["log-color", "include-dashboard"] + (["include-log-monitor"] if version >= "1.7" else [])
    out = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in special:
            if value.lower() == "true":
                out += f" --{key} "
        else:
            out += f" --{key}={value} "
    return out


def ray_start_line(params: dict, node_type: str, version: str) -> str:
    """The container's one argument: ``ulimit ...; ray start ...`` (BuildPod, no user command in the
    manifest)."""
    ulimit = "ulimit -n 65536" if version < "1.7" else "ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}"
    head = "ray start --head " if node_type == "head" else "ray start "
    return f"{ulimit}; {head}{convert_param_map(params, version)}"


def pod_env(container: dict, auth_options: dict | None, token: str) -> dict[str, str]:
    """The env the operator gives a Ray container for token auth (SetContainerTokenAuthEnvVars):
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret authOptions.secretName, key auth_token (here: its
    value), plus the container's own literal env."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    if auth_options and auth_options.get("mode") == "token":
        env.setdefault("RAY_AUTH_MODE", "token")
        env.setdefault("RAY_AUTH_TOKEN", token)
    return env


def job_submit_line(rayjob: dict, dashboard_url: str, job_id: str, version: str) -> str:
    """BuildJobSubmitCommand in K8sJobMode, joined with spaces as configureSubmitterContainer joins it: the
    submitter's one argument (the entrypoint goes in as shell text, untouched)."""
    spec = rayjob["spec"]
    address = dashboard_url if dashboard_url.startswith("http://") else "http://" + dashboard_url
    cmd: list[str] = []
    if version >= "1.7":
        health = (f"python -c \"import urllib.request; r=urllib.request.urlopen('{address}/api/gcs_healthz', "
                  f"timeout=10); exit(0 if b'success' in r.read() else 1)\"")
        cmd += ["until", health, ">/dev/null", "2>&1", ";", "do", "echo",
                json.dumps(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."), ";", "sleep",
                "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";",
            "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        raise NotImplementedError("runtimeEnvYAML: not used by deploy/rayjob.yaml")
    if spec.get("metadata"):
        cmd += ["--metadata-json", json.dumps(json.dumps(spec["metadata"], separators=(",", ":")))]
    cmd += ["--submission-id", job_id]
    for key, flag in (("entrypointNumCpus", "--entrypoint-num-cpus"),
                      ("entrypointNumGpus", "--entrypoint-num-gpus")):
        if spec.get(key, 0) > 0:
            cmd += [flag, f"{float(spec[key]):f}"]
    if spec.get("entrypointResources"):
        cmd += ["--entrypoint-resources", json.dumps(spec["entrypointResources"])]
    cmd += ["--", spec["entrypoint"].strip(), ";", "fi", ";", "ray", "job", "logs", "--address", address,
            "--follow", job_id]
    return " ".join(cmd)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, node type, group) for the head and every worker group."""
    return [("head", "head", spec["headGroupSpec"])] + [(g["groupName"], "worker", g)
                                                        for g in spec["workerGroupSpecs"]]
