"""The training epoch's micro-batches need no collective each (``train.steps.counted``): two real gloo
processes, the collectives they issue counted, and a split that breaks its promise reported, not hung."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpo_ray.train.steps import UnequalShardsError, counted


def _epoch(sizes: list[int], rank: int) -> str:
    calls = []
    real = dist.all_reduce

    def spy(*a, **k):  # counts the collectives; the real one runs
        calls.append(a[0].tolist())
        return real(*a, **k)

    dist.all_reduce = spy
    try:
        got = list(counted(iter(range(sizes[rank])), torch.device("cpu")))
        return f"ok {len(got)} {len(calls)}"
    except UnequalShardsError as e:
        return f"unequal {len(calls)} {e}"
    finally:
        dist.all_reduce = real


def _worker(rank: int, world: int, store: str, epochs: list[list[int]], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = [_epoch(sizes, rank) for sizes in epochs]
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write("\n".join(results))


def test_an_epoch_costs_one_collective_and_unequal_counts_get_a_clear_error(tmp_path):
    """Two gloo workers. An epoch of 50 micro-batches each: every one yielded, one all-reduce in all (at the
    epoch's end), not one per micro-batch. Then an epoch where the split broke its promise (3 and 4): every
    worker stops at the epoch's end with an error saying so; no collective is left waiting."""
    out = str(tmp_path / "result")
    epochs = [[50, 50], [3, 4]]
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), epochs, out), nprocs=2, join=True)
    for rank in range(2):
        even, uneven = open(f"{out}.{rank}").read().split("\n")
        assert even == "ok 50 1"
        assert (uneven.startswith("unequal 1 ") and "3 to 4 micro-batches" in uneven
                and "equal shares" in uneven)
