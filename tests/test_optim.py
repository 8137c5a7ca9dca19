"""optim.py: AdamW groups, the schedule, a param group that follows a running schedule, and the
adapters' group declared empty with the optimizer and filled later."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched

from slope_lightning.optim import (
    SUPPORTED_SCHEDULERS,
    OptimizerConfig,
    adapter_param_group,
    add_param_group_following_schedule,
    build_adamw,
    check_adapter_placement,
    check_schedule_extendable,
    decay_groups,
    param_group_named,
    place_adapter_params,
    put_back_group,
    set_aside_empty_group,
)

MakeScheduler = Callable[[torch.optim.Optimizer, list[float]], object]

# Each: a scheduler over an optimizer whose groups have the given max learning rates (only
# OneCycleLR reads them: it sets each group's lr from its own max_lr).
SUPPORTED: dict[str, MakeScheduler] = {
    "LambdaLR": lambda opt, _: sched.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "MultiplicativeLR": lambda opt, _: sched.MultiplicativeLR(opt, lambda step: 0.9),
    "StepLR": lambda opt, _: sched.StepLR(opt, step_size=3, gamma=0.5),
    "MultiStepLR": lambda opt, _: sched.MultiStepLR(opt, milestones=[2, 5, 9], gamma=0.3),
    "ConstantLR": lambda opt, _: sched.ConstantLR(opt, factor=0.5, total_iters=7),
    "LinearLR": lambda opt, _: sched.LinearLR(opt, start_factor=0.25, total_iters=8),
    "ExponentialLR": lambda opt, _: sched.ExponentialLR(opt, gamma=0.8),
    "PolynomialLR": lambda opt, _: sched.PolynomialLR(opt, total_iters=10, power=2.0),
    "CosineAnnealingLR": lambda opt, _: sched.CosineAnnealingLR(opt, T_max=6),
    "CosineAnnealingWarmRestarts": lambda opt, _: sched.CosineAnnealingWarmRestarts(opt, T_0=4),
    "OneCycleLR": lambda opt, max_lrs: sched.OneCycleLR(opt, max_lr=max_lrs, total_steps=20),
}

BASE_LRS = [0.1, 0.05]  # the two groups that exist from the start
ADAPTER_LR = 0.03
ADD_AT = 5
STEPS = 16


def _params(count: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3)) for _ in range(count)]


def _run(make: MakeScheduler, *, from_start: bool, lr: float | None = ADAPTER_LR):
    """LRs (and beta1) of the third group per step, present from the start or added at ADD_AT."""
    first, second, extra = _params(3)
    groups = [{"params": [first], "lr": BASE_LRS[0]}, {"params": [second], "lr": BASE_LRS[1]}]
    # OneCycleLR: the new group's bounds are group 0's scaled by lr / group 0's base lr.
    one_cycle_base = 0.1 / 25  # max_lr / div_factor, group 0's base lr under OneCycleLR
    max_lrs = [0.1, 0.1]
    if from_start:
        groups.append({"params": [extra], "lr": lr if lr is not None else BASE_LRS[0]})
        max_lrs.append(0.1 * (lr if lr is not None else one_cycle_base) / one_cycle_base)
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    scheduler = make(optimizer, max_lrs)
    seen: list[tuple[float, float]] = []
    for step in range(STEPS):
        if not from_start and step == ADD_AT:
            add_param_group_following_schedule(optimizer, [scheduler], [extra], lr=lr)
        if len(optimizer.param_groups) == 3:
            group = optimizer.param_groups[2]
            seen.append((group["lr"], group["betas"][0]))
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]
    return seen[-(STEPS - ADD_AT) :], optimizer, scheduler


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_an_added_group_follows_the_schedule_like_one_present_from_the_start(name):
    joined, optimizer, scheduler = _run(SUPPORTED[name], from_start=False)
    uninterrupted, _, _ = _run(SUPPORTED[name], from_start=True)
    assert len(joined) == len(uninterrupted) == STEPS - ADD_AT
    if name == "LambdaLR":
        assert joined == uninterrupted  # the closed form: bit for bit
    else:
        assert [lr for lr, _ in joined] == pytest.approx([lr for lr, _ in uninterrupted], rel=1e-12)
        assert [b for _, b in joined] == pytest.approx([b for _, b in uninterrupted], rel=1e-12)
    group = optimizer.param_groups[2]
    assert group["name"] == "adapters" and group["weight_decay"] == 0.0
    assert len(scheduler.base_lrs) == 3 and len(scheduler.get_last_lr()) == 3


@pytest.mark.parametrize("name", ["LambdaLR", "StepLR", "OneCycleLR"])
def test_without_lr_the_group_takes_the_reference_groups_learning_rate(name):
    first, second, extra = _params(3)
    optimizer = torch.optim.AdamW(
        [{"params": [first], "lr": 0.1}, {"params": [second], "lr": 0.05}], lr=0.1
    )
    scheduler = SUPPORTED[name](optimizer, [0.1, 0.1])
    for step in range(10):
        if step == 4:
            add_param_group_following_schedule(optimizer, [scheduler], [extra])
        if step >= 4:
            assert optimizer.param_groups[2]["lr"] == pytest.approx(
                optimizer.param_groups[0]["lr"], rel=1e-12
            )
        optimizer.step()
        scheduler.step()


def test_an_explicit_lr_is_a_base_lr_scaled_by_the_running_factor():
    (param, extra) = _params(2)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = sched.LambdaLR(optimizer, lambda step: 0.1 if step >= 3 else 1.0)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    group = add_param_group_following_schedule(optimizer, [scheduler], [extra], lr=5e-3)
    assert group["initial_lr"] == 5e-3  # the base, as the optimizer's own groups keep it
    assert group["lr"] == pytest.approx(5e-4)  # x the factor the schedule applies now


def test_without_a_scheduler_the_group_keeps_its_lr_and_weight_decay():
    (param, extra) = _params(2)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    group = add_param_group_following_schedule(
        optimizer, [], [extra], name="extra", lr=2e-3, weight_decay=0.05
    )
    assert (group["lr"], group["weight_decay"], group["name"]) == (2e-3, 0.05, "extra")


def test_parameters_already_in_a_group_are_moved_to_the_new_one():
    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # weight and bias in group 0
    scheduler = sched.LambdaLR(optimizer, lambda step: 1.0)
    add_param_group_following_schedule(optimizer, [scheduler], [model.bias])
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1]
    assert optimizer.param_groups[0]["params"][0] is model.weight


@pytest.mark.parametrize(
    ("make", "name", "match"),
    [
        (
            lambda opt: sched.SequentialLR(
                opt,
                [sched.ConstantLR(opt, factor=0.5), sched.ExponentialLR(opt, gamma=0.9)],
                milestones=[3],
            ),
            "SequentialLR",
            "several inner schedulers.*one LambdaLR",
        ),
        (
            lambda opt: sched.ChainedScheduler(
                [sched.ConstantLR(opt, factor=0.5), sched.ExponentialLR(opt, gamma=0.9)]
            ),
            "ChainedScheduler",
            "one LambdaLR",
        ),
        (lambda opt: sched.ReduceLROnPlateau(opt), "ReduceLROnPlateau", "no base learning rate"),
        (
            lambda opt: sched.CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, cycle_momentum=False),
            "CyclicLR",
            "per-group cycle bounds",
        ),
        (
            lambda opt: sched.CosineAnnealingLR(opt, T_max=10, eta_min=1e-5),
            "CosineAnnealingLR",
            "eta_min=1e-05.*use eta_min=0",
        ),
        (
            lambda opt: type("MyLambdaLR", (sched.LambdaLR,), {})(opt, lambda step: 1.0),
            "MyLambdaLR",
            "not one of the schedulers.*LambdaLR",
        ),
    ],
    ids=[
        "SequentialLR",
        "ChainedScheduler",
        "ReduceLROnPlateau",
        "CyclicLR",
        "CosineAnnealingLR-eta_min",
        "subclass",
    ],
)
def test_a_scheduler_that_cannot_be_extended_is_named_and_nothing_changes(make, name, match):
    (param, extra) = _params(2)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = make(optimizer)
    base_lrs = list(getattr(scheduler, "base_lrs", []))
    with pytest.raises(
        ValueError, match=f"cannot add a param group that follows {name}: .*{match}"
    ):
        check_schedule_extendable(optimizer, [scheduler])
    with pytest.raises(ValueError, match=f"follows {name}:"):
        add_param_group_following_schedule(optimizer, [scheduler], [extra])
    assert len(optimizer.param_groups) == 1
    assert list(getattr(scheduler, "base_lrs", [])) == base_lrs


def test_every_supported_name_is_tested():
    assert set(SUPPORTED_SCHEDULERS) == set(SUPPORTED)


def test_two_schedulers_on_one_optimizer_are_refused():
    (param, extra) = _params(2)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    schedulers = [sched.StepLR(optimizer, 2), sched.ExponentialLR(optimizer, 0.9)]
    with pytest.raises(ValueError, match=r"2 schedulers \(StepLR, ExponentialLR\) drive"):
        add_param_group_following_schedule(optimizer, schedulers, [extra])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"params": []}, "no parameters given"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"reference_group": 3}, "reference_group=3 is not a group index"),
        ({"name": "taken"}, "already has a param group named 'taken'"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    (param, extra) = _params(2)
    optimizer = torch.optim.AdamW([{"params": [param], "name": "taken"}], lr=1e-3)
    arguments = {"params": [extra], **kwargs}
    with pytest.raises(ValueError, match=match):
        add_param_group_following_schedule(optimizer, [], **arguments)


def test_build_adamw_names_its_groups_and_decays_matrices_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    decay, no_decay = decay_groups(model)
    assert [p.dim() for p in decay] == [2] and all(p.dim() == 1 for p in no_decay)
    optimizer, scheduler = build_adamw(model, OptimizerConfig(warmup=2), total_steps=10)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(6e-4 / 2)  # step 0 of 2 warmup
    with pytest.raises(ValueError, match="positive number of steps"):
        build_adamw(model, OptimizerConfig(), total_steps=0)
    assert isinstance(scheduler, sched.LambdaLR)


def test_embedding_lr_scale_puts_each_embedding_weight_once_in_a_group_at_that_multiple():
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight  # tied, as a language model's head
    model = nn.Sequential(embed, nn.Linear(4, 4), head)
    optimizer, scheduler = build_adamw(
        model, OptimizerConfig(warmup=2, embedding_lr_scale=0.5), total_steps=10
    )
    decay, _, embedding = optimizer.param_groups
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "embedding"]
    assert embedding["params"] == [embed.weight] and decay["params"] == [model[1].weight]
    for _ in range(6):  # warmup and decay alike: the ratio holds at every step
        assert embedding["lr"] == pytest.approx(0.5 * decay["lr"], rel=1e-12)
        optimizer.step()
        scheduler.step()
    default, _ = build_adamw(model, OptimizerConfig(), total_steps=10)
    assert [g["name"] for g in default.param_groups] == ["decay", "no_decay"]


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_a_non_positive_embedding_lr_scale_is_refused_by_name(scale):
    with pytest.raises(ValueError, match="optimizer.embedding_lr_scale must be a positive"):
        OptimizerConfig(embedding_lr_scale=scale)


# ------------------------------------------------------------- the adapters' declared group


def test_adapter_param_group_is_an_empty_named_group_with_its_own_settings():
    assert adapter_param_group() == {"params": [], "name": "adapters", "weight_decay": 0.0}
    assert adapter_param_group(lr=2e-3, weight_decay=0.1)["lr"] == 2e-3
    with pytest.raises(ValueError, match=r"adapter_param_group\(lr=0\.0\): .*positive"):
        adapter_param_group(lr=0.0)
    with pytest.raises(ValueError, match=r"adapter_param_group\(weight_decay=-1\): must be >= 0"):
        adapter_param_group(weight_decay=-1)


def _declared(kind: str) -> tuple[torch.optim.Optimizer, nn.Linear]:
    model = nn.Linear(4, 4)
    groups = [{"params": model.parameters()}, adapter_param_group()]
    fused, foreach = kind == "fused", kind == "foreach"
    return torch.optim.AdamW(groups, lr=1e-2, fused=fused, foreach=foreach), model


@pytest.mark.parametrize("kind", ["fused", "foreach", "for-loop"])
def test_parameters_placed_in_the_declared_group_train_at_its_scheduled_lr(kind):
    optimizer, model = _declared(kind)
    schedule = sched.SequentialLR(  # what SequentialLR cannot do when a group is added late
        optimizer,
        [sched.LinearLR(optimizer, 0.1, total_iters=2), sched.CosineAnnealingLR(optimizer, 4)],
        milestones=[2],
    )
    adapter = nn.Parameter(torch.ones(3))
    for step in range(6):
        if step == 3:
            group = place_adapter_params(optimizer, [schedule], [adapter])
            assert group is optimizer.param_groups[1] and group["params"] == [adapter]
        loss = model(torch.ones(4)).sum() + (adapter.sum() if step >= 3 else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"]
    assert not torch.equal(adapter.detach(), torch.ones(3))
    assert len(schedule.get_last_lr()) == 2  # the scheduler was never edited


def test_placing_takes_the_parameters_out_of_other_groups_and_never_twice():
    model, adapter = nn.Linear(4, 4), nn.Linear(4, 2, bias=False)
    everything = [*model.parameters(), *adapter.parameters()]  # a resume: adapters restored
    optimizer = torch.optim.AdamW([{"params": everything}, adapter_param_group()], lr=1e-3)
    place_adapter_params(optimizer, [], adapter.parameters())
    place_adapter_params(optimizer, [], adapter.parameters())
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
    assert optimizer.param_groups[1]["params"] == [adapter.weight]


def test_without_a_declared_group_placing_adds_a_group_that_follows_the_schedule():
    model, extra = nn.Linear(4, 4), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = sched.LambdaLR(optimizer, lambda step: 0.5)
    group = place_adapter_params(optimizer, [schedule], [extra], lr=2e-3, weight_decay=0.1)
    assert (group["name"], group["initial_lr"], group["lr"]) == ("adapters", 2e-3, 1e-3)
    assert group["weight_decay"] == 0.1 and len(schedule.base_lrs) == 2


@pytest.mark.parametrize("place", [True, False], ids=["place", "check"])
def test_without_a_declared_group_an_unsupported_scheduler_error_shows_the_declaring_line(place):
    model, extra = nn.Linear(4, 4), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plateau = sched.ReduceLROnPlateau(optimizer)
    line = 'torch.optim.AdamW([{"params": self.parameters()}, adapter_param_group()], lr=...)'
    with pytest.raises(ValueError, match="follows ReduceLROnPlateau") as error:
        if place:
            place_adapter_params(optimizer, [plateau], [extra])
        else:
            check_adapter_placement(optimizer, [plateau])
    assert line in str(error.value)
    assert len(optimizer.param_groups) == 1


def test_any_scheduler_passes_the_check_once_the_group_is_declared():
    optimizer, _ = _declared("foreach")
    inner = [sched.ConstantLR(optimizer, 0.5), sched.ExponentialLR(optimizer, 0.9)]
    for schedule in (sched.ReduceLROnPlateau(optimizer), sched.ChainedScheduler(inner)):
        check_adapter_placement(optimizer, [schedule])


@pytest.mark.parametrize(
    ("group", "kwargs", "match"),
    [
        (adapter_param_group(lr=2e-3), {"lr": 5e-3}, r"base lr 0\.002, but lr=0\.005"),
        (adapter_param_group(), {"weight_decay": 0.1}, r"weight_decay 0\.0, but weight_decay=0\.1"),
        ({**adapter_param_group(), "params": [nn.Parameter(torch.zeros(1))]}, {}, "must be empty"),
    ],
    ids=["lr", "weight_decay", "not-empty"],
)
def test_a_declared_group_that_disagrees_with_the_caller_is_a_clear_error(group, kwargs, match):
    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW([{"params": model.parameters()}, group], lr=1e-2)
    with pytest.raises(ValueError, match=match):
        check_adapter_placement(optimizer, [sched.StepLR(optimizer, 2)], **kwargs)


def test_a_declared_group_s_base_lr_is_the_one_its_scheduler_recorded():
    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(
        [{"params": model.parameters()}, adapter_param_group(lr=2e-3)], lr=1e-2
    )
    sched.LinearLR(optimizer, start_factor=0.1)  # lr is now 2e-4; the base stays 2e-3
    check_adapter_placement(optimizer, [], lr=2e-3)


def test_two_groups_with_the_adapters_name_are_refused():
    model = nn.Linear(4, 4)
    groups = [{"params": [model.weight]}, adapter_param_group(), adapter_param_group()]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert param_group_named(optimizer, "missing") is None
    with pytest.raises(ValueError, match="2 param groups named 'adapters'"):
        place_adapter_params(optimizer, [], [model.bias])


def test_the_declared_group_must_be_the_last_one():
    model = nn.Linear(4, 4)
    groups = [adapter_param_group(), {"params": model.parameters()}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    with pytest.raises(ValueError, match=r"must be its last param group \(it is group 0 of 2\)"):
        check_adapter_placement(optimizer, [])


def test_an_empty_declared_group_set_aside_goes_back_to_its_place():
    model = nn.Linear(4, 4)
    groups = [{"params": [model.weight]}, {"params": [model.bias]}, adapter_param_group()]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    before = list(optimizer.param_groups)
    aside = set_aside_empty_group(optimizer, "adapters")
    assert aside is not None and len(optimizer.param_groups) == 2
    assert set_aside_empty_group(optimizer, "adapters") is None  # none left to set aside
    put_back_group(optimizer, aside)
    assert all(a is b for a, b in zip(optimizer.param_groups, before, strict=True))
    optimizer.param_groups[2]["params"].append(nn.Parameter(torch.zeros(2)))
    assert set_aside_empty_group(optimizer, "adapters") is None  # a filled group stays
