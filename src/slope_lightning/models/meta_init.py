"""Meta-device initialisation: build and sparsify a model with no memory, shard it, then give
each rank its own rows of exactly the parameters the ordinary build would have drawn.

The ordinary build (:func:`~slope_lightning.models.build_model`) draws every dense weight
from the global RNG in :meth:`Transformer.init_weights`' order, then prunes each linear
weight N:M along d_in by magnitude. Under FSDP2 every rank then holds the whole dense model
before sharding it. Here the model is built on the ``meta`` device instead, and after
``fully_shard`` :func:`materialize` replays the same random stream on a private generator, one
transient full tensor at a time, keeping only this rank's rows of each: a row's M_R needs
only that row, so the rank prunes its own rows; M_C comes from the sharded refresh
(:func:`~slope_lightning.sparse.sharded.refresh_sharded`, packed mask bytes only). The
parameters, masks and the global RNG afterwards are bit for bit the ordinary build's.

Host memory per rank: its shard plus the largest single tensor (the embedding, typically).
Time: every rank draws the whole model's random numbers twice (once in :func:`build_on_meta`
to move the global RNG on as the ordinary build does, once in :func:`materialize`).

Given dense weights instead of the plan (a :class:`~slope_lightning.sparse.dense_rows.DenseRows`,
e.g. a ``.safetensors`` file read by rows), :func:`materialize` loads each rank's rows of them
and prunes them by magnitude: the parameters and masks of the ordinary build with those
weights loaded into it (``InitFromPretrained(mask_method="magnitude")``), bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slope_lightning.models.build import build_model
from slope_lightning.models.config import TransformerConfig
from slope_lightning.models.transformer import RESIDUAL_PROJECTIONS, Transformer, rope_cache
from slope_lightning.sparse import SparseLinear, SparsifyReport, sparse_layers
from slope_lightning.sparse.config import SparsityConfig
from slope_lightning.sparse.dense_rows import (
    DenseRows,
    allocate,
    load_dense_rows,
    require_masks_sharded_with_values,
    write_sparse_rows,
)
from slope_lightning.sparse.dtensor import local_part, local_rows

__all__ = ["InitPlan", "build_on_meta", "materialize"]


@dataclass(frozen=True)
class Draw:
    """One draw of the ordinary build from the global RNG, of a dense ``shape`` in ``dtype``:
    ``normal_(0, std)`` of ``module``'s weight in :meth:`Transformer.init_weights`, or (with
    ``module`` empty: drawn only to move the generator on) a draw of the ``nn.Linear`` and
    ``nn.Embedding`` constructors, which ``init_weights`` overwrites."""

    module: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    std: float
    uniform: bool = False


@dataclass(frozen=True)
class InitPlan:
    """What :func:`materialize` needs to reproduce the ordinary build's parameters.

    Attributes:
        rng_state: the global CPU RNG state the ordinary build would have started from.
        draws: every normal draw, in the ordinary build's order (a later draw of the same
            module overwrites an earlier one, as there).
        constants: (parameter name, value) of the parameters set to a constant (biases 0,
            norm weights 1, norm biases 0).
    """

    rng_state: Tensor
    draws: tuple[Draw, ...]
    constants: tuple[tuple[str, float], ...]


def build_on_meta(
    config: TransformerConfig, sparsity: SparsityConfig | None
) -> tuple[Transformer, SparsifyReport | None, InitPlan]:
    """:func:`~slope_lightning.models.build_model` on the ``meta`` device, and the plan that
    :func:`materialize` initialises it from.

    The global RNG is moved on as the ordinary build moves it (its draws replayed on
    transient tensors, one at a time), so whatever draws next (data order, dropout,
    adapters) draws what it would have.

    Raises:
        ValueError: ``sparsity.mask_method`` is not "magnitude" (a random mask draws from
            the global RNG while the layers are built, which a meta build cannot replay).
    """
    if sparsity is not None and sparsity.sparse and sparsity.mask_method != "magnitude":
        raise ValueError(
            f"meta_init supports sparsity.mask_method='magnitude' only, got "
            f"{sparsity.mask_method!r}; set model.meta_init: false for this run"
        )
    rng_state = torch.random.get_rng_state()
    with torch.device("meta"):
        model, report = build_model(config, sparsity)
    plan = InitPlan(rng_state, _draws(model), _constants(model))
    generator = torch.Generator().manual_seed(0)
    generator.set_state(rng_state)
    for draw in plan.draws:
        _draw(draw, generator)  # discarded: only the generator moves on
    torch.random.set_rng_state(generator.get_state())
    return model, report, plan


@torch.no_grad()
def materialize(model: Transformer, init: InitPlan | DenseRows, device: torch.device) -> None:
    """Allocate ``model`` (built by :func:`build_on_meta`, sharded by FSDP2 or not) on
    ``device`` and initialise what this rank holds: bit for bit as the ordinary build from
    an :class:`InitPlan`, or from dense weights (a
    :class:`~slope_lightning.sparse.dense_rows.DenseRows`), this rank's rows of them read
    and pruned by magnitude (see :func:`~slope_lightning.sparse.dense_rows.load_dense_rows`).

    Under FSDP2 this is a collective (M_C's sharded refresh): every rank calls it. Call it
    after ``fully_shard`` and before the first forward. Lightning calls ``configure_model``
    under a ``meta`` default device, so every new tensor here names its device.

    Raises:
        ValueError: a parameter the plan does not initialise (the model's layout has
            changed since :func:`build_on_meta`), or one not sharded by rows, or sharded
            values beside replicated masks (before anything is allocated); dense weights
            that do not fit (see :func:`~slope_lightning.sparse.dense_rows.load_dense_rows`).
    """
    require_masks_sharded_with_values(model)  # before anything is allocated
    with torch.device(device):
        allocate(model, device)
        if isinstance(init, InitPlan):
            _initialise(model, init)
        else:
            load_dense_rows(model, init)  # M_C included
        if model.rope_cos is not None and model.rope_sin is not None:
            cfg = model.config
            cos, sin = rope_cache(cfg.seq_len, cfg.head_dim, cfg.rope_theta, device=device)
            model.rope_cos.copy_(cos)
            model.rope_sin.copy_(sin)


def _initialise(model: Transformer, plan: InitPlan) -> None:
    covered = {name for name, _ in plan.constants}
    generator = torch.Generator().manual_seed(0)
    generator.set_state(plan.rng_state)
    last = {draw.module: index for index, draw in enumerate(plan.draws)}
    for index, draw in enumerate(plan.draws):
        full = _draw(draw, generator)  # (rows, cols): transient
        if not draw.module or last[draw.module] != index:
            continue  # overwritten by a later draw, as in the ordinary build
        module = model.get_submodule(draw.module)
        if isinstance(module, SparseLinear):
            write_sparse_rows(module, full[local_rows(module.values, module.name)])
            covered |= {f"{draw.module}.{p}" for p in ("values", "row_index", "col_index")}
        else:
            weight = module.get_parameter("weight")
            local_part(weight).copy_(full[local_rows(weight, draw.module)])
            covered.add(f"{draw.module}.weight")
    for name, value in plan.constants:
        local_part(model.get_parameter(name)).fill_(value)
    missing = [name for name, _ in model.named_parameters() if name not in covered]
    if missing:
        raise ValueError(
            f"meta_init does not know how to initialise {missing}; the model's layout differs "
            "from the one models/meta_init.py mirrors (Transformer.init_weights): update it, "
            "or set model.meta_init: false"
        )
    for _, layer in sparse_layers(model):
        layer.refresh_transpose_mask(with_stats=False)  # M_C; a collective when sharded


def _draws(model: Transformer) -> tuple[Draw, ...]:
    """The draws of the ordinary build of ``model`` (sparsified or not: a SparseLinear stands
    where its nn.Linear stood, and its dense weight is drawn): the layers' constructors in
    the order they are built (the order they are registered in), then
    :meth:`Transformer.init_weights`."""
    draws = _constructor_draws(model)
    std = model.config.init_std
    linears: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, SparseLinear)):
            linears.append((name, module))
            draws.append(_linear_draw(name, module, std))
        elif isinstance(module, nn.Embedding):
            weight = module.weight
            draws.append(Draw(name, tuple(weight.shape), weight.dtype, std))
    residual = [(n, m) for n, m in linears if n.endswith(RESIDUAL_PROJECTIONS)]
    draws += [_linear_draw(n, m, model.residual_std()) for n, m in residual]
    return tuple(draws)


def _constructor_draws(model: Transformer) -> list[Draw]:
    """``nn.Embedding``'s ``normal_(0, 1)``, ``nn.Linear``'s ``kaiming_uniform_`` weight and
    uniform bias, in construction order: only their consumption of the RNG matters."""
    draws: list[Draw] = []
    for _, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            draws.append(Draw("", tuple(module.weight.shape), module.weight.dtype, 1.0))
        elif isinstance(module, (nn.Linear, SparseLinear)):
            weight = _linear_draw("", module, 1.0)
            draws.append(Draw("", weight.shape, weight.dtype, 1.0, uniform=True))
            if module.bias is not None:
                draws.append(Draw("", (weight.shape[0],), weight.dtype, 1.0, uniform=True))
    return draws


def _linear_draw(name: str, module: nn.Module, std: float) -> Draw:
    if isinstance(module, SparseLinear):
        shape = (module.out_features, module.in_features)
        return Draw(name, shape, module.values.dtype, std)
    weight = module.get_parameter("weight")
    return Draw(name, tuple(weight.shape), weight.dtype, std)


def _constants(model: Transformer) -> tuple[tuple[str, float], ...]:
    """Biases of linear layers (0) and norm weights (1) and biases (0), by parameter name."""
    out: list[tuple[str, float]] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Linear, SparseLinear)) and module.bias is not None:
            out.append((f"{prefix}bias", 0.0))
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            for param_name, _ in module.named_parameters(recurse=False):
                out.append((f"{prefix}{param_name}", 1.0 if param_name == "weight" else 0.0))
    return tuple(out)


def _draw(draw: Draw, generator: torch.Generator) -> Tensor:
    """The full dense tensor of one draw, on the CPU (where the ordinary build draws)."""
    out = torch.empty(draw.shape, dtype=draw.dtype, device="cpu")
    if draw.uniform:  # the bounds do not change what is consumed
        return out.uniform_(-draw.std, draw.std, generator=generator)
    return out.normal_(0.0, draw.std, generator=generator)
