"""Prompt groups end to end on a local Ray: 2-worker invariance and resume, through the reference sources that
run apart from the policy (actor pool, precomputed per-response columns); three 2-step fits. The per-pair
equalities (and the local reference) are tests/test_groups.py's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpo_ray import DPOConfig, DPOTrainer

pytestmark = pytest.mark.slow

BASE = dict(
    learning_rate=5e-3, beta=0.5, per_device_train_batch_size=4, per_device_eval_batch_size=4,
    logging_steps=1, max_length=64, save_strategy="no", report_to=[], seed=7,
    ray={"num_workers": 2}, reference={"source": "local"},
)


def make_groups(n: int, seed: int = 0) -> list[dict]:
    """Groups of 3 responses with distinct scores: 3 pairs each (all pairs), so every micro-batch has as many
    pairs as every other and the mean over a worker's pairs is the mean over all of them."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nums = [str(rng.randint(0, 9)) for _ in range(3)]
        right = " ".join(sorted(nums))
        rows.append({"prompt": f"sort: {' '.join(nums)}", "scores": [0.5, 1.0, 0.0],
                     "completions": [right + " " + nums[0], right,
                                     " ".join(sorted(nums, reverse=True)) + " 9"]})
    return rows


def train(tmp_path: Path, name: str, rows, **overrides):
    cfg = DPOConfig(**{**BASE, **overrides, "output_dir": str(tmp_path / name)})
    return DPOTrainer(args=cfg, train_dataset=rows).train()


def losses(out) -> list[float]:
    return [r["loss"] for r in out.history if "loss" in r]


def test_two_workers_equal_one_worker_and_resume(ray_local, tmp_path):
    """Each optimizer step sees all 8 groups (24 pairs) either way: 2 workers with the reference actor pool vs
    1 worker accumulating 2 micro-batches on precomputed per-response reference log-probs (same curve up to
    reduction order). The 1-worker run saves at step 1; resumed from there it gives the same step 2."""
    rows = make_groups(8, seed=3)
    two = train(tmp_path, "two", rows, num_train_epochs=2, ray={"num_workers": 2},
                gradient_accumulation_steps=1,
                reference={"source": "actor", "num_actors": 1, "num_cpus": 0.5})
    kw = dict(num_train_epochs=2, ray={"num_workers": 1}, gradient_accumulation_steps=2,
              reference={"source": "precomputed", "cache_dir": str(tmp_path / "refcache")})
    one = train(tmp_path, "one", rows, save_strategy="steps", save_steps=1, run_name="groups-one", **kw)
    assert len(losses(two)) == len(losses(one)) == 2
    for a, b in zip(losses(two), losses(one)):
        assert a == pytest.approx(b, abs=1e-4)
    assert all(math.isfinite(x) for x in losses(one)) and losses(one)[1] < losses(one)[0]
    state = json.loads((Path(one.output_dir) / "train_state.json").read_text())
    assert state["pairs_seen"] == 2 * 24  # the pairs of 8 groups per step, not 8

    ckpts = sorted((Path(one.output_dir) / "ray_results").glob("*/checkpoint-000001"))
    assert ckpts, "no checkpoint at step 1"
    resumed = train(tmp_path, "one", rows, resume_from_checkpoint=str(ckpts[0]), run_name="groups-resumed",
                    **kw)
    assert [r["step"] for r in resumed.history if "loss" in r] == [1, 2]
    for a, b in zip(losses(one), losses(resumed)):
        assert a == pytest.approx(b, abs=1e-5)
