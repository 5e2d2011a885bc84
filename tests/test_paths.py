"""Path-valued settings: resolved once, on the driver, against the working directory (dpo_ray/paths.py).

The end-to-end proof (relative model, data and output paths from a directory the Ray workers do not run
in) is tests/test_docs_commands.py running the README's commands; these are the rules underneath.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpo_ray.cli import main
from dpo_ray.config import DPOConfig, load_config
from dpo_ray.errors import ConfigError
from dpo_ray.paths import check_paths, resolve_config_paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prefs.jsonl").write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n')
    return tmp_path


def test_relative_paths_become_absolute_against_the_working_directory(in_tmp):
    cfg = resolve_config_paths(DPOConfig(
        model_name_or_path="model", dataset_name="data/*.jsonl", output_dir="out",
        resume_from_checkpoint="ckpt", ray={"storage_path": "../storage"},
        reference={"cache_dir": "~/refcache", "model_name_or_path": "./model"}))
    assert cfg.model_name_or_path == str(in_tmp / "model")
    assert cfg.dataset_name == str(in_tmp / "data" / "*.jsonl")  # a glob that matches here
    assert cfg.output_dir == str(in_tmp / "out")  # need not exist yet
    assert cfg.resume_from_checkpoint == str(in_tmp / "ckpt")
    assert cfg.ray.storage_path == str(in_tmp.parent / "storage")
    assert cfg.reference.cache_dir == str(Path.home() / "refcache")
    assert cfg.reference.model_name_or_path == str(in_tmp / "model")
    assert resolve_config_paths(cfg) == cfg  # idempotent: the driver may resolve twice


def test_outputs_of_a_ray_job_never_land_in_its_uploaded_working_dir(in_tmp, monkeypatch):
    """Under `ray job submit --working-dir` the driver's working directory is a node-local copy Ray deletes
    after the job: a relative output path there is refused, naming the key; DPO_RAY_SHARED_DIR is where
    relative output paths (and the default precomputed-reference cache) go instead, while inputs stay the
    working directory's."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg.zip"}}))
    monkeypatch.delenv("DPO_RAY_SHARED_DIR", raising=False)
    with pytest.raises(ConfigError) as e:
        resolve_config_paths(DPOConfig(output_dir="out", ray={"storage_path": "ckpts"}))
    assert [k for k, _ in e.value.problems] == ["output_dir", "ray.storage_path"]
    assert ("shared_dir" in str(e.value) and "DPO_RAY_SHARED_DIR" in str(e.value)
            and "deletes after the job" in str(e.value))
    # absolute: as given
    assert resolve_config_paths(DPOConfig(output_dir="/abs/out")).output_dir == "/abs/out"
    shared = in_tmp / "shared"
    monkeypatch.setenv("DPO_RAY_SHARED_DIR", str(shared))
    cfg = resolve_config_paths(DPOConfig(model_name_or_path="model", output_dir="out",
                                         ray={"storage_path": "ckpts"}))
    assert cfg.output_dir == str(shared / "out") and cfg.ray.storage_path == str(shared / "ckpts")
    assert cfg.reference.cache_dir == str(shared / "ref_logps_cache")
    assert cfg.model_name_or_path == str(in_tmp / "model")  # an input: the (uploaded) working directory's
    # the variable is the setting's default: validate and dpo_config.yaml show it
    assert cfg.shared_dir == str(shared)
    assert resolve_config_paths(cfg) == cfg
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # outside a job too: shared_dir is the output base
    assert resolve_config_paths(DPOConfig(output_dir="o")).output_dir == str(shared / "o")
    monkeypatch.delenv("DPO_RAY_SHARED_DIR")  # the setting itself, no variable
    other = in_tmp / "other"
    cfg = resolve_config_paths(DPOConfig(output_dir="o", shared_dir=str(other)))
    assert cfg.output_dir == str(other / "o") and cfg.reference.cache_dir == str(other / "ref_logps_cache")


def test_names_uris_and_latest_pass_through(in_tmp):
    cfg = resolve_config_paths(DPOConfig(model_name_or_path="Qwen/Qwen2-0.5B-Instruct",
                                         dataset_name="trl-lib/ultrafeedback_binarized",
                                         output_dir="s3://bucket/run",
                                         ray={"storage_path": "gs://bucket/ray"}))
    assert cfg.model_name_or_path == "Qwen/Qwen2-0.5B-Instruct"  # a hub-style name: checked, not rewritten
    assert cfg.dataset_name == "trl-lib/ultrafeedback_binarized"
    assert cfg.output_dir == "s3://bucket/run" and cfg.ray.storage_path == "gs://bucket/ray"
    assert resolve_config_paths(DPOConfig(resume_from_checkpoint="latest")).resume_from_checkpoint == "latest"
    # latest lists checkpoints on the driver's disk: with a URI storage_path it is refused, saying why
    with pytest.raises(ConfigError, match="resume_from_checkpoint: latest reads the checkpoints"):
        DPOConfig(resume_from_checkpoint="latest", ray={"storage_path": "gs://bucket/ray"})
    # path-like values are paths even when nothing is there yet
    assert (resolve_config_paths(DPOConfig(model_name_or_path="./missing")).model_name_or_path
            == str(in_tmp / "missing"))


def test_a_yaml_file_elsewhere_means_the_same_as_flags(in_tmp):
    """Relative paths in a YAML file are the working directory's, not the file's folder (TRL's scripts)."""
    (in_tmp / "configs").mkdir()
    (in_tmp / "configs" / "run.yaml").write_text("model_name_or_path: model\noutput_dir: out\n")
    from_yaml = resolve_config_paths(load_config(in_tmp / "configs" / "run.yaml"))
    from_flags = resolve_config_paths(DPOConfig(model_name_or_path="model", output_dir="out"))
    assert from_yaml.model_name_or_path == from_flags.model_name_or_path == str(in_tmp / "model")
    assert from_yaml.output_dir == str(in_tmp / "out")


def test_python_api_resolves_model_and_reference_paths(in_tmp):
    from dpo_ray.trainer import DPOTrainer

    t = DPOTrainer(model="model", ref_model="./model", args=DPOConfig(output_dir="out"))
    assert t.model == str(in_tmp / "model") and t.args.model_name_or_path == str(in_tmp / "model")
    assert t.args.reference.model_name_or_path == str(in_tmp / "model")
    assert t.args.output_dir == str(in_tmp / "out")


def test_missing_model_directory_is_an_error_naming_the_key(in_tmp):
    with pytest.raises(ConfigError) as e:
        check_paths(resolve_config_paths(DPOConfig(model_name_or_path="./nope")))
    assert "model_name_or_path" in str(e.value) and "is not a directory" in str(e.value)
    (in_tmp / "weights_only").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        check_paths(resolve_config_paths(DPOConfig(model_name_or_path="weights_only")))
    with pytest.raises(ConfigError, match="downloads nothing at run time"):
        check_paths(DPOConfig(model_name_or_path="org/not-downloaded"))


def test_validate_checks_paths_before_anything_starts(in_tmp, capsys):
    assert main(["validate", "--model_name_or_path", "./nope"]) == 2
    assert "model_name_or_path" in capsys.readouterr().err
    assert main(["validate", "--model_name_or_path", "./nope", "--no_path_check"]) == 0
    assert main(["validate", "--model_name_or_path", "model", "--output_dir", "out"]) == 0
    out = capsys.readouterr().out
    assert f"model_name_or_path: {in_tmp / 'model'}" in out and f"output_dir: {in_tmp / 'out'}" in out


_PROBE = textwrap.dedent("""
    import json, sys, tempfile
    import ray
    from ray.cluster_utils import Cluster
    from dpo_ray.cluster import paths_missing_on_nodes

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"policy": 1})
    ray.init(address=cluster.address)
    try:
        shared = tempfile.mkdtemp()
        print(json.dumps({
            "nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "present": paths_missing_on_nodes({"model_name_or_path": sys.argv[1]}, shared),
            "missing": paths_missing_on_nodes({"dataset_name": "/nonexistent/prefs-*.jsonl"}, None),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.timeout(300)
def test_multi_node_probe_names_the_nodes_that_miss_a_path(tmp_path):
    """Two raylets on this machine: a path every node sees passes, one no node sees is named with the
    nodes."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2
    assert result["present"] == []
    [(key, message)] = result["missing"]
    assert key == "dataset_name" and "does not exist on node(s)" in message and message.count("(") >= 2
