"""Nothing lost: outputs, checkpoints, resume and faults, proven by injecting the faults.

The unit tests build the damaged files by hand (a torn metrics line, half-written checkpoints, a used
output_dir). The slow tests inject real faults on the real stack (Ray Train + DeepSpeed, the tiny Llama):
one run, then damage, then ``resume_from_checkpoint: latest``; and a run whose loss blows up. A killed
worker is tested in tests/test_train.py (test_killed_worker_is_recovered).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_ray.config import REDACTED, DPOConfig
from dpo_ray.errors import ConfigError
from dpo_ray.train.checkpoint import (
    CHECKPOINT_STATE_FILE,
    CKPT_TAG,
    _rng_state,
    _set_rng_state,
    checkpoint_problems,
    saved_checkpoints,
)
from dpo_ray.train.logger import cut_metrics, read_metrics
from dpo_ray.trainer import _check_output_dir, _find_checkpoint


# ------------------------------------------------------------------------------------- unit tests
def test_torn_metrics_line_is_skipped_and_cut(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
                    + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert "torn" in capsys.readouterr().err
    cut_metrics(path, 2)
    assert path.read_text().endswith("\n") and [r["step"] for r in read_metrics(path)] == [1, 2]
    cut_metrics(path, 0)  # a restart before the first checkpoint: nothing survives
    assert read_metrics(path) == []


def _fake_checkpoint(d: Path, step: int, world: int = 2, stage: int = 2, ref_version: int = 0) -> Path:
    d.mkdir(parents=True)
    (d / CHECKPOINT_STATE_FILE).write_text(json.dumps({"global_step": step, "world_size": world,
                                                       "zero_stage": stage, "ref_version": ref_version}))
    (d / CKPT_TAG).mkdir()
    (d / CKPT_TAG / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for r in range(world):
        (d / f"rng_rank{r}.pt").write_bytes(b"x")
        (d / CKPT_TAG / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    return d


def test_checkpoint_completeness(tmp_path):
    ok = _fake_checkpoint(tmp_path / "ok", 2)
    assert checkpoint_problems(ok) == ""
    (ok / "rng_rank1.pt").unlink()
    assert "rng_rank1.pt" in checkpoint_problems(ok)
    shard = _fake_checkpoint(tmp_path / "shard", 2)
    (shard / CKPT_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert "zero_pp_rank_1" in checkpoint_problems(shard)
    assert "checkpoint_state.json" in checkpoint_problems(tmp_path / "absent")
    tr = _fake_checkpoint(tmp_path / "tr", 2, ref_version=3)
    assert "ref_rank0.pt" in checkpoint_problems(tr)  # TR-DPO weights it says it holds
    (tr / "ref_model.pt").write_bytes(b"x")
    assert checkpoint_problems(tr) == ""


def test_latest_is_the_newest_complete_checkpoint_of_the_run(tmp_path, capsys):
    out = tmp_path / "out"
    root = out / "ray_results"
    _fake_checkpoint(root / "a" / "checkpoint-000004", 4)
    _fake_checkpoint(root / "a" / "checkpoint-000010", 10)
    half = _fake_checkpoint(root / "a" / "checkpoint-000012", 12)
    (half / "rng_rank1.pt").unlink()
    (root / "a" / "checkpoint-000014").mkdir()  # a crash before anything was written
    _fake_checkpoint(root / "b" / "checkpoint-000100", 100)  # another run: never mixed in when run_name is a
    (root / "a" / "checkpoint-000020").write_text("")  # someone's file, and a copy of a checkpoint: not ours
    _fake_checkpoint(root / "a" / "checkpoint-000016-copy", 16)
    assert sorted(saved_checkpoints(root / "a")) == [4, 10, 12, 14]
    cfg = DPOConfig(output_dir=str(out), run_name="a")
    assert _find_checkpoint("latest", out, cfg) == (root / "a" / "checkpoint-000010").resolve()
    assert "skipping" in capsys.readouterr().err
    # no run_name: the most recently written run, and it says which
    import os
    import time

    now = time.time()
    for ckpt in (root / "b").glob("checkpoint-*"):
        os.utime(ckpt, (now - 1000, now - 1000))
    assert _find_checkpoint(True, out, DPOConfig(output_dir=str(out))).parent.name == "a"
    assert "run 'a'" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="half-written"):
        _find_checkpoint(str(half), out, cfg)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        _find_checkpoint("latest", out, DPOConfig(output_dir=str(out), run_name="c"))
    elsewhere = tmp_path / "storage"
    _fake_checkpoint(elsewhere / "a" / "checkpoint-000002", 2)
    cfg = DPOConfig(output_dir=str(out), run_name="a", ray={"storage_path": str(elsewhere)})
    assert _find_checkpoint("latest", out, cfg).parent.parent == elsewhere.resolve()


def test_second_run_into_a_used_output_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data_report").mkdir()  # inspect-data's report is not a run's output
    _check_output_dir(DPOConfig(output_dir=str(out)), out, None)
    (out / "model.safetensors").write_bytes(b"x")
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="resume_from_checkpoint.*overwrite_output_dir"):
        _check_output_dir(DPOConfig(output_dir=str(out)), out, None)
    assert (out / "model.safetensors").exists()  # refused before anything was deleted
    _check_output_dir(DPOConfig(output_dir=str(out)), out, resume=out)  # resuming: allowed
    _check_output_dir(DPOConfig(output_dir=str(out), overwrite_output_dir=True), out, None)
    # a reused run_name with checkpoints (Ray Train would silently continue it)
    fresh = tmp_path / "fresh"
    _fake_checkpoint(fresh / "ray_results" / "r" / "checkpoint-000002", 2)
    with pytest.raises(ConfigError, match="run_name 'r'"):
        _check_output_dir(DPOConfig(output_dir=str(fresh), run_name="r"), fresh, None)
    # a run folder dpo_ray did not make (no marker) is never deleted, even with overwrite_output_dir
    with pytest.raises(ConfigError, match="no .dpo_ray_owned marker"):
        _check_output_dir(DPOConfig(output_dir=str(fresh), run_name="r", overwrite_output_dir=True),
                          fresh, None)
    from dpo_ray.owned import mark_owned

    mark_owned(fresh / "ray_results", "ray-storage")
    mark_owned(fresh / "ray_results" / "r", "ray-train-run")
    _check_output_dir(DPOConfig(output_dir=str(fresh), run_name="r", overwrite_output_dir=True), fresh, None)
    assert not list((fresh / "ray_results" / "r").glob("checkpoint-*"))


def test_secrets_are_redacted_in_the_yaml_only(capsys):
    import yaml

    from dpo_ray.cli import main

    cfg = DPOConfig(model_init_kwargs={"token": "hf_secret", "revision": "main", "Auth_Header": "x"},
                    ray={"runtime_env": {"env_vars": {"HF_TOKEN": "hf_secret", "PLAIN": "v"}}})
    dumped = yaml.safe_load(cfg.to_yaml())
    assert dumped["model_init_kwargs"] == {"token": REDACTED, "revision": "main", "Auth_Header": REDACTED}
    assert dumped["ray"]["runtime_env"]["env_vars"] == {"HF_TOKEN": REDACTED, "PLAIN": REDACTED}
    assert cfg.model_init_kwargs["token"] == "hf_secret"  # the in-memory config keeps them
    assert main(["validate", "--no_path_check", "--model_init_kwargs", '{"token": "hf_secret"}']) == 0
    assert "hf_secret" not in capsys.readouterr().out


def test_rng_state_loads_with_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_crash_while_writing_the_model_leaves_no_partial_files(tmp_path):
    from helpers import tiny_llama

    from dpo_ray.data import load_tokenizer
    from dpo_ray.train.checkpoint import model_files_problem, write_model

    cfg = DPOConfig(output_dir=str(tmp_path))
    tok = load_tokenizer(cfg)

    class Crash(RuntimeError):
        pass

    class BrokenTokenizer:
        def save_pretrained(self, d):
            raise Crash("disk full")

    with pytest.raises(Crash):
        write_model(tiny_llama(), cfg, BrokenTokenizer(), tmp_path)
    # the weights were written, but only into the temporary folder (the folder's ownership marker stays)
    assert [p.name for p in tmp_path.iterdir()] == [".dpo_ray_owned"]
    write_model(tiny_llama(), cfg, tok, tmp_path)
    assert not list(tmp_path.glob(".model-tmp-*")) and (tmp_path / "model.safetensors").exists()
    assert model_files_problem(tmp_path, cfg) == "train_state.json"


def test_reference_cache_key_covers_how_the_model_loads():
    from dpo_ray.reference.precompute import cache_key, tokenization_settings

    def key(**kw):
        return cache_key({"tokenization": tokenization_settings(DPOConfig(**kw), None)})

    base = key()
    assert key(attn_implementation="eager") != base and key(torch_dtype="bfloat16") != base
    assert key(model_init_kwargs={"revision": "x"}) != base
    # secrets: not in the key
    assert key(model_init_kwargs={"token": "a"}) == key(model_init_kwargs={"token": "b"})


# ----------------------------------------------------------------------------- the real stack
FAULT_RUN = dict(max_steps=4, save_strategy="steps", save_steps=2, ray={"num_workers": 1},
                 sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5,
                 eval_strategy="steps", eval_steps=4, report_to=["tensorboard"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_faults_then_latest_resume_reproduce_the_run(ray_local, tmp_path, capsys):
    """One TR-DPO run (reference.source local, synced every step), then the damage a crash leaves: a torn
    last metrics line, the newest checkpoint half-written, a checkpoint folder with only its state file. A
    second run into the same output_dir is refused; ``resume_from_checkpoint: latest`` skips both broken
    checkpoints, resumes at step 2 with the reference weights of that step, and logs the same curve, each
    step once. (A resume from a checkpoint named by its path: tests/test_groups_ray.py, same curve;
    test_ownership_runs.py, what is refused; Ray Train's own restart: test_train.py, killed worker.)"""
    from test_train import make_rows, train

    rows, eval_rows = make_rows(64, seed=5), make_rows(8, seed=11)
    full = train(tmp_path, "run", rows, eval_rows, run_name="faulty", **FAULT_RUN)
    out = Path(full.output_dir)
    storage = out / "ray_results" / "faulty"
    # the final eval ran once (eval_steps divides max_steps), and the last step has its checkpoint
    assert [r["step"] for r in full.history if "eval_loss" in r] == [4]
    assert sorted(p.name for p in storage.glob("checkpoint-*")) == [f"checkpoint-00000{s}" for s in (2, 4)]
    assert all(checkpoint_problems(p) == "" for p in storage.glob("checkpoint-*"))
    assert json.loads((storage / "checkpoint-000004" / CHECKPOINT_STATE_FILE).read_text())["ref_version"] == 4
    assert (out / "runs" / "faulty").is_dir() and not list(out.glob(".model-tmp-*"))

    # the faults
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')  # the disk filled mid-line
    (storage / "checkpoint-000004" / "rng_rank0.pt").unlink()  # half-written
    (storage / "checkpoint-000006").mkdir()
    (storage / "checkpoint-000006" / CHECKPOINT_STATE_FILE).write_text(json.dumps({"global_step": 6}))

    with pytest.raises(ConfigError, match="overwrite_output_dir"):  # no Ray work: refused up front
        train(tmp_path, "run", rows, eval_rows, **FAULT_RUN)
    capsys.readouterr()
    resumed = train(tmp_path, "run", rows, eval_rows, resume_from_checkpoint="latest", **FAULT_RUN)
    err = capsys.readouterr()
    assert "skipping" in err.err and "checkpoint-000006" in err.err and "checkpoint-000004" in err.err
    assert "run 'faulty'" in err.out and "checkpoint-000002" in err.out
    steps = [r["step"] for r in resumed.history if "loss" in r]
    assert steps == [1, 2, 3, 4], steps  # no duplicate rows, nothing of the torn line
    assert [r["step"] for r in resumed.history if "eval_loss" in r] == [4]
    for a, b in zip([r["loss"] for r in full.history if "loss" in r],
                    [r["loss"] for r in resumed.history if "loss" in r]):
        assert a == pytest.approx(b, abs=1e-5)  # steps 3 and 4 need step 2's mixed reference back
    assert resumed.eval_metrics["eval_loss"] == pytest.approx(full.eval_metrics["eval_loss"], abs=1e-5)
    assert resumed.report["steps"] == 4
    assert [p.name for p in (out / "runs").iterdir()] == ["faulty"]  # the resume continued its run's folder


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_non_finite_loss_stops_the_run_naming_the_step(ray_local, tmp_path):
    """With an eval set smaller than one eval batch (scored whole since every eval row counts: test_train)."""
    from test_train import make_rows, train

    with pytest.raises(Exception, match=r"not finite at step \d"):
        train(tmp_path, "nan", make_rows(32), make_rows(2, seed=1), max_steps=4, learning_rate=1e30,
              ray={"num_workers": 1}, eval_strategy="steps", eval_steps=100)
