"""MetricAccumulator: summed, plain-mean and weighted metrics, on one process and across two gloo workers.

The weighted rule is TRL's: per micro-batch, the token- (or pair-) weighted mean over the workers (TRL
gathers every rank's counts), then the plain mean over the micro-batches of the logging step.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpo_ray.losses import METRIC_WEIGHT
from dpo_ray.train.metrics import MetricAccumulator

W = METRIC_WEIGHT

# (worker, micro-batch) -> mean_token_accuracy as its worker computed it, chosen tokens, loss, num_tokens
BATCHES = {
    0: [(0.5, 4.0, 1.0, 10.0), (1.0, 2.0, 3.0, 7.0)],
    1: [(0.25, 12.0, 2.0, 20.0), (0.0, 0.0, 5.0, 1.0)],  # the second has no chosen tokens on this worker
}


def micro(acc_value: float, tokens: float, loss: float, num_tokens: float) -> dict[str, torch.Tensor]:
    t = torch.tensor
    return {"mean_token_accuracy": t(acc_value), W + "mean_token_accuracy": t(tokens), "loss": t(loss),
            "num_tokens": t(num_tokens)}


def expected(workers: list[int]) -> dict[str, float]:
    """Hand-reduced: per micro-batch Σ acc·n / Σ n over the workers, then the mean over micro-batches."""
    per_micro = []
    for k in range(2):
        rows = [BATCHES[w][k] for w in workers]
        den = sum(r[1] for r in rows)
        per_micro.append(sum(r[0] * r[1] for r in rows) / den if den else 0.0)
    rows = [r for w in workers for r in BATCHES[w]]
    return {"mean_token_accuracy": sum(per_micro) / 2, "loss": sum(r[2] for r in rows) / len(rows),
            "num_tokens": sum(r[3] for r in rows)}


def test_one_worker():
    acc = MetricAccumulator()
    for b in BATCHES[0]:
        acc.add(micro(*b))
    got = acc.reduce()
    want = expected([0])  # (0.5 + 1.0) / 2: each micro-batch counts once, whatever its token count
    assert got == pytest.approx(want)
    assert W + "mean_token_accuracy" not in got
    assert acc.reduce() == {}  # reset


def test_a_micro_batch_without_tokens_counts_as_zero():
    acc = MetricAccumulator()
    acc.add(micro(0.8, 5.0, 1.0, 1.0))
    acc.add(micro(0.0, 0.0, 1.0, 1.0))
    assert acc.reduce()["mean_token_accuracy"] == pytest.approx(0.4)


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        acc = MetricAccumulator()
        for b in BATCHES[rank]:
            acc.add(micro(*b))
        out[rank] = acc.reduce()
    finally:
        dist.destroy_process_group()


def test_two_workers_weight_by_tokens_per_micro_batch(tmp_path):
    """Micro-batch 0: (0.5·4 + 0.25·12) / 16 = 0.3125; micro-batch 1: (1·2 + 0·0) / 2 = 1; mean 0.65625.
    A plain mean of the four worker values would say 0.4375."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
        results = dict(out)
    want = expected([0, 1])
    assert want["mean_token_accuracy"] == pytest.approx(0.65625)
    for rank in (0, 1):
        assert results[rank] == pytest.approx(want), rank


def test_best_checkpoint_step():
    from dpo_ray.train.metrics import best_checkpoint_step

    rows = [{"step": 10, "loss": 0.6}, {"step": 10, "eval_loss": 0.50, "eval_rewards/accuracies": 0.6},
            {"step": 20, "eval_loss": 0.40, "eval_rewards/accuracies": 0.7},
            {"step": 30, "eval_loss": 0.40, "eval_rewards/accuracies": 0.9},
            {"step": 40, "eval_loss": float("nan")}]
    assert best_checkpoint_step(rows, [10, 20, 30, 40], "eval_loss", False) == 20  # ties: the first
    assert best_checkpoint_step(rows, [10, 30], "eval_rewards/accuracies", True) == 30
    assert best_checkpoint_step(rows, [10], "eval_rewards/accuracies", True) == 10
    assert best_checkpoint_step(rows, [5], "eval_loss", False) is None


def _eval_batch(loss: float, pairs: float, acc_value: float, tokens: float) -> dict[str, torch.Tensor]:
    t = torch.tensor
    return {"loss": t(loss), "num_pairs": t(pairs), "mean_token_accuracy": t(acc_value),
            W + "mean_token_accuracy": t(tokens)}


def test_eval_accumulator_is_the_mean_over_rows_and_fillers_weigh_nothing():
    """Batches of 4 and 1 rows (a partial last batch): the loss is Σ mean·rows / Σ rows, a token
    metric Σ value·tokens / Σ tokens over the whole set; a filler batch changes nothing; no row: NaN, not a
    guess."""
    from dpo_ray.train.metrics import EvalAccumulator

    acc = EvalAccumulator()
    acc.add(_eval_batch(1.0, 4, 0.5, 10))
    acc.add(_eval_batch(3.0, 1, 1.0, 30))
    acc.add(_eval_batch(100.0, 1, 0.0, 50), real=False)  # a worker's weight-0 filler forward
    got = acc.reduce()
    assert got["loss"] == pytest.approx((1.0 * 4 + 3.0) / 5) and got["num_pairs"] == 5
    assert got["mean_token_accuracy"] == pytest.approx((0.5 * 10 + 30) / 40)
    acc.add(_eval_batch(2.0, 1, 0.5, 1), real=False)
    got = acc.reduce()
    assert got["num_pairs"] == 0 and got["loss"] != got["loss"]  # NaN: no row was scored
