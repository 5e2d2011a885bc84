"""Checkpoints (every rank's DeepSpeed shard + RNG, through ``ray.train.report``) and the final saved model.

Two state files, two names: ``checkpoint_state.json`` sits in each checkpoint (where to resume: step, epoch,
data position); ``train_state.json`` is written to ``output_dir`` at the end (what the run did, for the
driver's report).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dpo_ray.config import DPOConfig

CHECKPOINT_STATE_FILE = "checkpoint_state.json"
FINAL_STATE_FILE = "train_state.json"
CKPT_TAG = "engine"


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed (the data position)
    pairs_seen: int = 0
    tokens_seen: int = 0
    micro_per_epoch: int | None = None  # micro-batches the first full epoch gave (kept rows size the plan)
    planned_steps: int | None = None  # the run's optimizer steps, after that resizing
    world_size: int | None = None  # ranks that wrote the checkpoint (what a complete one holds)
    zero_stage: int | None = None
    ref_version: int = 0  # TR-DPO: syncs applied to the reference (its weights are saved when > 0)
    # what the data position (epoch, micro_in_epoch) means: resuming with other values would skip other rows
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    data_seed: int | None = None
    data_fingerprint: str | None = None
    # each rank wrote manifest_rank{r}.json last: completeness is checked against them
    manifests: bool = False


# The state keys a resume must match (world_size included), with the setting that gives each.
RESUME_KEYS = {"world_size": "ray.num_workers", "per_device_train_batch_size": "per_device_train_batch_size",
               "gradient_accumulation_steps": "gradient_accumulation_steps", "data_seed": "data_seed",
               "data_fingerprint": "dataset_name"}
MANIFEST = "manifest_rank{rank}.json"


def checkpoint_dir_name(step: int) -> str:
    """A checkpoint's folder name in its run's Ray Train folder: ``checkpoint-000012`` for optimizer step
    12."""
    return f"checkpoint-{step:06d}"


def saved_checkpoints(run_dir: Path) -> dict[int, Path]:
    """The checkpoint folders in one run's Ray Train folder, by optimizer step (others' files ignored)."""
    out = {}
    for p in Path(run_dir).glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and p.is_dir():
            out[int(step)] = p
    return out


def save_checkpoint(engine, state: TrainerState, rank: int, metrics: dict[str, float] | None = None,
                    reference=None) -> None:
    """Every rank writes its DeepSpeed shard (+ RNG) and reports it; Ray Train merges them in storage.

    Metrics go to metrics.jsonl / TensorBoard, so Ray Train sees only the step and ``metrics`` (the eval
    metric load_best_model_at_end ranks checkpoints by).
    """
    import ray.train
    import torch.distributed as dist

    state.world_size = dist.get_world_size() if dist.is_initialized() else 1
    state.zero_stage = engine.zero_optimization_stage()
    state.manifests = True
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG)
        torch.save(_rng_state(), Path(d) / f"rng_rank{rank}.pt")
        if reference is not None and state.ref_version > 0:
            reference.save_state(Path(d), rank)
        if rank == 0:
            (Path(d) / CHECKPOINT_STATE_FILE).write_text(json.dumps(asdict(state)))
        # last: every file this rank wrote, with its size; a checkpoint is complete when every rank's manifest
        # is there and every file it lists has that size (a file torn or emptied in the upload is caught)
        files = {str(p.relative_to(d)): p.stat().st_size for p in sorted(Path(d).rglob("*")) if p.is_file()}
        (Path(d) / MANIFEST.format(rank=rank)).write_text(json.dumps(files))
        ray.train.report({"step": state.global_step, **(metrics or {})},
                         checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_dir_name(state.global_step))


def load_checkpoint(engine, d: str, rank: int, reference=None) -> TrainerState:
    engine.load_checkpoint(d, tag=CKPT_TAG)
    state = TrainerState(**json.loads((Path(d) / CHECKPOINT_STATE_FILE).read_text()))
    rng_file = Path(d) / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))  # plain tensors and numbers: no pickled code
    if state.ref_version > 0:
        if reference is None or not hasattr(reference, "load_state"):
            raise RuntimeError(f"checkpoint {d} holds a TR-DPO reference at weights version "
                               f"{state.ref_version}, but this run's reference source cannot take it; resume "
                               "with the same reference.source")
        reference.load_state(Path(d), rank, state.ref_version)
    return state


def _rng_state() -> dict:
    """Every RNG's state as tensors and numbers, so it loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, torch.tensor(py_state, dtype=torch.int64), py_gauss]}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    kind, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = rng["python"]
    random.setstate((version, tuple(int(x) for x in py_state.tolist()), py_gauss))


def checkpoint_problems(d: Path) -> str:
    """What checkpoint ``d`` lacks to be complete ("" when it is): the state file, every rank's RNG file,
    DeepSpeed's files for the tag (model states, and each rank's optimizer shard under ZeRO), and the
    TR-DPO reference weights it says it holds. A crash while writing or uploading leaves one half-written."""
    d = Path(d)
    try:
        state = TrainerState(**json.loads((d / CHECKPOINT_STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        return f"no readable {CHECKPOINT_STATE_FILE} ({type(e).__name__})"
    world = state.world_size or max(1, len(list(d.glob("rng_rank*.pt"))))
    if state.manifests:
        return _manifest_problems(d, world)
    missing = [f"rng_rank{r}.pt" for r in range(world) if not (d / f"rng_rank{r}.pt").exists()]
    tag = d / CKPT_TAG
    shards = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    if not (tag / "mp_rank_00_model_states.pt").exists():
        missing += [f"{CKPT_TAG}/{f}" for f in shards if not (tag / f).exists()]
    if (state.zero_stage or 0) > 0 or any(tag.glob("*zero_pp_rank_*optim_states.pt")):
        missing += [f"{CKPT_TAG}/zero_pp_rank_{r}_*optim_states.pt" for r in range(world)
                    if not any(tag.glob(f"*zero_pp_rank_{r}_mp_rank_*optim_states.pt"))]
    if state.ref_version > 0 and not (d / "ref_model.pt").exists():
        missing += [f"ref_rank{r}.pt" for r in range(world) if not (d / f"ref_rank{r}.pt").exists()]
    if missing:
        return f"missing {', '.join(missing)}"
    empty = sorted(str(p.relative_to(d)) for p in d.rglob("*.pt") if p.is_file() and p.stat().st_size == 0)
    return f"empty {', '.join(empty)}" if empty else ""


def _manifest_problems(d: Path, world: int) -> str:
    """Every rank's manifest is there, and every file it lists exists with the size it had when written."""
    problems = []
    for rank in range(world):
        try:
            files = json.loads((d / MANIFEST.format(rank=rank)).read_text())
        except (OSError, ValueError):
            problems.append(f"missing {MANIFEST.format(rank=rank)} (rank {rank} did not finish writing)")
            continue
        for name, size in files.items():
            p = d / name
            if not p.is_file():
                problems.append(f"missing {name}")
            elif p.stat().st_size != size:
                problems.append(f"{name} has {p.stat().st_size} bytes, not the {size} written")
    return "; ".join(problems[:6]) + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")


def resume_mismatches(state: dict, now: dict) -> list[tuple[str, str]]:
    """(key, message) for each setting the checkpoint's data position depends on that differs in this run
    (``now``: the RESUME_KEYS as this run has them); a checkpoint that did not record a key is not checked on
    it."""
    out = []
    for key, setting in RESUME_KEYS.items():
        was, is_ = state.get(key), now.get(key)
        if was is None or is_ is None or was == is_:
            continue
        what = ("other data (the dataset's files, sizes, row count or data settings differ)"
                if key == "data_fingerprint" else f"{setting} {was}, and this run has {is_}")
        out.append((setting, f"resume_from_checkpoint: the checkpoint was written with {what}; its data "
                             f"position (epoch {state.get('epoch')}, micro-batch "
                             f"{state.get('micro_in_epoch')}) counts that run's batches, so resuming would "
                             f"skip other rows. Resume with the checkpoint's {setting}, or start a new run"))
    return out


def save_model(engine, cfg: DPOConfig, tokenizer, rank: int) -> None:
    """Write a from_pretrained-loadable model (consolidated from ZeRO-3) and the tokenizer to output_dir."""
    out = Path(cfg.output_dir)
    if cfg.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    else:
        state_dict = None
    if rank == 0:
        write_model(engine.module, cfg, tokenizer, out, state_dict)


_OPTIONAL = ("README.md",)  # files of the set a model loads without: one dpo_ray did not write stays


def write_model(module, cfg: DPOConfig, tokenizer, out: Path, state_dict=None) -> None:
    """``module`` (or ``state_dict`` in its layout) in save_pretrained's layout, the adapter for PEFT.

    Written into a temporary folder inside ``out``, then each file renamed into place: a crash mid-write
    leaves the previous files or none, never a truncated model.safetensors beside a valid config.json.
    The set is replaced whole: what an earlier write listed in ``out``'s marker (``model_files``) and this one
    did not write (a LoRA run's adapter files under a full model, old shards, merged/) is removed, so
    ``from_pretrained(out)`` never loads a stale piece. A file dpo_ray did not write (a user's README.md) is
    left as it is, never replaced by a model card (the rest of the set is the model's and is written)."""
    from dpo_ray.owned import mark_owned, read_marker, remove_owned, replace_owned

    mark_owned(out, "output_dir")
    previous = set(read_marker(out).get("model_files", []))
    tmp = Path(tempfile.mkdtemp(prefix=".model-tmp-", dir=out))
    try:
        if cfg.uses_peft:
            from dpo_ray.adapters import save_peft

            save_peft(module, cfg, tmp, state_dict)
        else:
            module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # merge_adapter: a model directory of its own, loadable with its tokenizer
        if (tmp / "merged").is_dir():
            tokenizer.save_pretrained(tmp / "merged")
        written, kept = [], []
        # weights first, config.json last: a config is there only once its weights are
        for src in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            dst = out / src.name
            if src.name in _OPTIONAL and os.path.lexists(dst) and src.name not in previous:
                kept.append(src.name)  # a user's README.md is never replaced by a model card
                continue
            replace_owned(src, dst, out)
            written.append(src.name)
        for stale in sorted(previous - set(written) - set(kept)):
            remove_owned(out / stale, out)
        mark_owned(out, "output_dir", model_files=sorted(written))
        if kept:
            print(f"dpo-ray: left {', '.join(kept)} in {out} as they were (not written by dpo_ray)",
                  flush=True)
    finally:
        remove_owned(tmp, out)


def model_files_problem(out: Path, cfg: DPOConfig) -> str:
    """What a finished run's ``output_dir`` lacks ("" when whole): the model's weights and config (or the
    adapter under PEFT) and train_state.json."""
    need = ["adapter_config.json"] if cfg.uses_peft else ["config.json"]
    missing = [f for f in need + [FINAL_STATE_FILE] if not (out / f).exists()]
    if not any(out.glob("adapter_model.*" if cfg.uses_peft else "model*.safetensors")) and not any(
            out.glob("pytorch_model*.bin")):
        missing.append("adapter_model.safetensors" if cfg.uses_peft else "model.safetensors")
    return ", ".join(missing)


def checkpoint_weights(d: Path, cfg: DPOConfig) -> dict[str, torch.Tensor]:
    """The full fp32 weights in checkpoint ``d``: every rank's ZeRO shard gathered, or ZeRO-0's whole copy."""
    tag = Path(d) / CKPT_TAG
    if cfg.deepspeed.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(d), tag=CKPT_TAG)
    return torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def export_checkpoint(d: Path, cfg: DPOConfig, model_source, tokenizer, out: Path) -> None:
    """Write checkpoint ``d`` to ``out`` as the run's model: the policy rebuilt as the workers built it (PEFT
    wrapped), the checkpoint's weights loaded, saved like the final model."""
    import ray

    from dpo_ray.models import load_causal_lm

    source = ray.get(model_source) if isinstance(model_source, ray.ObjectRef) else model_source
    model = load_causal_lm(source, cfg, tokenizer)
    if cfg.uses_peft:
        from dpo_ray.adapters import wrap_peft

        model = wrap_peft(model, cfg)
    missing, unexpected = model.load_state_dict(checkpoint_weights(d, cfg), strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise RuntimeError(f"checkpoint {d} does not match the policy: missing "
                           f"{sorted(trainable & set(missing))[:5]}, unexpected {sorted(unexpected)[:5]}")
    write_model(model, cfg, tokenizer, out)


def save_final_state(cfg: DPOConfig, state: TrainerState) -> None:
    path = Path(cfg.output_dir) / FINAL_STATE_FILE
    path.with_name(path.name + ".tmp").write_text(json.dumps(asdict(state)))
    path.with_name(path.name + ".tmp").replace(path)
