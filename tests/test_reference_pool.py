"""The reference actor pool: exact log-probs, prefetch matching, actor death, TR-DPO, placement, cache.

CPU only, on a local Ray with more logical CPUs than cores; the model is a tiny Llama built from a
LlamaConfig (no downloads). Every blocking wait carries a timeout so a bug fails instead of hanging.
"""

from __future__ import annotations

import copy
import json
import random
import time

import pytest
import ray
import torch
from helpers import tiny_llama
from hooks import slow_reference

from dpo_ray.config import DPOConfig
from dpo_ray.forward import reference_logps
from dpo_ray.reference import prefetched
from dpo_ray.reference.client import ActorPoolReference
from dpo_ray.reference.pool import ReferencePlacementError, ReferencePool, placement_problem

VOCAB, PAD = 100, 0


def tiny_source(seed: int = 0) -> dict:
    model = tiny_llama(VOCAB, seed, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=True)
    return {"config": model.config, "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}


def build(source: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(source["config"], dtype=torch.float32)
    model.load_state_dict(source["state_dict"])
    return model.eval().requires_grad_(False)


def make_batch(b: int, seed: int, t: int = 12) -> dict[str, torch.Tensor]:
    """A collated pair batch by hand (CONTRACTS): right-padded, prompt then completion."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((2 * b, t), PAD, dtype=torch.long)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    prompts = torch.randint(2, 5, (b,), generator=g)
    for i in range(2 * b):
        p = int(prompts[i % b])
        n = int(torch.randint(p + 1, t + 1, (1,), generator=g))
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        ids[i, :p] = ids[i % b, :p]  # chosen and rejected share the prompt
        attn[i, :n] = 1
        comp[i, p:n] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
            "row_id": torch.arange(seed * b, seed * b + b)}


def config(**reference) -> DPOConfig:
    return DPOConfig(reference={"num_cpus": 0.5, **reference})


@pytest.fixture(scope="module")
def source(ray_local):
    return tiny_source()


@pytest.fixture(scope="module")
def source_ref(source):
    return ray.put(source)


def expected(model, batches, ld_alpha=None):
    return [reference_logps(model, b, ld_alpha=ld_alpha) for b in batches]


def assert_close(got, want, atol=1e-5):
    for (gc, gr), (wc, wr) in zip(got, want, strict=True):
        torch.testing.assert_close(gc, wc, atol=atol, rtol=0)
        torch.testing.assert_close(gr, wr, atol=atol, rtol=0)


def consume(client, batches, depth, on_item=None):
    out = []
    for i, (batch, c, r) in enumerate(prefetched(batches, client, depth)):
        out.append((c, r))
        if on_item is not None:
            on_item(i, batch)
    return out


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.timeout(120)
def test_actor_logps_equal_in_process_and_prefetch_under_delays(source, source_ref):
    """Two actors with random delays, two ranks, depth 3: every batch gets its own log-probs (1e-5)."""
    cfg = config(num_actors=2)
    pool = ReferencePool.create(cfg, source_ref, None, ready_timeout_s=90,
                                host_class=slow_reference(0.0, 0.06))
    try:
        model = build(source)
        batches = [make_batch(3, s) for s in range(10)]
        want = expected(model, batches)
        for rank in (0, 1):
            client = ActorPoolReference(pool.handles(), cfg, rank=rank, timeout_s=60)
            assert_close(consume(client, batches, depth=3), want)
        # LD-DPO weighting travels with the request
        cfg_ld = DPOConfig(ld_alpha=0.5, reference={"num_cpus": 0.5})
        client = ActorPoolReference(pool.handles(), cfg_ld, rank=0, timeout_s=60)
        assert_close(consume(client, batches[:3], depth=2), expected(model, batches[:3], ld_alpha=0.5))
    finally:
        pool.shutdown()


@pytest.mark.timeout(150)
def test_killed_actor_restarts_and_results_match(source, source_ref):
    cfg = config(num_actors=1, max_restarts=2, max_task_retries=3)
    pool = ReferencePool.create(cfg, source_ref, None, ready_timeout_s=90,
                                host_class=slow_reference(0.02, 0.05))
    try:
        batches = [make_batch(2, s) for s in range(8)]
        want = expected(build(source), batches)
        client = ActorPoolReference(pool.handles(), cfg, rank=0, timeout_s=90)
        pid_before = ray.get(pool.handles()[0].ping.remote(), timeout=60)["pid"]

        def kill_midstream(i, _batch):
            if i == 2:  # requests 3..5 are in flight now
                ray.kill(pool.handles()[0], no_restart=False)

        assert_close(consume(client, batches, depth=3, on_item=kill_midstream), want)
        pid_after = ray.get(pool.handles()[0].ping.remote(), timeout=60)["pid"]
        assert pid_after != pid_before  # a restarted process answered the rest
    finally:
        pool.shutdown()


@pytest.mark.timeout(90)
def test_exhausted_retry_budget_raises_clear_error(source_ref):
    cfg = config(num_actors=1, max_restarts=0, max_task_retries=1)
    pool = ReferencePool.create(cfg, source_ref, None, ready_timeout_s=90)
    try:
        client = ActorPoolReference(pool.handles(), cfg, rank=0, timeout_s=30)
        batch = make_batch(2, 0)
        handle = client.submit(batch)
        ray.kill(pool.handles()[0], no_restart=True)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"retry budget reference.max_task_retries=1|are dead") as err:
            client.result(handle, batch)
            client.result(client.submit(batch), batch)
        assert time.monotonic() - t0 < 30
        assert "reference" in str(err.value)
    finally:
        pool.shutdown()


@pytest.mark.timeout(150)
def test_tr_dpo_sync_mixes_exactly_and_resubmits_stale(source, source_ref, tmp_path):
    alpha = 0.6
    cfg = config(num_actors=2, max_restarts=2, max_task_retries=3)
    pool = ReferencePool.create(cfg, source_ref, None, ready_timeout_s=90,
                                host_class=slow_reference(0.0, 0.03))
    try:
        ref_model = build(source)
        policy = copy.deepcopy(ref_model)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        mixed = copy.deepcopy(ref_model)
        with torch.no_grad():  # the same op order as the actor: π_ref·(1-α) + α·π_θ
            for (_, r), (_, p) in zip(mixed.named_parameters(), policy.named_parameters()):
                r.mul_(1 - alpha).add_(p, alpha=alpha)

        batches = [make_batch(2, s) for s in range(9)]
        old, new = expected(ref_model, batches), expected(mixed, batches)
        client = ActorPoolReference(pool.handles(), cfg, rank=0, timeout_s=90)
        submitted = []
        real_submit = client.submit
        client.submit = lambda b: submitted.append(int(b["row_id"][0])) or real_submit(b)
        sync_after, kill_after = 2, 5

        def step(i, _batch):
            if i == sync_after:  # "optimizer step" boundary after the third micro-batch
                client.sync_from(policy, alpha)
            if i == kill_after:  # an actor restarts after the sync: it must get the mixed weights back
                ray.kill(pool.handles()[0], no_restart=False)

        got = consume(client, batches, depth=3, on_item=step)
        assert_close(got[: sync_after + 1], old[: sync_after + 1])
        assert_close(got[sync_after + 1:], new[sync_after + 1:])
        assert client.version == 1
        # the depth-many requests in flight at the sync were sent again
        assert len(submitted) >= len(batches) + 3
        # a request on the restarted actor is answered with
        # the mixed weights (the client restores them first);
        # sent explicitly, as the last batches may all have gone to the other actor
        assert 0 not in client._dead
        client._seq += client._seq % 2  # rank 0 of 2 actors: an even sequence number picks actor 0
        probe = make_batch(2, 9)
        assert_close([client.result(client.submit(probe), probe)], expected(mixed, [probe]))
        for h in pool.handles():
            assert ray.get(h.weights_version.remote(), timeout=60) == 1
            state = ray.get(h.state_dict.remote(), timeout=60)
            for name, p in mixed.named_parameters():
                assert torch.equal(state[name], p), name
        # idempotent: applying the same version again changes nothing
        h = pool.handles()[1]
        ray.get(h.mix.remote({n: torch.zeros_like(p) for n, p in policy.named_parameters()}, alpha, 1),
                timeout=60)
        state = ray.get(h.state_dict.remote(), timeout=60)
        assert all(torch.equal(state[n], p) for n, p in mixed.named_parameters())
        # a checkpoint carries the mixed weights; a resumed run's pool (back at version 0) gets them back
        client.save_state(tmp_path, rank=0)
        initial = {n: p for n, p in ref_model.named_parameters()}
        ray.get([a.load_state.remote(initial, 0) for a in pool.handles()], timeout=60)
        resumed = ActorPoolReference(pool.handles(), cfg, rank=0, timeout_s=90)
        resumed.load_state(tmp_path, rank=0, version=1)
        assert resumed.version == 1
        for h in pool.handles():
            assert ray.get(h.weights_version.remote(), timeout=60) == 1
            state = ray.get(h.state_dict.remote(), timeout=60)
            assert all(torch.equal(state[n], p) for n, p in mixed.named_parameters())
    finally:
        pool.shutdown()


def test_placement_fails_fast_naming_the_resource(ray_local, source_ref):
    cfg = config(num_actors=2, num_gpus=1)
    t0 = time.monotonic()
    with pytest.raises(ReferencePlacementError,
                       match=r"reference.num_gpus=1 × 2 actor\(s\) needs 2 GPU but the cluster has 0"):
        ReferencePool.create(cfg, source_ref, None, ready_timeout_s=5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ReferencePlacementError, match=r"reference.resources.ref_pool"):
        ReferencePool.create(config(resources={"ref_pool": 1}), source_ref, None, ready_timeout_s=5)
    with pytest.raises(ReferencePlacementError, match=r"reference.node_label"):
        ReferencePool.create(config(node_label={"pool": "reference"}), source_ref, None, ready_timeout_s=5)


def test_placement_per_node_fit():
    nodes = [{"Resources": {"CPU": 8, "GPU": 1}}, {"Resources": {"CPU": 8, "GPU": 1}}]
    assert placement_problem(config(num_actors=2, num_gpus=1), nodes) is None
    problem = placement_problem(config(num_actors=1, num_gpus=2), nodes)
    assert problem is not None and "single node" in problem


def test_precompute_cache_hit_on_second_call(source, source_ref, tmp_path, capsys, monkeypatch):
    from dpo_ray.reference import precompute
    from dpo_ray.reference.precompute import attach_reference_logps

    # several hash batches, cut differently per layout
    monkeypatch.setattr(precompute, "FINGERPRINT_BATCH", 4)

    rng = random.Random(0)
    rows = []
    for rid in range(12):
        p = rng.randint(2, 4)
        prompt = [rng.randint(3, VOCAB - 1) for _ in range(p)]
        rows.append({"row_id": rid, "chosen_prompt_len": p, "rejected_prompt_len": p,
                     "chosen_input_ids": prompt
                     + [rng.randint(3, VOCAB - 1) for _ in range(rng.randint(1, 6))],
                     "rejected_input_ids": prompt
                     + [rng.randint(3, VOCAB - 1) for _ in range(rng.randint(1, 6))]})
    ds = ray.data.from_items(rows)
    cfg = DPOConfig(per_device_eval_batch_size=4,
                    reference={"num_cpus": 0.5, "num_actors": 1, "cache_dir": str(tmp_path)})

    out = attach_reference_logps(ds, cfg, source_ref, None, split="train").take_all()
    assert "reference cache miss" in capsys.readouterr().out
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert any(p.suffix == ".parquet" for p in files)

    out2 = attach_reference_logps(ds, cfg, source_ref, None, split="train").take_all()
    assert "reference cache hit" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted(p for p in tmp_path.rglob("*") if p.is_file())] == mtimes
    # the same rows in another order and other blocks (another read's layout): the same content key, a hit
    reshaped = ray.data.from_items(rows[5:] + rows[:5], override_num_blocks=5).repartition(3)
    attach_reference_logps(reshaped, cfg, source_ref, None, split="train").materialize()
    assert "reference cache hit" in capsys.readouterr().out
    # one pass logged for the key: 12 rows, its result kept; the hits ran none
    (log,) = tmp_path.rglob(precompute.PASSES_LOG)
    passes = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(p["split"], p["rows"], p["kept"]) for p in passes] == [("train", 12, True)], passes

    model = build(source)
    by_id = {r["row_id"]: r for r in out}
    by_id2 = {r["row_id"]: r for r in out2}
    assert sorted(by_id) == list(range(12))
    for row in rows:
        from dpo_ray.reference.precompute import pad_pairs

        one = pad_pairs({k: [row[k]] for k in row}, PAD)
        c, r = reference_logps(model, one)
        for got in (by_id[row["row_id"]], by_id2[row["row_id"]]):
            assert (got["chosen_input_ids"] == row["chosen_input_ids"]
                    or list(got["chosen_input_ids"]) == row["chosen_input_ids"])
            assert abs(got["ref_chosen_logps"] - float(c[0])) < 1e-4
            assert abs(got["ref_rejected_logps"] - float(r[0])) < 1e-4

    # a different ld_alpha is a different key: miss
    cfg_ld = DPOConfig(ld_alpha=0.5, per_device_eval_batch_size=4,
                       reference={"num_cpus": 0.5, "num_actors": 1, "cache_dir": str(tmp_path)})
    attach_reference_logps(ds, cfg_ld, source_ref, None, split="train").take_all()
    assert "reference cache miss" in capsys.readouterr().out


def _sync_rank(rank: int, port: int, gcs: str, handles_blob: bytes, source: dict, alpha: float, out,
               reported) -> None:
    """One of two gloo ranks: consume 4 batches with a TR-DPO sync after the second."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()  # a crash or a stall shows its stacks in the test's captured stderr
    faulthandler.dump_traceback_later(100)
    ray.init(address=gcs, log_to_driver=False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(1)  # the same "trained" policy on both ranks, as after an all-reduced step
        policy = build(source)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        client = ActorPoolReference(ray.cloudpickle.loads(handles_blob), config(num_actors=2), timeout_s=60)
        assert client.rank == rank
        batches = [make_batch(2, 10 * rank + s) for s in range(4)]
        got = consume(client, batches, depth=2,
                      on_item=lambda i, _b: client.sync_from(policy, alpha) if i == 1 else None)
        out.put((rank, client.version, [(c.tolist(), r.tolist()) for c, r in got]))
    except BaseException as e:  # report instead of hanging the parent
        out.put((rank, -1, repr(e)))
    finally:
        # no rank closes its gloo connections before the parent has both reports: a peer that tears down while
        # the other is still inside a collective (even a barrier) reads as "Connection closed by peer" there
        reported.wait(timeout=150)
        dist.destroy_process_group()
        ray.shutdown()


@pytest.mark.timeout(150)
def test_tr_dpo_sync_across_two_gloo_ranks(source, source_ref):
    """Rank 0 mixes, both ranks bump the version, and both see the mixed weights after the sync."""
    import multiprocessing as mp
    import queue
    import socket

    alpha = 0.5
    cfg = config(num_actors=2)
    pool = ReferencePool.create(cfg, source_ref, None, ready_timeout_s=90,
                                host_class=slow_reference(0.0, 0.03))
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        out, reported = ctx.Queue(), ctx.Event()
        gcs = ray.get_runtime_context().gcs_address
        blob = ray.cloudpickle.dumps(pool.handles())  # the model reference in it keeps its owner (the driver)
        procs = [ctx.Process(target=_sync_rank, args=(r, port, gcs, blob, source, alpha, out, reported))
                 for r in (0, 1)]
        for p in procs:
            p.start()
        results: dict[int, tuple] = {}
        try:
            for _ in procs:
                r, v, vals = out.get(timeout=120)
                results[r] = (v, vals)
        except queue.Empty:
            # a rank that failed outside the collectives leaves its peer waiting in one until it tears down
            pytest.fail(f"a rank did not report within 120 s; reports so far {results}; exit codes "
                        f"{[p.exitcode for p in procs]} (None: running; its stacks are in the captured "
                        "stderr)")
        finally:
            reported.set()
        for p in procs:
            p.join(timeout=30)
        ref_model = build(source)
        torch.manual_seed(1)
        policy = build(source)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        mixed = copy.deepcopy(ref_model)
        with torch.no_grad():
            for (_, r), (_, p) in zip(mixed.named_parameters(), policy.named_parameters()):
                r.mul_(1 - alpha).add_(p, alpha=alpha)
        failed = {r: vals for r, (v, vals) in results.items() if v != 1}
        assert not failed, (
            f"ranks that failed (a peer's error is often only 'Connection closed by peer'): {failed}")
        for rank in (0, 1):
            version, vals = results[rank]
            batches = [make_batch(2, 10 * rank + s) for s in range(4)]
            got = [(torch.tensor(c), torch.tensor(r)) for c, r in vals]
            assert_close(got[:2], expected(ref_model, batches[:2]))
            assert_close(got[2:], expected(mixed, batches[2:]))
        for h in pool.handles():
            assert ray.get(h.weights_version.remote(), timeout=60) == 1  # mixed once, not once per rank
    finally:
        pool.shutdown()


def test_tr_dpo_sync_of_a_local_reference_mixes_every_parameter():
    """reference.source local: π_ref ← α·π_θ + (1-α)·π_ref, parameter by parameter, and the version moves."""
    from dpo_ray.reference import LocalReference

    policy, ref = tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=1)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    client = LocalReference(ref, torch.device("cpu"))
    client.sync_from(policy, 0.6)
    assert client.version == 1
    for name, p in policy.named_parameters():
        torch.testing.assert_close(dict(ref.named_parameters())[name], 0.6 * p + 0.4 * before[name])


def test_a_reference_that_cannot_load_fails_the_pool_in_the_background(ray_local, tmp_path):
    """The trainer starts the pool without waiting (loading overlaps the worker group's start): a model file
    torn in half is reported by the background check naming the actor, the actors are stopped, and a
    worker's first request then fails at once instead of waiting for an answer that cannot come."""
    model_dir = tmp_path / "torn-ref"
    tiny_llama(VOCAB, 0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2).save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = config(num_actors=1)
    pool = ReferencePool.create(cfg, str(model_dir), None, ready_timeout_s=120, wait=False)
    try:
        handles = pool.handles()
        assert len(handles) == 1  # returned before the model was loaded
        pool._watcher.join(timeout=120)
        assert not pool._watcher.is_alive()
        assert pool.ready_at is None
        assert "reference actor 0 failed to load its model" in str(pool.error)
        assert pool.handles() == []  # stopped
        client = ActorPoolReference(handles, cfg, rank=0, timeout_s=30)
        batch = make_batch(2, seed=0)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="failed|dead"):
            client.result(client.submit(batch), batch)
        assert time.monotonic() - t0 < 30
    finally:
        pool.shutdown()


_QUIET_POOL = """
import sys

import ray

from test_reference_pool import config, make_batch, tiny_source
from dpo_ray.reference.client import ActorPoolReference
from dpo_ray.reference.pool import ReferencePool

ray.init(address=sys.argv[1], log_to_driver=False)
cfg = config(num_actors=1, max_restarts=2)
pool = ReferencePool.create(cfg, ray.put(tiny_source()), {"a large tokenizer stands in": "x" * 300_000},
                            ready_timeout_s=90)
batch = make_batch(2, 1)
client = ActorPoolReference(pool.handles(), cfg, rank=0, timeout_s=60)
client.result(client.submit(batch), batch)
pool.shutdown()
print("CONTROL", file=sys.stderr, flush=True)


@ray.remote(max_restarts=1, num_cpus=0.1)
class WithRefArgument:  # the shape Ray warns about: a restartable actor constructed with an ObjectRef
    def __init__(self, x):
        pass

    def ping(self):
        return 1


ray.get(WithRefArgument.remote(ray.put(1)).ping.remote(), timeout=60)
"""


@pytest.mark.timeout(180)
def test_the_pool_starts_without_rays_constructor_arguments_error_line(ray_local, tmp_path):
    """Ray's core worker logs an error-level line (once per process, from C++, where no log filter reaches)
    when a restartable actor is constructed with an ObjectRef argument (ray-project/ray#53727). The pool's
    actors get their model with their requests instead: a fresh driver that starts a pool with an ObjectRef
    model and a tokenizer too large to inline, and gets an answer, has no such line; the same driver's control
    actor, built the way Ray warns about, shows the line is real and would be seen."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "quiet_pool.py"
    script.write_text(_QUIET_POOL)
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    gcs = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, str(script), gcs], env=env, capture_output=True, text=True,
                         timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    before, _, after = out.stderr.partition("CONTROL")
    line = "has constructor arguments in the object store"
    assert line not in before, before[-3000:]
    assert line in after, f"the control actor did not show Ray's line: the check is not live\n{after[-2000:]}"
