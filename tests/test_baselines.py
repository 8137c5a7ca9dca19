"""The SR-STE and one-shot baselines, each against its defining rule written out by hand.

* SR-STE: the mask is the N:M magnitude mask of the current dense weight (so it changes as
  the weight trains); the forward and the input gradient use W ⊙ M; the weight gradient is
  dYᵀX + λ (1 − M) ⊙ W, dense (straight through) with the decay of the pruned entries.
* One-shot: magnitude or Wanda (|W| · ‖X_j‖₂) N:M pruning once, then a fixed mask under any
  optimizer; Wanda's norms are those of each layer's real inputs.

References are float64 and independent of the library (``reference_nm_mask`` loops over
groups in numpy); shapes are odd (2, 13, 67 rows).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from conftest import reference_nm_mask
from slope_lightning.baselines import (
    FixedMaskLinear,
    SRSTELinear,
    oneshot_finalize,
    oneshot_prune,
    srste_finalize,
    srste_mask,
    srste_sparsify,
    wanda_input_norms,
    wanda_scores,
)
from slope_lightning.baselines.layers import straight_through_linear
from slope_lightning.models import Transformer, TransformerConfig

SHAPES = [(2, 8), (13, 16), (67, 36)]  # (d_out, d_in)
SMALL = {"n_layer": 1, "d_model": 64, "n_head": 2, "n_kv_head": 1, "seq_len": 16, "vocab_size": 96}
BLOCK_LINEARS = [
    "blocks.0.attn.q_proj",
    "blocks.0.attn.k_proj",
    "blocks.0.attn.v_proj",
    "blocks.0.attn.o_proj",
    "blocks.0.mlp.gate_proj",
    "blocks.0.mlp.up_proj",
    "blocks.0.mlp.down_proj",
]


def _layer(
    cls: type[SRSTELinear] | type[FixedMaskLinear],
    shape: tuple[int, int],
    generator: torch.Generator,
    **kw: Any,
) -> tuple[nn.Linear, Any]:
    d_out, d_in = shape
    linear = nn.Linear(d_in, d_out, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=generator, dtype=torch.float64))
        linear.bias.copy_(torch.randn(d_out, generator=generator, dtype=torch.float64))
    return linear, cls.from_linear(linear, **kw)


def _small_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_name("tiny", **SMALL))


def _module_names(model: nn.Module, cls: type[nn.Module]) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, cls)]


# ---------------------------------------------------------------------------------------------
# SR-STE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8)])
def test_srste_mask_is_the_nm_magnitude_mask_of_the_weight(
    shape: tuple[int, int], n: int, m: int, generator: torch.Generator
) -> None:
    weight = torch.randn(shape[0], 8 * (shape[1] // 4), generator=generator)
    assert torch.equal(srste_mask(weight, n, m), reference_nm_mask(weight, n, m))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay", [0.0, 2e-4, 0.5])
def test_srste_forward_and_gradients_equal_the_formula(
    shape: tuple[int, int], decay: float, generator: torch.Generator
) -> None:
    linear, layer = _layer(SRSTELinear, shape, generator, decay=decay)
    weight = linear.weight.detach().clone()
    x = torch.randn(3, 5, shape[1], generator=generator, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 5, shape[0], generator=generator, dtype=torch.float64)

    y = layer(x)
    y.backward(grad_out)

    mask = reference_nm_mask(weight, 2, 4)
    w_s = weight * mask
    x2, g2 = x.detach().reshape(-1, shape[1]), grad_out.reshape(-1, shape[0])
    torch.testing.assert_close(y, x.detach() @ w_s.t() + linear.bias.detach())
    torch.testing.assert_close(x.grad, (g2 @ w_s).reshape(x.shape))
    expected_dw = g2.t() @ x2 + decay * (~mask) * weight  # dense STE + sparse-refined decay
    torch.testing.assert_close(layer.weight.grad, expected_dw)
    torch.testing.assert_close(layer.bias.grad, g2.sum(0))
    # straight through: the pruned entries get the data gradient too
    assert (layer.weight.grad[~mask] != 0).all()


def test_srste_decay_shrinks_only_the_pruned_weights(generator: torch.Generator) -> None:
    """With no data gradient, one SGD step is W ← W − η λ (1 − M) ⊙ W."""
    linear, layer = _layer(SRSTELinear, (13, 16), generator, decay=0.1)
    before = linear.weight.detach().clone()
    mask = reference_nm_mask(before, 2, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    (0.0 * layer(torch.randn(4, 16, dtype=torch.float64)).sum()).backward()
    optimizer.step()
    after = layer.weight.detach()
    torch.testing.assert_close(after[mask], before[mask])
    torch.testing.assert_close(after[~mask], before[~mask] * (1 - 0.5 * 0.1))


def test_srste_mask_follows_the_weight_while_training(generator: torch.Generator) -> None:
    """Each forward uses the N:M mask of the weight as it is then, so the mask changes."""
    torch.manual_seed(0)
    layer = SRSTELinear(32, 16, n=2, m=4)
    target = nn.Linear(32, 16)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=3e-2)
    masks = []
    for _ in range(20):
        x = torch.randn(64, 32, generator=generator)
        masks.append(layer.mask())
        assert torch.equal(masks[-1], reference_nm_mask(layer.weight.detach(), 2, 4))
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flips = [int((a != b).sum()) for a, b in itertools.pairwise(masks)]
    assert sum(flips) > 0, "the mask never changed"
    assert all(int(mask.sum()) == 16 * 32 // 2 for mask in masks)


def test_srste_sparsify_converts_the_block_linears_and_finalizes_to_nm(
    generator: torch.Generator,
) -> None:
    model = _small_model()
    before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before the swap
    converted = srste_sparsify(model, decay=2e-4)
    assert converted == BLOCK_LINEARS == _module_names(model, SRSTELinear)
    assert all(p is before[name] for name, p in model.named_parameters())  # shared, not copied
    idx = torch.randint(0, 96, (2, 16), generator=generator)
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        logits, _ = model(idx)
    assert srste_finalize(model) == BLOCK_LINEARS
    assert _module_names(model, SRSTELinear) == []
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], logits)
    for name in BLOCK_LINEARS:
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear
        kept = (linear.weight != 0).reshape(linear.weight.shape[0], -1, 4).sum(-1)
        assert (kept <= 2).all()


def test_srste_errors_name_the_layer_and_value() -> None:
    with pytest.raises(ValueError, match=r"layer 'x': in_features \(d_in\)=6 is not divisible"):
        SRSTELinear(6, 4, name="x")
    with pytest.raises(ValueError, match="decay must be a number >= 0, got -1"):
        SRSTELinear(8, 4, decay=-1)
    with pytest.raises(ValueError, match="invalid N:M pattern 4:4"):
        SRSTELinear(8, 4, n=4, m=4)
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        SRSTELinear.from_linear(nn.Conv1d(4, 4, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="for a single layer use SRSTELinear.from_linear"):
        srste_sparsify(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="expected 8"):
        SRSTELinear(8, 4)(torch.randn(2, 4))


# ---------------------------------------------------------------------------------------------
# One-shot pruning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_oneshot_magnitude_prunes_once_in_place(
    shape: tuple[int, int], generator: torch.Generator
) -> None:
    linear, layer = _layer(FixedMaskLinear, shape, generator)
    assert layer.weight is linear.weight  # the dense layer is consumed
    dense = torch.randn(shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(dense)
    layer.prune_()
    mask = reference_nm_mask(dense, 2, 4)
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(layer.weight.detach(), dense * mask)
    assert layer.positions.dtype == torch.uint8
    assert layer.positions.shape == (shape[0], shape[1] // 4, 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_mask_gradients_and_training_keep_the_mask(
    shape: tuple[int, int], generator: torch.Generator
) -> None:
    _, layer = _layer(FixedMaskLinear, shape, generator)
    mask = layer.mask().clone()
    positions = layer.positions.clone()
    w_s = layer.weight.detach().clone()
    x = torch.randn(7, shape[1], generator=generator, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(7, shape[0], generator=generator, dtype=torch.float64)
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ w_s)  # exact input gradient
    torch.testing.assert_close(layer.weight.grad, (grad_out.t() @ x.detach()) * mask)
    # AdamW with weight decay and momentum: pruned entries stay exactly zero
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(7, shape[1], generator=generator, dtype=torch.float64)).pow(
            2
        ).sum().backward()
        optimizer.step()
    assert torch.equal(layer.positions, positions)
    assert (layer.weight.detach()[~mask] == 0).all()
    assert not torch.equal(layer.weight.detach()[mask], w_s[mask])  # the kept ones trained


def test_fixed_mask_state_dict_round_trip(generator: torch.Generator) -> None:
    _, layer = _layer(FixedMaskLinear, (13, 16), generator)
    fresh = FixedMaskLinear(16, 13, dtype=torch.float64)
    assert not torch.equal(fresh.mask(), layer.mask())
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.mask(), layer.mask())
    x = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x))
    torch.testing.assert_close(layer.to_linear()(x), layer(x))


def test_wanda_norms_are_the_input_feature_norms_of_each_layer(generator: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4)).double()
    batches = [torch.randn(5, 8, generator=generator, dtype=torch.float64) for _ in range(3)]
    model.train()
    norms = wanda_input_norms(model, batches)
    assert model.training and [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    inputs = torch.cat(batches)  # (15, 8)
    hidden = torch.relu(model[0](inputs)).detach()
    torch.testing.assert_close(norms["0"], inputs.norm(dim=0).float())
    torch.testing.assert_close(norms["2"], hidden.norm(dim=0).float())


def test_wanda_uses_input_norms_where_magnitude_does_not(generator: torch.Generator) -> None:
    """A loud input feature keeps its small weights under Wanda, not under magnitude."""
    weight = torch.randn(12, 16, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        weight[:, 0::4] *= 1e-3  # tiny weights on features 0, 4, 8, 12 ...
    norms = torch.ones(16, dtype=torch.float64)
    norms[0::4] = 1e6  # ... whose inputs are huge
    scores = wanda_scores(weight, norms)
    assert scores.dtype == torch.float32  # the one Wanda rule: scores in float32
    torch.testing.assert_close(scores, (weight.abs() * norms).float())
    magnitude = nn.Sequential(nn.Linear(16, 12, dtype=torch.float64))
    wanda = nn.Sequential(nn.Linear(16, 12, dtype=torch.float64))
    for model in (magnitude, wanda):
        with torch.no_grad():
            model[0].weight.copy_(weight)  # type: ignore[operator]
    oneshot_prune(magnitude, method="magnitude")
    oneshot_prune(wanda, method="wanda", input_norms={"0": norms})
    by_magnitude, by_wanda = magnitude[0].mask(), wanda[0].mask()  # type: ignore[operator]
    assert torch.equal(by_magnitude, reference_nm_mask(weight, 2, 4))
    assert torch.equal(by_wanda, reference_nm_mask(weight.abs() * norms, 2, 4))
    assert by_wanda[:, 0::4].all() and not by_magnitude[:, 0::4].any()


def test_oneshot_prune_a_transformer_by_wanda(generator: torch.Generator) -> None:
    model = _small_model()
    batches = [torch.randint(0, 96, (2, 16), generator=generator) for _ in range(2)]
    norms = wanda_input_norms(model, batches, forward=lambda model, batch: model(batch))
    assert sorted(norms) == sorted(BLOCK_LINEARS)
    assert _module_names(model, FixedMaskLinear) == []  # the recorders were swapped back
    assert oneshot_prune(model, method="wanda", input_norms=norms) == BLOCK_LINEARS
    for name in BLOCK_LINEARS:
        layer = model.get_submodule(name)
        assert isinstance(layer, FixedMaskLinear)
        expected = reference_nm_mask(wanda_scores(layer.weight, norms[name]), 2, 4)
        # (the kept entries are unchanged by pruning, so the scores still choose them)
        assert torch.equal(layer.mask(), expected)
    _, loss = model(batches[0], batches[0])
    assert torch.isfinite(loss)
    # finalized: plain Linears a dense Transformer loads, the same outputs
    with torch.no_grad():
        logits, _ = model(batches[0])
    assert oneshot_finalize(model) == BLOCK_LINEARS
    dense = _small_model()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dense(batches[0])[0], logits)


def test_calibration_swaps_back_on_error() -> None:
    model = nn.Sequential(nn.Linear(8, 8))

    def failing(model: nn.Module, batch: object) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        wanda_input_norms(model, [torch.randn(2, 8)], forward=failing)
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="no calibration batch"):
        wanda_input_norms(model, [])
    with pytest.raises(ValueError, match="'1' saw no calibration token"):
        two = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        wanda_input_norms(two, [torch.randn(2, 8)], forward=lambda model, x: model[0](x))


def test_oneshot_errors() -> None:
    with pytest.raises(ValueError, match="unknown one-shot method 'random'"):
        oneshot_prune(nn.Sequential(nn.Linear(8, 8)), method="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"method='wanda' needs the input norms.*\['0'\]"):
        oneshot_prune(nn.Sequential(nn.Linear(8, 8)), method="wanda")
    with pytest.raises(ValueError, match="expected the weight's"):
        FixedMaskLinear(8, 4).prune_(torch.ones(4, 4))
    with pytest.raises(ValueError, match="one norm per input feature"):
        wanda_scores(torch.ones(4, 8), torch.ones(4))


def test_the_straight_through_function_runs_a_backend_matmul_for_both_gemms() -> None:
    """The GPU path of the shared autograd Function (transposable's cuSPARSELt/CUTLASS), run
    on CPU with a stand-in matmul: the same outputs and gradients as the mask path."""
    torch.manual_seed(0)
    weight = torch.randn(8, 12, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    mask = torch.rand(8, 12) > 0.5
    x = torch.randn(2, 3, 12, requires_grad=True)
    calls: list[tuple[int, bool]] = []

    def stand_in(operands: tuple[torch.Tensor, ...], dense: torch.Tensor, rows: int, t: bool):
        calls.append((rows, t))
        w_s = weight.detach() * operands[0]  # (d_out, d_in)
        return dense @ (w_s if t else w_s.t())

    outputs = []
    for sparse_mm in (None, stand_in):
        y = straight_through_linear(x, weight, bias, (mask,), sparse_mm)
        y.square().sum().backward()
        outputs.append((y.detach(), x.grad, weight.grad, bias.grad))
        x.grad = weight.grad = bias.grad = None
    assert calls == [(8, False), (12, True)]  # Y = X W_sᵀ (d_out rows), dX = dY W_s (d_in)
    for reference, backend in zip(*outputs, strict=True):
        torch.testing.assert_close(backend, reference)
