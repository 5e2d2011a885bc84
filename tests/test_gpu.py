"""The GPU path: bf16 forward/backward, the NCCL backend, ZeRO-2 and ZeRO-3 on the GPU, the reference actor on
the GPU beside the policy. Marked ``gpu``: skipped without CUDA. ``bench/gpu_check.py`` runs them first.

``DPO_RAY_GPU_DRY=1`` (set by ``bench/gpu_check.py --dry``) runs the same tests on the CPU instead, fp32 and
gloo, so their code cannot rot on machines without a GPU; the asserts that only hold on a GPU (device type,
bf16 dtypes, the NCCL backend) follow the device profile below.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from helpers import random_pairs, tiny_llama

from dpo_ray.config import DPOConfig

DRY = os.environ.get("DPO_RAY_GPU_DRY") == "1"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BACKEND = "nccl" if CUDA else "gloo"
VOCAB = 64

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (CUDA or DRY),
                                 reason="needs a CUDA GPU (DPO_RAY_GPU_DRY=1 rehearses on CPU)")]


def pairs_batch(b: int = 4, t: int = 24, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded pairs [chosen; rejected] sharing each prompt (the collate's contract)."""
    return random_pairs(VOCAB, b, t, seed, prompt_len=(3, 8), min_completion=2)


def to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def test_bf16_forward_backward_matches_fp32():
    """The policy's DPO step in the GPU dtype: log-probs within bf16 error of fp32, the packed
    (prefix-sharing) layout equal to the standard one, finite non-zero gradients on every parameter."""
    from dpo_ray.forward import sequence_forward
    from dpo_ray.train.steps import dpo_step

    ref32 = tiny_llama(VOCAB, 0, tie_word_embeddings=False)
    model = tiny_llama(VOCAB, 0, tie_word_embeddings=False).to(DEVICE, DTYPE).train()
    batch = to(pairs_batch(), DEVICE)
    with torch.no_grad():
        exact = sequence_forward(ref32, pairs_batch()).stats.logps
        got = sequence_forward(model, batch).stats.logps.float().cpu()
        packed = sequence_forward(model, batch, share_prefix=True).stats.logps.float().cpu()
    tol = 2e-2 * (pairs_batch()["completion_mask"].sum(1).float() + 1) if DTYPE == torch.bfloat16 else 1e-4
    assert ((got - exact).abs() <= tol).all(), (got - exact).abs().max()
    assert ((packed - got).abs() <= tol).all(), (packed - got).abs().max()
    cfg = DPOConfig(bf16=CUDA)
    zeros = torch.zeros(4, device=DEVICE)
    loss, metrics = dpo_step(model, cfg, batch, zeros, zeros, share_prefix=True)
    loss.backward()
    assert math.isfinite(float(loss)) and metrics["loss"].device.type == DEVICE.type
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == DTYPE, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.skipif(
    not CUDA, reason="FlexAttention has no backward on the CPU (torch 2.13): GPU only, also in dry runs")
def test_flex_prefix_attention_on_the_gpu():
    """Prefix sharing's block-sparse path on the GPU (compiled FlexAttention): fp32 log-probs and gradients
    equal the standard layout's; bf16 within bf16 error; ``prefix_sharing: auto`` times standard / dense /
    flex on the first batch and says which it kept."""
    from dpo_ray.forward import sequence_forward
    from dpo_ray.sharing import PrefixSharing

    batch = to(pairs_batch(b=4, t=48), DEVICE)
    # head_dim 16: FlexAttention's GPU kernels need ≥ 16
    shape = {"hidden_size": 64, "intermediate_size": 128}
    grads, logps = {}, {}
    for layout in (False, "flex"):
        m = tiny_llama(VOCAB, 0, tie_word_embeddings=False, **shape).to(DEVICE).train()
        stats = sequence_forward(m, batch, share_prefix=layout).stats
        stats.logps.sum().backward()
        logps[layout] = stats.logps.detach()
        grads[layout] = {k: p.grad for k, p in m.named_parameters()}
    torch.testing.assert_close(logps["flex"], logps[False], atol=1e-4, rtol=1e-4)
    for k, g in grads[False].items():
        torch.testing.assert_close(grads["flex"][k], g, atol=1e-4, rtol=1e-3, msg=k)
    sharing = PrefixSharing("auto", "policy", "auto")
    sharing(tiny_llama(VOCAB, 0, **shape).to(DEVICE, DTYPE), batch)
    assert set(sharing.timings) == {"standard", "dense", "flex"}, (sharing.timings, sharing.why)
    print(f"prefix_sharing auto on the GPU: {sharing.layout or 'standard'} ({sharing.why})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_group():
    """A one-process group on this module's backend (NCCL on the GPU), as Ray Train makes for one worker."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if CUDA:
        torch.cuda.set_device(0)
    dist.init_process_group(BACKEND, rank=0, world_size=1, device_id=DEVICE if CUDA else None)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_nccl_collectives(process_group):
    import torch.distributed as dist

    assert dist.get_backend() == BACKEND
    x = torch.arange(4, dtype=torch.float32, device=DEVICE)
    dist.all_reduce(x)
    out = [torch.zeros(4, device=DEVICE)]
    dist.all_gather(out, x)
    assert torch.equal(out[0].cpu(), torch.arange(4, dtype=torch.float32))


_ZERO_LOSSES: dict[int, list[float]] = {}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_on_the_device(process_group, stage):
    """dpo_ray's DeepSpeed engine (build_engine: its config, optimizer and schedule) under ZeRO-2 / ZeRO-3 in
    the device dtype: three DPO steps move the loss, every parameter changes, and both stages give the same
    losses (ZeRO partitions the work; it must not change the arithmetic beyond rounding)."""
    from dpo_ray.train.setup import build_engine, seed_everything
    from dpo_ray.train.steps import dpo_step

    cfg = DPOConfig(bf16=CUDA, learning_rate=1e-2, beta=0.5, per_device_train_batch_size=4, max_grad_norm=1.0,
                    deepspeed={"zero_stage": stage}, gradient_checkpointing=False)
    seed_everything(0)
    model = tiny_llama(VOCAB, 0, tie_word_embeddings=False).train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine, _ = build_engine(cfg, model, total_steps=3, world=1, on_gpu=CUDA)
    assert engine.zero_optimization_stage() == stage
    batch = to(pairs_batch(), engine.device)
    zeros = torch.zeros(4, device=engine.device)
    losses = []
    for _ in range(3):
        loss, _ = dpo_step(engine.module, cfg, batch, zeros, zeros)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            after = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    else:
        after = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    unchanged = [k for k, v in before.items() if torch.equal(v.float(), after[k])]
    assert not unchanged, unchanged[:4]
    _ZERO_LOSSES[stage] = losses
    if len(_ZERO_LOSSES) == 2:
        tol = 3e-2 if CUDA else 1e-4
        diffs = [abs(a - b) for a, b in zip(_ZERO_LOSSES[2], _ZERO_LOSSES[3])]
        assert max(diffs) <= tol, (_ZERO_LOSSES, diffs)


def test_reference_actor_on_the_gpu_beside_the_policy(ray_local, tmp_path):
    """One Ray Train fit: the policy on the GPU (NCCL process group, ZeRO-3, bf16) and the reference actor
    pool on the same GPU with a fractional ``num_gpus`` (whole GPUs when there are two or more); two steps."""
    import ray

    from dpo_ray import DPOTrainer
    from dpo_ray.data.bundled import make_pairs

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if CUDA:
        assert gpus >= 1, "Ray sees no GPU although torch does"
        share = 0.5 if gpus == 1 else 1
        worker = {"CPU": 1, "GPU": share}
        reference = {"source": "actor", "num_actors": 1, "num_gpus": share, "num_cpus": 1}
    else:  # dry run: the same fit on CPU (gloo, fp32), the actor at a fraction of a CPU
        worker = {"CPU": 0.5}
        reference = {"source": "actor", "num_actors": 1, "num_gpus": 0, "num_cpus": 0.5}
    cfg = DPOConfig(output_dir=str(tmp_path / "out"), bf16=CUDA, max_steps=2, per_device_train_batch_size=4,
                    logging_steps=1, save_strategy="no", report_to=[], max_length=64, learning_rate=1e-3,
                    deepspeed={"zero_stage": 3}, reference=reference,
                    ray={"num_workers": 1, "use_gpu": CUDA, "resources_per_worker": worker})
    out = DPOTrainer(args=cfg, train_dataset=list(make_pairs(64, 0))).train()
    rows = [r for r in out.history if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if CUDA:
        assert rows[-1].get("gpu_peak_mib", 0) > 0, (
            "the worker reported no GPU memory: did it train on the CPU?")
