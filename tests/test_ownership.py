"""A run touches only its own files: what dpo_ray may delete, the run lock, run names, and the one
redaction of secrets. Real folders with other people's files in them, real `dpo-ray` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_ray.owned import OwnershipError, RunLock, mark_owned, remove_owned, root_problem

ROOT = Path(__file__).resolve().parents[1]


def dpo_ray_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_ray", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def home_like(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    for d in (".ssh", "Documents", "projects/app"):
        (home / d).mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE")
    (home / "Documents" / "thesis.tex").write_text("words")
    (home / "projects" / "app" / "main.py").write_text("print(1)")
    return home


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------ ref-store clean

def test_ref_store_clean_all_on_a_folder_that_is_not_a_store_deletes_nothing(tmp_path):
    home = home_like(tmp_path)
    before = files_of(home)
    r = dpo_ray_cli("ref-store", "clean", "--store", str(home), "--all")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is not a reference store" in r.stderr and "nothing deleted" in r.stderr
    assert files_of(home) == before
    # the same folder as the user's home: refused as such
    r = dpo_ray_cli("ref-store", "clean", "--store", str(home), "--all", env={"HOME": str(home)})
    assert r.returncode == 2 and "is a home directory" in r.stderr
    assert files_of(home) == before


@pytest.mark.parametrize("store, said", [("", "is empty"), ("  ", "is empty"), ("/", "file system root")])
def test_ref_store_refuses_empty_and_root(tmp_path, store, said):
    home = home_like(tmp_path)
    before = files_of(home)
    r = dpo_ray_cli("ref-store", "clean", "--store", store, "--all", cwd=home)  # "" must not mean the cwd
    assert r.returncode == 2 and said in r.stderr, r.stderr
    assert files_of(home) == before


def test_ref_store_refuses_a_repository_root(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "src").mkdir()
    # even a marker (copied in by hand) does not make a repository a store
    mark_owned(repo, "reference-store")
    r = dpo_ray_cli("ref-store", "clean", "--store", str(repo), "--all")
    assert r.returncode == 2 and "repository's root" in r.stderr
    assert (repo / "src").is_dir() and (repo / ".git").is_dir()


def _store_with_entries(root: Path, keys: list[str]) -> None:
    from dpo_ray.reference.store import ENTRY_KIND, STORE_KIND

    mark_owned(root, STORE_KIND)
    for key in keys:
        (root / key / "abc" / "train").mkdir(parents=True)
        (root / key / "abc" / "train" / "part-0.parquet").write_bytes(b"x" * 100)
        mark_owned(root / key, ENTRY_KIND)
        (root / f"{key}.lock").write_text("")


def test_ref_store_clean_removes_only_its_entries(tmp_path):
    store = tmp_path / "store"
    _store_with_entries(store, ["k1", "k2"])
    (store / "notes").mkdir()  # someone's folder inside the store: not an entry the store wrote
    (store / "notes" / "todo.txt").write_text("keep me")
    r = dpo_ray_cli("ref-store", "clean", "--store", str(store), "--all")
    assert r.returncode == 0, r.stderr
    assert ("removed 2 key(s): k1, k2" in r.stdout
            and "left alone (not entries this store wrote): notes" in r.stdout)
    assert sorted(p.name for p in store.iterdir()) == [".dpo_ray_owned", "notes"]
    assert (store / "notes" / "todo.txt").read_text() == "keep me"


def test_ref_store_clean_reports_a_failed_removal_as_failed(tmp_path):
    store = tmp_path / "store"
    _store_with_entries(store, ["k1", "k2"])
    stuck = store / "k1" / "abc" / "train" / "part-0.parquet"
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on ext4)")
    try:
        r = dpo_ray_cli("ref-store", "clean", "--store", str(store), "--all")
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert r.returncode == 1
    assert "removed 1 key(s): k2" in r.stdout and "FAILED to remove k1" in r.stderr
    assert stuck.exists() and not (store / "k2").exists()


def test_remove_owned_checks_marker_root_and_inside(tmp_path):
    home = home_like(tmp_path)
    with pytest.raises(OwnershipError, match="no .dpo_ray_owned marker"):
        remove_owned(home / "Documents", home)
    out = mark_owned(tmp_path / "out", "output_dir")
    # a link out of the owned folder: the link goes, not its target
    (tmp_path / "out" / "link").symlink_to(home)
    assert remove_owned(out / "link", out) and (home / ".ssh" / "id_ed25519").exists()
    with pytest.raises(OwnershipError, match="outside the folder"):
        remove_owned(out / ".." / "home", out)
    with pytest.raises(OwnershipError, match="outside the folder"):
        remove_owned(out, out)
    for bad, said in (("", "is empty"), ("/", "file system root"), (str(Path.home()), "home directory")):
        assert said in root_problem(bad, "x")


# ------------------------------------------------------------------------------------ the run lock

_HOLD = """
import sys, time
from dpo_ray.owned import RunLock
lock = RunLock(sys.argv[1], "output_dir").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_run_lock_second_process_stops_at_once_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OwnershipError) as e:
            RunLock(out, "output_dir").acquire()
        msg = str(e.value)
        assert (f"pid {holder.pid}" in msg and "on host" in msg and "started" in msg
                and "in use by another run" in msg)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(out, "output_dir"):  # the killed holder's lock is taken over
        info = json.loads((out / ".dpo_ray_run.lock").read_text())
        assert info["pid"] == os.getpid()


# ------------------------------------------------------------------------------------ run names, output_dir

def test_run_name_is_a_plain_name_checked_before_anything_runs(tmp_path):
    from dpo_ray.config import DPOConfig
    from dpo_ray.errors import ConfigError

    victim = tmp_path / "x"  # what ../../x points at from <storage>/<run_name>
    (victim / "keep").mkdir(parents=True)
    out = tmp_path / "a" / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"output_dir: {out}\nrun_name: ../../x\noverwrite_output_dir: true\nray:\n  storage_path: {out}\n")
    r = dpo_ray_cli("train", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr[-2000:]
    assert "run_name" in r.stderr and "must be a plain name" in r.stderr and "Traceback" not in r.stderr
    assert (victim / "keep").is_dir() and not out.exists()
    for bad in ("a/b", "..", ".hidden", "x" * 201, "a..b", ""):
        with pytest.raises(ConfigError, match="run_name"):
            DPOConfig(run_name=bad)
    assert DPOConfig(run_name="t1_beta=0.1,loss=ipo").run_name == "t1_beta=0.1,loss=ipo"


def test_default_run_names_differ_within_one_second():
    from dpo_ray.trainer import default_run_name

    names = {default_run_name("dpo") for _ in range(200)}
    assert len(names) == 200 and all(n.startswith("dpo_ray-dpo-") for n in names)


def test_sweep_trials_never_share_the_base_run_name_or_folder(tmp_path):
    from dpo_ray.sweep import trial_config

    base = {"run_name": "shared", "ray": {"storage_path": str(tmp_path / "storage")}}
    a = trial_config(base, {"beta": 0.1}, tmp_path / "trials" / "a1b2c_00000_beta=0.1")
    b = trial_config(base, {"beta": 0.2}, tmp_path / "trials" / "a1b2c_00001_beta=0.2")
    assert {a.run_name, b.run_name} == {"a1b2c_00000_beta=0.1", "a1b2c_00001_beta=0.2"}


def test_output_dir_roots_repositories_and_foreign_model_files_are_refused(tmp_path, monkeypatch):
    from dpo_ray.config import DPOConfig
    from dpo_ray.errors import ConfigError
    from dpo_ray.trainer import _check_output_dir, run_locks

    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "README.md").write_text("my project")
    with pytest.raises(ConfigError, match="repository's root"):
        run_locks(DPOConfig(output_dir=str(repo)), "r")
    with pytest.raises(ConfigError, match="repository's root"):
        _check_output_dir(DPOConfig(output_dir=str(repo), overwrite_output_dir=True), repo, None)
    home = home_like(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ConfigError, match="home directory"):
        _check_output_dir(DPOConfig(output_dir=str(home), overwrite_output_dir=True), home, None)
    # model files someone else wrote (no marker): never replaced, even with overwrite_output_dir
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="did not write them"):
        _check_output_dir(DPOConfig(output_dir=str(other), overwrite_output_dir=True), other, None)
    assert (other / "config.json").read_text() == "{}" and not (other / ".dpo_ray_owned").exists()


def test_a_full_model_written_over_a_lora_one_leaves_no_adapter_and_keeps_the_users_readme(tmp_path):
    """The writer itself (``write_model``, what every run's final save and load_best_model_at_end call): a
    LoRA adapter with merged/, then a full model into the same folder. The real runs:
    test_ownership_runs.py."""
    from helpers import tiny_llama
    from transformers import AutoModelForCausalLM

    from dpo_ray.adapters import wrap_peft
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import load_tokenizer
    from dpo_ray.train.checkpoint import write_model

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("the user's notes")
    (out / "notes.txt").write_text("mine")
    tok = load_tokenizer(DPOConfig())
    lora = DPOConfig(output_dir=str(out), use_peft=True, lora_target_modules=["q_proj", "v_proj"])
    base = tiny_llama(vocab_size=len(tok))
    write_model(wrap_peft(base, lora), lora, tok, out)
    assert (out / "adapter_config.json").exists()
    full = DPOConfig(output_dir=str(out))
    write_model(tiny_llama(vocab_size=len(tok)), full, tok, out)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith("adapter_") or n == "merged"], names
    assert (out / "README.md").read_text() == "the user's notes" and (out / "notes.txt").read_text() == "mine"
    assert "model.safetensors" in names and not [n for n in names if n.startswith(".model-tmp")]
    AutoModelForCausalLM.from_pretrained(out)  # loads the full model, no adapter applied


# ------------------------------------------------------------------------------------ secrets

def test_one_redaction_for_configs_errors_validate_and_store_keys(tmp_path):
    import yaml

    from dpo_ray.config import DPOConfig
    from dpo_ray.errors import ConfigError
    from dpo_ray.redact import REDACTED, redact
    from dpo_ray.reference.store import reference_settings

    cfg = DPOConfig(model_init_kwargs={"hf_password": "S3CRET-A", "revision": "main",
                                       "headers": {"auth_header": "Bearer S3CRET-B"}},
                    deepspeed={"overrides": {"comet": {"api_key": "S3CRET-C", "project": "p"}}},
                    ray={"runtime_env": {"env_vars": {"HF_TOKEN": "S3CRET-D"}}},
                    dataset_name="https://user:S3CRET-E@example.com/data.jsonl")
    dumped = cfg.to_yaml()
    assert "S3CRET" not in dumped
    data = yaml.safe_load(dumped)
    assert (data["model_init_kwargs"] == {"hf_password": REDACTED, "revision": "main",
                                          "headers": {"auth_header": REDACTED}})
    assert data["deepspeed"]["overrides"]["comet"] == {"api_key": REDACTED, "project": "p"}
    assert data["dataset_name"] == f"https://{REDACTED}@example.com/data.jsonl"
    assert redact({"pad_token": "<pad>", "tokenizer": "t", "max_tokens": 5}) == \
        {"pad_token": "<pad>", "tokenizer": "t", "max_tokens": 5}
    # the store's key file is made of reference_settings
    assert "S3CRET" not in json.dumps(reference_settings(cfg))
    # error messages: TRL's hub_token note, pydantic's "got ...", a URL in any message
    for bad in ({"hub_token": "S3CRET-F"},
                {"model_init_kwargs": ["token", "hf_S3CRETabcdefghijklmnopqrstuv"]},
                {"ray": {"address": 5, "runtime_env": "HF_TOKEN=S3CRET-G"}}):
        with pytest.raises(ConfigError) as e:
            DPOConfig(**bad)
        assert "S3CRET" not in str(e.value) and REDACTED in str(e.value), str(e.value)
    # dpo-ray validate, as a user runs it
    r = dpo_ray_cli("validate", "--no_path_check", "--model_init_kwargs",
                    '{"hf_password": "S3CRET-H", "nested": {"api_key": "S3CRET-I"}}',
                    "--dataset_name", "https://me:S3CRET-J@host/x.jsonl")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "S3CRET" not in r.stdout + r.stderr
    r = dpo_ray_cli("validate", "--no_path_check", "--model_init_kwargs", '{"token": "S3CRET-K"')  # bad JSON
    assert r.returncode == 2 and "S3CRET" not in r.stdout + r.stderr, r.stderr


# ------------------------------------------------------------------------------ storage URIs, resume keys

def test_a_storage_uri_reaches_ray_train_unchanged(tmp_path, monkeypatch):
    """What Ray Train does with the storage_path it is given (its own resolver): the URI is a file system and
    a path in it, not a folder named 's3:' under the working directory. The real run:
    test_ownership_runs.py."""
    from ray.train._internal.storage import get_fs_and_path

    from dpo_ray.config import DPOConfig
    from dpo_ray.paths import resolve_config_paths
    from dpo_ray.trainer import storage_root

    monkeypatch.chdir(tmp_path)
    uri = f"file://{tmp_path / 'bucket'}"
    for given in (uri, "s3://bucket/x", "gs://bucket/x"):
        cfg = resolve_config_paths(DPOConfig(output_dir="out", ray={"storage_path": given}))
        assert storage_root(cfg, tmp_path / "out") == given
    fs, path = get_fs_and_path(uri)
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path / "bucket")
    local = resolve_config_paths(DPOConfig(output_dir="out", ray={"storage_path": "ckpts"}))
    assert storage_root(local, tmp_path / "out") == str(tmp_path / "ckpts")


def test_resume_keys_and_manifest_completeness(tmp_path):
    from dpo_ray.config import DPOConfig
    from dpo_ray.errors import ConfigError
    from dpo_ray.train.checkpoint import CHECKPOINT_STATE_FILE, checkpoint_problems
    from dpo_ray.trainer import _check_resume

    d = tmp_path / "checkpoint-000004"
    (d / "engine").mkdir(parents=True)
    state = {"global_step": 4, "epoch": 0, "micro_in_epoch": 4, "world_size": 2, "zero_stage": 0,
             "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "data_seed": 42,
             "data_fingerprint": "abc", "manifests": True}
    (d / CHECKPOINT_STATE_FILE).write_text(json.dumps(state))
    (d / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    for r in range(2):
        (d / f"rng_rank{r}.pt").write_bytes(b"r" * 10)
    (d / "manifest_rank0.json").write_text(json.dumps({
        "engine/mp_rank_00_model_states.pt": 100, "rng_rank0.pt": 10,
        CHECKPOINT_STATE_FILE: (d / CHECKPOINT_STATE_FILE).stat().st_size}))
    assert "missing manifest_rank1.json" in checkpoint_problems(d)
    (d / "manifest_rank1.json").write_text(json.dumps({"rng_rank1.pt": 10}))
    assert checkpoint_problems(d) == ""
    (d / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"")  # emptied after the write
    assert "mp_rank_00_model_states.pt has 0 bytes, not the 100 written" in checkpoint_problems(d)

    ok = DPOConfig(ray={"num_workers": 2}, per_device_train_batch_size=4)
    _check_resume(d, ok, "abc")
    _check_resume(d, ok, None)  # the data is checked once it is read
    for change, key in (({"per_device_train_batch_size": 2}, "per_device_train_batch_size"),
                        ({"ray": {"num_workers": 1}}, "ray.num_workers"), ({"seed": 1}, "data_seed"),
                        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps")):
        with pytest.raises(ConfigError) as e:
            _check_resume(d, DPOConfig(**{"ray": {"num_workers": 2}, "per_device_train_batch_size": 4,
                                          **change}), "abc")
        assert [k for k, _ in e.value.problems] == [key], e.value.problems
    with pytest.raises(ConfigError, match="other data"):
        _check_resume(d, ok, "def")
