"""Learning-rate schedules equal transformers' (the TRL meaning of lr_scheduler_type / lr_scheduler_kwargs)
at every step, and the optimizer names TRL's ``optim`` takes build the optimizer they name."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from dpo_ray.schedule import SCHEDULES, lr_lambda, lr_lambda_for, scheduler_kwargs_problems

LR = 2e-5

CASES = [
    ("linear", {}), ("cosine", {}), ("cosine", {"num_cycles": 1.5}), ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 1e-6, "num_cycles": 0.25}), ("polynomial", {}),
    ("polynomial", {"lr_end": 1e-6, "power": 2.0}), ("constant", {}), ("constant_with_warmup", {}),
    ("inverse_sqrt", {}), ("inverse_sqrt", {"timescale": 7}),
]


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("kind,kwargs", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_every_schedule_equals_transformers(kind, kwargs, warmup):
    total = 40
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ref = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total,
                        scheduler_specific_kwargs=dict(kwargs))
    ours = lr_lambda(kind, total, warmup, kwargs, base_lr=LR)
    for step in range(total + 1):
        assert ours(step) == pytest.approx(ref.lr_lambdas[0](step), rel=1e-12, abs=1e-15), (kind, step)


def test_the_table_covers_what_it_claims():
    assert set(SCHEDULES) == {k for k, _ in CASES}


def test_config_level_problems():
    assert scheduler_kwargs_problems("cosine", {"num_cycles": 1}, LR) == []
    assert ("not an argument of the cosine schedule"
            in scheduler_kwargs_problems("cosine", {"min_lr": 1}, LR)[0])
    assert "exactly one of min_lr" in scheduler_kwargs_problems("cosine_with_min_lr", {}, LR)[0]
    assert ("exactly one"
            in scheduler_kwargs_problems("cosine_with_min_lr", {"min_lr": 0, "min_lr_rate": 0.1}, LR)[0])
    assert "takes none" in scheduler_kwargs_problems("linear", {"power": 2}, LR)[0]
    assert "eval metrics" in scheduler_kwargs_problems("reduce_lr_on_plateau", {}, LR)[0]


def test_lr_lambda_for_reads_the_config():
    from dpo_ray.config import DPOConfig

    cfg = DPOConfig(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-7},
                    learning_rate=1e-6, warmup_steps=2)
    fn = lr_lambda_for(cfg, 10)
    assert fn(0) == 0 and fn(2) == pytest.approx(1.0) and fn(10) == pytest.approx(0.1)


# ------------------------------------------------------------------ optimizers

from dpo_ray.optim import (  # noqa: E402
    OPTIMIZER_ALIASES,
    OPTIMIZERS,
    UNSUPPORTED,
    build_optimizer,
    optimizer_problems,
    parse_optim_args,
)


def _groups():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    return [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], (w, b)


def test_every_transformers_optimizer_name_is_built_or_refused_with_a_reason():
    from transformers.training_args import OptimizerNames

    names = {o.value for o in OptimizerNames}
    assert names <= set(OPTIMIZERS) | set(UNSUPPORTED), names - set(OPTIMIZERS) - set(UNSUPPORTED)
    assert not set(OPTIMIZERS) & set(UNSUPPORTED)
    for name, why in UNSUPPORTED.items():
        assert why in optimizer_problems(name, None)[0]


@pytest.mark.parametrize("name,optim_args,cls", [
    ("adamw_torch", None, torch.optim.AdamW), ("adamw_torch_fused", None, torch.optim.AdamW),
    ("adamw_hf", None, torch.optim.AdamW), ("sgd", "momentum=0.9,nesterov=true", torch.optim.SGD),
    ("adagrad", "lr_decay=0.01", torch.optim.Adagrad),
    ("rmsprop", "alpha=0.9, centered=true", torch.optim.RMSprop),
])
def test_build_optimizer_names_the_class_and_passes_the_arguments(name, optim_args, cls):
    groups, (w, _) = _groups()
    opt = build_optimizer(name, groups, lr=1e-3, betas=(0.8, 0.99), eps=1e-6, optim_args=optim_args)
    assert type(opt) is cls and opt.defaults["lr"] == 1e-3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # per-group decay kept
    if cls is torch.optim.AdamW:
        assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-6
        assert bool(opt.defaults.get("fused")) == (name == "adamw_torch_fused")  # fused is available on CPU
    if name == "sgd":
        assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    if name == "rmsprop":
        assert opt.defaults["alpha"] == 0.9 and opt.defaults["centered"] is True
    w.grad = torch.ones_like(w)
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(before, w.detach())


def test_adafactor_is_transformers_with_a_fixed_learning_rate():
    from transformers.optimization import Adafactor

    groups, _ = _groups()
    opt = build_optimizer("adafactor", groups, lr=1e-3)
    assert isinstance(opt, Adafactor)
    assert opt.defaults["relative_step"] is False and opt.defaults["scale_parameter"] is False


def test_optim_args_problems():
    assert parse_optim_args(" momentum=0.9 , nesterov=true") == {"momentum": "0.9", "nesterov": "true"}
    assert parse_optim_args(None) == {}
    assert "not key=value" in optimizer_problems("sgd", "momentum")[0]
    assert "adamw_torch reads no optim_args" in optimizer_problems("adamw_torch", "momentum=0.9")[0]
    assert "not an optimizer name" in optimizer_problems("adamm", None)[0]
    assert optimizer_problems("adamw_hf", None) == [] and OPTIMIZER_ALIASES["adamw_hf"] == "adamw_torch"
    with pytest.raises(ValueError, match="bitsandbytes"):
        build_optimizer("paged_adamw_8bit", _groups()[0], lr=1e-3)
