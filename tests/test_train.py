"""End-to-end training on a local Ray: 2 CPU workers (gloo), DeepSpeed ZeRO 0-3, the tiny Llama.

Each fit costs ~30 s of Ray Train start-up, so the runs are few and each checks several things.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from dpo_ray import DPOConfig, DPOTrainer
from dpo_ray.data import load_tokenizer
from dpo_ray.models import load_causal_lm

pytestmark = pytest.mark.slow

# Small, fast runs: short sequences, a high learning rate so the loss moves within a few steps.
BASE = dict(
    learning_rate=5e-3, beta=0.5, per_device_train_batch_size=4, per_device_eval_batch_size=4,
    logging_steps=1, max_length=64, save_strategy="no", report_to=[], seed=7,
    ray={"num_workers": 2}, reference={"source": "local"},
)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic standard-format pairs (the bundled vocabulary: digits and words)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nums = [str(rng.randint(0, 9)) for _ in range(3)]
        rows.append({"prompt": f"sort: {' '.join(nums)}", "chosen": " ".join(sorted(nums)),
                     "rejected": " ".join(sorted(nums, reverse=True)) + " " + nums[0]})
    return rows


def train(tmp_path: Path, name: str, rows, eval_rows=None, model=None, callbacks=None, **overrides):
    cfg = DPOConfig(**{**BASE, **overrides, "output_dir": str(tmp_path / name)})
    return DPOTrainer(model=model, args=cfg, train_dataset=rows, eval_dataset=eval_rows,
                      callbacks=callbacks).train()


def losses(out) -> list[float]:
    return [r["loss"] for r in out.history if "loss" in r]


# Uninterrupted curves by ZeRO stage (make_rows(64), max_steps 4), kept for the recovery test to compare with.
_CURVES: dict[int, list[float]] = {}


def zero0_curve(tmp_path: Path) -> list[float]:
    """ZeRO-0's uninterrupted curve with the local reference (made here when a test runs alone)."""
    if 0 not in _CURVES:
        _CURVES[0] = losses(train(tmp_path, "z0", make_rows(64), max_steps=4, deepspeed={"zero_stage": 0}))
    return _CURVES[0]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_every_parameter(ray_local, tmp_path, stage):
    """Each stage's run trains every parameter. Two of the runs also carry checks that only read more of a
    run's outputs (a fit costs ~15 s here, so they share one): ZeRO-1's evaluates and saves at every step
    (``_check_best_model_and_callbacks``), ZeRO-3's scores 5 eval rows on 2 workers
    (``_check_every_eval_row``)."""
    from hooks import Recorder
    from ray._private.state import state

    rows = make_rows(64)
    before = set(state.actor_table(None))  # the module's Ray may have run other modules' actors
    extra, calls, eval_rows = {}, tmp_path / "calls", None
    if stage == 1:
        # load_best_model_at_end with the *highest* eval loss as "best": normally step 1, so the model written
        # to output_dir is a checkpoint's, exported, not the final weights; the rule is recomputed either way
        calls.mkdir()
        eval_rows = make_rows(8, seed=11)
        extra = dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                     load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                     callbacks=[Recorder(calls)])
    elif stage == 3:
        # 5 rows, 2 workers × per_device_eval_batch_size 2: shares of 3 and 2, a partial last batch and a
        # weight-0 filler forward on the worker that ran out; the policy from a saved initial model, which is
        # then the reference a one-process computation can rebuild
        eval_rows = make_rows(5, seed=13)
        extra = dict(model=str(_saved_initial(tmp_path)), eval_strategy="steps", eval_steps=4,
                     per_device_eval_batch_size=2)
    out = train(tmp_path, f"z{stage}", rows, eval_rows, max_steps=4, deepspeed={"zero_stage": stage}, **extra)
    curve = losses(out)
    _CURVES[stage] = curve
    assert len(curve) == 4 and all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0], f"loss did not fall under ZeRO-{stage}: {curve}"
    # every trainable parameter moved away from the (seeded) initial weights
    cfg = DPOConfig(**{**BASE, "output_dir": str(tmp_path)})
    tok = load_tokenizer(cfg)
    initial = load_causal_lm(None, cfg, tok).state_dict()
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out.output_dir).state_dict()
    unchanged = [k for k, v in initial.items() if torch.equal(v, trained[k])]
    assert not unchanged, f"ZeRO-{stage}: parameters never updated: {unchanged[:5]}"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "num_tokens",
                "learning_rate", "grad_norm", "epoch", "samples_per_second", "tokens_per_second"):
        assert key in out.metrics, key
    report = json.loads((Path(out.output_dir) / "report.json").read_text())
    assert report["steps"] == 4
    assert (Path(out.output_dir) / "metrics.png").stat().st_size > 1000
    # a Ray this process started: no placement-group cleaner process (cluster.torch_trainer_class)
    if stage == 0:
        started = {a["ActorClassName"] for aid, a in state.actor_table(None).items() if aid not in before}
        assert "TrainController" in started and "PlacementGroupCleaner" not in started, started
    if stage == 1:
        _check_best_model_and_callbacks(out, calls, eval_rows, steps=4)
    if stage == 3:
        _check_every_eval_row(out, eval_rows, tmp_path / "init")


def _saved_initial(tmp_path: Path) -> Path:
    """The bundled tiny model as BASE seeds it, saved with its tokenizer."""
    cfg = DPOConfig(**{**BASE, "output_dir": str(tmp_path)})
    tok = load_tokenizer(cfg)
    init = tmp_path / "init"
    load_causal_lm(None, cfg, tok).save_pretrained(init)
    tok.save_pretrained(init)
    return init


def _check_best_model_and_callbacks(out, calls: Path, eval_rows, steps: int) -> None:
    """The model written for load_best_model_at_end scores the eval rows as logged; and the run called every
    callback hook on every rank, in the documented order, with the step's metrics
    (dpo_ray.train.callbacks)."""
    from transformers import AutoModelForCausalLM

    from dpo_ray.data import collate_pairs, tokenize_rows
    from dpo_ray.forward import sequence_forward

    step_calls = [f"{hook} {s}" for s in range(1, steps + 1)
                  for hook in ("on_log", "on_evaluate", "on_save", "on_step_end")
                  if not (hook == "on_save" and s == steps)]  # the last checkpoint: after the last step
    expected = ["on_train_begin 0", *step_calls, f"on_save {steps}", f"on_train_end {steps}"]
    for rank in (0, 1):
        got = [json.loads(line) for line in (calls / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [f"{c['hook']} {c['step']}" for c in got] == expected, rank
        assert {(c["total"], c["world"], c["out"]) for c in got} == {(steps, 2, out.output_dir)}
        assert all(c["params"] > 0 for c in got)
        assert all(c["training"] for c in got)  # eval passes hand the policy back in training mode
        by_hook = {c["hook"]: c["metrics"] for c in got}
        assert {"loss", "rewards/accuracies", "learning_rate", "grad_norm"} <= set(by_hook["on_log"])
        assert "eval_loss" in by_hook["on_evaluate"] and by_hook["on_step_end"] == []
    evals = {r["step"]: r for r in out.history if "eval_loss" in r}
    assert sorted(evals) == list(range(1, steps + 1))
    best = max(evals, key=lambda s: (evals[s]["eval_loss"], -s))
    assert out.report["best_model"]["step"] == best
    cfg = DPOConfig(**{**BASE, "output_dir": out.output_dir})
    model = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    tok = load_tokenizer(out.output_dir)
    batch = collate_pairs(tokenize_rows(eval_rows, tok, cfg), tok.pad_token_id)
    with torch.no_grad():
        stats = sequence_forward(model, batch).stats
    chosen = stats.logps[: len(eval_rows)].mean().item()
    assert chosen == pytest.approx(evals[best]["eval_logps/chosen"], abs=1e-4)


def _check_every_eval_row(out, eval_rows, init: Path) -> None:
    """Every eval row counts once: the run's eval metrics equal one process's DPO metrics over all the rows
    in one batch (the saved policy, the initial model as reference). Before, a partial batch and the
    remainder of an uneven split were never scored."""
    from transformers import AutoModelForCausalLM

    from dpo_ray.data import collate_pairs, tokenize_rows
    from dpo_ray.forward import sequence_forward
    from dpo_ray.train.steps import dpo_step

    cfg = DPOConfig(**{**BASE, "output_dir": out.output_dir})
    tok = load_tokenizer(cfg)
    ev = out.eval_metrics
    assert ev["eval_num_pairs"] == len(eval_rows)
    policy = AutoModelForCausalLM.from_pretrained(out.output_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(init).eval()
    batch = collate_pairs(tokenize_rows(eval_rows, tok, cfg), tok.pad_token_id)
    n = len(eval_rows)
    with torch.no_grad():
        ref_logps = sequence_forward(ref, batch).stats.logps
        _, one = dpo_step(policy, cfg, batch, ref_logps[:n], ref_logps[n:])
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert ev[f"eval_{key}"] == pytest.approx(float(one[key]), abs=1e-4), key


def test_two_workers_equal_one_worker_with_accumulation(ray_local, tmp_path):
    """Each optimizer step sees the whole 8-pair set in both layouts, so the curves must agree.

    Tolerance 1e-4 absolute: the only difference is the order of float32 reductions (gloo all-reduce of
    two half-batch gradients vs DeepSpeed's accumulation of two micro-batch gradients).
    """
    rows = make_rows(8, seed=3)
    two = train(tmp_path, "two", rows, num_train_epochs=4, ray={"num_workers": 2},
                gradient_accumulation_steps=1)
    one = train(tmp_path, "one", rows, num_train_epochs=4, ray={"num_workers": 1},
                gradient_accumulation_steps=2)
    assert len(losses(two)) == len(losses(one)) == 4
    for a, b in zip(losses(two), losses(one)):
        assert a == pytest.approx(b, abs=1e-4)


def test_killed_worker_is_recovered(ray_local, tmp_path):
    """The last rank dies at the end of step 3 (a callback, tests/hooks.py); Ray Train restarts the group from
    the step-2 checkpoint. The curve is the uninterrupted run's (ZeRO-0's of the test above: same rows and
    steps), each step logged once."""
    from hooks import KillOnce

    marker = tmp_path / "killed"
    out = train(tmp_path, "kill", make_rows(64), max_steps=4, save_strategy="steps", save_steps=2,
                ray={"num_workers": 2, "max_failures": 2}, deepspeed={"zero_stage": 0},
                callbacks=[KillOnce(3, marker)])
    assert marker.exists(), "the fault was never injected"
    assert out.report["steps"] == 4
    assert [r["step"] for r in out.history if "loss" in r] == [1, 2, 3, 4]  # no row twice
    for a, b in zip(zero0_curve(tmp_path), losses(out)):
        assert a == pytest.approx(b, abs=1e-5)


def test_dpo_after_sft_starts_from_the_sft_weights(ray_local, tmp_path):
    """SFT from a saved initial model, then DPO from the SFT output with the *initial* model as reference:
    at step 1 (logged before any DPO update moves the policy) rewards/chosen = β·(log π_sft - log π_init) on
    chosen completions, which SFT raised; a policy that started anywhere else would log 0 here."""
    cfg = DPOConfig(**{**BASE, "output_dir": str(tmp_path)})
    tok = load_tokenizer(cfg)
    init = _saved_initial(tmp_path)
    rows = make_rows(64)
    sft = DPOTrainer(model=str(init),
                     args=DPOConfig(**{**BASE, "output_dir": str(tmp_path / "sft"), "max_steps": 6,
                                        "learning_rate": 1e-2, "reference": {"source": "none"}}),
                     train_dataset=rows, mode="sft").train()
    assert sft.report["steps"] == 6
    dpo = train(tmp_path, "dpo", rows, model=str(tmp_path / "sft"), max_steps=1,
                reference={"source": "local", "model_name_or_path": str(init)})
    first = dpo.history[0]
    assert first["step"] == 1 and first["rewards/chosen"] > 0.1, first
    assert load_causal_lm(str(tmp_path / "dpo"), cfg, tok) is not None


def test_actor_pool_reference_matches_local_reference(ray_local, tmp_path, capsys, monkeypatch):
    """The async actor pool gives the same reference log-probs, so the same curve, as the in-worker copy
    (ZeRO-0's run above: same rows and steps).

    Also the driver's progress display where output is not a terminal (as under `ray job logs`): plain lines
    (one per poll here), step and elapsed time counting up, the last at 100 %, and the duration estimate."""
    monkeypatch.setenv("DPO_RAY_PROGRESS_INTERVAL_S", "0")
    local = zero0_curve(tmp_path)  # before the capture: run alone, it trains here
    capsys.readouterr()
    pooled = train(tmp_path, "pool", make_rows(64), max_steps=4, deepspeed={"zero_stage": 0},
                   reference={"source": "actor", "num_actors": 2, "num_cpus": 0.25, "prefetch_depth": 2})
    assert len(losses(pooled)) == 4
    for a, b in zip(local, losses(pooled)):
        assert a == pytest.approx(b, abs=1e-5)

    captured = capsys.readouterr()
    assert "dpo-ray dpo: plan: 4 optimizer steps" in captured.out
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("dpo-ray dpo: ") and " steps (" in ln]
    assert lines and "\r" not in captured.err
    parsed = [re.search(r": (\d+)/4 steps \((\d+)%\).*elapsed (\d+):(\d+)", ln) for ln in lines]
    assert all(parsed), lines
    steps = [int(m.group(1)) for m in parsed]
    elapsed = [int(m.group(3)) * 60 + int(m.group(4)) for m in parsed]
    assert steps == sorted(steps) and elapsed == sorted(elapsed) and parsed[-1].group(2) == "100"
    assert "loss" in lines[-1] and "pairs_per_s" in lines[-1]

    # the start-up timeline (docs/training.md#start-up): every stage, in time order, printed with the summary
    stages = json.loads((Path(pooled.output_dir) / "report.json").read_text())["startup"]
    assert {"imports", "ray", "data plan", "reference pool", "fit", "worker", "policy", "engine",
            "first batch", "first step"} <= set(stages), stages
    assert list(stages.values()) == sorted(stages.values()) and stages["first step"] > 0
    # a quiet console: none of Ray's start-up chatter reached it (it stays in Ray's log files)
    from dpo_ray.cluster import _is_noise

    assert not [ln for ln in (captured.out + captured.err).splitlines() if _is_noise(ln)]


def test_lora_on_two_workers_changes_only_adapter_weights(ray_local, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = train(tmp_path, "lora", make_rows(32), max_steps=3, use_peft=True, lora_r=4, lora_alpha=8,
                lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"], merge_adapter=True,
                reference={"source": "adapter_off"})
    adapter = load_file(Path(out.output_dir) / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), "LoRA B never trained"
    cfg = DPOConfig(**{**BASE, "output_dir": str(tmp_path)})
    base = load_causal_lm(None, cfg, load_tokenizer(cfg)).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(Path(out.output_dir) / "merged").state_dict()
    changed = {k for k, v in base.items() if not torch.allclose(v, merged[k])}
    assert changed, "merged model equals the base"
    assert all(("q_proj" in k or "v_proj" in k) for k in changed), f"non-adapted weights moved: {changed}"
    # merged/ is a model directory of its own: its tokenizer loads from it (the adapter's base is not needed)
    from transformers import AutoTokenizer

    assert (AutoTokenizer.from_pretrained(Path(out.output_dir) / "merged").vocab_size
            == load_tokenizer(cfg).vocab_size)
