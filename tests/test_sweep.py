"""Sweeps on Ray Tune sharing one reference pass (dpo_ray/sweep.py, dpo_ray/reference/store.py,
docs/sweeps.md).

The 2×2 sweep is 4 Ray Train fits nested in Tune trials plus one reference pass: the costliest test here, so
it checks everything at once (the reference counted, bit-identical log-probs, table, plot, summary, the store
report).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpo_ray import DPOConfig
from dpo_ray.errors import ConfigError
from dpo_ray.reference.precompute import PASSES_LOG
from dpo_ray.reference.store import ReferenceStore, weights_fingerprint
from dpo_ray.sweep import grid_points, grid_space, parse_grid, reference_projection, trial_config

# Tiny trials: the bundled task, 2 optimizer steps, 1 worker on a fraction of a CPU, an eval at the last step.
BASE = dict(max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8, max_train_samples=32,
            max_eval_samples=8, eval_fraction=0.2, logging_steps=1, eval_strategy="steps", eval_steps=2,
            save_strategy="no", report_to=[], max_length=64, bf16=False, gradient_checkpointing=False,
            ray={"num_workers": 1, "resources_per_worker": {"CPU": 0.25}}, reference={"num_cpus": 0.25})


# ------------------------------------------------------------------------------------------------ no Ray

def test_grid_parsing_and_points():
    grid = parse_grid(["beta=0.05,0.1,0.3", "loss_type=sigmoid,ipo", "reference.batch_size=4,8"])
    assert grid == {"beta": [0.05, 0.1, 0.3], "loss_type": ["sigmoid", "ipo"], "reference.batch_size": [4, 8]}
    points = grid_points(grid_space(grid))
    assert len(points) == 12 and {"beta": 0.3, "loss_type": "ipo", "reference.batch_size": 8} in points
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid(["beta"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["beta=1", "beta=2"])


def test_reference_free_keys_share_a_projection_and_ld_alpha_does_not(tmp_path):
    base = {"max_steps": 2}
    a = trial_config(base, {"beta": 0.1, "loss_type": "sigmoid", "learning_rate": 1e-3}, tmp_path / "a")
    b = trial_config(base, {"beta": 0.3, "loss_type": "ipo", "label_smoothing": 0.1}, tmp_path / "b")
    c = trial_config(base, {"beta": 0.1, "ld_alpha": 0.5}, tmp_path / "c")
    assert reference_projection(a) == reference_projection(b) != reference_projection(c)
    shared = trial_config(base, {"beta": 0.1}, tmp_path / "d", cache_dir=str(tmp_path / "store" / "k"))
    assert (shared.reference.source == "precomputed"
            and shared.reference.cache_dir == str(tmp_path / "store" / "k"))


def test_weights_key_is_content_not_path_or_mtime(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"\x00\x01" * 1000)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    assert weights_fingerprint(str(model)) == weights_fingerprint(str(copy))
    (copy / "model.safetensors").write_bytes(b"\x00\x02" * 1000)  # same size, other bytes
    assert weights_fingerprint(str(model)) != weights_fingerprint(str(copy))


def test_store_report_and_clean(tmp_path):
    from dpo_ray.owned import mark_owned
    from dpo_ray.reference.store import ENTRY_KIND, STORE_KIND

    store = ReferenceStore(tmp_path / "store")
    mark_owned(tmp_path / "store", STORE_KIND)
    for key in ("k1", "k2"):
        d = tmp_path / "store" / key / "inner" / "train"
        d.mkdir(parents=True)
        mark_owned(tmp_path / "store" / key, ENTRY_KIND)
        (d / "part-00000.parquet").write_bytes(b"x" * 2048)
        (tmp_path / "store" / key / "_COMPLETE").write_text("t")
    old = tmp_path / "store" / "k1" / "_last_used"
    old.touch()
    os.utime(old, (0, 0))
    assert "2 key(s)" in store.report() and "k1" in store.report()
    assert store.clean(older_than_days=30).removed == ["k1"]
    assert [e.key for e in store.entries()] == ["k2"]
    with pytest.raises(ValueError, match="say what to clean"):
        store.clean()
    assert store.clean(everything=True).removed == ["k2"] and store.entries() == []


def test_summary_keeps_failed_trials_and_names_the_best(tmp_path):
    """A failed trial is a row with its error; the best is chosen among finished trials by the metric."""
    from types import SimpleNamespace

    from dpo_ray.sweep import SweepPlan, asha

    def result(beta, acc, error=None):
        out = tmp_path / "trials" / f"t_beta={beta}"
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_rewards/accuracies": acc,
                                                       "eval_rewards/margins": 0.1}) + "\n")
        metrics = None if error else {"eval_rewards/accuracies": acc, "steps": 1, "finished": True,
                                      "output_dir": str(out)}
        return SimpleNamespace(metrics=metrics, config={"beta": beta, "_sweep": {}}, error=error, path=None)

    plan = SweepPlan(sweep_dir=tmp_path, store=tmp_path / "store", trainable=None, param_space={},
                     varied=["beta"])
    summary = plan.summarize([result(0.1, 0.5), result(0.3, 0.75),
                              result(0.5, None, RuntimeError("boom\nbad"))],
                             "eval_rewards/accuracies", "max")
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok", "error"] and rows[2]["error"] == "bad"
    assert summary["best"]["config"] == {"beta": 0.3} and summary["failed"] == 1
    assert summary["best"]["model_dir"].endswith("t_beta=0.3") and (tmp_path / "sweep.png").exists()
    assert asha(40).__class__.__name__ == "AsyncHyperBandScheduler"


def test_a_torn_metrics_line_neither_breaks_the_plot_nor_stops_the_reporter(tmp_path, monkeypatch, capsys):
    """A trial killed mid-write leaves a torn line in its metrics.jsonl; the sweep's plot skips it (it used to
    raise JSONDecodeError), and the live reporter skips it once a later row follows (it used to stop
    there)."""
    from types import SimpleNamespace

    from ray import tune

    from dpo_ray.sweep import SweepPlan, _MetricsReporter, plot_sweep

    out = tmp_path / "t_beta=0.1"
    out.mkdir()
    rows = [{"step": 1, "loss": 0.69, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0},
            {"step": 2, "loss": 0.60, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.2}]
    metrics = out / "metrics.jsonl"
    metrics.write_text(json.dumps(rows[0]) + "\n" + '{"step": 2, "lo' + "}\n" + json.dumps(rows[1]) + "\n")
    assert plot_sweep([{"output_dir": str(out), "trial": "t", "beta": 0.1}], tmp_path / "sweep.png", ["beta"])
    assert "line 2 is torn" in capsys.readouterr().err
    plan = SweepPlan(sweep_dir=tmp_path, store=tmp_path / "store", trainable=None, param_space={},
                     varied=["beta"])
    done = {"eval_rewards/accuracies": 0.75, "steps": 2, "finished": True, "output_dir": str(out)}
    summary = plan.summarize(
        [SimpleNamespace(metrics=done, config={"beta": 0.1, "_sweep": {}}, error=None, path=None)],
        "eval_rewards/accuracies", "max")
    assert summary["best"]["config"] == {"beta": 0.1} and (tmp_path / "sweep.png").exists()

    reported = []
    monkeypatch.setattr(tune, "report", lambda m: reported.append(m))
    monkeypatch.setattr(_MetricsReporter, "POLL_S", 3600.0)  # polled by hand below
    live = tmp_path / "live.jsonl"
    live.write_text(json.dumps(rows[0]) + "\n" + '{"step": 2, "lo')  # the last row still being written
    reporter = _MetricsReporter(live, "eval_rewards/accuracies")
    try:
        reporter.poll()
        assert [r["step"] for r in reported] == [1]
        live.write_text(json.dumps(rows[0]) + "\n" + '{"step": 2, "lo' + "}\n" + json.dumps(rows[1]) + "\n")
        reporter.poll()  # the torn row is followed by another: skipped for good
        assert [r["step"] for r in reported] == [1, 2] and reported[-1]["eval_rewards/accuracies"] == 0.75
    finally:
        reporter.stop()


def test_a_sweep_whose_trials_have_no_eval_metric_says_why(tmp_path):
    """Every trial NaN (no eval row scored): no best, a reason, and the eval_rows column."""
    from types import SimpleNamespace

    from dpo_ray.sweep import SweepPlan

    def result(beta, rows):
        out = tmp_path / f"t_beta={beta}"
        metrics = {"eval_rewards/accuracies": float("nan"), "steps": 1, "finished": True,
                   "output_dir": str(out)}
        if rows is not None:
            metrics["eval_num_pairs"] = rows
        return SimpleNamespace(metrics=metrics, config={"beta": beta, "_sweep": {}}, error=None, path=None)

    plan = SweepPlan(sweep_dir=tmp_path, store=tmp_path / "store", trainable=None, param_space={},
                     varied=["beta"])
    summary = plan.summarize([result(0.1, None), result(0.3, None)], "eval_rewards/accuracies", "max")
    assert summary["best"] is None and "no finished trial scored an eval row" in summary["unranked"]
    assert [r["eval_rows"] for r in csv.DictReader(open(tmp_path / "results.csv"))] == ["", ""]
    summary = plan.summarize([result(0.1, 8)], "eval_rewards/accuracies", "max")
    assert ("no finished trial logged a finite eval_rewards/accuracies (eval rows per trial: 8)"
            in summary["unranked"])


def test_cli_sweep_surface(capsys):
    from dpo_ray.cli import _parser

    ns = _parser().parse_args(["sweep", "--grid", "beta=0.1,0.2", "--asha", "--max_concurrent_trials", "2"])
    assert ns.grid == ["beta=0.1,0.2"] and ns.asha and ns.max_concurrent_trials == 2
    assert _parser().parse_args(["ref-store", "clean", "--store", "s", "--all"]).all


# ------------------------------------------------------------------------------------------------ the sweep

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_runs_the_reference_once_and_shares_it(ray_local, tmp_path, monkeypatch):
    """Two trials (the grid's product is tested in test_grid_parsing_and_points; one round of two concurrent
    trials keeps the suite short), one reference pass for both."""
    from dpo_ray.sweep import run_sweep

    # DPO_RAY_* variables follow the trials, in private
    monkeypatch.setenv("DPO_RAY_TEST_SECRET", "S3CRET-ENV")
    sweep_dir = tmp_path / "sweep"
    storage = tmp_path / "storage"
    # the base names one run and one storage folder, and carries a secret: each trial still gets its own Ray
    # Train folder, and no secret reaches Tune's params.json / params.pkl
    base = DPOConfig(**{**BASE, "ray": {**BASE["ray"], "storage_path": str(storage),
                                        "runtime_env": {"env_vars": {"MY_API_TOKEN": "S3CRET-CFG"}}}},
                     output_dir=str(sweep_dir), run_name="shared")
    summary = run_sweep(base, grid_space({"beta": [0.3], "loss_type": ["sigmoid", "ipo"]}),
                        max_concurrent_trials=2, task_prompts=8, verbose=0)

    # one reference key, one pass over its rows: every row scored exactly once for the whole sweep
    assert summary["reference"]["keys"] and len(summary["reference"]["keys"]) == 1
    key = summary["reference"]["keys"][0]
    entry = sweep_dir / "reference_store" / key
    meta = json.loads((entry / "_content_key.json").read_text())
    # every pass over any key inside the entry (the store's, and any a trial ran) logs its rows
    passes = [json.loads(line) for log in entry.rglob(PASSES_LOG) for line in log.read_text().splitlines()]
    assert sum(p["rows"] for p in passes) == sum(meta["row_counts"].values()) > 0, \
        (passes, meta["row_counts"])
    assert all(p["kept"] for p in passes), passes

    # the table: one row per trial, all ok, the varied keys, metrics, every trial reading the store's entry
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}, rows
    assert {(r["beta"], r["loss_type"]) for r in rows} == {("0.3", t) for t in ("sigmoid", "ipo")}
    for r in rows:
        assert r["reference_dir"] == str(entry) and int(r["steps"]) == 2
        assert float(r["eval_rewards/accuracies"]) >= 0 and r["task_accuracy"] != ""
        assert (Path(r["output_dir"]) / "metrics.jsonl").exists()
    assert len(json.loads((sweep_dir / "results.json").read_text())) == 2
    assert (sweep_dir / "sweep.png").stat().st_size > 0
    best = summary["best"]
    assert best is not None and (Path(best["model_dir"]) / "config.json").exists()
    trial_dirs = sorted(Path(r["output_dir"]).name for r in rows)
    assert sorted(p.name for p in storage.iterdir() if p.is_dir()) == trial_dirs, list(storage.iterdir())
    params = [p for p in (sweep_dir / "tune").rglob("params.*")]
    assert len(params) >= 4, params  # params.json and params.pkl of each trial
    for p in params:
        blob = p.read_bytes()
        assert b"S3CRET" not in blob and b"DPO_RAY_" not in blob, p

    # bit-identical to a solo run's reference pass: the same preparation as DPOTrainer.train, its own cache
    import ray

    from dpo_ray.data import build_datasets, load_processing_class
    from dpo_ray.models import load_causal_lm, shippable
    from dpo_ray.reference.precompute import _load_table, attach_reference_logps

    solo_cache = tmp_path / "solo_cache"
    solo = trial_config(base.model_dump(mode="json", exclude_unset=True), {"beta": 0.1}, tmp_path / "solo",
                        cache_dir=str(solo_cache))
    tokenizer = load_processing_class(solo)
    prepared = build_datasets(solo, tokenizer, mode="dpo")
    source = ray.put(shippable(load_causal_lm(None, solo, tokenizer)))
    for split, ds in (("train", prepared.train), ("eval", prepared.eval)):
        attach_reference_logps(ds, solo, source, tokenizer, split=split)
        [solo_dir] = list(solo_cache.glob(f"*/{split}"))
        [shared_dir] = list(entry.glob(f"*/{split}"))
        for a, b in zip(_load_table(solo_dir), _load_table(shared_dir)):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), split

    report = ReferenceStore(sweep_dir / "reference_store").report()
    assert key in report and "1 key(s)" in report


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_sweep_that_cannot_rank_its_trials_exits_1_and_says_why(ray_local, tmp_path, capsys):
    """A real sweep whose trials score no eval row (eval_strategy no) ranked nothing and wrote
    "best": null without a word; now it says why and exits 1."""
    from dpo_ray.cli import main

    config = {**BASE, "eval_strategy": "no", "output_dir": str(tmp_path / "sweep")}
    (tmp_path / "sweep.yaml").write_text(json.dumps(config))  # JSON is YAML
    code = main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--grid", "beta=0.1",
                 "--task_prompts", "4"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1
    assert "cannot rank the trials by eval_rewards/accuracies: no finished trial scored an eval row" in err
    # without --verbose Tune prints nothing of its own: no experiment box, no result paths, no info lines
    tune_lines = ("Configuration for experiment", "View detailed results here", "Wrote the latest version")
    for tune_line in tune_lines:
        assert tune_line not in captured.out + err, tune_line
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert summary["best"] is None and summary["ok"] == 1 and summary["unranked"]
    assert list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))[0]["eval_rows"] == ""
