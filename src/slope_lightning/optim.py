"""The optimizer side of training: AdamW with nanoGPT's weight-decay rule, the warmup-then-decay
schedule, and where parameters that join a running optimizer (LazyLoRA's adapters) go.

Plain torch (no Lightning): :class:`~slope_lightning.module.SLoPeModule` builds its optimizer
with :func:`build_adamw`, and :class:`~slope_lightning.callbacks.LazyLoRA` puts the adapters'
parameters into the optimizer with :func:`place_adapter_params`: into the empty group that
:func:`adapter_param_group` declared when the optimizer was built (any scheduler), else into a
new group that follows the schedule (:func:`add_param_group_following_schedule`); any training
loop can do the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

from slope_lightning.sparse.config import config_from_dict

Schedule = Literal["cosine", "linear", "constant"]
_SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (YAML section ``model.optimizer``).

    Every value is validated when the config is built; a bad one raises a ``ValueError``
    naming the field.

    Attributes:
        lr: peak learning rate.
        weight_decay: applied to matrices (rank >= 2: linear values, embeddings) only;
            biases and norm gains are not decayed.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup: warmup length: a fraction of max_steps if < 1 (the paper: 1%), else steps.
        schedule: decay after warmup: "cosine", "linear" (the paper) or "constant".
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        fused: use torch's fused AdamW (None: when all parameters are on CUDA).
        embedding_lr_scale: the learning rate of every ``nn.Embedding`` weight (the token
            embedding, and an output head tied to it) as a multiple of ``lr``, in a group of
            its own (``"embedding"``, decayed like the other matrices) that follows the same
            schedule. 1.0 (the default): one group for every matrix. One lr serves both
            poorly in small models: an embedding row moves only when its token occurs, while
            the block matrices move at every step (see docs/quality.md, where this matters).
    """

    lr: float = 6e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup: float = 0.01
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.1
    fused: bool | None = None
    embedding_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        """Validate every field; ``betas`` given as a list (YAML, JSON) becomes a tuple.

        Raises:
            ValueError: ``lr``, ``eps`` or ``embedding_lr_scale`` not positive,
                ``weight_decay`` or ``warmup`` negative, ``min_lr_ratio`` outside [0, 1], a
                beta outside [0, 1), or an unknown ``schedule``.
        """
        object.__setattr__(self, "betas", tuple(self.betas))
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps must be positive, got {self.eps}")
        if not (self.embedding_lr_scale > 0 and math.isfinite(self.embedding_lr_scale)):
            raise ValueError(
                "optimizer.embedding_lr_scale must be a positive number (1.0: the embedding "
                f"at lr), got {self.embedding_lr_scale}"
            )
        if self.warmup < 0:
            raise ValueError(
                f"optimizer.warmup must be >= 0 (fraction < 1, or steps), got {self.warmup}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"optimizer.schedule must be one of {_SCHEDULES}, got {self.schedule!r}"
            )

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of ``total_steps`` (at least 1)."""
        warmup = self.warmup if self.warmup >= 1 else self.warmup * total_steps
        return max(1, round(warmup))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON/YAML values (``betas`` as a list)."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimizerConfig:
        """Rebuild a config from :meth:`to_dict` output (a checkpoint's hyperparameters).

        Raises:
            ValueError: a key that is not a field (the message lists the fields), or a bad value.
        """
        return config_from_dict(cls, data, "OptimizerConfig")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then the configured decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters split as (decayed, not decayed): matrices decay, vectors (biases,
    norm gains) do not (nanoGPT's rule, by tensor rank)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return decay, no_decay


def embedding_weights(model: nn.Module) -> list[Tensor]:
    """The trainable weights of ``model``'s ``nn.Embedding`` modules, each once (a tied
    output head shares its embedding's)."""
    found: dict[int, Tensor] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            found.setdefault(id(module.weight), module.weight)
    return list(found.values())


def describe_param_groups(optimizer: Optimizer) -> str:
    """One line for the log: each group's name, tensors, values and base learning rate."""
    return ", ".join(
        f"{group.get('name', index)}: {len(group['params'])} tensors "
        f"({sum(p.numel() for p in group['params'])} values, "
        f"lr {group.get('initial_lr', group['lr']):g})"
        for index, group in enumerate(optimizer.param_groups)
    )


def build_adamw(
    model: nn.Module, cfg: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.AdamW, sched.LambdaLR]:
    """AdamW over ``model`` with groups ``"decay"`` and ``"no_decay"`` (and ``"embedding"``,
    at ``lr * embedding_lr_scale``, when that scale is not 1), and its LambdaLR schedule.

    Args:
        model: the module whose trainable parameters are optimized.
        cfg: optimizer and schedule settings.
        total_steps: optimizer steps of the run (the schedule decays over them).

    Raises:
        ValueError: ``total_steps`` < 1.
    """
    if total_steps < 1:
        raise ValueError(f"the schedule needs a positive number of steps, got {total_steps}")
    decay, no_decay = decay_groups(model)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if cfg.embedding_lr_scale != 1.0:
        embeddings = {id(p) for p in embedding_weights(model)}
        groups[0]["params"] = [p for p in decay if id(p) not in embeddings]
        groups.append(
            {
                "params": [p for p in decay if id(p) in embeddings],
                "weight_decay": cfg.weight_decay,
                "lr": cfg.lr * cfg.embedding_lr_scale,
                "name": "embedding",
            }
        )
    fused = cfg.fused
    if fused is None:
        fused = all(p.device.type == "cuda" for p in model.parameters())
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=fused or None,
    )
    warmup_steps = cfg.warmup_steps(total_steps)

    def multiplier(step: int) -> float:
        return lr_multiplier(step, warmup_steps, total_steps, cfg)

    return optimizer, sched.LambdaLR(optimizer, multiplier)


# ---------------------------------------------------------------------- adding a param group

# Schedulers whose factor applies to every group alike, so that a new group's learning rate
# is its base lr times the reference group's current lr / base lr, and stays proportional at
# every later step: they read only group["lr"], base_lrs and shared settings. LambdaLR and
# MultiplicativeLR also keep one lambda per group (lr_lambdas).
_LAMBDA_SCHEDULERS: tuple[type, ...] = (sched.LambdaLR, sched.MultiplicativeLR)
_PROPORTIONAL_SCHEDULERS: tuple[type, ...] = (
    sched.StepLR,
    sched.MultiStepLR,
    sched.ConstantLR,
    sched.LinearLR,
    sched.ExponentialLR,
    sched.PolynomialLR,
)
_ETA_MIN_SCHEDULERS: tuple[type, ...] = (sched.CosineAnnealingLR, sched.CosineAnnealingWarmRestarts)
# OneCycleLR interpolates between per-group keys; scaled copies of them keep proportionality.
_ONE_CYCLE_LR_KEYS: tuple[str, ...] = ("initial_lr", "max_lr", "min_lr")
_ONE_CYCLE_MOMENTUM_KEYS: tuple[str, ...] = ("max_momentum", "base_momentum")

SUPPORTED_SCHEDULERS: tuple[str, ...] = tuple(
    cls.__name__
    for cls in (
        *_LAMBDA_SCHEDULERS,
        *_PROPORTIONAL_SCHEDULERS,
        *_ETA_MIN_SCHEDULERS,
        sched.OneCycleLR,
    )
)
"""Names of the torch schedulers :func:`add_param_group_following_schedule` can extend."""

_FIX = (
    "create the group (empty) when the optimizer is built, so the scheduler sees it from "
    "its construction (see adapter_param_group), or write the schedule as one LambdaLR "
    "(lr_lambda = the multiplier as a function of the step), which any number of param "
    "groups can follow"
)


def _why_not_extendable(scheduler: object) -> str | None:
    """None if a new group can follow ``scheduler`` exactly, else the reason it cannot."""
    kind = type(scheduler)
    if kind in (*_LAMBDA_SCHEDULERS, *_PROPORTIONAL_SCHEDULERS, sched.OneCycleLR):
        return None
    if kind in _ETA_MIN_SCHEDULERS:
        eta_min = getattr(scheduler, "eta_min", 0.0)
        if eta_min == 0:
            return None
        return (
            f"with eta_min={eta_min} its learning rates are not proportional to the base lrs, "
            "so a group joining mid-run has no well-defined place on it; use eta_min=0, or " + _FIX
        )
    if kind in (sched.SequentialLR, sched.ChainedScheduler):
        return (
            "it drives several inner schedulers whose per-group state cannot be extended "
            "through their public fields; " + _FIX
        )
    if kind is sched.ReduceLROnPlateau:
        return (
            "it records no base learning rate, so the factor it has applied so far (and "
            "hence the new group's lr) is unknown; " + _FIX + ", or add the group before "
            "training starts"
        )
    if kind is sched.CyclicLR:
        return "it keeps per-group cycle bounds (max_lrs, momentums); " + _FIX
    return (
        "it is not one of the schedulers this function knows to extend exactly "
        f"({', '.join(SUPPORTED_SCHEDULERS)}); " + _FIX
    )


def _bound_scheduler(optimizer: Optimizer, schedulers: Iterable[object]) -> object | None:
    """The one scheduler of ``schedulers`` that drives ``optimizer`` (None if none does)."""
    bound = [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
    if len(bound) > 1:
        names = ", ".join(type(s).__name__ for s in bound)
        raise ValueError(
            f"cannot add a param group that follows the schedule: {len(bound)} schedulers "
            f"({names}) drive the same optimizer; " + _FIX
        )
    return bound[0] if bound else None


def check_schedule_extendable(optimizer: Optimizer, schedulers: Iterable[object]) -> None:
    """Raise now what :func:`add_param_group_following_schedule` would raise later.

    For callers that add a group late in a run (LazyLoRA at 99% of the steps): call this
    before the first step, so an unsupported scheduler fails before any compute is spent.

    Raises:
        ValueError: the scheduler driving ``optimizer`` cannot be extended (the message
            names its class and what to use instead), or several schedulers drive it.
    """
    scheduler = _bound_scheduler(optimizer, schedulers)
    if scheduler is None:
        return
    reason = _why_not_extendable(scheduler)
    if reason is not None:
        raise ValueError(
            f"cannot add a param group that follows {type(scheduler).__name__}: {reason}"
        )


def add_param_group_following_schedule(
    optimizer: Optimizer,
    schedulers: Iterable[object],
    params: Iterable[Tensor],
    *,
    name: str = "adapters",
    lr: float | None = None,
    weight_decay: float = 0.0,
    reference_group: int = 0,
) -> dict[str, Any]:
    """Add a param group to a running optimizer that follows the learning-rate schedule.

    **The rule.** The new group behaves from now on exactly as if it had been in the
    optimizer from the first step with base learning rate ``lr``, under the same schedule as
    group ``reference_group``. So ``lr`` is a *base* (peak) learning rate, like the
    optimizer's own ``lr``: the schedule scales it by the factor it applies to the reference
    group now and at every later step. Joining at 99% of a cosine schedule that decays to 10%
    of the peak, the group starts near ``0.1 * lr``. ``lr=None`` takes the reference group's
    base lr, so the new group's lr equals the reference group's at every step.

    Only public state is written: the new group's keys, and the scheduler's ``base_lrs``
    (and ``lr_lambdas`` for LambdaLR / MultiplicativeLR: the new group follows the reference
    group's lambda). The scheduler's ``get_last_lr()`` lists the new group from its next
    ``step()`` on. Supported: the schedulers in :data:`SUPPORTED_SCHEDULERS` (the cosine ones
    with ``eta_min=0``); any other raises before anything is changed. LambdaLR gives the
    uninterrupted run's learning rates bit for bit; the others agree to rounding.

    Parameters already in another group of ``optimizer`` are taken out of it first (a resumed
    run whose ``configure_optimizers`` saw restored adapters), so the group layout equals
    the uninterrupted run's.

    Args:
        optimizer: the running optimizer (a torch Optimizer, not Lightning's wrapper).
        schedulers: the run's LR schedulers; the one whose ``optimizer`` is ``optimizer`` is
            extended (none: the group keeps its base lr).
        params: the parameters of the new group.
        name: the group's ``"name"`` (LearningRateMonitor logs it as ``lr-AdamW/<name>``).
        lr: the group's base learning rate (None: the reference group's).
        weight_decay: the group's weight decay.
        reference_group: index of the group whose schedule the new group follows.

    Returns:
        The new param group (the optimizer's last).

    Raises:
        ValueError: no parameters, a non-positive ``lr``, a bad ``reference_group``, a group
            called ``name`` already, a reference group with base lr 0, or a scheduler that
            cannot be extended (the message names its class and what to use instead).

    Example:
        >>> model = nn.Linear(4, 4)
        >>> opt = torch.optim.AdamW([model.weight], lr=1e-3)
        >>> schedule = sched.LambdaLR(opt, lambda step: 0.5)
        >>> group = add_param_group_following_schedule(opt, [schedule], [model.bias], lr=2e-3)
        >>> group["lr"], group["name"]
        (0.001, 'adapters')
    """
    params = list(params)
    if not params:
        raise ValueError(f"add_param_group_following_schedule({name!r}): no parameters given")
    if lr is not None and not lr > 0:
        raise ValueError(f"add_param_group_following_schedule({name!r}): lr must be > 0, got {lr}")
    groups = optimizer.param_groups
    if not 0 <= reference_group < len(groups):
        raise ValueError(
            f"reference_group={reference_group} is not a group index of an optimizer with "
            f"{len(groups)} param group(s)"
        )
    if any(group.get("name") == name for group in groups):
        raise ValueError(
            f"the optimizer already has a param group named {name!r}; give another name"
        )
    scheduler = _bound_scheduler(optimizer, schedulers)
    check_schedule_extendable(optimizer, [scheduler] if scheduler is not None else [])
    ref = groups[reference_group]
    if scheduler is not None:
        ref_base = float(scheduler.base_lrs[reference_group])  # type: ignore[attr-defined]
    else:
        ref_base = float(ref.get("initial_lr", ref["lr"]))
    if not ref_base > 0:
        raise ValueError(
            f"param group {reference_group} has base learning rate {ref_base}; a new group "
            "cannot follow a schedule relative to 0 (choose another reference_group)"
        )
    base = ref_base if lr is None else float(lr)
    scale = base / ref_base
    if isinstance(scheduler, sched.LambdaLR):
        # The closed form, as LambdaLR computes it: bit-equal to the uninterrupted run.
        now = base * scheduler.lr_lambdas[reference_group](scheduler.last_epoch)
    else:
        now = float(ref["lr"]) * scale
    group: dict[str, Any] = {
        "params": params,
        "lr": now,
        "initial_lr": base,
        "weight_decay": weight_decay,
        "name": name,
    }
    if isinstance(scheduler, sched.OneCycleLR):
        group.update({key: float(ref[key]) * scale for key in _ONE_CYCLE_LR_KEYS})
        if scheduler.cycle_momentum:
            group.update({key: ref[key] for key in _ONE_CYCLE_MOMENTUM_KEYS})
            if scheduler.use_beta1:
                group["betas"] = (ref["betas"][0], *optimizer.defaults["betas"][1:])
            else:
                group["momentum"] = ref["momentum"]

    ids = {id(p) for p in params}
    for other in groups:
        if any(id(p) in ids for p in other["params"]):
            other["params"] = [p for p in other["params"] if id(p) not in ids]
    optimizer.add_param_group(group)
    if scheduler is not None:
        scheduler.base_lrs.append(base)  # type: ignore[attr-defined]
        if isinstance(scheduler, sched.LambdaLR | sched.MultiplicativeLR):
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[reference_group])
    return optimizer.param_groups[-1]


# ------------------------------------------------------------- the adapters' declared group

ADAPTER_GROUP = "adapters"
"""The ``"name"`` of the adapters' param group (LearningRateMonitor logs ``lr-<opt>/adapters``)."""

_DECLARE = (
    "declare the adapters' param group (empty) where the optimizer is built, and every "
    "torch scheduler follows it from its construction: "
    'torch.optim.AdamW([{"params": self.parameters()}, adapter_param_group()], lr=...) '
    "(from slope_lightning.optim import adapter_param_group)"
)


def adapter_param_group(lr: float | None = None, weight_decay: float = 0.0) -> dict[str, Any]:
    """An empty param group named ``"adapters"``, to put in an optimizer when it is built.

    Adapters switched on late (:class:`~slope_lightning.callbacks.LazyLoRA`) have no
    parameters when ``configure_optimizers`` runs. Declared now, empty, their group is seen by
    every scheduler from its construction like any other group, and nothing is edited when
    the parameters arrive (:func:`place_adapter_params` appends them): every scheduler in
    ``torch.optim.lr_scheduler`` works, SequentialLR and ReduceLROnPlateau included. Put it
    last (checked before training): torch's distributed checkpoint loader (FSDP2) maps an
    empty group to the checkpoint's last one.

    Args:
        lr: the group's base learning rate (None: the optimizer's ``lr``). Schedulers that
            set per-group bounds themselves (CyclicLR, OneCycleLR) take them from their own
            arguments, as for any group.
        weight_decay: the group's weight decay (adapters are usually not decayed).

    Raises:
        ValueError: a non-positive ``lr`` or a negative ``weight_decay``.

    Example:
        >>> model = nn.Linear(4, 4)
        >>> opt = torch.optim.AdamW([{"params": model.parameters()}, adapter_param_group()])
        >>> [len(group["params"]) for group in opt.param_groups], opt.param_groups[1]["name"]
        ([2, 0], 'adapters')
    """
    if lr is not None and not lr > 0:
        raise ValueError(f"adapter_param_group(lr={lr}): the learning rate must be positive")
    if weight_decay < 0:
        raise ValueError(f"adapter_param_group(weight_decay={weight_decay}): must be >= 0")
    group: dict[str, Any] = {"params": [], "name": ADAPTER_GROUP, "weight_decay": weight_decay}
    if lr is not None:
        group["lr"] = lr
    return group


def param_group_named(optimizer: Optimizer, name: str) -> dict[str, Any] | None:
    """The param group of ``optimizer`` whose ``"name"`` is ``name`` (None if there is none).

    Raises:
        ValueError: several groups have that name.
    """
    found = [group for group in optimizer.param_groups if group.get("name") == name]
    if len(found) > 1:
        raise ValueError(f"the optimizer has {len(found)} param groups named {name!r}; keep one")
    return found[0] if found else None


def check_adapter_placement(
    optimizer: Optimizer,
    schedulers: Iterable[object],
    *,
    name: str = ADAPTER_GROUP,
    lr: float | None = None,
    weight_decay: float | None = None,
) -> None:
    """Raise before the first step what :func:`place_adapter_params` would raise later, and
    check that ``lr`` / ``weight_decay`` (None: not asked for) agree with a declared group's
    (its base lr: the ``initial_lr`` a scheduler recorded, else its ``lr``).

    Raises:
        ValueError: the declared group is not empty or not the last group, or its base lr
            or weight decay differs from ``lr`` / ``weight_decay`` (the message names both);
            or, with no declared group, a scheduler the new group cannot follow (the
            message shows the one line that declares the group).
    """
    group = param_group_named(optimizer, name)
    if group is None:
        try:
            check_schedule_extendable(optimizer, schedulers)
        except ValueError as error:
            raise ValueError(f"{error}. Or, for any scheduler: {_DECLARE}") from None
        return
    index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
    if index != len(optimizer.param_groups) - 1:
        # torch's distributed-checkpoint loader (FSDP2) maps an optimizer's empty group to
        # the checkpoint's last group, whichever group is empty there.
        raise ValueError(
            f"the optimizer's param group {name!r} must be its last param group (it is group "
            f"{index} of {len(optimizer.param_groups)}): put "
            "adapter_param_group() at the end of the list of groups"
        )
    if group["params"]:
        raise ValueError(
            f"the optimizer's param group {name!r} must be empty before training (its "
            f"parameters are added when the adapters are switched on), but it holds "
            f"{len(group['params'])} tensor(s); declare it with adapter_param_group()"
        )
    base = float(group.get("initial_lr", group["lr"]))
    if lr is not None and base != lr:
        raise ValueError(
            f"the optimizer's param group {name!r} has base lr {base}, but lr={lr} was asked "
            f"for; the declared group's settings are the ones used: give the same value to "
            f"both (adapter_param_group(lr={lr})), or leave lr unset"
        )
    if weight_decay is not None and group["weight_decay"] != weight_decay:
        raise ValueError(
            f"the optimizer's param group {name!r} has weight_decay {group['weight_decay']}, "
            f"but weight_decay={weight_decay} was asked for; give the same value to both "
            f"(adapter_param_group(weight_decay={weight_decay})), or leave it unset"
        )


def place_adapter_params(
    optimizer: Optimizer,
    schedulers: Iterable[object],
    params: Iterable[Tensor],
    *,
    name: str = ADAPTER_GROUP,
    lr: float | None = None,
    weight_decay: float | None = None,
) -> dict[str, Any]:
    """Put parameters that join a running optimizer (adapters) into their own param group.

    - If the optimizer has a group called ``name`` (:func:`adapter_param_group`), the
      parameters are appended to it: every scheduler has followed it since its construction,
      so nothing else changes, and it keeps its own lr and weight decay.
    - Otherwise a new group that follows the schedule is added, with base lr ``lr`` (None:
      group 0's) and ``weight_decay`` (None: 0), by
      :func:`add_param_group_following_schedule` (only the schedulers it supports).

    Either way the parameters are first taken out of any other group (a resumed run whose
    ``configure_optimizers`` saw restored adapters), so the layout equals the uninterrupted
    run's and a checkpoint's optimizer state loads onto it.

    Returns:
        The group now holding ``params``.

    Raises:
        ValueError: no parameters, or (no declared group) a scheduler the new group cannot
            follow; the message shows the one line that declares the group.

    Example:
        >>> model, adapter = nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        >>> opt = torch.optim.AdamW([{"params": model.parameters()}, adapter_param_group()])
        >>> plateau = sched.ReduceLROnPlateau(opt)
        >>> group = place_adapter_params(opt, [plateau], adapter.parameters())
        >>> group is opt.param_groups[1], len(group["params"])
        (True, 1)
    """
    params = list(params)
    if not params:
        raise ValueError(f"place_adapter_params({name!r}): no parameters given")
    schedulers = list(schedulers)
    group = param_group_named(optimizer, name)
    if group is None:
        check_adapter_placement(optimizer, schedulers, name=name)  # shows the declaring line
        return add_param_group_following_schedule(
            optimizer,
            schedulers,
            params,
            name=name,
            lr=lr,
            weight_decay=0.0 if weight_decay is None else weight_decay,
        )
    ids = {id(p) for p in params}
    for other in optimizer.param_groups:
        if other is not group and any(id(p) in ids for p in other["params"]):
            other["params"] = [p for p in other["params"] if id(p) not in ids]
    held = {id(p) for p in group["params"]}
    group["params"].extend(p for p in params if id(p) not in held)
    return group


def set_aside_empty_group(optimizer: Optimizer, name: str) -> tuple[int, dict[str, Any]] | None:
    """Take the empty param group ``name`` out of ``optimizer`` until :func:`put_back_group`
    (None, nothing changed: no such group, or not empty).

    Why: torch's distributed-checkpoint loader (FSDP2) refuses an optimizer's empty group
    unless the checkpoint has one empty group too, which one taken after the adapters' start
    has not. Set aside, the group is skipped as if absent; load again once it is back.
    """
    group = param_group_named(optimizer, name)
    if group is None or group["params"]:
        return None
    index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
    optimizer.param_groups.pop(index)
    return index, group


def put_back_group(optimizer: Optimizer, aside: tuple[int, dict[str, Any]]) -> None:
    """Put a group taken out by :func:`set_aside_empty_group` back at its place."""
    index, group = aside
    optimizer.param_groups.insert(index, group)
